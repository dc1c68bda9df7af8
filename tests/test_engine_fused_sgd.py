"""The engine's fused SGD update (``dpm_core.fused_sgd``): on the streaming path it runs
``torch.optim.SGD``'s update of a tensor itself, chunk by chunk inside the norm pass. It
must leave exactly what torch's step followed by the unfused decay leaves: weights,
momentum buffers, ``.grad`` and engine state; and it must stay out of the way wherever it
could not be exact."""

import math

import pytest
import torch

from dpm_core import DecayConfig, DecayEngine
from dpm_core import fused_sgd

SGD_OPTIONS = [
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.5, dampening=0.3),
    dict(momentum=0.9, maximize=True, weight_decay=1e-4),
    dict(momentum=0.0, weight_decay=1e-3),
    dict(momentum=0.0),
]


def _setup(fuse, sr, opt_fn, seed=3):
    """Group "a": A's rows and B's index columns; group "b": B's rows and C's columns
    (B shared by both). Every tensor takes the streaming path."""
    g = torch.Generator().manual_seed(seed)
    A = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    B = torch.nn.Parameter(torch.randn(8, 6 * 4, generator=g))
    C = torch.nn.Parameter(torch.randn(3, 8, generator=g))
    opt = opt_fn([A, B, C])
    eng = DecayEngine(DecayConfig(steps=5, self_rectify=sr, t_rate=0.3, t_len=0.0))
    eng.fuse_sgd = fuse
    eng.fuse_sgd_min_numel = 0
    eng.sliced_min_numel = 0
    eng._streaming = (0.0, 1.0)
    eng.add_group("a", [(A, 0), (B, 1, torch.arange(24).view(6, 4))])
    eng.add_group("b", [(B, 0), (C, 1)])
    eng.attach(opt)
    return [A, B, C], opt, eng


def _run(fuse, sr, opt_fn, n_iter=7, step=None):
    ps, opt, eng = _setup(fuse, sr, opt_fn)
    g = torch.Generator().manual_seed(11)
    grads_seen = []
    for it in range(n_iter):
        if it == 0:
            eng.mark("a", [0, 2, 3])
        if it == 2:
            eng.mark("b", [1, 4, 5, 7])
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        if it % 3 == 2:  # push some channels outward: Self-Rectifying may release them
            grads = [gr * 0.1 - 3.0 * p.detach() for gr, p in zip(grads, ps)]
        for p, gr in zip(ps, grads):
            p.grad = gr
        (step or (lambda o: o.step()))(opt)
        # .grad is given back: the very tensor the step was called with, unchanged
        grads_seen.append(all(p.grad is gr for p, gr in zip(ps, grads)))
    return ps, opt, eng, grads_seen


def _count_rows(monkeypatch):
    calls = []
    real = fused_sgd.DeferredSGD.rows
    monkeypatch.setattr(fused_sgd.DeferredSGD, "rows",
                        lambda self, a, b: (calls.append((a, b)), real(self, a, b))[1])
    return calls


def _assert_same(run_a, run_b):
    (pa, oa, ea, _), (pb, ob, eb, _) = run_a, run_b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)
    for x, y in zip(pa, pb):
        bx = oa.state.get(x, {}).get("momentum_buffer")
        by = ob.state.get(y, {}).get("momentum_buffer")
        assert (bx is None) == (by is None)
        if bx is not None:
            torch.testing.assert_close(bx, by, rtol=1e-6, atol=1e-7)
    for n in ("a", "b"):
        sa, sb = ea.state(n), eb.state(n)
        assert torch.equal(sa.decaying, sb.decaying)
        assert torch.equal(sa.zeroed, sb.zeroed)
        assert torch.equal(sa.n_step, sb.n_step)
    assert ea.counters == eb.counters


@pytest.mark.parametrize("sr", [False, True])
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                          o.items()))
def test_fused_update_equals_torch_sgd_then_decay(monkeypatch, options, sr):
    def make(params):
        return torch.optim.SGD(params, lr=0.05, **options)
    calls = _count_rows(monkeypatch)
    fused = _run(True, sr, make)
    assert calls, "the fused update never ran"
    plain_calls = len(calls)
    plain = _run(False, sr, make)
    assert len(calls) == plain_calls  # fuse_sgd=False never defers
    _assert_same(fused, plain)
    assert all(fused[3]) and all(plain[3])


