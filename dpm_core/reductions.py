"""Reductions over contiguous memory and the cache-sized scratch shared by the engine's
stacked (:mod:`dpm_core.stacked`) and sliced (:mod:`dpm_core.sliced`) kernels."""

from __future__ import annotations

import math

import torch

__all__ = ["reduce_to_cells", "sq_sums", "scratch_for", "ones_for"]


def sq_sums(t: torch.Tensor, dims) -> torch.Tensor:
    """Sum of squares of ``t`` over ``dims``, float32 (float64 math for float64)."""
    if t.dtype == torch.float64:
        n = torch.linalg.vector_norm(t, dim=dims)
    else:
        n = torch.linalg.vector_norm(t, dim=dims, dtype=torch.float32)
    return (n * n).float()


def reduce_to_cells(t: torch.Tensor, lead: int, keep: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` over every dim after the first ``lead`` except those in ``keep``
    (dims counted after ``lead``), innermost first, each over contiguous memory."""
    shape = list(t.shape)
    blocks: list[list] = []  # [size, kept]
    for d, s in enumerate(shape[lead:]):
        if d in keep:
            blocks.append([s, True])
        elif blocks and not blocks[-1][1]:
            blocks[-1][0] *= s
        else:
            blocks.append([s, False])
    t = t.reshape(shape[:lead] + [b[0] for b in blocks])
    for i in reversed(range(len(blocks))):
        if not blocks[i][1]:
            n = blocks[i][0]
            if i == len(blocks) - 1 and 1 < n < 64:
                # a short innermost sum (a 3x3 kernel) is far faster as a matrix-vector
                # product than as torch's inner reduction
                ones = torch.ones(n, dtype=t.dtype, device=t.device)
                t = (t.reshape(-1, n) @ ones).reshape(t.shape[:-1])
            else:
                t = t.sum(dim=lead + i)
    return t


_scratch: dict[tuple, torch.Tensor] = {}


def scratch_for(shape, dtype: torch.dtype, device, slot: int = 0) -> torch.Tensor:
    """A chunk-sized work tensor, shared by every sliced tensor of a device and dtype
    (one chunk of memory per slot in all, grown only when a chunk is larger)."""
    numel = math.prod(shape)
    key = (device, dtype, slot)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
    return buf[:numel].view(shape)


def ones_for(n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A vector of ``n`` ones (for sums as matrix-vector products), shared and grown like
    the scratch."""
    key = (device, dtype, "ones")
    ones = _scratch.get(key)
    if ones is None or ones.numel() < n:
        ones = torch.ones(n, dtype=dtype, device=device)
        _scratch[key] = ones
    return ones[:n]
