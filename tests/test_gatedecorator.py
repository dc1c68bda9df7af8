"""Gate Decorator adapter: gates, grouping, Taylor scores, pruning, melting, DPM hook, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_gatedecorator import GateDecorator, GatedBatchNorm

WIDTH = 0.25  # thin models: ResNet-56 stages 4/8/16, VGG-16-BN 16..128 channels


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BN layers (signed scales, shifts, running stats). |gamma| >= 0.2, so
    |beta / gamma| stays below the installation's clamp at 10 (see test_shift_clamp)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                w = torch.rand(c, generator=gen) * 1.4 - 0.4
                m.weight.copy_(torch.where(w.abs() < 0.2, torch.full_like(w, 0.2), w))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = get_model(name, width=WIDTH)
    _randomize_bn(m, seed)
    return m


def _data(n: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _score(gd: GateDecorator, model: nn.Module, x, y, passes: int = 1, reset: bool = True):
    with gd.scoring(reset=reset):
        for _ in range(passes):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def _channel_norms(gd: GateDecorator, name: str, channels: torch.Tensor) -> torch.Tensor:
    """L2 norm of each channel's whole structure (all the group's engine slices)."""
    sq = torch.zeros(channels.numel())
    for s in gd.structure_params(name):
        p, d = s[0], s[1]
        pos = channels if len(s) == 2 else s[2].index_select(0, channels).reshape(-1)
        v = p.detach().index_select(d, pos).movedim(d, 0).reshape(channels.numel(), -1)
        sq += v.float().pow(2).sum(1)
    return sq.sqrt()


MODELS = ["resnet56", "vgg16_bn"]


# ---------------------------------------------------------------------------- gates
@pytest.mark.parametrize("name", MODELS)
def test_gates_install_without_changing_outputs(name):
    model = _model(name)
    x, _ = _data(8)
    ref = copy.deepcopy(model)
    gd = GateDecorator(model, x[:1])
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert len(gd.gates) == n_bn
    assert sum(isinstance(m, GatedBatchNorm) for m in model.modules()) == n_bn
    model.eval(), ref.eval()
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-5
    # train mode (batch statistics) too, and running statistics move identically
    model.train(), ref.train()
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-5
    for n, gbn in gd.gates.items():
        assert torch.allclose(gbn.bn.running_mean, ref.get_submodule(n).running_mean, atol=1e-5)


def test_bn_scale_moves_into_gate():
    model = _model("vgg16_bn")
    gammas = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, nn.BatchNorm2d)}
    gd = GateDecorator(model, _data(1)[0])
    for n, gbn in gd.gates.items():
        assert torch.allclose(gbn.g.detach(), gammas[n])
        assert torch.equal(gbn.bn.weight, torch.ones_like(gbn.bn.weight))
        assert not gbn.bn.weight.requires_grad
        assert torch.equal(gbn.mask, torch.ones_like(gbn.mask))


def test_shift_clamp():
    """As the original's extract_from_bn: beta <- clamp(beta / gamma, -10, 10), g <- gamma."""
    bn = nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1e-3, -1e-3, 0.0, 0.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.5, 0.5, 1.0, 0.0, 1.0]))
    gbn = GatedBatchNorm(bn)
    assert torch.equal(gbn.g.detach(), torch.tensor([1e-3, -1e-3, 0.0, 0.0, 0.5]))
    assert torch.equal(bn.bias.detach(), torch.tensor([10.0, -10.0, 10.0, 0.0, 2.0]))
    assert torch.equal(bn.weight.detach(), torch.ones(5)) and not bn.weight.requires_grad


def test_tracing_leaves_running_stats_and_mode():
    model = _model("resnet56")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    GateDecorator(model, _data(2)[0])
    assert model.training
    after = {k.replace(".bn.running", ".running"): v for k, v in model.state_dict().items()
             if "running" in k}
    for k, v in before.items():
        assert torch.equal(after[k], v)


