"""dpm_depgraph on the paper's and common models (thin versions, CPU, a few steps).

For each model: the decay pruner (decay.steps=1, Self-Rectifying off, local pruning)
ends, after ``finalize()``, with exactly the architecture the plain Torch-Pruning pruner
produces on the same model; the model is physically smaller, runs forward, trains on
with the same optimizer, and ``count_ops_and_params`` reports the reduction.
"""
import copy

import pytest
import torch
import torch_pruning as tp
import torchvision

from benchmarks.models import get_model
from dpm_depgraph import DecayConfig, DecayMetaPruner

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _thin_resnet18():
    # torchvision's resnet18 has no width argument: thin it to 1/4 width with plain
    # Torch-Pruning (same module structure and names, 16..128 channels).
    m = torchvision.models.resnet18(num_classes=10)
    tp.pruner.MetaPruner(m, X[:1], importance=tp.importance.MagnitudeImportance(),
                         pruning_ratio=0.75, ignored_layers=[m.fc]).step()
    return m


BUILDERS = {
    "resnet56": (lambda: get_model("resnet56", width=0.25), lambda m: [m.fc]),
    "vgg16_bn": (lambda: get_model("vgg16_bn", width=0.25), lambda m: [m.classifier]),
    "resnet18": (_thin_resnet18, lambda m: [m.fc]),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25),
                     lambda m: [m.classifier]),
    "flatten_linear_cnn": (lambda: get_model("flatten_linear_cnn", width=0.5),
                           lambda m: [m.classifier[3]]),
}


def _arch(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _train(model, opt, steps):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(X).logsumexp(1).mean().backward()
        opt.step()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_same_architecture_as_base_pruner_and_smaller(name):
    torch.manual_seed(0)
    build, ignored = BUILDERS[name]
    model0 = build()
    kw = dict(importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.5,
              iterative_steps=2, global_pruning=False)

    base_model = copy.deepcopy(model0)
    base = tp.pruner.MetaPruner(base_model, X[:1], ignored_layers=ignored(base_model), **kw)
    for _ in range(2):
        base.step()

    model = copy.deepcopy(model0)
    pruner = DecayMetaPruner(model, X[:1], ignored_layers=ignored(model),
                             decay=DecayConfig(steps=1, self_rectify=False), **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    pruner.attach(opt)
    pruner.step()
    assert _arch(model) == _arch(model0)      # marked for decay, nothing removed yet
    _train(model, opt, 1)                     # steps=1: the marked channels are now zero
    pruner.step()                             # removes them, marks the next ones
    assert _arch(model) != _arch(model0)
    _train(model, opt, 1)
    summary = pruner.finalize()
    assert summary["still_decaying"] == 0 and sum(summary["removed"].values()) > 0

    assert _arch(model) == _arch(base_model)
    macs0, params0 = tp.utils.count_ops_and_params(model0, X[:1])
    macs, params = tp.utils.count_ops_and_params(model, X[:1])
    assert params < 0.6 * params0 and macs < 0.7 * macs0
    assert sum(p.numel() for p in model.parameters()) == params
    model.eval()
    with torch.no_grad():
        assert model(X).shape == (2, 10)
    # the same optimizer keeps training the new, smaller parameters
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    _train(model, opt, 1)
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].shape == p.shape


@pytest.mark.parametrize("opts,lr", [
    (dict(global_pruning=False), 0.01),
    (dict(global_pruning=True), 0.0),
    (dict(global_pruning=True, round_to=4, importance=tp.importance.MagnitudeImportance()), 0.0),
])
def test_same_architecture_as_base_pruner_while_channels_still_decay(opts, lr):
    """decay.steps=3 with one optimizer step between pruning steps: at each pruning step
    the channels selected before are still decaying (partly shrunk, not zero). They count
    as removed, and the importances are computed with their weights reading 0 (a filter's
    input columns owned by a decaying channel of the previous layer are gone in the
    smaller model Torch-Pruning holds), so local and global selections end at the plain
    pruner's architecture. Global pruning ranks weights across layers, so the weights
    must be the plain pruner's: lr = 0 there (only the decay moves them)."""
    torch.manual_seed(0)
    model0 = get_model("resnet56", width=0.25)
    kw = dict(importance=tp.importance.GroupMagnitudeImportance(), pruning_ratio=0.5,
              iterative_steps=3)
    kw.update(opts)
    base_model = copy.deepcopy(model0)
    base = tp.pruner.MetaPruner(base_model, X[:1], ignored_layers=[base_model.fc], **kw)
    for _ in range(3):
        base.step()
    model = copy.deepcopy(model0)
    pruner = DecayMetaPruner(model, X[:1], ignored_layers=[model.fc],
                             decay=DecayConfig(steps=3, self_rectify=False), **kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pruner.attach(opt)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        pruner.step()             # nothing is zero yet: nothing removed, weights untouched
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert pruner.engine.any_decaying()
        _train(model, opt, 1)
    pruner.finalize(force=True)
    assert _arch(model) == _arch(base_model)
    assert _arch(model) != _arch(model0)
