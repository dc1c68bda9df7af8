"""Keep training after ``construct_subnet``: the optimizer state, carried to the subnet.

only-train-once's ``construct_subnet`` prunes the model *in place* by replacing every pruned
parameter with a new, smaller ``nn.Parameter`` (``index_select`` of the kept rows/columns).
An optimizer built before still holds the old tensors: stepping it trains nothing that the
model uses (a new user's DHSPG held 1 of the subnet's 62 parameters). This module

* records, while ``dpm_otov2.OTO.construct_subnet`` runs, which parameter became which and
  which positions of which dims were kept (:func:`record_pruning`);
* builds a new optimizer over the subnet's parameters with the old one's class and
  hyper-parameters and every per-parameter state tensor (momentum buffer, Adam moments)
  sliced to the kept positions (:func:`subnet_optimizer`, ``oto.subnet_optimizer(opt)``);
  DHSPG / HESSO hand over to their base optimizer (``torch.optim.SGD`` / ``Adam`` /
  ``AdamW``): there is nothing left to prune in a subnet;
* warns (``RuntimeWarning``, once per optimizer) when an optimizer that still holds replaced
  parameters is stepped;
* keeps a frozen parameter frozen: 3.0.1's ``prune_param_and_grad`` wraps the pruned tensor in
  a new ``nn.Parameter`` with ``requires_grad=True`` whatever the old one had.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

__all__ = ["PruneRecord", "record_pruning", "subnet_optimizer", "StaleOptimizerWarning"]


class StaleOptimizerWarning(RuntimeWarning):
    """An optimizer holding parameters that ``construct_subnet`` replaced was stepped."""


class PruneRecord:
    """What ``construct_subnet`` did to the parameters of one model.

    ``names``: old parameter -> its name in the model; ``steps[name]``: the
    ``(dim, kept_index)`` selections that turned the old tensor into the new one (empty for
    parameters that were not pruned).
    """

    def __init__(self, model: torch.nn.Module):
        self._old = weakref.WeakValueDictionary()
        self.names: dict[int, str] = {}
        self.shapes: dict[str, torch.Size] = {}
        for name, p in model.named_parameters():
            self._old[id(p)] = p
            self.names[id(p)] = name
            self.shapes[name] = p.shape
        self.steps: dict[str, list[tuple[int, torch.Tensor]]] = {}

    def name_of(self, p: torch.Tensor) -> str | None:
        """The model name of ``p`` if ``p`` is one of the parameters before pruning."""
        return self.names.get(id(p)) if self._old.get(id(p)) is p else None

    def slice(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the old parameter ``name``) reduced to the kept positions."""
        for dim, idx in self.steps.get(name, ()):
            t = t.index_select(dim, idx.to(t.device))
        return t

    def replaced(self) -> list[torch.Tensor]:
        return [p for p in (self._old.get(i) for i, n in self.names.items() if n in self.steps)
                if p is not None]


def _prune_ops_classes() -> list[type]:
    """only-train-once's ``BasicOperator`` (3.0.1 imports ``operation.operator`` twice)."""
    import sys

    out = []
    for mod_name in ("only_train_once.operation.operator", "operation.operator"):
        mod = sys.modules.get(mod_name)
        cls = getattr(mod, "BasicOperator", None) if mod is not None else None
        if isinstance(cls, type) and cls not in out:
            out.append(cls)
    return out


