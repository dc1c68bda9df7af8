"""DDP on 2 CPU processes: every rank makes the same DPM decisions and ends identical."""

import os

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dpm_core import DecayConfig, DecayEngine
from dpm_core.distributed import is_stale, rewrap_ddp

from ddp_harness import run_ddp


def engine_worker(rank, world, out_dir):
    torch.manual_seed(0)  # same init everywhere (DDP would broadcast rank 0's anyway)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = DecayEngine(DecayConfig(steps=3, t_rate=0.05, t_len=0.3))
    eng.add_group("c", [(model[0].weight, 0), (model[0].bias, 0), (model[1].weight, 0),
                        (model[1].bias, 0), (model[5].weight, 1)])
    eng.attach(opt)
    log = []
    eng.on_released(lambda n, c: log.append(("released", eng.step_count, c.tolist())))
    eng.on_zeroed(lambda n, c: log.append(("zeroed", eng.step_count, c.tolist())))
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for it in range(10):
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        if it == 2:
            norms = model[0].weight.detach().flatten(1).norm(dim=1)
            chans = norms.argsort()[:4]
            eng.mark("c", chans)
            log.append(("marked", it, sorted(chans.tolist())))
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    stale_before = is_stale(ddp)
    # physical removal of zeroed channels, then re-wrap
    keep = (~eng.state("c").zeroed).nonzero().squeeze(1)
    with torch.no_grad():
        conv, bn, lin = model[0], model[1], model[5]
        conv.weight = nn.Parameter(conv.weight[keep].clone())
        conv.bias = nn.Parameter(conv.bias[keep].clone())
        bn.weight = nn.Parameter(bn.weight[keep].clone())
        bn.bias = nn.Parameter(bn.bias[keep].clone())
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
        lin.weight = nn.Parameter(lin.weight[:, keep].clone())
    stale_after = is_stale(ddp)
    ddp = rewrap_ddp(ddp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save({"log": log, "state": eng.state("c"), "kept": keep,
                # parameters: BN running stats legitimately differ per rank after the last forward
                # (DDP broadcasts rank 0's buffers at the start of each forward)
                "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
                "stale": (stale_before, stale_after, is_stale(ddp))},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_ranks_agree_and_rewrap_follows_removal(tmp_path):
    r0, r1 = run_ddp("test_ddp_engine:engine_worker", tmp_path)
    assert r0["log"] == r1["log"]
    assert any(e[0] == "zeroed" for e in r0["log"])
    for f in ("decaying", "zeroed", "n_step", "l_init"):
        assert torch.equal(getattr(r0["state"], f), getattr(r1["state"], f))
    assert torch.equal(r0["kept"], r1["kept"]) and r0["kept"].numel() < 8
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    assert r0["stale"] == (False, True, False)
