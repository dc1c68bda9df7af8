"""Run a worker function on 2 CPU processes with the gloo backend and collect results.

The worker is ``fn(rank, world_size, out_dir)`` and must be importable (a module-level
function); it writes whatever it wants to compare into ``out_dir/rank{r}.pt``. The
harness itself only sets up the process group: comparisons happen in the test, after
both processes have finished.
"""

from __future__ import annotations

import importlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, target, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mod, name = target.rsplit(":", 1)
        getattr(importlib.import_module(mod), name)(rank, world_size, out_dir)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_ddp(target: str, out_dir, world_size: int = 2) -> list:
    """``target`` is ``"module:function"``; returns the per-rank saved objects."""
    port = _free_port()
    # fork: the children inherit the imported torch instead of importing it again (as
    # DataLoader workers do), which keeps a 2-rank test to a few seconds
    mp.start_processes(_entry, args=(world_size, port, target, str(out_dir)),
                       nprocs=world_size, join=True, start_method="fork")
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)]