# ---------------------------------------------------------------------------- groups
def test_residual_groups_found_by_depgraph():
    model = _model("resnet56")
    gd = GateDecorator(model, _data(1)[0])
    members = {g.name: sorted(mn for mn, *_ in g.members) for g in gd.groups}
    # stage 1: the stem BN and the 9 blocks' second BNs share one decision
    assert members["bn1"] == sorted(["bn1"] + [f"layer1.{i}.bn2" for i in range(9)])
    # stage 2/3: the projection shortcut's BN and every block's second BN
    for stage in (2, 3):
        root = [g for g in gd.groups if f"layer{stage}.0.bn2" in members[g.name]]
        assert len(root) == 1
        assert sorted(members[root[0].name]) == sorted(
            [f"layer{stage}.0.shortcut.1"] + [f"layer{stage}.{i}.bn2" for i in range(9)])
    # every first BN of a block is its own group; every BN is in exactly one group
    all_members = [mn for g in gd.groups for mn, *_ in g.members]
    assert sorted(all_members) == sorted(gd.gates)
    assert len(gd.groups) == 3 + 27
    # the stem group's structure includes the stem conv's filters and the consumers' inputs
    items = {(it.module_name, it.role) for it in gd._group("bn1").spec.items}
    assert ("conv1", "out") in items and ("layer1.0.conv1", "in") in items
    assert ("layer2.0.shortcut.0", "in") in items


def test_vgg_groups_are_single_layers():
    model = _model("vgg16_bn")
    gd = GateDecorator(model, _data(1)[0])
    assert len(gd.groups) == 13
    assert all(len(g.members) == 1 for g in gd.groups)


# ---------------------------------------------------------------------------- scores
def test_scores_accumulate_taylor():
    model = _model("resnet56")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1])
    model.train()
    gates = list(gd.gates.values())

    def manual():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [(g.g.detach() * g.g.grad).abs() for g in gates]

    torch.manual_seed(1)
    expected1 = manual()
    bn_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(bn_state)
    _score(gd, model, x, y, passes=1)
    assert gd.scored_batches == 1
    for g, e in zip(gates, expected1):
        assert torch.allclose(g.score, e, rtol=1e-4, atol=1e-7)
    s1 = [g.score.clone() for g in gates]
    _score(gd, model, x, y, passes=2, reset=False)
    assert gd.scored_batches == 3
    for g, a in zip(gates, s1):
        assert torch.all(g.score >= a - 1e-7)
        assert not torch.allclose(g.score, a)
    # group score = sum of its members' scores
    grp = gd._group("bn1")
    want = sum(gd.gates[mn].score for mn, *_ in grp.members)
    assert torch.allclose(gd.group_scores("bn1"), want)
    # a fresh block starts from zero; no hook outside the block
    _score(gd, model, x, y, passes=1)
    assert gd.scored_batches == 1
    before = [g.score.clone() for g in gates]
    F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(g.score, b) for g, b in zip(gates, before))


def test_tick_trains_what_the_original_trains():
    """The original's tick: conv weights frozen; gates, BN shifts and the final Linear
    trained by SGD(lr_min=1e-3, momentum 0.9, weight decay 5e-4); scores gathered meanwhile."""
    model = _model("vgg16_bn")
    x, y = _data(16)
    gd = GateDecorator(model, x[:1])
    model.eval()
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    running = {n: gbn.bn.running_mean.clone() for n, gbn in gd.gates.items()}
    out = gd.tick(loader, F.cross_entropy)
    assert out["batches"] == 2 and gd.scored_batches == 2
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith("bn.weight"))
    assert not model.training  # flags restored; the tick itself ran in train mode:
    assert all(not torch.equal(gbn.bn.running_mean, running[n]) for n, gbn in gd.gates.items())
    ticked = {id(p) for p in gd.tick_parameters()}
    assert ticked == {id(p) for p in gd.gate_parameters()} | {id(model.classifier[1].weight),
                                                               id(model.classifier[1].bias)}
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (id(p) in ticked), n
    # the same two SGD steps by hand (fresh momentum buffers), from the same start
    ref = _model("vgg16_bn")
    gd_ref = GateDecorator(ref, x[:1])
    opt = torch.optim.SGD(gd_ref.tick_parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    ref.train()
    for xb, yb in loader:
        ref.zero_grad(set_to_none=True)
        F.cross_entropy(ref(xb), yb).backward()
        for mod in ref.modules():
            if isinstance(mod, nn.Conv2d):
                for p in mod.parameters():
                    p.grad = None
        opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    # with your own optimizer (momentum buffers on the convs too): the convs still do not move
    # (the original's zero_grad kept zero gradients, so its convs drifted by momentum and decay)
    full = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    F.cross_entropy(model(x), y).backward()
    full.step()
    convs = [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.Conv2d)]
    gd.tick(loader, F.cross_entropy, optimizer=full)
    assert all(torch.equal(a, m.weight) for a, m in
               zip(convs, [m for m in model.modules() if isinstance(m, nn.Conv2d)]))
    # score only (the behaviour before): nothing trains
    snap = [p.detach().clone() for p in model.parameters()]
    assert gd.tick(loader, F.cross_entropy, num_batches=1, train=False)["batches"] == 1
    assert gd.scored_batches == 1
    assert all(torch.equal(a, p) for a, p in zip(snap, model.parameters()))


