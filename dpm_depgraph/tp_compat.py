"""A compatibility fix for Torch-Pruning's dependency graph: concatenations along a
negative ``dim`` of 4-D tensors (HF LLaMA's rotary embedding).

The problem (Torch-Pruning 1.6.1 with PyTorch 2.14): autograd reports the ``dim`` that
``CatBackward0`` saved for a negative ``dim`` as an unsigned 64-bit number
(``torch.cat(xs, dim=-1).grad_fn._saved_dim == 2**64 - 1``). Torch-Pruning's
``index_mapping.update_concat_index_mapping`` skips concatenations along a dim other than 1
(the channel dim) but reads a dim ``>= MAX_VALID_DIM`` (100) as "unknown" (a workaround for
PyTorch 1.11) and then maps the concat as if it joined channels: input ``k``'s index ``i``
becomes ``i + offset_k``. HF LLaMA's ``rotate_half`` concatenates the halves of q and k
along the head dim (``torch.cat((-x2, x1), dim=-1)`` on ``[batch, heads, seq, head_dim]``);
read as a channel concat it maps q_proj's output index ``i`` to ``i + C`` (``C`` =
q_proj's width), and the cycle q_proj -> rotate_half -> ``q * cos + rotate_half(q) * sin``
-> back to q_proj adds ``C`` on every lap, so ``DependencyGraph.get_pruning_group`` never
reaches a fixed point: ``tp.pruner.MetaPruner(llama, ...)`` hangs in its constructor
(Torch-Pruning issue #527 reports a hang building the graph of Qwen3-8B, which has the
same rotary embedding).

The fix (:func:`resolve_negative_cat_dims`): where a concat's saved dim is such a wrapped
negative number and its output has 4 or more dims, Torch-Pruning is shown the dim
``torch.cat`` actually used (``dim + ndim``, e.g. 3), so its own rule applies: a concat along
a dim other than 1 is not a channel concat, and the indices pass through it unchanged (for
whole attention heads, as the LLM example prunes, that is the right mapping). Concats of 2-D
and 3-D tensors are left alone: there Torch-Pruning's channel reading is what ``dim=-1``
means for ``[N, C]`` and ``[B, L, C]`` tensors. Nothing else in the graph changes.

The decay pruners apply it while they build their graph. Plain Torch-Pruning gets the same
fix by building its pruner inside :func:`torch_pruning_fixes`::

    with dpm_depgraph.torch_pruning_fixes():
        pruner = tp.pruner.MetaPruner(model, example_inputs, ...)   # then use it as usual

The fix lives in the pruner's graph (``pruner.DG``), so ``pruner.step()`` needs no context.
It is applied only where autograd wraps negative dims (probed once at import time); on a
PyTorch that reports them as negative numbers Torch-Pruning already skips these concats.
"""

from __future__ import annotations

import contextlib

import torch
from torch_pruning.dependency.graph import DependencyGraph

__all__ = ["keep_training_modes", "negative_dims_wrap", "resolve_negative_cat_dims",
           "torch_pruning_fixes"]

_WRAP = 1 << 63


def _probe() -> bool:
    x = torch.zeros(1, 1, requires_grad=True)
    dim = torch.cat([x, x], dim=-1).grad_fn._saved_dim
    return isinstance(dim, int) and dim >= _WRAP


_NEGATIVE_DIMS_WRAP = _probe()


def negative_dims_wrap() -> bool:
    """Whether this PyTorch reports a negative saved ``dim`` as ``2**64 + dim``."""
    return _NEGATIVE_DIMS_WRAP


class _ResolvedDim:
    """``grad_fn`` as Torch-Pruning reads it, with ``_saved_dim`` the non-negative dim."""

    def __init__(self, grad_fn, dim: int):
        self._grad_fn = grad_fn
        self._saved_dim = dim

    def __getattr__(self, name):
        return getattr(self._grad_fn, name)

    def __repr__(self):
        return f"{self._grad_fn!r} (dim {self._saved_dim})"


def resolve_negative_cat_dims(module2node: dict) -> list:
    """Show Torch-Pruning the real dim of every concat of >= 4-D tensors whose saved dim is
    a wrapped negative number (see the module docstring). Returns the nodes changed."""
    changed = []
    for node in module2node.values():
        grad_fn = node.grad_fn
        if isinstance(grad_fn, _ResolvedDim) or not hasattr(grad_fn, "name"):
            continue
        if not grad_fn.name().startswith("CatBackward"):
            continue
        dim = getattr(grad_fn, "_saved_dim", None)
        meta = getattr(grad_fn, "_input_metadata", None)
        if not isinstance(dim, int) or dim < _WRAP or not meta:
            continue
        ndim = len(meta[0].shape)
        dim -= 1 << 64
        if ndim >= 4 and -ndim <= dim < 0:
            node.grad_fn = _ResolvedDim(grad_fn, dim + ndim)
            changed.append(node)
    return changed


@contextlib.contextmanager
def torch_pruning_fixes():
    """Every Torch-Pruning ``DependencyGraph`` built inside (e.g. by a pruner's
    constructor) gets :func:`resolve_negative_cat_dims` right after tracing. A no-op where
    autograd does not wrap negative dims."""
    if not _NEGATIVE_DIMS_WRAP or getattr(DependencyGraph._trace, "_dpm_fixed", False):
        yield
        return
    original = DependencyGraph._trace

    def _trace(self, *args, **kwargs):
        module2node = original(self, *args, **kwargs)
        resolve_negative_cat_dims(module2node)
        return module2node

    _trace._dpm_fixed = True
    DependencyGraph._trace = _trace
    try:
        yield
    finally:
        DependencyGraph._trace = original


@contextlib.contextmanager
def keep_training_modes(model: torch.nn.Module):
    """Give every submodule of ``model`` back its ``training`` flag on exit.

    Torch-Pruning's ``DependencyGraph.build_dependency`` calls ``model.eval()`` to trace the
    model and leaves it there. A plain Torch-Pruning script prunes first and calls
    ``model.train()`` before fine-tuning, but a decay pruner is built before (or during)
    training, and a loop that sets the mode once, before the pruner, would go on training
    with BatchNorm's running statistics and dropout frozen, silently. The decay pruners
    therefore leave each module in the mode it had.
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
