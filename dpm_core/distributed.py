"""DistributedDataParallel after physical pruning.

DPM needs no communication of its own under DDP: DDP averages gradients before
``optimizer.step()``, every rank starts from the same weights (DDP broadcasts rank 0's
at construction), and the engine's decisions are a deterministic function of weights and
gradients, so every rank marks, releases and zeroes the same channels. Adapters' pruning
decisions are deterministic functions of the same weights (and, for Taylor scores, of
the averaged gradients), so they agree too.

What DDP does not follow is a parameter *replaced* by a physically smaller one: its
reducer keeps the old tensors, so gradients of the new ones would never be averaged.
After an adapter removed channels, wrap the module again with :func:`rewrap_ddp`.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["is_stale", "rewrap_ddp"]


def is_stale(ddp: DistributedDataParallel) -> bool:
    """True when ``ddp.module``'s parameters are no longer the ones DDP registered."""
    registered = getattr(ddp, "_module_parameters", None)
    if registered is None:
        raise RuntimeError(
            f"this torch ({torch.__version__}) DistributedDataParallel has no "
            f"_module_parameters; call rewrap_ddp() after every physical removal instead")
    current = [p for p in ddp.module.parameters() if p.requires_grad]
    return [id(p) for p in registered] != [id(p) for p in current]


def rewrap_ddp(ddp: DistributedDataParallel, **overrides) -> DistributedDataParallel:
    """A new DDP wrapper around ``ddp.module`` with the same settings.

    Call it on every rank after a physical removal (all ranks remove the same channels);
    keep training with the returned wrapper. ``overrides`` replace constructor arguments.
    """
    if not isinstance(ddp, DistributedDataParallel):
        raise TypeError(f"rewrap_ddp expects a DistributedDataParallel, got "
                        f"{type(ddp).__name__}")
    kwargs = dict(
        device_ids=ddp.device_ids,
        output_device=ddp.output_device,
        dim=ddp.dim,
        process_group=ddp.process_group,
        find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
        bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024),
    )
    kwargs.update(overrides)
    return DistributedDataParallel(ddp.module, **kwargs)
