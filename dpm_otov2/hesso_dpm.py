"""only-train-once 3.0.1's HESSO, device-agnostic, optionally with the Decay Pruning Method.

HESSO (OTOv3) picks redundant zero-invariant groups by importance scores once per pruning
period and then shrinks them *linearly* to zero over the period ("forgetting"), after which
they are projected to zero for good. Its own code builds a mask with ``.cuda()``;
:class:`HESSO` runs that call under :func:`dpm_otov2.compat.params_device`, so it works on the
CPU and on any GPU.

``decay=DecayConfig(...)`` replaces the linear forgetting by the Decay Pruning Method: the
groups HESSO selects in a period are marked in a :class:`dpm_core.DecayEngine` (right after
that step) and decay over N steps with Self-Rectifying instead. HESSO adds no penalty to
the gradient, so the SR criteria are penalty-free as they are. A released group is taken
out of HESSO's list of pruned groups, so it trains normally and may be selected again in a
later period; zeroed groups stay exactly zero. (HESSO's own forgetting is the natural
baseline: ``decay=None``.)
"""

from __future__ import annotations

import copy

import torch

from . import compat

compat.apply()

from only_train_once.optimizer import HESSO as _OTOHESSO  # noqa: E402

from .zig import build_zigs  # noqa: E402

__all__ = ["HESSO", "hesso"]

_STATE_VERSION = 1
_ATTRS = ("num_steps", "curr_pruning_period", "target_num_redundant_groups",
          "pruned_group_idxes", "important_idxes", "pruned_idxes", "active_redundant_idxes",
          "curr_group_sparsity", "curr_num_zero_groups", "first_moment_grads",
          "second_moment_grads")


class HESSO(_OTOHESSO):
    """only-train-once's HESSO (same arguments) plus ``decay=None | DecayConfig``."""

    def __init__(self, params, *args, decay=None, **kwargs):
        params = [dict(g, params=list(g["params"])) for g in params]
        if not params:
            raise ValueError("HESSO got an empty list of param groups")
        if kwargs.get("pruning_steps") is None:
            raise ValueError("HESSO: pruning_steps must be a positive int (the number of "
                             "steps over which groups are pruned)")
        super().__init__(params, *args, **kwargs)
        self._device = params[0]["params"][0].device
        self.engine = None
        self.zigs = build_zigs(self.param_groups)
        self._pending_marks: dict[str, torch.Tensor] = {}
        self.num_released = 0
        if decay is not None:
            from .optim import attach_engine

            self.engine, self._engine_handle = attach_engine(self, decay, "HESSO")
            self.register_step_post_hook(HESSO._after_step)

    def identify_redundant_groups(self):
        with compat.params_device(self._device):
            super().identify_redundant_groups()
        if self.engine is None:
            return
        for group in self.param_groups:
            if not group["is_prunable"] or group["is_auxiliary"]:
                continue
            idx = self.active_redundant_idxes[group["id"]]
            if len(idx):
                mask = torch.zeros(group["num_groups"], dtype=torch.bool, device=self._device)
                mask[torch.as_tensor(idx, dtype=torch.long, device=self._device)] = True
                prev = self._pending_marks.get(group["id"])
                self._pending_marks[group["id"]] = mask if prev is None else prev | mask
            # the engine decays them: HESSO must neither scale nor commit them
            self.active_redundant_idxes[group["id"]] = list()
            group["active_redundant_bool"] = torch.zeros(group["num_groups"], dtype=torch.bool,
                                                         device=self._device)

    @torch.no_grad()
    def _after_step(self, args, kwargs):
        if self._pending_marks:
            for name, mask in self._pending_marks.items():
                self.engine.mark(name, mask)
            self._pending_marks = {}

    def _on_released(self, name, channels):
        group = next(g for g in self.param_groups if g["id"] == name)
        start = int(group.get("global_start_idx", 0))
        released = set((start + channels.cpu()).tolist())
        self.pruned_group_idxes = [i for i in self.pruned_group_idxes if i not in released]
        self.num_released += int(channels.numel())

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["hesso"] = {
            "version": _STATE_VERSION,
            "attrs": {k: copy.deepcopy(getattr(self, k)) for k in _ATTRS if hasattr(self, k)},
            "pending_marks": {k: v.cpu().clone() for k, v in self._pending_marks.items()},
            "num_released": self.num_released,
            "zigs": [(z.name, z.m, z.width) for z in self.zigs],
            "engine": None if self.engine is None else self.engine.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "hesso" not in state_dict:
            raise ValueError("HESSO.load_state_dict: not a dpm_otov2.HESSO state_dict")
        sd = dict(state_dict)
        extra = sd.pop("hesso")
        if [tuple(x) for x in extra["zigs"]] != [(z.name, z.m, z.width) for z in self.zigs]:
            raise ValueError("HESSO.load_state_dict: the checkpoint's zero-invariant groups do "
                             "not match this model's; load into the same architecture")
        if (extra["engine"] is None) != (self.engine is None):
            raise ValueError("HESSO.load_state_dict: decay setting differs from the "
                             "checkpoint's")
        super().load_state_dict(sd)
        for k, v in extra["attrs"].items():
            setattr(self, k, copy.deepcopy(v))
        for d in (self.first_moment_grads, self.second_moment_grads):
            for k in d:
                d[k] = d[k].to(self._device)
        self._pending_marks = {k: v.to(self._device) for k, v in
                               extra["pending_marks"].items()}
        self.num_released = int(extra["num_released"])
        if self.engine is not None:
            self.engine.load_state_dict(extra["engine"])


def hesso(oto, lr: float = 0.1, *, decay=None, **kwargs) -> HESSO:
    """Drop-in for ``oto.hesso(...)`` (same keywords) with ``decay=None | DecayConfig``."""
    graph = getattr(oto, "_graph", None)
    if graph is None or not hasattr(graph, "get_param_groups"):
        raise TypeError(f"hesso() expects an only_train_once.OTO built with a model and a "
                        f"dummy input, got {type(oto).__name__}")
    kwargs.setdefault("pruning_steps", 1)
    kwargs.setdefault("pruning_periods", 1)
    opt = HESSO(list(graph.get_param_groups()), lr=lr, decay=decay, **kwargs)
    oto._optimizer = opt
    return opt
