"""Exact targets where decaying groups share elements (paper Figure 2 on a real ResNet).

Every ResNet/VGG layer shares elements between groups: a conv's filter rows belong to
its own layer's group, its input columns to the previous layer's. With half of each
layer decaying and nothing else moving the weights (lr = 0), every decaying channel's
norm must be exactly (N - k) / N of its L_init after step k, shared elements included
(the rule is in the ``dpm_core.engine`` docstring, "Shared elements").
"""

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