# ---------------------------------------------------------------------------- prune
@pytest.mark.parametrize("name", MODELS)
def test_prune_respects_min_ratio_groups_and_ranking(name):
    model = _model(name)
    x, y = _data(8)
    gd = GateDecorator(model, x[:1], min_keep_ratio=0.5)
    _score(gd, model, x, y)
    scores = gd.ranking_scores()  # flops_eta=0: the member scores' sum, in float64
    assert all(torch.allclose(gd.group_scores(n).double(), s) for n, s in scores.items())
    k = 25
    chosen = gd.prune(k)
    units = sum(v.numel() * gd._group(n).units for n, v in chosen.items())
    assert units >= k + 1 and gd.history[-1]["units"] == units  # the threshold is entry k
    assert gd.summary()["units_masked"] == units
    max_chosen = max(float(scores[n][c].max()) for n, c in chosen.items())
    assert max_chosen == gd.history[-1]["threshold"]
    for g in gd.groups:
        open_ = g.channel_mask()
        assert int(open_.sum()) >= g.keep_min == max(1, g.m // 2)
        # all members of a group share the decision
        for _, gbn, idx, _ in g.members:
            assert torch.equal(gbn.mask[idx] > 0, open_)
        if g.name in chosen:
            assert not open_[chosen[g.name]].any()
        # global ranking: no cheaper channel was skipped where the group could give more
        if int(open_.sum()) > g.keep_min:
            assert float(scores[g.name][open_].min()) > max_chosen
    # prune up to the limit, then one more is an error that says what to do
    left = sum((int(g.channel_mask().sum()) - g.keep_min) * g.units for g in gd.groups)
    assert gd.max_prunable() == left
    gd.prune(left - 1)
    assert gd.max_prunable() == 0
    with pytest.raises(ValueError, match="min_keep_ratio"):
        gd.prune(0)


def test_flops_aware_penalty_prefers_large_feature_maps():
    """The original's term: eta / smallest_area * area * remaining, per BN."""
    model = _model("vgg16_bn")
    x, y = _data(8)
    eta = 1e3
    gd = GateDecorator(model, x[:1], flops_eta=eta)
    _score(gd, model, x, y)
    areas = {n: gbn.out_area for n, gbn in gd.gates.items()}
    assert areas["features.1"] == 32 * 32 and min(areas.values()) == 2 * 2
    pen = {n: eta / 4 * areas[n] * gbn.num_features for n, gbn in gd.gates.items()}
    for n, gbn in gd.gates.items():
        assert torch.allclose(gd.ranking_scores(n), gbn.score.double() - pen[n])
    chosen = gd.prune(5)
    top = max(pen.values())
    assert chosen and all(pen[n] == top for n in chosen)


# ---------------------------------------------------------------------------- melt
def _train_steps(model, gd, opt, x, y, n):
    model.train()
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) + gd.gate_l1()).backward()
        opt.step()


