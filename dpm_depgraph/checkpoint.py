"""Checkpoints of the decay pruners: the pruner's state for an exact resume, and its
restore onto a freshly built model (the recorded physical removals are replayed first).

:meth:`dpm_depgraph.pruner.DecayPrunerMixin.state_dict` / ``load_state_dict`` call these.
"""

from __future__ import annotations

import copy

from ._slices import apply_removal, root_size
from .attention import group_units, kv_layers_to_skip, whole_units

__all__ = ["STATE_VERSION", "pruner_state", "load_pruner_state"]

STATE_VERSION = 1


def pruner_state(pruner) -> dict:
    """Schedule position, scopes, removal history and the engine's decay state."""
    return {
        "version": STATE_VERSION,
        "current_step": pruner.current_step,
        "scope_initial_channels": dict(pruner._scope_initial_channels),
        "pruning_history": copy.deepcopy(pruner.DG.pruning_history()),
        "removed": dict(pruner.removed),
        "removals": pruner.removals,
        "last_step_at": pruner._last_step_at,
        "num_channels": {n: pruner.engine.num_channels(n) for n in pruner.engine.groups()},
        "decay": pruner.decay.to_dict(),
        "engine": pruner.engine.state_dict(),
    }


def _replay_removals(pruner, history: list, names: list) -> None:
    """Apply a checkpoint's physical removals to an unpruned model, through the attached
    optimizer, and rebuild the engine's groups on the smaller tensors."""
    mod_by_name = dict(pruner.model.named_modules())
    for module_name, is_out, idxs in history:
        module = mod_by_name.get(module_name)
        if module is None or module not in pruner.DG.module2node:
            raise ValueError(f"checkpoint removes channels of {module_name!r}, which this "
                             f"model does not have; load into the same architecture")
        layer_pruner = pruner.DG.get_pruner_of_module(module)
        fn = layer_pruner.prune_out_channels if is_out else layer_pruner.prune_in_channels
        full = pruner._full_group(module, fn)
        name = pruner._root_names.get((id(module), bool(is_out)))
        # whole heads among the removed root indices (a removal may also take head dims)
        heads = 0 if name is None else int(whole_units(
            group_units(pruner, full, root_size(pruner.DG, full)), list(idxs)).sum())
        apply_removal(pruner.DG, pruner.model, module, fn, list(idxs), pruner.optimizer,
                      pruner._probe_cache, skip=kv_layers_to_skip(pruner, full))
        if name is not None:
            pruner._after_removal(name, full, heads)
            pruner._sync_heads()
    pruner._sync_model_attributes()
    for name in list(pruner.engine.groups()):
        pruner.engine.remove_group(name)
    for name in names:
        layout = pruner._layout(name)
        pruner.engine.add_group(name, layout.slices)
        pruner._coverage[name] = layout.coverage
    pruner.update_regularizer()


def load_pruner_state(pruner, state: dict) -> None:
    """Restore :func:`pruner_state` into an attached pruner (see ``load_state_dict``)."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"not a decay pruner state_dict (version {STATE_VERSION})")
    pruner._require_attached("load_state_dict()")
    if state["decay"] != pruner.decay.to_dict():
        raise ValueError(f"checkpoint was made with decay={state['decay']}, this pruner has "
                         f"{pruner.decay.to_dict()}; build the pruner with the same DecayConfig")
    history = state["pruning_history"]
    mine = pruner.DG.pruning_history()
    if len(mine) == 0 and history:
        _replay_removals(pruner, history, list(state["num_channels"]))
    elif mine != history:
        raise ValueError("this model was already pruned differently from the checkpoint; "
                         "load into a freshly built model")
    counts = {n: pruner.engine.num_channels(n) for n in pruner.engine.groups()}
    if counts != state["num_channels"]:
        bad = [n for n in state["num_channels"] if counts.get(n) != state["num_channels"][n]]
        raise ValueError(f"checkpoint does not fit this model: channel counts differ for "
                         f"{bad[:5]}; load into a model of the architecture it was saved from")
    pruner.engine.load_state_dict(state["engine"])
    pruner.current_step = int(state["current_step"])
    pruner._scope_initial_channels = dict(state["scope_initial_channels"])
    pruner.removed = dict(state["removed"])
    pruner.removals = int(state["removals"])
    pruner._last_step_at = state.get("last_step_at")
