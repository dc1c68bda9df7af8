"""Exact targets where decaying groups share elements (paper Figure 2 on a real ResNet).

Every ResNet/VGG layer shares elements between groups: a conv's filter rows belong to
its own layer's group, its input columns to the previous layer's. With half of each
layer decaying and nothing else moving the weights (lr = 0), every decaying channel's
norm must be exactly (N - k) / N of its L_init after step k, shared elements included
(the rule is in the ``dpm_core.engine`` docstring, "Shared elements").
"""

import math

import pytest
import torch
import torch_pruning as tp
import torchvision

from dpm_core import DecayConfig, DecayEngine
from dpm_depgraph import DecayMetaPruner

N = 4


def _channel_norms(engine, name):
    return engine._groups[name].sq_norms().sqrt()


def test_resnet18_half_of_each_layer_decays_exactly_by_figure2():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    pruner = DecayMetaPruner(model, x, importance=tp.importance.MagnitudeImportance(),
                             pruning_ratio=0.5, iterative_steps=1, global_pruning=False,
                             ignored_layers=[model.fc],
                             decay=DecayConfig(steps=N, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner.attach(opt)
    pruner.step()
    eng = pruner.engine
    # the engine exercises both of its paths on this model
    assert any(p.numel() >= DecayEngine.sliced_min_numel for n in eng.groups()
               for p in eng.group_params(n))
    assert any(p.numel() < DecayEngine.sliced_min_numel for n in eng.groups()
               for p in eng.group_params(n))
    groups = {n: eng.state(n) for n in eng.groups()}
    decaying = {n: st.decaying for n, st in groups.items() if st.decaying.any()}
    assert len(decaying) >= 8
    # channels of different groups share elements: every conv's input columns
    bn = model.layer1[0].bn1
    bn_group = next(n for n in eng.groups() if any(p is bn.weight for p in eng.group_params(n)))
    bn_slice = next(s for s in eng._groups[bn_group].slices if s.param is bn.weight)
    bn_marked = decaying[bn_group][bn_slice.local_owner]
    assert 0 < int(bn_marked.sum()) < bn.weight.numel()
    bn0 = bn.weight.detach().clone()
    for k in range(1, N + 1):
        opt.step()  # no gradients, lr = 0: nothing but the engine moves the weights
        for name, dec in decaying.items():
            norms = _channel_norms(eng, name)[dec]
            want = (N - k) / N * groups[name].l_init[dec]
            if k < N:
                torch.testing.assert_close(norms, want, rtol=2e-6, atol=0, msg=name)
            else:
                assert torch.count_nonzero(norms) == 0, name
        # BatchNorm scales of layer1[0].bn1: the marked ones at (N - k) / N of their value
        w = bn.weight.detach()
        torch.testing.assert_close(w[bn_marked], (N - k) / N * bn0[bn_marked], rtol=2e-6,
                                   atol=0)
        assert torch.equal(w[~bn_marked], bn0[~bn_marked])
    assert all(eng.state(n).zeroed[dec].all() for n, dec in decaying.items())


def _two_layer(dtype, path, sr):
    """conv-like rows/columns sharing: group "a" owns A's rows and B's index columns,
    group "b" owns B's rows and C's columns; B's elements belong to both groups."""
    g = torch.Generator().manual_seed(3)
    A = torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype))
    B = torch.nn.Parameter(torch.randn(8, 6 * 4, generator=g).to(dtype))
    C = torch.nn.Parameter(torch.randn(3, 8, generator=g).to(dtype))
    opt = torch.optim.SGD([A, B, C], lr=0.05, momentum=0.9)
    eng = DecayEngine(DecayConfig(steps=5, self_rectify=sr, t_rate=0.3, t_len=0.8))
    if path != "stacked":
        eng.sliced_min_numel = 0
        eng._streaming = (math.inf, 0.0) if path == "sliced" else (0.0, 1.0)
    eng.add_group("a", [(A, 0), (B, 1, torch.arange(24).view(6, 4))])
    eng.add_group("b", [(B, 0), (C, 1)])
    eng.attach(opt)
    return (A, B, C), opt, eng, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("sr", [False, True])
def test_sliced_and_stacked_paths_agree(dtype, sr):
    runs = []
    for path in ("stacked", "sliced", "streamed"):
        ps, opt, eng, g = _two_layer(dtype, path, sr)
        eng.mark("a", [0, 2, 3])
        for it in range(7):
            if it == 2:
                eng.mark("b", [1, 4, 5, 7])
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs.append(([p.detach().clone() for p in ps],
                     {n: eng.state(n) for n in ("a", "b")}))
    (p0, s0) = runs[0]
    for p1, s1 in runs[1:]:
        for n in ("a", "b"):
            assert torch.equal(s0[n].decaying, s1[n].decaying)
            assert torch.equal(s0[n].zeroed, s1[n].zeroed)
            assert torch.equal(s0[n].n_step, s1[n].n_step)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)
        for a, b in zip(p0, p1):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
            assert torch.equal(a == 0, b == 0)


def test_sliced_path_keeps_only_the_decaying_slices():
    # a Linear after a Flatten: 32 channels of 4 columns each; 2 decay
    w = torch.nn.Parameter(torch.randn(64, 32 * 4))
    opt = torch.optim.SGD([w], lr=0.1)
    eng = DecayEngine(DecayConfig(steps=3, self_rectify=True))
    eng.sliced_min_numel = w.numel()
    eng.add_group("g", [(w, 1, torch.arange(128).view(32, 4))])
    eng.attach(opt)
    eng.mark("g", [5, 17])
    w.grad = torch.randn_like(w)
    before = w.detach().clone()
    opt.step()
    layout = next(iter(eng._layout_cache.values()))
    assert not layout.buffers and len(layout.sliced) == 1
    spec = layout.sliced[0].specs[0]
    assert spec.r == 4  # whole runs of 4 columns are gathered, not single elements
    assert spec.snap.numel() == 64 * 2 * 4  # one copy of the decaying slices only
    moved = (w.detach() != before.add(w.grad, alpha=-0.1)).any(0)
    assert moved.nonzero().squeeze(1).tolist() == [20, 21, 22, 23, 68, 69, 70, 71]
