"""Unit tests of dpm_core: every rule of the engine on small tensors with hand-set grads."""

import math
import warnings

import pytest
import torch

from dpm_core import DecayConfig, DecayEngine
from dpm_core import functional as F


def make(m=4, n=3, steps=3, self_rectify=False, opt="sgd", lr=0.0, seed=0, **okw):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(m, n))
    if opt == "sgd":
        o = torch.optim.SGD([w], lr=lr, **okw)
    elif opt == "adam":
        o = torch.optim.Adam([w], lr=lr, **okw)
    else:
        raise ValueError(opt)
    e = DecayEngine(DecayConfig(steps=steps, self_rectify=self_rectify))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    return w, o, e


def step(w, o, grad):
    w.grad = grad.clone()
    o.step()


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    ({"steps": 0}, "steps"), ({"steps": 2.0}, "steps"), ({"steps": True}, "steps"),
    ({"t_len": -0.1}, "t_len"), ({"t_rate": float("nan")}, "t_rate"),
    ({"t_rate": float("inf")}, "t_rate"), ({"t_rate": "0.3"}, "t_rate"),
    ({"self_rectify": 1}, "self_rectify"),
    ({"t_rate": 1.0}, "self_rectify=False"), ({"t_rate": 2.0}, "ever be released"),
    ({"t_rate": -1.01}, "C_len alone"),
])
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        DecayConfig(**kw)


def test_config_defaults_and_roundtrip():
    c = DecayConfig()
    assert (c.steps, c.t_rate, c.t_len, c.self_rectify) == (5, 0.3, 0.8, True)
    assert DecayConfig.from_dict(c.to_dict()) == c
    assert DecayConfig(t_rate=-1, t_len=0).t_rate == -1.0
    # without Self-Rectifying the thresholds are unused: any finite value is accepted
    assert DecayConfig(t_rate=2.0, self_rectify=False).t_rate == 2.0
    assert DecayConfig(t_rate=0.999).t_rate == 0.999


def test_engine_rejects_non_config():
    with pytest.raises(TypeError, match="DecayConfig"):
        DecayEngine({"steps": 3})


# ---------------------------------------------------------------- Smooth Pruning
def test_figure2_three_steps_two_thirds_one_third_zero():
    w, o, e = make(steps=3)
    l0 = w.detach()[1].norm().item()
    e.mark("g", [1])
    norms = []
    for _ in range(3):
        step(w, o, torch.zeros_like(w))
        norms.append(w.detach()[1].norm().item() / l0)
    assert norms == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-6)
    assert torch.equal(w.detach()[1], torch.zeros(3))
    st = e.state("g")
    assert st.zeroed.tolist() == [False, True, False, False]
    assert not st.decaying.any()


@pytest.mark.parametrize("opt, okw", [("sgd", {}), ("sgd", {"momentum": 0.9}),
                                      ("adam", {})])
def test_norm_follows_targets_under_training(opt, okw):
    # the optimizer moves the channel (direction changes) but the norm lands on target
    w, o, e = make(m=6, n=5, steps=5, opt=opt, lr=0.01, **okw)
    e.mark("g", [0, 3])
    l0 = e.state("g").l_init[[0, 3]]
    g = torch.Generator().manual_seed(1)
    for k in range(1, 6):
        step(w, o, 0.1 * torch.randn(6, 5, generator=g))
        norms = w.detach()[[0, 3]].norm(dim=1)
        assert torch.allclose(norms, l0 * (5 - k) / 5, atol=1e-5), (k, norms, l0)
    assert torch.equal(w.detach()[[0, 3]], torch.zeros(2, 5))