@contextlib.contextmanager
def record_pruning(model: torch.nn.Module):
    """While active, log every ``prune_param_and_grad`` of only-train-once into a record."""
    from .compat import _fail

    record = PruneRecord(model)
    classes = _prune_ops_classes()
    if not classes or not all(callable(getattr(c, "prune_param_and_grad", None))
                              for c in classes):
        raise _fail("subnet_record", "only_train_once.operation.operator.BasicOperator"
                                     ".prune_param_and_grad is gone")
    chain: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}  # id(new) -> (new, root, steps)
    origs = {c: c.__dict__.get("prune_param_and_grad") for c in classes}

    def make(orig):
        def prune_param_and_grad(self, param, preserved_idxes, dim=0):
            new = orig(self, param, preserved_idxes, dim)
            new.requires_grad_(param.requires_grad)  # 3.0.1 makes frozen params trainable
            _, root, steps = chain.pop(id(param), (None, param, []))
            idx = torch.as_tensor(list(preserved_idxes), dtype=torch.long)
            chain[id(new)] = (new, root, steps + [(int(dim), idx)])
            return new
        return prune_param_and_grad

    for c, orig in origs.items():
        c.prune_param_and_grad = make(orig if orig is not None else c.prune_param_and_grad)
    try:
        yield record
    finally:
        for c, orig in origs.items():
            if orig is None:
                del c.prune_param_and_grad
            else:
                c.prune_param_and_grad = orig
    for new, root, steps in chain.values():
        name = record.name_of(root)
        if name is not None:
            record.steps[name] = steps
    _watch_stale(record.replaced())


# ------------------------------------------------------------------ stale optimizer warning
_stale = weakref.WeakValueDictionary()
_checked = weakref.WeakKeyDictionary()
_generation = [0]
_hook = [None]


def _stale_hook(optimizer, args, kwargs):
    if _checked.get(optimizer) == _generation[0]:
        return
    _checked[optimizer] = _generation[0]
    n_stale = sum(1 for g in optimizer.param_groups for p in g["params"]
                  if _stale.get(id(p)) is p)
    if n_stale:
        warnings.warn(
            f"{type(optimizer).__name__} holds {n_stale} parameter(s) that construct_subnet "
            f"replaced; stepping it does not train the pruned model. Build the optimizer for "
            f"the subnet with oto.subnet_optimizer(optimizer) (carries its state) or a new "
            f"optimizer over model.parameters().", StaleOptimizerWarning, stacklevel=3)


def _watch_stale(params) -> None:
    for p in params:
        _stale[id(p)] = p
    _generation[0] += 1
    if _hook[0] is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook[0] = register_optimizer_step_pre_hook(_stale_hook)


# ------------------------------------------------------------------ the new optimizer
_HYPER = {"sgd": ("lr", "weight_decay", "first_momentum", "dampening"),
          "adam": ("lr", "weight_decay", "first_momentum", "second_momentum"),
          "adamw": ("lr", "weight_decay", "first_momentum", "second_momentum")}


def _base_of(optimizer):
    """``(class, group -> hyper-parameter dict, state translator)`` for DHSPG / HESSO."""
    variant = optimizer.param_groups[0].get("variant", "sgd")
    if any(g.get("variant", variant) != variant for g in optimizer.param_groups):
        raise ValueError("subnet_optimizer: the param groups use different variants")
    if variant == "sgd":
        def hyper(g):
            return dict(lr=g["lr"], momentum=g["first_momentum"], dampening=g["dampening"],
                        weight_decay=g["weight_decay"])
        return torch.optim.SGD, hyper
    cls = torch.optim.AdamW if variant == "adamw" else torch.optim.Adam

    def hyper(g):
        return dict(lr=g["lr"], betas=(g["first_momentum"], g["second_momentum"]),
                    weight_decay=g["weight_decay"], eps=1e-8)
    return cls, hyper


def _old_state(optimizer, p, name) -> dict:
    """Per-parameter state of ``p`` in torch's key names (HESSO keeps its moments by name)."""
    from only_train_once.optimizer import HESSO as _OTOHESSO

    if not isinstance(optimizer, _OTOHESSO):
        return dict(optimizer.state.get(p, {}))
    st = {}
    variant = optimizer.param_groups[0].get("variant", "sgd")
    i, j = next((i, j) for i, g in enumerate(optimizer.param_groups)
                for j, q in enumerate(g["params"]) if q is p)
    # HESSO's buffer names (only_train_once 3.0.1 HESSO.compute_grad_variant)
    first = getattr(optimizer, "first_moment_grads", {}).get(
        f"grad_first_moment_buffer_group_{i}_param_{j}")
    second = getattr(optimizer, "second_moment_grads", {}).get(
        f"grad_second_moment_buffer_group_{i}_param_{j}")
    if variant == "sgd":
        if first is not None:
            st["momentum_buffer"] = first
    elif first is not None and second is not None:
        st.update(exp_avg=first, exp_avg_sq=second,
                  step=torch.tensor(float(getattr(optimizer, "num_steps", 1))))
    return st


