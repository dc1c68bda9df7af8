"""DHSPG never returns a broken subnet: every layer keeps at least one group (issue 13).

ResNet-18 and DenseNet layouts (torchvision's blocks, thin widths, 32x32 inputs) at target
group sparsity 0.7-0.9 with the settings a new user tries (``lr=0.1, lmbda=2.0``): before
OTOv2's keep-one-group-per-layer rule was applied for ``group_divisible=1`` these zeroed
whole layers and ``construct_subnet`` returned convs with 0 output channels.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

from dpm_core import DecayConfig
from dpm_otov2 import OTO
from dpm_otov2.dhspg_rules import num_kept
from test_otov2_dhspg import subnet_of

pytestmark = pytest.mark.usefixtures("one_thread")


class ThinResNet18(ResNet):
    """torchvision's ResNet-18 layout (BasicBlock x [2, 2, 2, 2], 1x1 downsample shortcuts)
    with stage widths ``w, 2w, 4w, 8w`` (module level, so construct_subnet can pickle it)."""

    def __init__(self, width: int = 8, num_classes: int = 10):
        nn.Module.__init__(self)
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(BasicBlock, width, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * width, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, 2, stride=2)
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8 * width, num_classes)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "resnet18":
        return ThinResNet18(8)
    # DenseNet-121's layout (dense layers of 1x1 + 3x3 convs, concatenation, transitions),
    # 2 layers per block instead of 6/12/24/16 and growth 8 instead of 32
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2),
                                       num_init_features=16, bn_size=2, num_classes=10)


@pytest.mark.parametrize("arch,target,decay", [
    ("resnet18", 0.7, None), ("resnet18", 0.9, None), ("densenet", 0.8, None),
    ("densenet", 0.9, None), ("densenet", 0.9, DecayConfig(steps=3)),
], ids=lambda v: "dpm" if isinstance(v, DecayConfig) else ("otov2" if v is None else str(v)))
def test_every_layer_keeps_a_group_and_subnet_matches(arch, target, decay, tmp_path):
    model = _model(arch)
    oto = OTO(model, torch.randn(1, 3, 32, 32))
    params0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "target will not be reached"
        opt = oto.dhspg(lr=0.1, lmbda=2.0, target_group_sparsity=target, decay=decay)
        g = torch.Generator().manual_seed(1)
        for _ in range(60):
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            busy = opt.engine is not None and opt.engine.any_decaying()
            if opt.reach_target_group_sparsity() and not busy:
                break
    for z in opt.zigs:  # no layer lost all its groups
        assert int((z.param_rows().norm(dim=1) > 0).sum()) >= 1, z.name
    final = opt.compute_group_sparsity()
    # OTOv2's band: G_p holds at most K = int(N * (target + tolerance)) groups; its per-layer
    # rule can leave G_p a few groups short of the target (then a warning says so)
    assert final <= opt.K / opt.total_num_groups + 1e-12
    assert abs(final - target) <= opt.tolerance_group_sparsity, final
    assert final >= target - 0.01, final
    sub = subnet_of(model, oto, torch.randn(2, 3, 32, 32), tmp_path)  # asserts the 1e-4 bound
    assert sum(p.numel() for p in sub.parameters()) < params0


def test_num_kept_is_otov2s_rule():
    assert num_kept(10, 0, 1) == 1          # all ten redundant: keep one
    assert num_kept(10, 3, 1) == 3
    assert num_kept(10, 0, 4) == 4          # at least one multiple of group_divisible
    assert num_kept(10, 6, 4) == 8          # round(1.5) = 2 -> 8
    assert num_kept(10, 10, 4) == 8         # round(2.5) = 2 (halves to even) -> 8
    assert num_kept(11, 11, 4) == 11        # round(2.75) = 3 -> 12, capped at m
    assert num_kept(4, 0, 4) == 4           # m <= group_divisible: never penalised
    assert num_kept(3, 0, 4) == 3


def _cnn_oto():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    return model, OTO(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("kwargs,match", [
    (dict(target_group_sparsity=0.3, tolerance_group_sparsity=0.5),
     "tolerance_group_sparsity=0.5 is larger than target_group_sparsity=0.3"),
    (dict(target_group_sparsity=0.95), "cannot be reached"),  # 8 + 4 groups, keep >= 1 each
    (dict(target_group_sparsity=0.5, group_divisible=4), "cannot be reached"),
    (dict(weight_decay_type="l1"), "weight_decay_type must be 'l2_norm' or 'l1_norm'"),
    (dict(weight_decay_type="l1_norm"), "needs variant='adamw'"),
    (dict(moment_init="zero"), "variant='sgd' has none"),
    (dict(variant="adam", moment_init="ones"), "moment_init must be 'gradient'"),
    (dict(start_pruning_step=3, partition_step=1, half_space_project_steps=2),
     "only sets the defaults"),
    (dict(start_pruning_step=3, start_pruning_steps=4), "not both"),
    (dict(release_cooldown=5), "needs decay=DecayConfig"),
    (dict(second_momentum=0.99), "variant='sgd' has no second moment"),
    (dict(variant="adam", dampening=0.1), "dampening=0.1 is SGD's"),
])
def test_inconsistent_settings_are_clear_errors(kwargs, match):
    _, oto = _cnn_oto()
    with pytest.raises(ValueError, match=match):
        oto.dhspg(**kwargs)


def test_reachable_limits_are_accepted():
    _, oto = _cnn_oto()
    # 12 groups, every layer keeps one: 10 can be zeroed (0.833); 0.8 needs 10
    assert oto.dhspg(target_group_sparsity=0.8, tolerance_group_sparsity=0.05).K == 10
    assert oto.dhspg(target_group_sparsity=0.0).K == 0  # no pruning: the tolerance is moot


def test_moment_init_zero_is_torch_adam():
    """moment_init='zero' is textbook Adam; the default ('gradient') is OTOv2's."""
    model, oto = _cnn_oto()
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]
    ref_opt = torch.optim.Adam(ref, lr=0.01)
    opt = oto.dhspg(variant="adam", lr=0.01, target_group_sparsity=0.0, moment_init="zero")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, q, gr in zip(model.parameters(), ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref):
        assert torch.allclose(p, q, atol=1e-6)
    _, oto2 = _cnn_oto()
    assert oto2.dhspg(variant="adam").param_groups[0]["moment_init"] == "gradient"