def test_direction_is_kept():
    w, o, e = make(steps=4, lr=0.1)
    e.mark("g", [2])
    grad = torch.randn(4, 3)
    before = w.detach()[2] - 0.1 * grad[2]
    step(w, o, grad)
    after = w.detach()[2]
    cos = torch.nn.functional.cosine_similarity(before, after, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def test_recalibration_when_already_below_target():
    # N=5, L_init=1: the update shrinks the norm to 0.5 < target 0.8, so the channel keeps
    # x~ and n becomes 5 - ceil(0.5 / 0.2) = 2.
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    o = torch.optim.SGD([w], lr=1.0)
    e = DecayEngine(DecayConfig(steps=5, self_rectify=False))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [0])
    step(w, o, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    assert w.detach()[0].tolist() == [0.5, 0.0]
    assert e.state("g").n_step[0].item() == 2
    # next target is (5-3)*0.2 = 0.4 < 0.5: scaled to 0.4
    step(w, o, torch.zeros(2, 2))
    assert w.detach()[0].norm().item() == pytest.approx(0.4)
    assert e.state("g").n_step[0].item() == 3


def test_update_to_exact_zero_norm_zeroes_channel():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    o = torch.optim.SGD([w], lr=1.0)
    e = DecayEngine(DecayConfig(steps=5, self_rectify=False))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [0])
    step(w, o, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    st = e.state("g")
    assert st.zeroed[0] and not st.decaying[0] and st.n_step[0] == 5


def test_zeroed_stays_exactly_zero_with_momentum_and_weight_decay():
    w, o, e = make(steps=2, lr=0.1, momentum=0.9, weight_decay=1e-2)
    e.mark("g", [0])
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        step(w, o, torch.randn(4, 3, generator=g))
    assert torch.equal(w.detach()[0], torch.zeros(3))
    for _ in range(5):
        step(w, o, torch.randn(4, 3, generator=g))
        assert torch.equal(w.detach()[0], torch.zeros(3))
    assert e.state("g").zeroed[0]


def test_zeroed_stays_exactly_zero_when_its_update_is_not_finite():
    # 0 * inf is NaN: a zeroed channel whose x~ is not finite must still end at exact 0,
    # while a non-finite channel that is not zeroed is left as the optimizer made it
    w, o, e = make(m=4, steps=1, lr=0.1)
    e.mark("g", [0, 1])
    step(w, o, torch.zeros(4, 3))
    assert e.state("g").zeroed[:2].all()
    e.mark("g", [2])  # keeps the group in the stacked (decaying) path
    grad = torch.zeros(4, 3)
    grad[0, 0] = float("inf")
    grad[3, 1] = float("nan")
    step(w, o, grad)
    assert torch.equal(w.detach()[:2], torch.zeros(2, 3))
    assert torch.isnan(w.detach()[3, 1])
    assert e.state("g").zeroed[2]


def test_retargeted_group_decays_its_new_tensor():
    # the stacked layout is cached; set_slices must make the next step use the new tensor
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(4, 3))
    w2 = torch.nn.Parameter(torch.randn(4, 5))
    o = torch.optim.SGD([w1, w2], lr=0.0)
    e = DecayEngine(DecayConfig(steps=4, self_rectify=True))
    e.add_group("g", [(w1, 0)])
    e.attach(o)
    e.mark("g", [1])
    l0 = e.state("g").l_init[1].item()
    w1.grad, w2.grad = torch.zeros_like(w1), torch.zeros_like(w2)
    o.step()
    assert w1.detach()[1].norm().item() == pytest.approx(0.75 * l0)
    e.set_slices("g", [(w2, 0)])
    before = w1.detach().clone()
    n2 = w2.detach()[1].norm().item()
    o.step()
    assert torch.equal(w1.detach(), before)
    assert w2.detach()[1].norm().item() == pytest.approx(0.5 * l0)  # target (4-2)/4 L_init
    assert n2 > 0.5 * l0 and e.state("g").n_step[1] == 2


def test_group_changed_between_step_hooks_skips_only_that_group():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(4, 3))
    w2 = torch.nn.Parameter(torch.randn(4, 3))  # same shape: stacked in one buffer
    w3 = torch.nn.Parameter(torch.randn(4, 3))
    o = torch.optim.SGD([w1, w2, w3], lr=0.1)
    e = DecayEngine(DecayConfig(steps=4, self_rectify=True, t_len=1e9))  # never releases
    e.add_group("a", [(w1, 0)])
    e.add_group("b", [(w2, 0)])
    e.attach(o)
    e.mark("a", [0])
    e.mark("b", [0, 3])
    lb = e.state("b").l_init.clone()
    # a pre-hook registered after attach() runs between the engine's two hooks
    hook = o.register_step_pre_hook(lambda *a: e.set_slices("a", [(w3, 0)]))
    for p in (w1, w2, w3):
        p.grad = torch.randn_like(p)
    o.step()
    hook.remove()
    assert e.state("a").n_step[0] == 0  # its tensors changed mid-step: not advanced
    st = e.state("b")
    assert st.n_step[[0, 3]].tolist() == [1, 1]
    assert torch.allclose(w2.detach()[[0, 3]].norm(dim=1), 0.75 * lb[[0, 3]])
    o.step()  # the next step decays "a" on its new tensor
    assert e.state("a").n_step[0] == 1


