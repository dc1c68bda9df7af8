"""Argument checks of the decay pruners: what a Torch-Pruning user may get wrong, caught at
construction with a message that says what is wrong and what to do (issue 11, item 6).

Pure functions of the pruner's arguments (and, for the output warning, of the registered
groups); :class:`dpm_depgraph.pruner.DecayPrunerMixin` calls them from its constructor.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable

import torch.nn as nn

from dpm_core import DecayConfig

__all__ = ["check_decay", "check_gqa_group", "check_model", "check_ratios", "trace_error",
           "warn_output_pruned"]

# frames of Torch-Pruning's tracing: an exception raised under one of them means the model
# could not be traced with the given example inputs
_TRACE_FRAMES = {"build_dependency", "_trace", "_trace_computational_graph", "_build_dependency"}


def check_decay(owner: str, decay) -> DecayConfig:
    """``decay`` as a :class:`DecayConfig` (the default one for ``None``)."""
    if decay is None:
        return DecayConfig()
    if not isinstance(decay, DecayConfig):
        hint = " (use decay=DecayConfig(**your_dict))" if isinstance(decay, dict) else ""
        raise TypeError(f"{owner}: decay must be a dpm_core.DecayConfig, got "
                        f"{type(decay).__name__}{hint}; e.g. decay=DecayConfig(steps=5, "
                        f"t_rate=0.3, t_len=0.8)")
    return decay


def check_model(owner: str, args: tuple, kwargs: dict) -> None:
    """The model argument is a plain ``nn.Module`` (not a DDP / DataParallel wrapper)."""
    model = kwargs.get("model", args[0] if args else None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: the first argument must be the nn.Module to prune, got "
                        f"{type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{owner}: pass the wrapped model (ddp.module), not the "
                        f"{type(model).__name__} wrapper; re-wrap it after physical removals "
                        f"(see on_removed)")


def check_ratios(owner: str, base_init: Callable, args: tuple, kwargs: dict) -> None:
    """Reject pruning ratios outside [0, 1) now, with a message, instead of an index error
    deep inside the first ``step()``. ``base_init``: the base pruner's ``__init__``, whose
    signature names the arguments."""
    try:
        bound = inspect.signature(base_init).bind(*args, **kwargs)
    except TypeError:
        return   # the base pruner reports wrong arguments itself
    given = bound.arguments
    extra = given.get("kwargs", {})
    checks = []
    for key in ("pruning_ratio", "head_pruning_ratio", "ch_sparsity"):
        value = given.get(key, extra.get(key))
        if value is not None:
            checks.append((key, value))
    for key in ("pruning_ratio_dict", "head_pruning_ratio_dict", "ch_sparsity_dict"):
        for layer, value in (given.get(key, extra.get(key)) or {}).items():
            checks.append((f"{key}[{type(layer).__name__}]", value))
    for key, value in checks:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and 0 <= value < 1
        if not ok:
            raise ValueError(
                f"{owner}: {key} must be a number in [0, 1) (the fraction of channels or "
                f"heads to remove; 1 would remove whole layers), got {value!r}; e.g. "
                f"pruning_ratio=0.5")


def _from_trace(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _TRACE_FRAMES:
            return True
        tb = tb.tb_next
    return False


def trace_error(owner: str, exc: BaseException) -> RuntimeError | None:
    """A clear error for an exception raised while Torch-Pruning traced the model (``None``
    when it came from elsewhere: re-raise it as it is)."""
    if not _from_trace(exc):
        return None
    return RuntimeError(
        f"{owner}: Torch-Pruning could not trace the model with the given example_inputs "
        f"({type(exc).__name__}: {exc}). Check that example_inputs run through "
        f"model(example_inputs) (right shape, dtype and device, and grad enabled), pass "
        f"forward_fn= for models that need other calling conventions or output_transform= "
        f"for non-tensor outputs")


def warn_output_pruned(pruner, stacklevel: int = 3) -> None:
    """Warn when a group would shrink a layer whose output is the model's output (usually
    the classifier forgotten in ``ignored_layers``)."""
    outputs = []
    for name in pruner._roots:
        for module, is_out, _is_in, _per_root in pruner._coverage.get(name, []):
            node = pruner.DG.module2node.get(module)
            if is_out and node is not None and not node.outputs \
                    and module not in [m for m, _ in outputs]:
                outputs.append((module, name))
    for module, group in outputs:
        layer = pruner._root_name(module)
        warnings.warn(
            f"{type(pruner).__name__}: pruning would change the model's output size: "
            f"{layer!r} ({type(module).__name__}, {pruner.DG.get_out_channels(module)} "
            f"outputs) produces the model's output and its output channels are pruned "
            f"with group {group!r}. Put it in ignored_layers (e.g. "
            f"ignored_layers=[model.get_submodule({layer!r})]) to keep the output size",
            UserWarning, stacklevel=stacklevel)


def check_gqa_group(pruner, group) -> None:
    """Grouped-query attention whose key/value projections the graph couples to the query
    projection channel by channel (HF attention traced through ``sdpa`` with
    ``enable_gqa``, no ``repeat_kv``): Torch-Pruning 1.6.1 then roots a group at k or v
    that holds q and fails at its first ``step()`` (``shape '[H, -1]' is invalid``, its
    issue #516). Say so at construction, before anything changes."""
    heads = pruner.num_heads
    root = group[0].dep.target.module
    if not heads or root not in heads:
        return
    coupled = [dep.target.module for dep, _ in group
               if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in heads]
    if any(heads[m] > heads[root] for m in coupled):
        layer = pruner._root_name(root)
        raise ValueError(
            f"{type(pruner).__name__}: grouped-query attention at {layer!r}: the traced graph "
            f"ties its {heads[root]} key/value heads to the query projection channel by "
            f"channel (attention traced without repeat_kv, e.g. HF's sdpa with enable_gqa), "
            f"and Torch-Pruning cannot prune that (plain Torch-Pruning fails at step() with "
            f"\"shape '[H, -1]' is invalid\"). Build the model with eager attention "
            f"(from_pretrained(..., attn_implementation='eager'), or "
            f"config._attn_implementation = 'eager' before constructing it); the model was "
            f"not changed")
