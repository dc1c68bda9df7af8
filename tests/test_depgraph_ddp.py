"""dpm_depgraph under DistributedDataParallel: 2 CPU ranks (gloo), different data per rank.

Each rank trains a thin small CNN with ``DecayGroupNormPruner`` + DPM (Self-Rectifying on,
low thresholds so that some channels are released) through several ``pruner.step()``
calls that physically remove zeroed channels; after every removal the DDP wrapper is
rebuilt with ``dpm_core.distributed.rewrap_ddp`` from the pruner's ``on_removed``
callback (docs/depgraph.md). The ranks must log the same decisions (marked, released,
zeroed, removed channels) and end with identical parameters.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_core.distributed import is_stale, rewrap_ddp
from dpm_depgraph import DecayGroupNormPruner

from ddp_harness import run_ddp

PRUNE_STEPS = 3        # pruner.step() calls (the 2nd and 3rd remove what the previous zeroed)
TRAIN_PER_STEP = 4     # optimizer steps between pruning steps
DECAY = DecayConfig(steps=3, t_rate=0.02, t_len=0.6)   # low thresholds: some releases


def _decisions_of(pruner) -> dict:
    """Per group: which channels are decaying / zeroed right now (channel indices)."""
    out = {}
    for name in pruner.engine.groups():
        st = pruner.engine.state(name)
        out[name] = (st.decaying.nonzero().flatten().tolist(),
                     st.zeroed.nonzero().flatten().tolist())
    return out


def depgraph_worker(rank: int, world: int, out_dir: str) -> None:
    torch.manual_seed(0)   # same init on every rank (DDP would broadcast rank 0's anyway)
    model = get_model("small_cnn", width=0.5)     # convs 8 / 16 / 32 channels
    example = torch.randn(1, 3, 16, 16)
    pruner = DecayGroupNormPruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5, iterative_steps=PRUNE_STEPS, ignored_layers=[model.fc],
        global_pruning=True, max_pruning_ratio=0.75, reg=1e-3, decay=DECAY)
    ddp = DDP(model) if world > 1 else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(opt)

    log: list = []
    holder = {"ddp": ddp, "stale": []}
    pruner.engine.on_released(
        lambda n, c: log.append(("released", pruner.engine.step_count, n, c.tolist())))
    pruner.engine.on_zeroed(
        lambda n, c: log.append(("zeroed", pruner.engine.step_count, n, c.tolist())))

    def rewrap(pr, removed):
        log.append(("removed", pruner.engine.step_count,
                    {k: v.tolist() for k, v in sorted(removed.items())}))
        if holder["ddp"] is not None:
            holder["stale"].append(is_stale(holder["ddp"]))     # True: must be rebuilt
            holder["ddp"] = rewrap_ddp(holder["ddp"])
            holder["stale"].append(is_stale(holder["ddp"]))     # False after rewrap
    pruner.on_removed(rewrap)

    gen = torch.Generator().manual_seed(100 + rank)   # each rank its own data
    losses = []
    for it in range(PRUNE_STEPS):
        pruner.step()
        log.append(("after_step", it, _decisions_of(pruner)))
        for _ in range(TRAIN_PER_STEP):
            x = torch.randn(8, 3, 16, 16, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            net = holder["ddp"] if holder["ddp"] is not None else model
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            pruner.regularize(model)
            opt.step()
            losses.append(loss.item())
    # Two more optimizer steps after the last removal, through the rebuilt wrapper: a stale
    # wrapper would leave the new parameters' gradients un-averaged (ranks would diverge).
    fin = pruner.finalize(force=True)
    log.append(("finalize", fin))
    for _ in range(2):
        x = torch.randn(8, 3, 16, 16, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        net = holder["ddp"] if holder["ddp"] is not None else model
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    # Control: one plain local step on this rank's own data, no DDP averaging. Its result
    # must differ between ranks, so the equality checked on the real run is not trivial.
    local = copy.deepcopy(model)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.05)
    x = torch.randn(8, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    F.cross_entropy(local(x), y).backward()
    local_opt.step()

    torch.save({
        "log": log, "losses": losses, "counters": dict(pruner.engine.counters),
        "removed": dict(pruner.removed), "removals": pruner.removals,
        "stale": holder["stale"],
        "widths": [model.features[i].out_channels for i in (0, 3, 6)],
        # parameters only: BN running statistics legitimately differ per rank
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "local_params": {n: p.detach().clone() for n, p in local.named_parameters()},
    }, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_depgraph_ddp_ranks_agree_through_removals(tmp_path):
    r0, r1 = run_ddp("test_depgraph_ddp:depgraph_worker", tmp_path)

    # the ranks really saw different data
    assert r0["losses"] != r1["losses"]
    # ... and a local step without DDP averaging would make them differ
    assert any(not torch.equal(r0["local_params"][n], r1["local_params"][n])
               for n in r0["local_params"])

    # decisions actually happened: marks, releases, zeroing, physical removals
    c = r0["counters"]
    assert c["marked"] > 0 and c["zeroed"] > 0 and c["released"] > 0, c
    kinds = [e[0] for e in r0["log"]]
    assert "released" in kinds and "zeroed" in kinds
    assert kinds.count("removed") >= 2          # removals inside step() and in finalize()
    assert r0["removals"] >= 2
    assert r0["widths"] != [8, 16, 32]

    # same decisions on every rank, in the same order, at the same optimizer steps
    assert r0["log"] == r1["log"]
    assert r0["counters"] == r1["counters"]
    assert r0["removed"] == r1["removed"] and r0["widths"] == r1["widths"]

    # the wrapper was stale after every removal and fresh after rewrap_ddp
    assert r0["stale"] == r1["stale"] == [True, False] * r0["removals"]

    # identical parameters (names and shapes included)
    assert r0["params"].keys() == r1["params"].keys()
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