def test_mark_is_noop_on_decaying_and_zeroed_and_zero_norm_zeroes_at_once():
    w, o, e = make(steps=3)
    e.mark("g", [0])
    l0 = e.state("g").l_init[0].item()
    step(w, o, torch.zeros_like(w))
    started = e.mark("g", [0])  # decaying: no-op
    assert started.numel() == 0
    assert e.state("g").l_init[0].item() == l0 and e.state("g").n_step[0] == 1
    with torch.no_grad():
        w[3] = 0
    e.mark("g", torch.tensor([False, False, False, True]))
    st = e.state("g")
    assert st.zeroed[3] and not st.decaying[3]
    e.mark("g", [3])  # zeroed: no-op
    assert e.counters["marked"] == 2


def test_untouched_channels_are_plain_optimizer_updates():
    w, o, e = make(m=5, steps=3, lr=0.1, momentum=0.9)
    ref = torch.nn.Parameter(w.detach().clone())
    ro = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    e.mark("g", [1])
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=g)
        step(w, o, grad)
        step(ref, ro, grad)
    keep = [0, 2, 3, 4]
    assert torch.equal(w.detach()[keep], ref.detach()[keep])


# ---------------------------------------------------------------- Self-Rectifying
def outward_grad(w, chan, scale):
    g = torch.zeros_like(w)
    g[chan] = -scale * w.detach()[chan]  # SGD moves x along +x: norm grows
    return g


def test_release_when_gradient_pushes_norm_up():
    w, o, e = make(m=4, steps=5, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    x = w.detach()[1].clone()
    grad = outward_grad(w, 1, 1.0)
    step(w, o, grad)
    st = e.state("g")
    assert not st.decaying[1] and not st.zeroed[1] and st.n_step[1] == 0
    assert torch.allclose(w.detach()[1], x * 1.1)  # keeps x~
    assert e.counters["released"] == 1
    # trains normally afterwards
    step(w, o, grad)
    assert torch.allclose(w.detach()[1], x * 1.1 - 0.1 * grad[1])


def test_no_release_when_gradient_is_short():
    # C_rate = 1 but this channel's gradient is tiny next to its neighbours: C_len < T_len
    w, o, e = make(m=4, steps=5, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    grad = torch.randn(4, 3)
    grad[1] = -1e-3 * w.detach()[1]
    step(w, o, grad)
    assert e.state("g").decaying[1]


def test_no_release_when_gradient_pulls_inward():
    w, o, e = make(m=4, steps=5, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    grad = torch.zeros(4, 3)
    grad[1] = 5.0 * w.detach()[1]  # big, but towards zero: C_rate = -1
    step(w, o, grad)
    assert e.state("g").decaying[1]


def test_criteria_thresholds_are_strict():
    # C_rate exactly -1 (a purely inward update) and T_rate = -1: not released (Eq. 6
    # uses >); C_rate exactly 1 against T_rate = 1 through the pure function
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2, 3))
    o = torch.optim.SGD([w], lr=0.5)  # x~ = x / 2 exactly: C_rate = -1 exactly
    e = DecayEngine(DecayConfig(steps=5, t_rate=-1.0, t_len=0.0))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [0])
    step(w, o, outward_grad(w, 0, -1.0))
    assert e.state("g").decaying[0]
    one = torch.ones(1)
    assert not F.release_condition(one, one, 1.0, 0.0).any()


def test_functional_criteria_values():
    c_rate = F.escaping_rate(torch.tensor([2.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]),
                             torch.tensor([1.0, 0.0, 2.0]))
    assert c_rate.tolist() == [1.0, 0.0, 0.0]
    c_len = F.relative_grad_length(torch.tensor([1.0, 3.0, float("inf")]))
    assert c_len[:2].tolist() == [0.5, 1.5]
    assert F.relative_grad_length(torch.zeros(3)).tolist() == [0, 0, 0]
    assert F.release_condition(torch.tensor([0.5, 0.5, 0.1]), torch.tensor([1.0, 0.1, 1.0]),
                               0.3, 0.8).tolist() == [True, False, False]
    t = F.target_length(torch.tensor([3.0]), torch.tensor([1]), 3)
    assert t.item() == pytest.approx(2.0)