def subnet_optimizer(optimizer: torch.optim.Optimizer, record: PruneRecord,
                     model: torch.nn.Module) -> torch.optim.Optimizer:
    """A new optimizer over ``model``'s (the subnet's) parameters, state carried.

    Args:
        optimizer: the optimizer used before ``construct_subnet`` (a ``torch.optim``
            optimizer, :class:`dpm_otov2.DHSPG` or a HESSO).
        record: the :class:`PruneRecord` of that ``construct_subnet`` call.
        model: the pruned model (``construct_subnet`` prunes the traced model in place; a
            copy loaded with ``oto.compressed_model()`` works too: parameters are matched by
            name).

    Returns an optimizer of the same class with the same per-group hyper-parameters
    (DHSPG / HESSO: ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` with their lr, momentum,
    dampening, betas and weight decay), whose per-parameter state tensors shaped like the
    parameter are sliced to the kept positions and other state (``step``) copied.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: it holds a parameter that is not one of the model's before pruning, or
            the subnet's parameter of that name has an unexpected shape.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"subnet_optimizer expects a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    from only_train_once.optimizer import HESSO as _OTOHESSO

    from .optim import DHSPG

    new_params = dict(model.named_parameters())
    groups, pairs = [], []
    handover = isinstance(optimizer, (DHSPG, _OTOHESSO))
    if handover:
        cls, hyper = _base_of(optimizer)
    for g in optimizer.param_groups:
        params = []
        for p in g["params"]:
            name = record.name_of(p)
            if name is None:
                raise ValueError(
                    "subnet_optimizer: the optimizer holds a parameter of shape "
                    f"{tuple(p.shape)} that was not a parameter of the model when "
                    "construct_subnet ran; pass the optimizer that trained this model")
            q = new_params.get(name)
            expect = record.slice(name, torch.empty(record.shapes[name], device="meta")).shape
            if q is None or q.shape != expect:
                raise ValueError(
                    f"subnet_optimizer: the subnet's parameter {name!r} is "
                    f"{'missing' if q is None else tuple(q.shape)}, expected {tuple(expect)}; "
                    f"pass the model construct_subnet pruned (or oto.compressed_model())")
            if any(q is x for x in params):
                continue  # a shared parameter listed twice
            params.append(q)
            pairs.append((p, q, name))
        if not params:
            continue
        if handover:
            groups.append(dict(hyper(g), params=params))
        else:
            groups.append(dict({k: v for k, v in g.items() if k != "params"}, params=params))
    if not groups:
        raise ValueError("subnet_optimizer: the optimizer holds no parameters")
    if handover:
        new = cls(groups)
    else:
        import inspect

        try:
            accepted = inspect.signature(type(optimizer).__init__).parameters
            kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
            new = type(optimizer)(groups, **kwargs)
        except TypeError as e:
            raise TypeError(f"subnet_optimizer cannot rebuild {type(optimizer).__name__} as "
                            f"cls(param_groups, **defaults) ({e}); build it yourself over "
                            f"model.parameters()") from e
    for p, q, name in pairs:
        state = {}
        for k, v in _old_state(optimizer, p, name).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                v = record.slice(name, v.detach()).clone()
            elif isinstance(v, torch.Tensor):
                v = v.detach().clone()
            elif k == "step" and handover:
                v = torch.tensor(float(v))
            state[k] = v
        if state:
            new.state[q] = state
    return new