def test_plain_oto_dhspg_takes_epsilon_and_lmbda():
    """``only_train_once.OTO.dhspg`` (after import dpm_otov2) passes 2.0.x's arguments and
    uses OTOv2's tolerance default 0.05."""
    import only_train_once

    model = _cnn_oto()[0]
    oto = only_train_once.OTO(model, torch.randn(1, 3, 8, 8))
    opt = oto.dhspg(lr=0.05, epsilon=0.3, lmbda=2.0, target_group_sparsity=0.5,
                    weight_decay_type="l2_norm", device="cpu")
    assert opt.param_groups[0]["epsilon"] == 0.3 and opt.get_lmbda() == 2.0
    assert opt.tolerance_group_sparsity == 0.05
    assert oto._optimizer is opt
    with pytest.raises(TypeError):
        oto.dhspg(0.1, 1e-4)  # only lr is positional (2.0.x and 3.0.1 order the rest apart)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
@pytest.mark.parametrize("target", [0.7, 0.8, 0.9])
def test_torchvision_full_size(arch, target, tmp_path):
    """The issue's runs: torchvision resnet18 / densenet121 (random init, 32x32 inputs),
    ``dhspg(lr=0.1, lmbda=2.0, target_group_sparsity=target)``; prints the final sparsity
    (``pytest -m slow -s -k full_size``)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10)
    oto = OTO(model, torch.randn(1, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt = oto.dhspg(lr=0.1, lmbda=2.0, target_group_sparsity=target)
        g = torch.Generator().manual_seed(1)
        for step in range(150):
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if opt.reach_target_group_sparsity():
                break
    final = opt.compute_group_sparsity()
    kept = min(int((z.param_rows().norm(dim=1) > 0).sum()) for z in opt.zigs)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y_full = model(x)
    oto.construct_subnet(out_dir=str(tmp_path))
    sub = oto.compressed_model().eval()
    with torch.no_grad():
        diff = (sub(x) - y_full).abs().max().item()
    print(f"\n{arch} target {target}: final group sparsity {final:.4f} after {step + 1} steps "
          f"(K/N {opt.K / opt.total_num_groups:.4f}, N {opt.total_num_groups}), fewest kept "
          f"groups in a layer {kept}, subnet max abs diff {diff:.2e}")
    assert kept >= 1 and diff < 1e-4
    assert abs(final - target) <= opt.tolerance_group_sparsity
    assert final <= opt.K / opt.total_num_groups + 1e-12