@pytest.mark.parametrize("name", MODELS)
def test_melt_matches_masked_model_with_fewer_flops(name):
    model = _model(name)
    x, y = _data(16)
    ex = x[:1]
    flops0, params0 = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), ex)
    gd = GateDecorator(model, ex)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gd.attach(opt)
    _score(gd, model, x, y)
    gd.prune(40)
    _train_steps(model, gd, opt, x, y, 2)
    model.eval()
    small = gd.melt().eval()
    assert not any(isinstance(m, GatedBatchNorm) for m in small.modules())
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() < 1e-4
    flops1, params1 = tp.utils.count_ops_and_params(small, ex)
    assert flops1 < flops0 and params1 < params0
    # each melted BN has exactly the open channels of its gate
    for n, gbn in gd.gates.items():
        assert small.get_submodule(n).num_features == int(gbn.mask.sum())
    # the decorated model is untouched and still trains
    assert sum(isinstance(m, GatedBatchNorm) for m in model.modules()) == len(gd.gates)


def test_melt_flatten_linear_index_mapping():
    torch.manual_seed(0)
    model = get_model("flatten_linear_cnn", width=0.5)
    _randomize_bn(model)
    x, y = _data(8)
    gd = GateDecorator(model, x[:1])
    _score(gd, model, x, y)
    gd.prune(6)
    model.eval()
    small = gd.melt().eval()
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() < 1e-4


