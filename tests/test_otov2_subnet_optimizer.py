"""dpm_otov2: keep training after construct_subnet (``oto.subnet_optimizer``) and the warning
for an optimizer that still holds the replaced parameters."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpm_otov2 import OTO
from dpm_otov2.subnet import StaleOptimizerWarning

from otov2_sanity_models import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _trained(kind, make_opt, steps=3):
    model, x = build(kind, batch=4)
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(5))
    oto = OTO(model, x[:1])
    opt = make_opt(oto, model)
    model.train()
    for _ in range(steps):
        _step(model, opt, x, y)
    return model, oto, opt, x, y


_SGD = lambda oto, m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9,  # noqa: E731
                                      weight_decay=1e-4)
_ADAM = lambda oto, m: torch.optim.Adam(m.parameters(), lr=1e-2)  # noqa: E731
_ADAMW2 = lambda oto, m: torch.optim.AdamW(  # noqa: E731
    [{"params": list(m.parameters())[:4], "lr": 1e-2}, {"params": list(m.parameters())[4:]}],
    lr=3e-3)


# "concat" has conv biases right before a train-mode BatchNorm: their true gradient is 0,
# the computed one rounding noise, which Adam's normalisation blows up to lr-sized steps
# that differ between two equal models; so Adam runs on the bias-free "resnet" only.
@pytest.mark.parametrize("kind,make_opt", [
    ("concat", _SGD), ("resnet", _SGD), ("resnet", _ADAM), ("resnet", _ADAMW2)],
    ids=["concat-sgd-momentum", "resnet-sgd-momentum", "resnet-adam", "resnet-adamw-2-groups"])
def test_subnet_continues_exactly_like_the_full_model(kind, make_opt, tmp_path):
    """One more step of the subnet with the carried state == the full group-sparse model's
    step with the old state, at the kept positions (gradients there are the same)."""
    model, oto, opt, x, y = _trained(kind, make_opt)
    np.random.seed(0)
    oto.random_set_zero_groups()
    full = copy.deepcopy(model)
    full_opt = type(opt)([dict(g, params=[dict(full.named_parameters())[n] for n in names])
                          for g, names in zip(opt.param_groups, _group_names(model, opt))])
    full_opt.load_state_dict(opt.state_dict())
    n_full = sum(p.numel() for p in model.parameters())

    oto.construct_subnet(out_dir=str(tmp_path))
    new = oto.subnet_optimizer(opt)
    assert type(new) is type(opt)
    assert sum(p.numel() for p in model.parameters()) < n_full
    assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in opt.param_groups]

    _step(full, full_opt, x, y)
    _step(model, new, x, y)
    record = oto._prune_record
    full_params = dict(full.named_parameters())
    pruned = 0
    for name, q in model.named_parameters():
        expect = record.slice(name, full_params[name].detach())
        assert q.shape == expect.shape, name
        torch.testing.assert_close(q.detach(), expect, rtol=1e-5, atol=1e-6, msg=name)
        pruned += q.shape != full_params[name].shape
    assert pruned > 0


def _group_names(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in opt.param_groups]


def test_dhspg_hands_over_to_sgd_with_momentum_sliced(tmp_path):
    fast = dict(lr=0.05, momentum=0.9, weight_decay=1e-4, lmbda=5.0, epsilon=0.5,
                start_pruning_step=1, target_group_sparsity=0.4)
    model, oto, opt, x, y = _trained("vgg_bn", lambda oto, m: oto.dhspg(**fast), steps=8)
    assert opt.curr_num_zero_groups > 0
    old = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    oto.construct_subnet(out_dir=str(tmp_path))
    new = oto.subnet_optimizer(opt)
    assert isinstance(new, torch.optim.SGD)
    g = new.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.05, 0.9, 1e-4)
    record = oto._prune_record
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for grp in new.param_groups for p in grp["params"]} == ids
    for name, q in model.named_parameters():
        buf = new.state[q]["momentum_buffer"]
        assert torch.equal(buf, record.slice(name, old[name])), name
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        _step(model, new, x, y)  # the new optimizer is not stale
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_dhspg_adam_moments_and_step_carried(tmp_path):
    fast = dict(variant="adam", lr=1e-2, lmbda=25.0, epsilon=0.5, start_pruning_step=1,
                target_group_sparsity=0.3)
    model, oto, opt, x, y = _trained("concat", lambda oto, m: oto.dhspg(**fast), steps=6)
    old = {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
           for n, p in model.named_parameters()}
    oto.construct_subnet(out_dir=str(tmp_path))
    new = oto.subnet_optimizer(opt)
    assert type(new) is torch.optim.Adam
    assert new.param_groups[0]["betas"] == (0.9, 0.999)
    record = oto._prune_record
    for name, q in model.named_parameters():
        st = new.state[q]
        assert float(st["step"]) == float(old[name]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], record.slice(name, old[name][k])), (name, k)
    _step(model, new, x, y)  # torch's Adam accepts the carried state


def test_stale_optimizer_warns_once_and_compressed_copy_maps_by_name(tmp_path):
    model, oto, opt, x, y = _trained(
        "concat", lambda oto, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    np.random.seed(1)
    oto.random_set_zero_groups()
    oto.construct_subnet(out_dir=str(tmp_path))
    with pytest.warns(StaleOptimizerWarning, match="subnet_optimizer"):
        _step(model, opt, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOptimizerWarning)
        _step(model, opt, x, y)  # once per optimizer
    copy_ = oto.compressed_model()
    new = oto.subnet_optimizer(opt, model=copy_)
    assert {id(p) for g in new.param_groups for p in g["params"]} == \
        {id(p) for p in copy_.parameters()}


def test_subnet_optimizer_bad_inputs(tmp_path):
    model, oto, opt, x, y = _trained(
        "concat", lambda oto, m: torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="call construct_subnet"):
        oto.subnet_optimizer(opt)
    np.random.seed(0)
    oto.random_set_zero_groups()
    oto.construct_subnet(out_dir=str(tmp_path))
    with pytest.raises(TypeError, match="expects a torch.optim.Optimizer"):
        oto.subnet_optimizer("sgd")
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="was not a parameter of the model"):
        oto.subnet_optimizer(other)
    wrong, _ = build("concat")
    with pytest.raises(ValueError, match="expected"):
        oto.subnet_optimizer(opt, model=wrong)


def test_frozen_parameter_stays_frozen(tmp_path):
    # CARN's mean-shift convs are frozen; the exit conv's outputs are prunable, so OTO prunes
    # add_mean's input dim, and 3.0.1 would hand back a trainable parameter
    from test_otov2_sanity import UNPRUNABLE

    model, x = build("carn")
    oto = OTO(model, x[:1])
    oto.mark_unprunable_by_param_names(param_names=UNPRUNABLE["carn"])
    with torch.no_grad():  # zero one output channel of the exit conv (its own group)
        model.exit.weight[0] = 0
        model.exit.bias[0] = 0
    shape = model.add_mean.weight.shape
    oto.construct_subnet(out_dir=str(tmp_path))
    assert model.add_mean.weight.shape != shape  # it was pruned
    assert not model.add_mean.weight.requires_grad and not model.add_mean.bias.requires_grad


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_hesso_hands_over_with_its_moments(variant, tmp_path):
    # HESSO keeps its moment buffers by parameter name outside optimizer.state
    kw = dict(lr=0.05, variant=variant, first_momentum=0.9, target_group_sparsity=0.4,
              start_pruning_step=1, pruning_steps=2)
    model, oto, opt, x, y = _trained("vgg_bn", lambda oto, m: oto.hesso(**kw), steps=5)
    names = {id(p): n for n, p in model.named_parameters()}
    old = {names[id(p)]: opt.first_moment_grads[f"grad_first_moment_buffer_group_{i}_param_{j}"]
           .clone() for i, g in enumerate(opt.param_groups) for j, p in enumerate(g["params"])
           if f"grad_first_moment_buffer_group_{i}_param_{j}" in opt.first_moment_grads}
    assert len(old) == len(names)
    oto.construct_subnet(out_dir=str(tmp_path))
    new = oto.subnet_optimizer(opt)
    assert type(new) is (torch.optim.SGD if variant == "sgd" else torch.optim.Adam)
    key = "momentum_buffer" if variant == "sgd" else "exp_avg"
    record = oto._prune_record
    for name, q in model.named_parameters():
        if name in old:
            assert torch.equal(new.state[q][key], record.slice(name, old[name])), name
    _step(model, new, x, y)


def test_guard_prune_record_moved(monkeypatch):
    from dpm_otov2 import compat
    from dpm_otov2.subnet import _prune_ops_classes, record_pruning

    for cls in _prune_ops_classes():
        monkeypatch.setattr(cls, "prune_param_and_grad", None)
    with pytest.raises(compat.OTOCompatError) as e:
        with record_pruning(torch.nn.Linear(2, 2)):
            pass
    assert "subnet_record" in str(e.value) and torch.__version__ in str(e.value)
