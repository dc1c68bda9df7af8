"""dpm_otov2 (DHSPG + DPM) reliability: DDP on 2 CPU ranks, GradScaler-skipped steps, and
a checkpoint taken while ZIGs are decaying, released and zeroed at once.

OTO models are not physically pruned during training (``construct_subnet`` runs after
it), so under DistributedDataParallel nothing is re-wrapped: DDP averages the gradients,
and DHSPG's partition, penalty, projection-to-decay marks and the engine's release/zero
decisions are deterministic functions of the (identical) weights and averaged gradients.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_otov2 import OTO

from ddp_harness import run_ddp
from state_compare import state_diff

# aggressive DHSPG settings (as in test_otov2_dhspg.py) so that pruning starts within a few
# steps; t_rate a little below the paper's 0.2-0.4 so that, on these random data, some
# decaying ZIGs are released while most decay to zero (BN makes filters scale-invariant)
FAST = dict(lr=0.05, lmbda=5.0, epsilon=0.5, start_pruning_step=2, target_group_sparsity=0.5)
DECAY = DecayConfig(steps=3, t_rate=0.1, t_len=0.8)
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(seed: int = 0, decay=DECAY, **kw):
    torch.manual_seed(seed)
    model = get_model("small_cnn", width=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # only_train_once imports `imp`
        oto = OTO(model, torch.randn(1, 3, SIZE, SIZE))
    model.train()       # only_train_once's OTO() leaves the model in eval mode
    opt = oto.dhspg(decay=decay, **dict(FAST, **kw))
    return model, oto, opt


def _batch(gen: torch.Generator, n: int = 8):
    return torch.randn(n, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (n,), generator=gen)


_same = state_diff


def _masks(opt) -> dict:
    return {k: {m: v.nonzero().flatten().tolist() for m, v in d.items()}
            for k, d in opt.group_masks().items()}


# ---------------------------------------------------------------------------- DDP
DDP_STEPS = 14


def otov2_worker(rank: int, world: int, out_dir: str) -> None:
    model, oto, opt = _build(momentum=0.9)
    ddp = DDP(model)             # OTO traced the bare model; DHSPG holds its parameters
    eng = opt.engine
    log: list = []
    eng.on_released(lambda n, c: log.append(("released", eng.step_count, n, c.tolist())))
    eng.on_zeroed(lambda n, c: log.append(("zeroed", eng.step_count, n, c.tolist())))
    gen = torch.Generator().manual_seed(100 + rank)    # each rank its own data
    losses = []
    for _ in range(DDP_STEPS):
        x, y = _batch(gen)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        log.append(("masks", opt.num_steps, _masks(opt), opt.curr_group_sparsity))
    # control: one plain local step without DDP averaging must make the ranks differ
    local = copy.deepcopy(model)
    x, y = _batch(gen)
    F.cross_entropy(local(x), y).backward()
    with torch.no_grad():
        for p in local.parameters():
            p.sub_(0.05 * p.grad)
    torch.save({
        "log": log, "losses": losses, "counters": dict(eng.counters),
        "num_released": opt.num_released,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "local": {n: p.detach().clone() for n, p in local.named_parameters()},
        "engine": eng.state_dict(),
    }, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_dhspg_ddp_ranks_agree(tmp_path):
    r0, r1 = run_ddp("test_otov2_reliability:otov2_worker", tmp_path)
    assert r0["losses"] != r1["losses"]                      # different data per rank
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in r0["local"])
    c = r0["counters"]
    assert c["marked"] > 0 and c["released"] > 0 and c["zeroed"] > 0, c
    assert r0["num_released"] == c["released"]
    # same decisions, at the same steps, on both ranks
    assert r0["log"] == r1["log"]
    assert r0["counters"] == r1["counters"]
    assert _same(r0["engine"], r1["engine"]) == []
    # identical parameters (BN running statistics may differ per rank)
    assert r0["params"].keys() == r1["params"].keys()
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


# ---------------------------------------------------------------------------- AMP
def test_dhspg_grad_scaler_skipped_step_changes_nothing():
    model, oto, opt = _build(momentum=0.9)
    eng = opt.engine
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    gen = torch.Generator().manual_seed(7)

    def amp_step(poison: bool = False) -> None:
        x, y = _batch(gen)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison:       # an overflow in one decaying ZIG's conv filter
            z = decaying_zig()
            row = int(eng.is_decaying(z.name).nonzero()[0])
            z.params()[0].grad[row].view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()

    def decaying_zig():
        return next(z for z in opt.zigs if bool(eng.is_decaying(z.name).any()))

    for _ in range(30):
        amp_step()
        if eng.any_decaying() and eng.counters["zeroed"] > 0:
            break
    else:
        pytest.fail(f"nothing decaying and zeroed after 30 steps: {eng.counters}")
    steps_before = opt.num_steps
    before = {"opt": copy.deepcopy(opt.state_dict()),
              "params": {n: p.detach().clone() for n, p in model.named_parameters()},
              "scale": scaler.get_scale()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        amp_step(poison=True)
    assert scaler.get_scale() == before["scale"] / 2         # the scaler skipped the step
    assert opt.num_steps == steps_before
    assert _same(before["opt"], opt.state_dict()) == []      # DHSPG + engine + momentum
    assert _same(before["params"], {n: p.detach() for n, p in model.named_parameters()}) == []

    n_before = {z.name: eng.state(z.name) for z in opt.zigs}
    amp_step()                                               # finite: advances
    assert scaler.get_scale() == before["scale"] / 2
    assert opt.num_steps == steps_before + 1
    assert eng.step_count == before["opt"]["dhspg"]["engine"]["step_count"] + 1
    for name, was in n_before.items():
        now = eng.state(name)
        d = was.decaying
        ok = (now.decaying[d] & (now.n_step[d] > was.n_step[d])) | ~now.decaying[d]
        assert bool(ok.all()), name
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- resume
def _resume_run(steps: int, split: bool):
    """``steps`` DHSPG+DPM steps on a fixed batch sequence; with ``split``, checkpoint (through
    torch.save/torch.load) once ZIGs are decaying, released and zeroed, and continue in a
    freshly built model (different init) and optimizer. Returns (model, opt, ckpt info)."""
    model, oto, opt = _build(momentum=0.9)
    gen = torch.Generator().manual_seed(11)
    batches = [_batch(gen) for _ in range(steps)]
    info = None
    for i, (x, y) in enumerate(batches):
        eng = opt.engine
        if split and info is None and eng.any_decaying() and eng.counters["zeroed"] > 0 \
                and eng.counters["released"] > 0:
            info = {"at": i, "counters": dict(eng.counters)}
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            buf.seek(0)
            ck = torch.load(buf, weights_only=False)
            model, oto, opt = _build(seed=123, momentum=0.9)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, info


def test_dhspg_resume_mid_decay_with_releases_is_bit_exact():
    ma, oa, _ = _resume_run(18, split=False)
    mb, ob, info = _resume_run(18, split=True)
    assert info is not None, "never decaying + released + zeroed at once"
    assert 0 < info["at"] < 18 - 3          # some decay steps run after the resume
    assert oa.engine.counters["zeroed"] > info["counters"]["zeroed"]   # decisions after it
    assert _same(ma.state_dict(), mb.state_dict()) == []
    assert _same(oa.state_dict(), ob.state_dict()) == []      # momentum, partition, engine
