"""dpm_depgraph with mixed precision (GradScaler + autocast) and non-finite gradients.

* A step that ``torch.amp.GradScaler`` skips (an inf in a decaying channel's gradient)
  leaves the pruner's and engine's state, the weights and the optimizer state exactly as
  they were; the next finite step advances the decay.
* Without a scaler, a NaN/inf in one decaying channel's gradient gives one RuntimeWarning,
  stays in that channel (engine state and all other channels finite, the other decaying
  channels advance), and that channel's decay continues at the next finite step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_depgraph import DecayGroupNormPruner, DecayMetaPruner
from state_compare import state_diff


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


_same = state_diff


def _decaying(pruner) -> dict:
    return {n: pruner.engine.state(n) for n in pruner.engine.groups()
            if bool(pruner.engine.state(n).decaying.any())}


# ---------------------------------------------------------------------------- AMP
def test_grad_scaler_skipped_step_leaves_all_state_unchanged():
    torch.manual_seed(0)
    model = get_model("small_cnn", width=0.5)
    pruner = DecayGroupNormPruner(
        model, torch.randn(1, 3, 16, 16), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model.fc], reg=1e-3,
        decay=DecayConfig(steps=3, t_rate=0.1, t_len=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    pruner.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    conv = model.features[3]

    def amp_step(seed: int, poison_channel: int | None = None) -> None:
        x, y = _data(seed)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if poison_channel is not None:      # an overflow inside one decaying channel
            conv.weight.grad[poison_channel, 0, 0, 0] = float("inf")
        scaler.unscale_(opt)                # docs: unscale before regularize
        pruner.regularize(model)
        scaler.step(opt)
        scaler.update()

    pruner.step()
    for s in range(3):            # N=3 finite steps: the first marks reach zero (or release)
        amp_step(s)
    assert pruner.engine.counters["steps"] == 3
    assert pruner.engine.counters["zeroed"] > 0
    pruner.step()                 # physical removal + new marks
    assert pruner.removals == 1
    amp_step(3)                   # mid-decay
    dec = _decaying(pruner)
    assert "features.3" in dec
    victim = int(dec["features.3"].decaying.nonzero()[0])

    before = {"pruner": copy.deepcopy(pruner.state_dict()),
              "params": {n: p.detach().clone() for n, p in model.named_parameters()},
              "opt": copy.deepcopy(opt.state_dict()),
              "scale": scaler.get_scale()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # a skipped step is silent for the engine
        amp_step(4, poison_channel=victim)
    assert scaler.get_scale() == before["scale"] / 2     # the scaler saw the inf and skipped
    assert _same(before["pruner"], pruner.state_dict()) == []
    after_params = {n: p.detach() for n, p in model.named_parameters()}
    assert _same(before["params"], after_params) == []
    assert _same(before["opt"], opt.state_dict()) == []

    # the next finite step advances: step counter, decay of every decaying channel
    n_before = {n: st.n_step.clone() for n, st in dec.items()}
    amp_step(5)
    sd = pruner.state_dict()
    assert sd["engine"]["step_count"] == before["pruner"]["engine"]["step_count"] + 1
    assert scaler.get_scale() == before["scale"] / 2     # not skipped
    for name, st in dec.items():
        now = pruner.engine.state(name)
        was = st.decaying
        advanced = now.decaying[was] & (now.n_step[was] > n_before[name][was])
        gone = ~now.decaying[was]          # released (or zeroed at n == N)
        assert bool((advanced | gone).all()), name
    assert not torch.equal(before["params"]["features.3.weight"], conv.weight.detach())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and the run goes on to the end
    amp_step(6)
    pruner.finalize(force=True)
    assert model.features[3].out_channels == 8


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_in_decaying_channel_is_contained(bad):
    torch.manual_seed(0)
    model = get_model("small_cnn", width=0.5)
    pruner = DecayMetaPruner(
        model, torch.randn(1, 3, 16, 16), importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.5, iterative_steps=1, ignored_layers=[model.fc],
        decay=DecayConfig(steps=4, t_rate=0.2, t_len=0.8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(opt)
    bn = model.features[4]          # BN of features.3: its scale[c] belongs to channel c only

    def fwd_bwd(seed: int) -> None:
        x, y = _data(seed)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    pruner.step()
    fwd_bwd(0)
    opt.step()
    st0 = pruner.engine.state("features.3")
    assert int(st0.decaying.sum()) >= 2
    victim = int(st0.decaying.nonzero()[0])
    others = {n: pruner.engine.state(n) for n in pruner.engine.groups()}
    bn_w_before = bn.weight.detach().clone()

    fwd_bwd(1)
    bn.weight.grad[victim] = bad
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step()
    msgs = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "non-finite" in str(msgs[0].message), [str(w.message) for w in rec]

    # the bad value stays where the optimizer put it: that one BN scale, nowhere else
    assert not torch.isfinite(bn.weight[victim])
    for n, p in model.named_parameters():
        mask = torch.isfinite(p)
        if p is bn.weight:
            mask[victim] = True
        assert bool(mask.all()), n
    # engine state finite; the victim did not advance, was not released nor zeroed
    sd = pruner.engine.state_dict()
    for name, gs in sd["groups"].items():
        assert torch.isfinite(gs["l_init"]).all(), name
    st1 = pruner.engine.state("features.3")
    assert bool(st1.decaying[victim]) and not bool(st1.zeroed[victim])
    assert int(st1.n_step[victim]) == int(st0.n_step[victim])
    assert float(st1.l_init[victim]) == float(st0.l_init[victim])
    # every other decaying channel (this group and the others) took its step as usual
    for name, was in others.items():
        now = pruner.engine.state(name)
        rest = was.decaying.clone()
        if name == "features.3":
            rest[victim] = False
        progressed = (now.n_step[rest] > was.n_step[rest]) | ~now.decaying[rest]
        assert bool(progressed.all()), name
    assert pruner.engine.counters["steps"] == 2

    # repair the weight (as a user/scaler would), then decay continues silently
    with torch.no_grad():
        bn.weight[victim] = bn_w_before[victim]
    fwd_bwd(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    st2 = pruner.engine.state("features.3")
    assert bool(st2.decaying[victim]) and int(st2.n_step[victim]) == int(st0.n_step[victim]) + 1
    for _ in range(4):
        fwd_bwd(3)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    st3 = pruner.engine.state("features.3")
    assert bool(st3.zeroed[victim])        # its decay ran its course: N=4 finite steps in all
    pruner.finalize()
    assert model.features[3].out_channels < 16


# ---------------------------------------------------------------------------- known issue
def test_capture_before_skipped_step_is_not_replayed_later():
    torch.manual_seed(0)
    model = get_model("small_cnn", width=0.5)
    pruner = DecayGroupNormPruner(
        model, torch.randn(1, 3, 16, 16), importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5, iterative_steps=2, ignored_layers=[model.fc],
        decay=DecayConfig(steps=3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner.attach(opt)
    scaler = torch.amp.GradScaler("cpu")
    pruner.step()
    victim = int(pruner.engine.decaying_channels("features.3")[0])

    def it(seed: int, poison: bool, regularize: bool) -> None:
        x, y = _data(seed)
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if poison:
            model.features[3].weight.grad[victim, 0, 0, 0] = float("inf")
        scaler.unscale_(opt)
        if regularize:
            pruner.regularize(model)
        scaler.step(opt)
        scaler.update()

    it(0, poison=False, regularize=True)
    it(1, poison=True, regularize=True)      # skipped by the scaler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        it(2, poison=False, regularize=False)   # finite batch, no penalty this iteration
    assert torch.isfinite(model.features[3].weight[victim]).all()
