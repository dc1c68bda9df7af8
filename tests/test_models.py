"""Tests for benchmarks.models: shapes, parameter counts, DependencyGraph tracing."""
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from benchmarks.models import (
    MODEL_NAMES,
    FlattenLinearCNN,
    default_input_size,
    example_inputs,
    get_model,
)

# Thin widths keep the whole file fast on 2 CPU cores; resnet50 is traced at 64x64.
_SIZE = {"resnet50": 64}


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_classes,in_channels", [(10, 3), (100, 1)])
def test_forward_shape(name, num_classes, in_channels):
    torch.manual_seed(0)
    m = get_model(name, num_classes=num_classes, in_channels=in_channels, width=0.25).eval()
    x = example_inputs(name, in_channels=in_channels, batch=2, size=_SIZE.get(name))
    with torch.no_grad():
        y = m(x)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "vgg16_bn", "small_cnn", "flatten_linear_cnn"])
def test_small_inputs_work(name):
    # 8x8 inputs (the digits fallback without upsampling) must still run.
    m = get_model(name, width=0.25).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_parameter_counts():
    # Standard counts; option-B shortcuts add 2752 params to ResNet-56's 0.853M.
    assert abs(_n_params(get_model("resnet56")) - 0.855e6) < 0.01e6
    assert abs(_n_params(get_model("resnet20")) - 0.272e6) < 0.005e6
    assert abs(_n_params(get_model("vgg16_bn")) - 14.72e6) < 0.05e6
    assert abs(_n_params(get_model("vgg19_bn")) - 20.04e6) < 0.05e6
    assert _n_params(get_model("resnet50", num_classes=1000)) == 25_557_032  # torchvision's


def test_resnet50_is_torchvision_and_thin_keeps_names():
    import torchvision

    full = get_model("resnet50", num_classes=10)
    assert type(full) is torchvision.models.ResNet
    thin = get_model("resnet50", num_classes=10, width=0.25)
    assert {n for n, _ in full.named_modules()} == {n for n, _ in thin.named_modules()}
    assert thin.conv1.out_channels == 16 and thin.fc.in_features == 512


def test_resnet_option_b_shortcut():
    m = get_model("resnet56")
    blocks = [b for layer in (m.layer1, m.layer2, m.layer3) for b in layer]
    assert len(blocks) == 27
    projections = [b for b in blocks if len(b.shortcut) > 0]
    assert len(projections) == 2
    for b in projections:
        assert isinstance(b.shortcut[0], nn.Conv2d) and b.shortcut[0].kernel_size == (1, 1)
        assert isinstance(b.shortcut[1], nn.BatchNorm2d)


def test_width_multiplier():
    m = get_model("vgg16_bn", width=0.5)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 13
    assert convs[0].out_channels == 32 and convs[-1].out_channels == 256
    assert len([mod for mod in get_model("vgg19_bn").modules() if isinstance(mod, nn.Conv2d)]) == 16
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in get_model("vgg16", width=0.25).modules())
    assert all(c.bias is not None for c in get_model("vgg16", width=0.25).modules() if isinstance(c, nn.Conv2d))


def test_unknown_model_and_bad_args():
    with pytest.raises(ValueError) as e:
        get_model("resnet57")
    assert "resnet57" in str(e.value) and "resnet56" in str(e.value) and "vgg16_bn" in str(e.value)
    with pytest.raises(ValueError, match="width"):
        get_model("resnet20", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="in_channels"):
        get_model("small_cnn", in_channels=0)
    # aliases
    assert type(get_model("ResNet-56", width=0.25)).__name__ == "CifarResNet"
    assert default_input_size("resnet50") == 224 and default_input_size("vgg16") == 32


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dependency_graph_traces_and_prunes(name):
    """DepGraph traces every model; pruning one channel of the first conv keeps the forward working."""
    torch.manual_seed(0)
    m = get_model(name, width=0.25).eval()
    x = example_inputs(name, batch=1, size=_SIZE.get(name))
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
    conv = next(mod for mod in m.modules() if isinstance(mod, nn.Conv2d))
    before = conv.out_channels
    group = dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    assert dg.check_pruning_group(group)
    group.prune()
    assert conv.out_channels == before - 1
    with torch.no_grad():
        assert m(x).shape == (1, 10)
    ops, params = tp.utils.count_ops_and_params(m, x)
    assert ops > 0 and params == _n_params(m)


def test_resnet_residual_coupling_traced():
    # In a CIFAR ResNet the stem conv's output channels are coupled (through the residual adds)
    # with every block output of stage 1: pruning a stem channel must shrink layer1's conv2s.
    m = get_model("resnet20", width=0.5).eval()
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 32, 32))
    group = dg.get_pruning_group(m.conv1, tp.prune_conv_out_channels, idxs=[0, 1])
    group.prune()
    for block in m.layer1:
        assert block.conv2.out_channels == m.conv1.out_channels
    assert m.layer2[0].shortcut[0].in_channels == m.conv1.out_channels


def test_flatten_linear_index_mapping():
    # One conv channel owns H*W = 16 input columns of the first Linear.
    m = get_model("flatten_linear_cnn").eval()
    assert isinstance(m, FlattenLinearCNN)
    last_conv = m.features[4]
    fc = m.classifier[1]
    assert fc.in_features == last_conv.out_channels * 16
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 32, 32))
    keep_cols = torch.ones(fc.in_features, dtype=torch.bool)
    keep_cols[3 * 16:4 * 16] = False
    expected = fc.weight.detach()[:, keep_cols].clone()
    group = dg.get_pruning_group(last_conv, tp.prune_conv_out_channels, idxs=[3])
    group.prune()
    assert fc.in_features == last_conv.out_channels * 16
    assert torch.equal(fc.weight.detach(), expected)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