def test_segment_sums_and_per_layer_means():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = F.segment_sum(v, torch.tensor([2, 0, 1]))
    assert out.tolist() == [[4.0, 6.0], [0.0, 0.0], [5.0, 6.0]]
    # two layers in one call, each against its own mean; a non-finite entry is left out
    g = torch.tensor([1.0, 3.0, 2.0, 2.0, float("nan")])
    c_len = F.relative_grad_length(g, torch.tensor([0, 0, 1, 1, 1]), 2)
    assert c_len[:4].tolist() == [0.5, 1.5, 1.0, 1.0]


def test_released_channel_can_be_marked_again():
    w, o, e = make(m=4, steps=3, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    step(w, o, outward_grad(w, 1, 1.0))
    assert not e.state("g").decaying[1]
    new = e.mark("g", [1])
    assert new.tolist() == [1]
    st = e.state("g")
    assert st.decaying[1] and st.l_init[1].item() == pytest.approx(w.detach()[1].norm().item())


# ---------------------------------------------------------------- slices & groups
def test_multi_tensor_group_with_index_slice():
    # conv (4 filters) -> flatten (4x2x2) -> linear: channel c owns 4 linear columns
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 4, 3)
    lin = torch.nn.Linear(16, 5)
    o = torch.optim.SGD(list(conv.parameters()) + list(lin.parameters()), lr=0.0)
    idx = torch.arange(16).view(4, 4)
    e = DecayEngine(DecayConfig(steps=2, self_rectify=False))
    e.add_group("conv", [(conv.weight, 0), (conv.bias, 0), (lin.weight, 1, idx)])

    def chan_norm(c):
        with torch.no_grad():
            return math.sqrt(conv.weight[c].pow(2).sum() + conv.bias[c] ** 2
                             + lin.weight[:, 4 * c:4 * c + 4].pow(2).sum())

    e.attach(o)
    l0 = chan_norm(2)
    e.mark("conv", [2])
    assert e.state("conv").l_init[2].item() == pytest.approx(l0, rel=1e-6)
    for p in [conv.weight, conv.bias, lin.weight, lin.bias]:
        p.grad = torch.zeros_like(p)
    lin_before = lin.weight.detach().clone()
    o.step()
    assert chan_norm(2) == pytest.approx(l0 / 2, rel=1e-5)
    other_cols = [i for i in range(16) if i not in (8, 9, 10, 11)]
    assert torch.equal(lin.weight.detach()[:, other_cols], lin_before[:, other_cols])
    o.step()
    assert chan_norm(2) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_params(dtype):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 8).to(dtype))
    o = torch.optim.SGD([w], lr=0.01)
    e = DecayEngine(DecayConfig(steps=4, self_rectify=False))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [0])
    assert e.state("g").l_init.dtype == torch.float32
    l0 = e.state("g").l_init[0].item()
    for k in range(1, 5):
        step(w, o, (0.1 * torch.randn(4, 8)).to(dtype))
        got = w.detach()[0].float().norm().item()
        tol = 2e-2 * l0 if dtype != torch.float64 else 1e-6
        assert got == pytest.approx(l0 * (4 - k) / 4, abs=tol)
    assert torch.equal(w.detach()[0].float(), torch.zeros(8))


def test_drop_channels_and_replace_param():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5, 4))  # b's dim 1 belongs to group "a"
    o = torch.optim.SGD([a, b], lr=0.0)
    e = DecayEngine(DecayConfig(steps=2, self_rectify=False))
    e.add_group("a", [(a, 0), (b, 1)])
    e.add_group("b", [(b, 0)])
    e.attach(o)
    e.mark("a", [1, 2])
    e.mark("b", [4])
    for _ in range(2):
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        o.step()
    assert e.zeroed_channels("a").tolist() == [1, 2]
    # physically remove a's channels 1, 2 (and b's input columns 1, 2)
    keep = torch.tensor([0, 3])
    a2 = torch.nn.Parameter(a.detach()[keep].clone())
    b2 = torch.nn.Parameter(b.detach()[:, keep].clone())
    o.param_groups[0]["params"] = [a2, b2]
    with pytest.raises(ValueError, match="drop_channels"):
        e.replace_param(b, b2)  # group "a" slice on dim 1 changed size
    e.drop_channels("a", [1, 2], slices=[(a2, 0), (b2, 1)])
    assert e.replace_param(b, b2) == ["b"]
    assert e.num_channels("a") == 2 and not e.state("a").zeroed.any()
    assert e.state("b").zeroed.tolist() == [False, False, False, False, True]
    a2.grad, b2.grad = torch.ones_like(a2), torch.ones_like(b2)
    o.step()  # zeroed row of b still written to 0 on the new tensor
    assert torch.equal(b2.detach()[4], torch.zeros(2))
    e.drop_channels("b", [0, 1, 2, 3, 4])
    assert e.groups() == ["a"]