# ---------------------------------------------------------------------------- DPM
@pytest.mark.parametrize("name", MODELS)
def test_dpm_structures_follow_n_step_norms_then_masks_close(name):
    n_steps = 3
    model = _model(name)
    x, y = _data(16)
    gd = GateDecorator(model, x[:1], decay=DecayConfig(steps=n_steps, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    gd.attach(opt)
    _score(gd, model, x, y)
    chosen = gd.prune(12)
    l_init = {n: _channel_norms(gd, n, c) for n, c in chosen.items()}
    # a decision does not touch masks or weights
    for n, c in chosen.items():
        assert torch.allclose(_channel_norms(gd, n, c), l_init[n])
        assert bool((gd._group(n).channel_mask()[c]).all())
        assert bool(gd.engine.is_decaying(n)[c].all())
    # ... and decaying channels are out of the L1 penalty
    for n, c in chosen.items():
        for _, gbn, idx, _ in gd._group(n).members:
            assert not gbn.penalty_mask[idx[c]].any()
    for step in range(1, n_steps + 2):
        _train_steps(model, gd, opt, x, y, 1)
        for n, c in chosen.items():
            norms = _channel_norms(gd, n, c)
            mask_open = gd._group(n).channel_mask()[c]
            target = max(n_steps - step, 0) / n_steps * l_init[n]
            assert torch.all(norms <= target * (1 + 1e-5) + 1e-7), (step, norms, target)
            if step < n_steps:
                assert torch.all(norms > 0) and bool(mask_open.all())
            else:
                # exactly zero, and only now the masks are closed
                assert torch.all(norms == 0) and not bool(mask_open.any())
                for s in gd.structure_params(n):
                    pos = c if len(s) == 2 else s[2][c].reshape(-1)
                    assert torch.all(s[0].detach().index_select(s[1], pos) == 0)
    assert gd.summary()["decaying"] == 0
    model.eval()
    small = gd.melt().eval()
    with torch.no_grad():
        assert (model(x) - small(x)).abs().max() < 1e-4
    assert tp.utils.count_ops_and_params(small, x[:1])[0] < \
        tp.utils.count_ops_and_params(model, x[:1])[0]


def test_dpm_released_filters_return_to_normal_and_can_be_picked_again():
    torch.manual_seed(0)
    model = get_model("vgg16_bn", width=WIDTH)  # default BN init: no dead (zero-gradient) channel
    x, y = _data(16)
    # t_rate=-1, t_len=0: every decaying channel with a gradient is released at once
    gd = GateDecorator(model, x[:1], decay=DecayConfig(steps=5, t_rate=-1.0, t_len=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gd.attach(opt)
    released = []
    gd.engine.on_released(lambda n, c: released.append((n, c.clone())))
    _score(gd, model, x, y)
    chosen = gd.prune(5)
    _train_steps(model, gd, opt, x, y, 1)
    assert sum(c.numel() for _, c in released) == sum(c.numel() for c in chosen.values()) >= 6
    for n, c in chosen.items():
        assert not gd.engine.is_decaying(n)[c].any()
        assert bool(gd.remaining(n)[c].all())
        assert bool(gd._group(n).channel_mask()[c].all())
        for _, gbn, idx, _ in gd._group(n).members:
            assert bool(gbn.penalty_mask[idx[c]].all())
    # released channels are candidates again: with the same scores, the same choice
    again = gd.prune(5)
    assert {n: c.tolist() for n, c in again.items()} == {n: c.tolist() for n, c in chosen.items()}


def test_dpm_decaying_channels_do_not_count_as_remaining():
    model = _model("vgg16_bn")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1], min_keep_ratio=0.5, decay=DecayConfig(steps=4))
    gd.attach(torch.optim.SGD(model.parameters(), lr=0.01))
    _score(gd, model, x, y)
    first = gd.prune(10)
    second = gd.prune(10)
    for n in set(first) & set(second):
        assert not set(first[n].tolist()) & set(second[n].tolist())
    n_chosen = sum(c.numel() for c in first.values()) + sum(c.numel() for c in second.values())
    assert n_chosen >= 22
    total = sum(gd.remaining(g.name).sum() for g in gd.groups)
    assert int(total) == sum(g.m for g in gd.groups) - n_chosen


def test_gate_l1_value():
    model = _model("vgg16_bn")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1], sparse_lambda=0.5)
    full = sum(gbn.g.detach().abs().sum() for gbn in gd.gates.values())
    assert torch.allclose(gd.gate_l1(), 0.5 * full)
    assert torch.allclose(gd.gate_l1(weight=2.0), 2.0 * full)
    _score(gd, model, x, y)
    gd.prune(7)
    # as the original: every gate, masked ones included
    assert torch.allclose(gd.gate_l1(weight=1.0), full)
    assert gd.gate_l1().requires_grad
    # DPM path: decaying gates are left out, zeroed ones are back (they are exactly 0)
    model = _model("vgg16_bn")
    gd = GateDecorator(model, x[:1], decay=DecayConfig(steps=2, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gd.attach(opt)
    _score(gd, model, x, y)
    full = sum(gbn.g.detach().abs().sum() for gbn in gd.gates.values())
    chosen = gd.prune(7)
    decaying = sum(gd.gates[n].g.detach()[c].abs().sum() for n, c in chosen.items())
    assert torch.allclose(gd.gate_l1(weight=1.0), full - decaying)
    _train_steps(model, gd, opt, x, y, 2)
    assert gd.summary()["masked"] == sum(c.numel() for c in chosen.values())
    full = sum(gbn.g.detach().abs().sum() for gbn in gd.gates.values())
    assert torch.allclose(gd.gate_l1(weight=1.0), full)


# ---------------------------------------------------------------------------- resume
def _run(steps_total, stop_at=None, resume_from=None):
    """Tick-tock with DPM on thin ResNet-20; optional checkpoint/resume; returns final state."""
    torch.manual_seed(0)
    model = get_model("resnet20", width=WIDTH)
    x, y = _data(32, seed=3)
    gd = GateDecorator(model, x[:1], decay=DecayConfig(steps=3, t_rate=0.3, t_len=0.8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gd.attach(opt)
    start = 0
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        opt.load_state_dict(resume_from["opt"])
        gd.load_state_dict(resume_from["gd"])
        start = resume_from["step"]
    for step in range(start, steps_total):
        if stop_at is not None and step == stop_at:
            return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                    "gd": copy.deepcopy(gd.state_dict()), "step": step, "summary": gd.summary()}
        xb, yb = x[(step % 4) * 8:(step % 4 + 1) * 8], y[(step % 4) * 8:(step % 4 + 1) * 8]
        if step % 4 == 0:
            _score(gd, model, xb, yb)
            gd.prune(4)
        model.train()
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(xb), yb) + gd.gate_l1()).backward()
        opt.step()
    return {"model": model.state_dict(), "gd": gd.state_dict(), "summary": gd.summary()}


def test_state_dict_resume_mid_decay_is_exact():
    full = _run(10)
    ckpt = _run(10, stop_at=6)
    assert ckpt["summary"]["decaying"] > 0 and ckpt["summary"]["masked"] > 0
    resumed = _run(10, resume_from=ckpt)
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert full["summary"] == resumed["summary"]
    assert full["gd"]["history"] == resumed["gd"]["history"]


def test_load_state_dict_into_other_shape_is_an_error():
    x, _ = _data(1)
    a = GateDecorator(get_model("resnet20", width=WIDTH), x)
    b = GateDecorator(get_model("resnet20", width=0.5), x)
    with pytest.raises(ValueError, match="another shape"):
        b.load_state_dict(a.state_dict())
    c = GateDecorator(get_model("resnet20", width=WIDTH), x, decay=DecayConfig())
    with pytest.raises(ValueError, match="decay"):
        c.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------- bad input
def test_model_without_batchnorm_is_a_clear_error():
    with pytest.raises(ValueError, match="no BatchNorm"):
        GateDecorator(get_model("vgg16", width=WIDTH), _data(1)[0])


def test_prune_before_scores_is_a_clear_error():
    model = _model("vgg16_bn")
    gd = GateDecorator(model, _data(1)[0])
    with pytest.raises(RuntimeError, match=r"gd\.scoring\(\)"):
        gd.prune(3)


def test_too_many_filters_is_a_clear_error():
    model = _model("vgg16_bn")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1], min_keep_ratio=0.5)
    _score(gd, model, x, y)
    total = sum(g.m for g in gd.groups)
    with pytest.raises(ValueError, match=r"at most \d+ can be pruned now, with num = \d+"):
        gd.prune(total)
    assert gd.summary()["masked"] == 0  # nothing happened