def test_fused_steps_with_zeroing_and_lr_schedule(monkeypatch):
    # channels reach zero mid-run (their tensors then keep torch's update); the learning
    # rate changes every step
    def make(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)

    def step(opt):
        opt.step()
        for grp in opt.param_groups:
            grp["lr"] *= 0.8
    calls = _count_rows(monkeypatch)
    fused = _run(True, False, make, n_iter=12, step=step)
    assert calls
    plain = _run(False, False, make, n_iter=12, step=step)
    _assert_same(fused, plain)
    assert fused[2].state("a").zeroed.any()  # the run went through zeroing


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("case", ["adam", "subclass", "closure", "first-step"])
def test_not_fused_where_it_could_not_be_exact(monkeypatch, case):
    opt_fn = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
        "subclass": lambda ps: _MySGD(ps, lr=0.05, momentum=0.9),
        "closure": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "first-step": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    }[case]
    step = (lambda o: o.step(lambda: None)) if case == "closure" else None
    n_iter = 1 if case == "first-step" else 5  # torch makes the momentum buffer
    calls = _count_rows(monkeypatch)
    fused = _run(True, True, opt_fn, n_iter=n_iter, step=step)
    assert calls == []
    plain = _run(False, True, opt_fn, n_iter=n_iter, step=step)
    _assert_same(fused, plain)


def test_a_step_that_raises_gives_the_gradients_back():
    ps, opt, eng = _setup(True, False, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    eng.mark("a", [0, 1])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # makes the momentum buffers: the next step can be fused
    boom = [True]

    def failing(optimizer, args, kwargs):
        if boom.pop() if boom else False:
            raise RuntimeError("boom")
    h = opt.register_step_pre_hook(failing)  # runs after the engine's pre-hook
    grads = [torch.full_like(p, 0.5) for p in ps]
    for p, g in zip(ps, grads):
        p.grad = g
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    # the step did not happen; a retry without a new backward finds its gradients
    opt.step()
    h.remove()
    assert all(p.grad is g for p, g in zip(ps, grads))
    assert not all(torch.equal(p.detach(), b) for p, b in zip(ps, before))
    assert eng.state("a").n_step.tolist()[:2] == [2, 2]


def test_tensors_below_the_size_threshold_keep_torchs_update(monkeypatch):
    deferred = []
    real = fused_sgd.DeferredSGD.__init__
    monkeypatch.setattr(fused_sgd.DeferredSGD, "__init__",
                        lambda self, param, hp: (deferred.append(tuple(param.shape)),
                                                 real(self, param, hp))[1])
    ps, opt, eng = _setup(True, False, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    eng.fuse_sgd_min_numel = ps[1].numel()  # B only (8 x 24); A (6 x 5) and C (3 x 8) are smaller
    eng.mark("a", [0, 1])
    eng.mark("b", [2])
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert deferred and set(deferred) == {tuple(ps[1].shape)}


def test_sgd_hyperparameters_reads_group_and_state():
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([w], lr=torch.tensor(0.1), momentum=0.9, weight_decay=1e-2)
    w.grad = torch.randn(4, 3)
    assert fused_sgd.sgd_hyperparameters(opt, w, (opt,), {}) is None  # no buffer yet
    opt.step()
    hp = fused_sgd.sgd_hyperparameters(opt, w, (opt,), {})
    assert hp["buf"] is opt.state[w]["momentum_buffer"]
    assert math.isclose(hp["lr"], 0.1, rel_tol=1e-6) and hp["weight_decay"] == 1e-2
    assert fused_sgd.sgd_hyperparameters(opt, w, (opt, lambda: 0.0), {}) is None
    assert fused_sgd.sgd_hyperparameters(opt, w, (opt,), {"closure": lambda: 0.0}) is None
    w.grad = torch.randn(3, 4).t()  # not contiguous
    assert fused_sgd.sgd_hyperparameters(opt, w, (opt,), {}) is None