def test_remove_handle_detaches():
    w, o, e = make(steps=3)
    e.mark("g", [0])
    e._handle.remove()
    before = w.detach()[0].clone()
    step(w, o, torch.zeros_like(w))
    assert torch.equal(w.detach()[0], before)
    assert e.optimizer is None
    e.attach(o)
    step(w, o, torch.zeros_like(w))
    assert w.detach()[0].norm().item() == pytest.approx(before.norm().item() * 2 / 3)


def test_events_and_counters():
    w, o, e = make(m=4, steps=2, self_rectify=True, lr=0.1)
    e.mark("g", [0, 1])
    grad = outward_grad(w, 0, 1.0)
    step(w, o, grad)
    step(w, o, torch.zeros_like(w))
    assert e.events == [
        {"step": 1, "decaying": 1, "released": 1, "zeroed": 0, "marked": 2},
        {"step": 2, "decaying": 0, "released": 0, "zeroed": 1, "marked": 0},
    ]
    assert e.counters == {"steps": 2, "marked": 2, "released": 1, "zeroed": 1}


def test_callbacks():
    w, o, e = make(m=4, steps=1, self_rectify=True, lr=0.1)
    seen = []
    e.on_zeroed(lambda n, c: seen.append(("z", n, c.tolist())))
    e.on_released(lambda n, c: seen.append(("r", n, c.tolist())))
    e.mark("g", [0, 2])
    step(w, o, outward_grad(w, 2, 1.0))
    assert seen == [("z", "g", [0]), ("r", "g", [2])]


def test_zero_now_forces_decaying_to_zero():
    w, o, e = make(steps=5)
    e.mark("g", [0, 1])
    step(w, o, torch.zeros_like(w))
    assert e.zero_now("g").tolist() == [0, 1]
    assert torch.equal(w.detach()[:2], torch.zeros(2, 3))
    assert e.state("g").zeroed[:2].all()