def test_other_misuse_errors():
    x, y = _data(8)
    model = _model("vgg16_bn")
    early_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gd = GateDecorator(model, x[:1], decay=DecayConfig())
    with pytest.raises(ValueError, match="AFTER GateDecorator"):
        gd.attach(early_opt)
    _score(gd, model, x, y)
    with pytest.raises(RuntimeError, match="attach"):
        gd.prune(2)
    with pytest.raises(ValueError, match="already has gates"):
        GateDecorator(model, x[:1])
    with pytest.raises(ValueError, match="min_keep_ratio"):
        GateDecorator(_model("vgg16_bn"), x[:1], min_keep_ratio=0.0)
    with pytest.raises(ValueError, match="num_filters"):
        gd.prune(-1)


def test_scoring_with_grad_scaler_and_nonfinite_passes():
    model = _model("vgg16_bn")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1])
    _score(gd, model, x, y)
    plain = [g.score.clone() for g in gd.gates.values()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with gd.scoring(grad_scaler=scaler):
        model.zero_grad(set_to_none=True)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        # an overflowing pass contributes nothing
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x), y) * float("inf")).backward()
    model.zero_grad(set_to_none=True)
    assert gd.scored_batches == 1
    for g, p in zip(gd.gates.values(), plain):
        assert torch.isfinite(g.score).all()
        assert torch.allclose(g.score, p, rtol=1e-4, atol=1e-8)


def test_dpm_step_skipped_by_grad_scaler_changes_nothing():
    model = _model("vgg16_bn")
    x, y = _data(8)
    gd = GateDecorator(model, x[:1], decay=DecayConfig(steps=3, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gd.attach(opt)
    _score(gd, model, x, y)
    n_chosen = sum(c.numel() for c in gd.prune(5).values())
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)

    def step(poison: bool):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + gd.gate_l1()
        scaler.scale(loss * (float("inf") if poison else 1.0)).backward()
        scaler.step(opt)
        scaler.update()

    step(False)
    before = copy.deepcopy(gd.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    step(True)  # overflow: the scaler skips optimizer.step()
    after = gd.state_dict()
    assert after["engine"]["step_count"] == before["engine"]["step_count"]
    for n in before["masks"]:
        assert torch.equal(before["masks"][n], after["masks"][n])
    for name, st in before["engine"]["groups"].items():
        for key in ("decaying", "zeroed", "n_step", "l_init"):
            assert torch.equal(st[key], after["engine"]["groups"][name][key])
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    step(False), step(False)  # decay resumes and finishes: N=3 effective steps in all
    assert gd.summary()["masked"] == n_chosen and gd.summary()["decaying"] == 0
