"""Gate Decorator + DPM under DistributedDataParallel: 2 CPU processes (gloo) decide alike."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from ddp_harness import run_ddp


def gd_worker(rank: int, world: int, out_dir: str) -> None:
    import torch.nn.functional as F

    from benchmarks.models import get_model
    from dpm_core import DecayConfig
    from dpm_gatedecorator import GateDecorator

    torch.manual_seed(0)
    model = get_model("resnet20", width=0.25)
    gd = GateDecorator(model, torch.randn(1, 3, 32, 32), decay=DecayConfig(steps=3))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gd.attach(opt)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    decisions = []
    for step in range(7):
        if step % 3 == 0:
            with gd.scoring():
                ddp.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
            ddp.zero_grad(set_to_none=True)
            decisions.append({k: v.tolist() for k, v in gd.prune(4).items()})
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(ddp(x), y) + gd.gate_l1()).backward()
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {n: g.mask.clone() for n, g in gd.gates.items()}
    torch.save({"decisions": decisions, "summary": gd.summary(), "params": params,
                "masks": masks}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_ranks_take_the_same_decisions(tmp_path):
    a, b = run_ddp("test_gatedecorator_ddp:gd_worker", tmp_path)
    assert a["decisions"] == b["decisions"] and any(a["decisions"])
    assert a["summary"] == b["summary"] and a["summary"]["masked"] > 0
    for n in a["masks"]:
        assert torch.equal(a["masks"][n], b["masks"][n])
    # parameters are identical (BN running statistics are per rank, as always under DDP)
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