# ---------------------------------------------------------------- penalty-free SR
def test_clean_grads_remove_penalty_for_decaying_channels():
    w, o, e = make(m=4, steps=5, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    clean = outward_grad(w, 1, 1.0)
    clean[0] = torch.randn(3)
    w.grad = clean.clone()
    e.capture_clean_grads()
    w.grad += 3.0 * w.detach()  # a magnitude penalty pulling everything to zero
    x = w.detach()[1].clone()
    o.step()
    # the decaying channel saw the clean (outward) gradient: released, kept x~
    assert not e.state("g").decaying[1]
    assert torch.allclose(w.detach()[1], x * 1.1)


def test_clean_grads_restored_per_channel_across_groups_sharing_a_tensor():
    # w's rows are group "rows", its columns group "cols": only the elements of channels
    # that were decaying at the capture get their clean gradient back
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    v = torch.nn.Parameter(torch.randn(4, 3))  # same shape, group "other", retargeted
    u = torch.nn.Parameter(torch.randn(4, 3))
    o = torch.optim.SGD([w, v, u], lr=0.0)
    grads = {}
    e = DecayEngine(DecayConfig(steps=10 ** 6, self_rectify=True, t_len=1e9))
    e.add_group("rows", [(w, 0)])
    e.add_group("cols", [(w, 1)])
    e.add_group("other", [(v, 0)])
    e.attach(o)
    # the optimizer sees the gradients right after the engine's pre-hook
    o.register_step_pre_hook(lambda opt, *a: grads.update(
        {k: p.grad.clone() for k, p in (("w", w), ("v", v), ("u", u))}))
    e.mark("rows", [1])
    e.mark("cols", [2])
    e.mark("other", [0])
    clean_w, clean_v = torch.randn(4, 3), torch.randn(4, 3)
    w.grad, v.grad, u.grad = clean_w.clone(), clean_v.clone(), torch.zeros(4, 3)
    e.capture_clean_grads()
    w.grad += 5.0
    v.grad += 5.0
    e.set_slices("other", [(u, 0)])  # changed after the capture: not restored
    o.step()
    keep = torch.zeros(4, 3, dtype=torch.bool)
    keep[1] = True
    keep[:, 2] = True
    assert torch.equal(grads["w"], torch.where(keep, clean_w, clean_w + 5.0))
    assert torch.equal(grads["v"], clean_v + 5.0)


def test_without_clean_grads_penalty_hides_resistance():
    w, o, e = make(m=4, steps=5, self_rectify=True, lr=0.1)
    e.mark("g", [1])
    grad = outward_grad(w, 1, 1.0)
    grad[0] = torch.randn(3)
    w.grad = grad + 3.0 * w.detach()
    o.step()
    assert e.state("g").decaying[1]


def test_mark_between_step_hooks_does_not_skip_a_decay_step():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    o = torch.optim.SGD([w], lr=0.0)
    # a post-hook registered before attach() runs between the engine's pre- and post-hook
    o.register_step_post_hook(lambda *a: e.mark("g", [2]))
    e = DecayEngine(DecayConfig(steps=4, self_rectify=False))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [0])
    l0 = w.detach()[0].norm().item()
    w.grad = torch.zeros_like(w)
    o.step()
    st = e.state("g")
    assert st.n_step[0] == 1 and w.detach()[0].norm().item() == pytest.approx(0.75 * l0)
    assert st.decaying[2] and st.n_step[2] == 0  # marked mid-step: starts at the next step
    l2 = st.l_init[2].item()
    o.step()
    assert w.detach()[2].norm().item() == pytest.approx(0.75 * l2)


def test_capture_is_discarded_when_another_backward_comes_first():
    # iteration 1 captures, then its step is skipped (as GradScaler does on inf);
    # iteration 2 does not capture: its own gradient must be used, not iteration 1's
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    o = torch.optim.SGD([w], lr=0.1)
    e = DecayEngine(DecayConfig(steps=5, self_rectify=False))
    e.add_group("g", [(w, 0)])
    e.attach(o)
    e.mark("g", [1])
    (w * torch.full((4, 3), float("inf"))).sum().backward()
    e.capture_clean_grads()
    # step skipped; next iteration
    o.zero_grad()
    (w * 2.0).sum().backward()
    x = w.detach()[1].clone()
    o.step()
    assert torch.isfinite(w.detach()).all()
    expect = (x - 0.1 * 2.0)
    assert torch.allclose(w.detach()[1], expect * (0.8 * x.norm() / expect.norm()))
    assert e._clean_hooks == []


