"""dpm_depgraph: decay pruners for Torch-Pruning. Behaviour on tiny models (fast)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_depgraph import (DecayBNScalePruner, DecayGroup, DecayGroupNormPruner, DecayMetaPruner,
                          decay_pruner, prune_group)

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4) % 10


def _small(width=1.0, seed=0):
    torch.manual_seed(seed)
    return get_model("small_cnn", width=width)


def _loss(model):
    return nn.functional.cross_entropy(model(X), Y)


def _train(model, opt, steps, pruner=None):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        if pruner is not None:
            pruner.regularize(model)
        opt.step()


def _pruner(model, cls=DecayMetaPruner, decay=None, **kw):
    kw.setdefault("importance", tp.importance.MagnitudeImportance())
    kw.setdefault("pruning_ratio", 0.5)
    kw.setdefault("iterative_steps", 2)
    if "ignored_layers" not in kw:
        kw["ignored_layers"] = [model.fc]
    return cls(model, X[:1], decay=decay or DecayConfig(steps=3, self_rectify=False), **kw)


def _n_dead(pruner, name):
    st = pruner.engine.state(name)
    return int((st.decaying | st.zeroed).sum())


# ------------------------------------------------------------------------------ smooth decay
def test_selected_channel_norm_falls_by_l_init_over_n_per_step():
    """A Flatten -> Linear model: a channel of the last conv owns its filter, its BN scale
    and shift and 16 columns of the Linear; its norm over all of them falls by L_init/N
    per optimizer step, while the weights keep training."""
    torch.manual_seed(0)
    model = get_model("flatten_linear_cnn", width=0.5)
    conv, bn, lin = model.features[4], model.features[5], model.classifier[1]
    n_steps = 4
    # only this group is pruned, so no other group's decay touches its tensors (a conv's
    # input slice belongs to the previous layer's group, where both would scale it)
    pruner = _pruner(model, decay=DecayConfig(steps=n_steps, self_rectify=False),
                     ignored_layers=[model.features[0], model.classifier[1], model.classifier[3]],
                     iterative_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner.attach(opt)

    def norms():  # computed from the model, independently of the pruner's slices
        s = conv.weight.flatten(1).pow(2).sum(1) + bn.weight.pow(2) + bn.bias.pow(2)
        s = s + lin.weight.view(lin.out_features, conv.out_channels, 16).pow(2).sum((0, 2))
        return s.sqrt().detach()

    before = norms()
    pruner.step()
    st = pruner.engine.state("features.4")
    sel = st.decaying.nonzero().squeeze(1)
    assert sel.numel() == conv.out_channels // 2
    torch.testing.assert_close(st.l_init[sel], before[sel])
    live = ~st.decaying
    for k in range(1, n_steps + 1):
        w_live = conv.weight[live].detach().clone()
        _train(model, opt, 1)
        expect = before[sel] * (n_steps - k) / n_steps
        torch.testing.assert_close(norms()[sel], expect, rtol=1e-5, atol=1e-6)
        assert not torch.equal(conv.weight[live], w_live)      # the rest trains normally
    assert bool(pruner.engine.state("features.4").zeroed[sel].all())
    assert float(lin.weight.detach().view(lin.out_features, -1, 16)[:, sel].abs().max()) == 0.0
    pruner.finalize()
    assert conv.out_channels == 8 and lin.in_features == 8 * 16
    assert model(X).shape == (4, 10)


def test_decay_is_smooth_not_abrupt_compared_with_base_pruner():
    model = _small()
    base_model = copy.deepcopy(model)
    pruner = _pruner(model, decay=DecayConfig(steps=5, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)   # lr 0: only the decay changes weights
    pruner.attach(opt)
    pruner.step()
    loss0 = float(_loss(model).detach())
    losses = []
    for _ in range(5):
        _train(model, opt, 1)
        losses.append(float(_loss(model).detach()))
    base = tp.pruner.MetaPruner(base_model, X[:1], importance=tp.importance.MagnitudeImportance(),
                                pruning_ratio=0.5, iterative_steps=2, ignored_layers=[base_model.fc])
    base.step()
    # after N steps the function equals the base pruner's abrupt removal (same channels)
    base_model.train()
    assert abs(losses[-1] - float(_loss(base_model).detach())) < 1e-5
    assert losses[0] != pytest.approx(losses[-1]) and loss0 != pytest.approx(losses[-1])


# ------------------------------------------------------------------------------ accounting
def test_decaying_channels_count_as_pruned_and_are_not_picked_again():
    model = _small()
    pruner = _pruner(model, decay=DecayConfig(steps=50, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()                                   # target 25 %
    first = {n: pruner.engine.state(n).decaying.clone() for n in pruner.engine.groups()}
    for n, dec in first.items():
        m = dec.numel()
        assert int(dec.sum()) == m - int(m * 0.75)
    _train(model, opt, 2)
    pruner.step()                                   # target 50 %: only the difference is new
    for n, dec in first.items():
        now = pruner.engine.state(n).decaying
        m = now.numel()
        assert int(now.sum()) == m - int(m * 0.5)
        assert bool(now[dec].all())                 # still decaying, not re-picked
    assert pruner.engine.counters["marked"] == sum(
        m.numel() - int(m.numel() * 0.5) for m in first.values())


def test_released_channels_are_live_again_and_the_target_is_still_met():
    model = _small()
    # t_rate = -1, t_len = 0: every decaying channel with a gradient is released at once
    pruner = _pruner(model, decay=DecayConfig(steps=5, t_rate=-1.0, t_len=0.0, self_rectify=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    marked = pruner.engine.counters["marked"]
    _train(model, opt, 1)
    assert pruner.engine.counters["released"] == marked
    assert all(_n_dead(pruner, n) == 0 for n in pruner.engine.groups())
    pruner.step()                                  # released channels may be picked again
    for n in pruner.engine.groups():
        m = pruner.engine.num_channels(n)
        assert _n_dead(pruner, n) == m - int(m * 0.5)


def test_zeroed_channels_are_removed_at_next_step_and_target_holds():
    model = _small()
    pruner = _pruner(model, decay=DecayConfig(steps=2, self_rectify=False), iterative_steps=3,
                     pruning_ratio=0.75)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner.attach(opt)
    calls = []
    pruner.on_removed(lambda pr, removed: calls.append({k: v.numel() for k, v in removed.items()}))
    widths = [16, 32, 64]
    for it in range(1, 4):
        pruner.step()
        _train(model, opt, 3)
        convs = [model.features[i] for i in (0, 3, 6)]
        for conv, w0, name in zip(convs, widths, ("features.0", "features.3", "features.6")):
            keep_target = int(w0 * (1 - 0.25 * it))
            assert conv.out_channels - _n_dead(pruner, name) == keep_target
    pruner.finalize()
    assert [model.features[i].out_channels for i in (0, 3, 6)] == [4, 8, 16]
    assert model.fc.in_features == 16
    assert pruner.removals == len(calls) == 3           # at steps 2 and 3, and in finalize
    assert sum(c["features.6"] for c in calls) == pruner.removed["features.6"] == 48


def test_interactive_step_yields_groups_whose_prune_starts_decay():
    model = _small()
    ref = _small()
    pruner = _pruner(model)
    ref_pruner = _pruner(ref)
    for p, m in ((pruner, model), (ref_pruner, ref)):
        p.attach(torch.optim.SGD(m.parameters(), lr=0.01))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    groups = list(pruner.step(interactive=True))
    assert groups and all(isinstance(g, DecayGroup) and isinstance(g, tp.Group) for g in groups)
    for g in groups:
        g.prune()
    assert {n: p.shape for n, p in model.named_parameters()} == shapes   # nothing deleted
    ref_pruner.step()
    for n in pruner.engine.groups():
        assert torch.equal(pruner.engine.state(n).decaying, ref_pruner.engine.state(n).decaying)


def test_finalize_force_removes_still_decaying_and_plain_finalize_warns():
    model = _small()
    pruner = _pruner(model, decay=DecayConfig(steps=10, self_rectify=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    _train(model, opt, 2)
    with pytest.warns(RuntimeWarning, match="still decaying"):
        out = pruner.finalize()
    assert out["removed"] == {} and out["still_decaying"] > 0
    out = pruner.finalize(force=True)
    assert out["still_decaying"] == 0
    assert [model.features[i].out_channels for i in (0, 3, 6)] == [12, 24, 48]
    _train(model, opt, 1)


# ------------------------------------------------------------------------------ optimizer
@pytest.mark.parametrize("opt_cls", [
    lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=1e-4),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
])
def test_optimizer_state_is_sliced_not_reset(opt_cls):
    model = _small()
    pruner = _pruner(model, decay=DecayConfig(steps=1, self_rectify=False))
    opt = opt_cls(model.parameters())
    pruner.attach(opt)
    _train(model, opt, 2)
    pruner.step()
    _train(model, opt, 2)                     # the marked channels are zeroed now
    zeroed = pruner.engine.zeroed_channels("features.3")
    zeroed_in = pruner.engine.zeroed_channels("features.0")   # conv 3's input channels
    zeroed_next = pruner.engine.zeroed_channels("features.6")
    old_conv = model.features[3].weight
    old_next = model.features[6].weight
    old_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[old_conv].items()}
    old_next_state = {k: (v.clone() if torch.is_tensor(v) else v)
                      for k, v in opt.state[old_next].items()}
    pruner.step()                             # removes them physically
    conv, nxt = model.features[3].weight, model.features[6].weight
    assert conv is not old_conv and conv.shape[0] == 32 - zeroed.numel()
    keep = torch.ones(32, dtype=torch.bool)
    keep[zeroed] = False
    keep_in = torch.ones(16, dtype=torch.bool)
    keep_in[zeroed_in] = False
    keep_out = torch.ones(64, dtype=torch.bool)
    keep_out[zeroed_next] = False
    assert zeroed.numel() and zeroed_in.numel() and zeroed_next.numel()
    for k, v in old_state.items():
        if torch.is_tensor(v) and v.dim() > 0:    # rows of conv 3, and its input columns
            assert torch.equal(opt.state[conv][k], v[keep][:, keep_in])
        else:
            assert opt.state[conv][k] == v    # e.g. Adam's step counter is carried over
    for k, v in old_next_state.items():       # the consumer loses the same input columns
        if torch.is_tensor(v) and v.dim() > 0:
            assert torch.equal(opt.state[nxt][k], v[keep_out][:, keep])
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert len(held) == len(list(model.parameters()))
    _train(model, opt, 2)
    assert torch.isfinite(_loss(model))


def test_prune_group_keeps_optimizer_state_for_a_plain_torch_pruning_loop():
    model = _small()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, 2)
    with torch.no_grad():  # tie each momentum to its weight, to check the slicing exactly
        for p in model.parameters():
            opt.state[p]["momentum_buffer"].copy_(2 * p + 1)
    pruner = tp.pruner.MetaPruner(model, X[:1], importance=tp.importance.MagnitudeImportance(),
                                  pruning_ratio=0.5, iterative_steps=1,
                                  ignored_layers=[model.fc])
    before = {name: p.shape for name, p in model.named_parameters()}
    replaced = []
    for group in pruner.step(interactive=True):
        replaced += prune_group(pruner.DG, group, opt)
    assert replaced and model.features[3].weight.shape[0] < before["features.3.weight"][0]
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    for p in model.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], 2 * p.detach() + 1)
    _train(model, opt, 2)
    assert torch.isfinite(_loss(model))
    with pytest.raises(TypeError, match="expects a torch_pruning Group"):
        prune_group(pruner.DG, "features.3")


def test_removal_of_a_model_with_nan_weights_is_not_an_internal_error():
    """A diverged model (NaN in kept weights) is pruned like any other: the check that
    Torch-Pruning removed the expected positions treats NaN as equal to NaN."""
    model = _small()
    with torch.no_grad():
        model.features[0].weight[:, 0, 0, 0] = float("nan")   # every output channel
    pruner = tp.pruner.MetaPruner(model, X[:1], importance=tp.importance.RandomImportance(),
                                  pruning_ratio=0.5, iterative_steps=1,
                                  ignored_layers=[model.fc])
    kept = model.features[0].weight.shape[0]
    for group in pruner.step(interactive=True):
        prune_group(pruner.DG, group)
    assert model.features[0].weight.shape[0] < kept
    assert torch.isnan(model.features[0].weight[:, 0, 0, 0]).all()


# ------------------------------------------------------------------------------ sparse learning
def test_group_norm_pruner_keeps_penalty_out_of_decaying_channels():
    model = _small()
    pruner = _pruner(model, cls=DecayGroupNormPruner, reg=1e-2,
                     decay=DecayConfig(steps=5, t_rate=0.1, t_len=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    dec = pruner.engine.state("features.0").decaying
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(g=model.features[0].weight.grad.clone()))
    opt.zero_grad()
    _loss(model).backward()
    clean = model.features[0].weight.grad.clone()
    pruner.regularize(model)
    penalised = model.features[0].weight.grad.clone()
    assert not torch.allclose(penalised[dec], clean[dec])   # the penalty does reach them ...
    opt.step()
    assert torch.equal(seen["g"][dec], clean[dec])           # ... but the step sees clean grads
    assert torch.equal(seen["g"][~dec], penalised[~dec])     # live channels keep the penalty


def test_group_norm_pruner_global_resnet_end_to_end():
    torch.manual_seed(0)
    model = get_model("resnet20", width=0.25)
    params0 = sum(p.numel() for p in model.parameters())
    # max_pruning_ratio: Torch-Pruning's GroupNormPruner.regularize turns a 1-channel group's
    # gradient into NaN (0/0 in its scaling), with or without decay
    pruner = _pruner(model, cls=DecayGroupNormPruner, global_pruning=True, iterative_steps=3,
                     max_pruning_ratio=0.7, decay=DecayConfig(steps=2, t_rate=0.1, t_len=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner.attach(opt)
    for _ in range(3):
        pruner.step()
        _train(model, opt, 2, pruner)
    pruner.finalize(force=True)
    assert sum(p.numel() for p in model.parameters()) < params0
    _train(model, opt, 1, pruner)
    assert torch.isfinite(_loss(model))


def test_bn_scale_pruner_end_to_end():
    model = _small()
    pruner = _pruner(model, cls=DecayBNScalePruner, importance=tp.importance.BNScaleImportance(),
                     decay=DecayConfig(steps=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    for _ in range(2):
        pruner.step()
        _train(model, opt, 3, pruner)
    pruner.finalize(force=True)
    assert [model.features[i].num_features for i in (1, 4, 7)] == [8, 16, 32]


@pytest.mark.parametrize("cls", [DecayMetaPruner, DecayGroupNormPruner, DecayBNScalePruner])
def test_building_the_pruner_keeps_each_module_training_mode(cls):
    """Torch-Pruning's graph build calls model.eval(); a decay pruner is built before
    training, so it gives every module its mode back (BN would train frozen otherwise)."""
    model = _small()
    model.train()
    model.features[1].eval()   # a user's frozen BN stays frozen
    kw = {"importance": tp.importance.BNScaleImportance()} if cls is DecayBNScalePruner else {}
    pruner = _pruner(model, cls=cls, **kw)
    assert model.training and model.features[4].training
    assert not model.features[1].training
    base = _small()
    base.train()
    tp.pruner.MetaPruner(base, X[:1], importance=tp.importance.MagnitudeImportance(),
                         ignored_layers=[base.fc])
    assert not base.training   # what the restore is for (Torch-Pruning 1.6.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    assert model.training and not model.features[1].training


def test_factory_wraps_any_base_pruner():
    cls = decay_pruner(tp.pruner.GrowingRegPruner)
    assert cls is decay_pruner(tp.pruner.GrowingRegPruner)
    assert cls.__name__ == "DecayGrowingRegPruner" and issubclass(cls, tp.pruner.GrowingRegPruner)
    model = _small()
    pruner = _pruner(model, cls=cls)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner.attach(opt)
    pruner.step()
    _train(model, opt, 3, pruner)
    pruner.finalize(force=True)
    assert model.features[0].out_channels == 12
    with pytest.raises(TypeError, match="BasePruner"):
        decay_pruner(nn.Module)


# ------------------------------------------------------------------------------ resume
def _resume_run(split):
    """Run a fixed schedule; if ``split``, checkpoint mid-decay after a physical removal and
    continue in a freshly built model/pruner/optimizer. Returns final state_dict."""
    def build():
        model = _small(seed=0)
        pruner = _pruner(model, decay=DecayConfig(steps=3, t_rate=0.0, t_len=0.5),
                         iterative_steps=3, pruning_ratio=0.6)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner.attach(opt)
        return model, pruner, opt

    model, pruner, opt = build()
    pruner.step()
    _train(model, opt, 4)
    pruner.step()            # removes zeroed channels, marks more
    _train(model, opt, 1)    # mid-decay
    if split:
        ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                              "pruner": pruner.state_dict()})
        del model, pruner, opt
        model, pruner, opt = build()
        pruner.load_state_dict(ckpt["pruner"])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    _train(model, opt, 2)
    pruner.step()
    _train(model, opt, 3)
    pruner.finalize(force=True)
    _train(model, opt, 1)
    return model.state_dict(), pruner.engine.counters


def test_state_dict_resume_is_exact():
    full, c_full = _resume_run(split=False)
    resumed, c_res = _resume_run(split=True)
    assert c_full == c_res
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_load_state_dict_into_other_architecture_fails():
    model, other = _small(), _small(width=0.5)
    p = _pruner(model)
    p.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    p.step()
    q = _pruner(other)
    q.attach(torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="(does not fit|layout|same shape)"):
        q.load_state_dict(p.state_dict())


# ------------------------------------------------------------------------------ bad input
def test_step_before_attach_says_what_to_do():
    pruner = _pruner(_small())
    with pytest.raises(RuntimeError, match=r"attach\(optimizer\)"):
        pruner.step()
    with pytest.raises(RuntimeError, match=r"attach\(optimizer\)"):
        pruner.finalize()


def test_attach_optimizer_of_other_model_or_partial():
    model = _small()
    pruner = _pruner(model)
    with pytest.raises(ValueError, match="holds none of the model's parameters"):
        pruner.attach(torch.optim.SGD(_small().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="does not hold"):
        pruner.attach(torch.optim.SGD(model.features[0].parameters(), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pruner.attach(model.parameters())


def test_wrong_decay_type():
    with pytest.raises(TypeError, match="DecayConfig"):
        _pruner(_small(), decay={"steps": 3})
    with pytest.raises(TypeError, match="DecayConfig"):
        DecayMetaPruner(_small(), X[:1], importance=tp.importance.MagnitudeImportance(), decay=3)


def test_untraceable_model_says_what_to_do():
    model = _small()
    with pytest.raises(RuntimeError, match="could not trace.*example_inputs"):
        DecayMetaPruner(model, torch.randn(1, 5, 32, 32),
                        importance=tp.importance.MagnitudeImportance(),
                        decay=DecayConfig())


def test_wrapped_model_is_rejected():
    model = nn.DataParallel(_small())
    with pytest.raises(TypeError, match="module"):
        DecayMetaPruner(model, X[:1], importance=tp.importance.MagnitudeImportance())


# ------------------------------------------------------------------------------ base options
@pytest.mark.parametrize("opts", [
    dict(round_to=4),
    dict(pruning_ratio_dict=None),   # filled in below (needs the model)
    dict(max_pruning_ratio=0.3, pruning_ratio=0.6),
    dict(interactive=True),
])
def test_same_channels_as_base_pruner_with_base_options(opts):
    opts = dict(opts)
    interactive = opts.pop("interactive", False)
    model0 = _small()
    arch = []
    for decay in (False, True):
        model = copy.deepcopy(model0)
        kw = dict(opts)
        if "pruning_ratio_dict" in kw:
            kw["pruning_ratio_dict"] = {model.features[3]: 0.25}
        kw.setdefault("pruning_ratio", 0.5)
        common = dict(importance=tp.importance.MagnitudeImportance(), iterative_steps=3,
                      ignored_layers=[model.fc], **kw)
        if decay:
            pruner = DecayMetaPruner(model, X[:1], decay=DecayConfig(steps=1, self_rectify=False),
                                     **common)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            pruner.attach(opt)
        else:
            pruner = tp.pruner.MetaPruner(model, X[:1], **common)
        for _ in range(3):
            if interactive:
                for g in pruner.step(interactive=True):
                    g.prune()
            else:
                pruner.step()
            if decay:
                _train(model, opt, 1)
        if decay:
            pruner.finalize()
        arch.append([model.features[i].out_channels for i in (0, 3, 6)])
    assert arch[0] == arch[1]
    assert arch[0] != [16, 32, 64]


def test_rebuilt_optimizer_is_detected_and_reattach_works():
    model = _small()
    pruner = _pruner(model, decay=DecayConfig(steps=2, self_rectify=False))
    pruner.attach(torch.optim.SGD(model.parameters(), lr=0.01))
    pruner.step()
    new_opt = torch.optim.SGD(model.parameters(), lr=0.01)   # a script that rebuilds it
    _train(model, new_opt, 2)                                # nothing decays ...
    with pytest.warns(RuntimeWarning, match="has not stepped"):
        pruner.step()                                         # ... and the pruner says so
    pruner.attach(new_opt)
    _train(model, new_opt, 2)
    assert pruner.engine.counters["zeroed"] > 0
    pruner.finalize(force=True)
    assert [model.features[i].out_channels for i in (0, 3, 6)] == [8, 16, 32]
