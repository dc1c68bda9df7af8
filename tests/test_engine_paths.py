"""What the engine reads and keeps per step (the rules of "Self-Rectifying reads only what
Eq. 6 can use" in the ``dpm_core.engine`` docstring) and which path a large tensor takes.
Correctness of every path against the reference is in ``test_engine_property.py``."""

import math

import pytest
import torch

from dpm_core import DecayConfig, DecayEngine
from dpm_core.stacked import StackedLayout


def _linear_group(t_len, m=8, a=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(m, a, generator=g))
    opt = torch.optim.SGD([w], lr=0.05)
    # T_rate just below 1: no release, so every decaying channel advances
    eng = DecayEngine(DecayConfig(steps=5, t_rate=0.99, t_len=t_len, self_rectify=True))
    eng.sliced_min_numel = 0
    eng._streaming = (math.inf, 0.0)  # the gather path: its snapshot is visible
    eng.add_group("g", [(w, 0)])
    eng.attach(opt)
    return w, opt, eng


def test_snapshot_keeps_only_channels_whose_c_len_passes_t_len():
    w, opt, eng = _linear_group(t_len=0.8)
    eng.mark("g", list(range(8)))
    grad = torch.zeros(8, 16)
    grad[:3] = 1.0        # C_len = 8 * 4 / (3 * 4 + 5 * 0.04) > 0.8: may be released
    grad[3:] = 0.01       # C_len ~ 0.03: Eq. 6 fails whatever C_rate is
    w.grad = grad
    opt.step()
    layout = next(iter(eng._layout_cache.values()))
    spec = layout.sliced[0].specs[0]
    assert spec.region_blocks.numel() == 8       # all 8 decay (and are scaled)
    assert spec.snap_ch.tolist() == [0, 1, 2]    # x is kept for 3 of them only
    assert spec.snap.shape == (1, 3, 16)
    assert eng.state("g").n_step.tolist() == [1] * 8


def test_no_gradient_read_where_t_len_reaches_m(monkeypatch):
    # C_len <= M: with T_len >= M nothing can be released, so SR reads no gradient and
    # keeps no snapshot
    calls = []
    real = StackedLayout.grad_sq_norms
    monkeypatch.setattr(StackedLayout, "grad_sq_norms",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for t_len, reads in ((8.5, False), (7.9, True)):
        calls.clear()
        w, opt, eng = _linear_group(t_len=t_len)
        eng.mark("g", [0, 1, 2])
        w.grad = torch.randn(8, 16)
        opt.step()
        assert bool(calls) == reads, t_len
        spec = next(iter(eng._layout_cache.values())).sliced[0].specs[0]
        if not reads:
            assert spec.snap is None and spec.snap_ch is None
        assert eng.state("g").n_step.tolist()[:3] == [1, 1, 1]


@pytest.mark.parametrize("share, dense", [(1 / 16, False), (1 / 2, True)])
def test_large_tensor_path_follows_the_decaying_share(share, dense):
    # a Linear after a Flatten, 32 channels of 49 columns: the gather path for a few
    # decaying channels, the streaming path when half of them decay
    w = torch.nn.Parameter(torch.randn(16, 32 * 49))
    opt = torch.optim.SGD([w], lr=0.0)
    eng = DecayEngine(DecayConfig(steps=4, self_rectify=False))
    eng.sliced_min_numel = w.numel()
    eng.add_group("g", [(w, 1, torch.arange(32 * 49).view(32, 49))])
    eng.attach(opt)
    marked = list(range(0, 32, int(1 / share)))
    eng.mark("g", marked)
    before = w.detach().clone()
    opt.step()
    t = next(iter(eng._layout_cache.values())).sliced[0]
    assert t.dense == dense
    cols = torch.arange(32 * 49).view(32, 49)[marked].reshape(-1)
    rest = torch.ones(32 * 49, dtype=torch.bool)
    rest[cols] = False
    torch.testing.assert_close(w.detach()[:, cols], before[:, cols] * 3 / 4)
    assert torch.equal(w.detach()[:, rest], before[:, rest])  # exactly untouched


def test_clean_grads_and_sr_agree_on_every_path():
    # conv-like sharing (rows of B to group "b", index columns to group "a"), a captured
    # penalty-free gradient and a magnitude penalty, SR on with T_len in the middle of the
    # C_len range: the stacked, gather and streaming paths reach the same weights and state
    runs = []
    for path in ("stacked", "sliced", "streamed"):
        g = torch.Generator().manual_seed(7)
        A = torch.nn.Parameter(torch.randn(6, 5, generator=g))
        B = torch.nn.Parameter(torch.randn(8, 6 * 4, generator=g))
        opt = torch.optim.SGD([A, B], lr=0.05, momentum=0.9)
        eng = DecayEngine(DecayConfig(steps=6, t_rate=0.4, t_len=1.0, self_rectify=True))
        if path != "stacked":
            eng.sliced_min_numel = 0
            eng._streaming = (math.inf, 0.0) if path == "sliced" else (0.0, 1.0)
        eng.add_group("a", [(A, 0), (B, 1, torch.arange(24).view(6, 4))])
        eng.add_group("b", [(B, 0)])
        eng.attach(opt)
        eng.mark("a", [0, 2, 3, 5])
        eng.mark("b", [1, 4, 6])
        for _ in range(5):
            for p in (A, B):
                p.grad = torch.randn(p.shape, generator=g) - 0.1 * p.detach()
            eng.capture_clean_grads()
            for p in (A, B):
                p.grad += 2.0 * p.detach()  # the penalty the clean gradients remove
            opt.step()
        runs.append(([A.detach().clone(), B.detach().clone()],
                     {n: eng.state(n) for n in ("a", "b")}, dict(eng.counters)))
    (p0, s0, c0) = runs[0]
    assert c0["steps"] == 5 and c0["released"] >= 1          # some released by SR,
    assert any(st.decaying.any() for st in s0.values())      # some still decaying
    for p1, s1, c1 in runs[1:]:
        assert c1 == c0
        for n in ("a", "b"):
            assert torch.equal(s0[n].decaying, s1[n].decaying)
            assert torch.equal(s0[n].n_step, s1[n].n_step)
        for x, y in zip(p0, p1):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