# ---------------------------------------------------------------- robustness
def test_gradscaler_skipped_step_does_not_advance():
    w, o, e = make(steps=3, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    e.mark("g", [0])
    before = (w.detach().clone(), e.state_dict())
    loss = (w * torch.tensor(float("inf"))).sum()
    scaler.scale(loss).backward()
    scaler.step(o)
    scaler.update()
    assert torch.equal(w.detach(), before[0])
    after = e.state_dict()
    assert after["step_count"] == 0
    assert torch.equal(after["groups"]["g"]["n_step"], before[1]["groups"]["g"]["n_step"])
    o.zero_grad()
    scaler.scale((w ** 2).sum()).backward()
    scaler.step(o)
    scaler.update()
    assert e.state("g").n_step[0] == 1


def test_nonfinite_gradient_is_contained():
    w, o, e = make(m=4, steps=3, self_rectify=True, lr=0.1)
    e.mark("g", [0, 1])
    grad = torch.zeros(4, 3)
    grad[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        step(w, o, grad)
    st = e.state("g")
    assert st.n_step.tolist()[:2] == [0, 1]  # channel 0 not advanced, channel 1 advanced
    assert st.decaying[0] and torch.isfinite(st.l_init).all()
    assert torch.isfinite(w.detach()[1:]).all()
    with torch.no_grad():
        w[0] = torch.tensor([1.0, 2.0, 2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(w, o, torch.zeros(4, 3))
    assert e.state("g").n_step[0] == 1


# ---------------------------------------------------------------- bad input
def test_bad_groups():
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(5, 3))
    e = DecayEngine()
    with pytest.raises(ValueError, match="agree on M"):
        e.add_group("x", [(a, 0), (b, 0)])
    with pytest.raises(ValueError, match="not a leaf"):
        e.add_group("x", [(a * 2, 0)])
    with pytest.raises(ValueError, match=r"index values must lie in \[0, 3\)"):
        e.add_group("x", [(a, 1, torch.tensor([[0], [3]]))])
    with pytest.raises(ValueError, match="dim 2 is out of range"):
        e.add_group("x", [(a, 2)])
    with pytest.raises(ValueError, match="LongTensor"):
        e.add_group("x", [(a, 1, torch.tensor([[0.0]]))])
    with pytest.raises(ValueError, match="twice"):
        e.add_group("x", [(a, 1, torch.tensor([[0], [0]]))])
    with pytest.raises(ValueError, match="empty"):
        e.add_group("x", [])
    e.add_group("x", [(a, 0)])
    with pytest.raises(ValueError, match="already exists"):
        e.add_group("x", [(a, 0)])
    with pytest.raises(KeyError, match="no group named 'y'"):
        e.mark("y", [0])
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        e.mark("x", [4])
    with pytest.raises(ValueError, match="bool channel mask"):
        e.mark("x", torch.tensor([True, False]))


def test_optimizer_must_hold_group_params_either_order():
    a = torch.nn.Parameter(torch.randn(4, 3))
    other = torch.nn.Parameter(torch.randn(2))
    e = DecayEngine()
    e.add_group("x", [(a, 0)])
    with pytest.raises(ValueError, match="not among the attached optimizer"):
        e.attach(torch.optim.SGD([other], lr=0.1))
    e2 = DecayEngine()
    e2.attach(torch.optim.SGD([other], lr=0.1))
    with pytest.raises(ValueError, match="not among the attached optimizer"):
        e2.add_group("x", [(a, 0)])
    assert e2.groups() == []
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        DecayEngine().attach("sgd")


def test_attach_to_second_optimizer_is_an_error():
    w, o, e = make()
    assert e.attach(o) is e._handle
    with pytest.raises(RuntimeError, match="already attached"):
        e.attach(torch.optim.SGD([w], lr=0.1))


def test_load_state_dict_mismatch():
    w, o, e = make(m=4, steps=3)
    sd = e.state_dict()
    w2 = torch.nn.Parameter(torch.randn(5, 3))
    e2 = DecayEngine(DecayConfig(steps=3))
    e2.add_group("g", [(w2, 0)])
    with pytest.raises(ValueError, match="does not match"):
        e2.load_state_dict(sd)
    e3 = DecayEngine(DecayConfig(steps=4))
    e3.add_group("g", [(w, 0)])
    with pytest.raises(ValueError, match="steps=3"):
        e3.load_state_dict(sd)
    e4 = DecayEngine(DecayConfig(steps=3))
    e4.add_group("h", [(w, 0)])
    with pytest.raises(ValueError, match="group layout mismatch"):
        e4.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a DecayEngine state_dict"):
        e4.load_state_dict({"foo": 1})


# ---------------------------------------------------------------- resume
def _run(steps_total, split=None, path=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def build(model, opt):
        e = DecayEngine(DecayConfig(steps=4, t_rate=0.1, t_len=0.5))
        e.add_group("h", [(model[0].weight, 0), (model[0].bias, 0), (model[2].weight, 1)])
        e.attach(opt)
        return e

    e = build(model, opt)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(steps_total)]
    for i, (x, y) in enumerate(data):
        if i == 2:
            e.mark("h", [0, 3, 5, 6])
        if split is not None and i == split:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "dpm": e.state_dict()}, path)
            torch.manual_seed(123)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                        torch.nn.Linear(8, 3))
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            e = build(model, opt)
            ck = torch.load(path)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            e.load_state_dict(ck["dpm"])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, e


def test_resume_mid_decay_is_bit_exact(tmp_path):
    m1, e1 = _run(9)
    m2, e2 = _run(9, split=4, path=tmp_path / "ck.pt")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = e1.state("h"), e2.state("h")
    for f in ("decaying", "zeroed", "n_step", "l_init"):
        assert torch.equal(getattr(s1, f), getattr(s2, f))
    assert e1.events == e2.events and e1.counters == e2.counters
    assert s1.zeroed.any()
