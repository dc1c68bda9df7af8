"""dpm_gatedecorator against the original Gate Decorator's tick rules, restated independently.

``OriginalTick`` below restates, with plain Python lists and loops, the pruning rules of the
original research code (You et al., NeurIPS 2019; ``prune/universal.py``,
``IterRecoverFramework.prune`` / ``get_threshold`` / ``set_mask`` and
``GatedBatchNorm2d.get_score``); it is written from the rules, shares no code with the library
and never calls its selection code. It keeps its own masks, gathers its own Taylor scores with
its own hooks on the gates (``score += |g * grad|``, as the original's ``cal_score``), measures
the BN output areas with its own forward hooks, and takes the residual groups written by hand,
as the original's ResNet-56 notebook does (stage 1: the stem BN and every block's second BN;
stages 2 and 3: the projection shortcut's BN and every block's second BN).

The rules:

* a channel's score is, summed over the BNs of its group, ``(taylor - eta / smallest_area *
  area * remaining) * mask`` (``remaining``: the BN's open channels);
* each group keeps ``max(1, int(C * ratio))`` channels; its candidate entries are its sorted
  scores without the ``minimal`` largest and without zeros, each once per BN of the group;
* ``threshold = sorted(all entries)[num]``; a channel is pruned iff its score is
  ``<= threshold`` and ``<`` the ``minimal``-th largest score of its group (so zero-score
  channels go whenever the threshold is >= 0, without being counted);
* the schedule is the original notebooks': ``num = int((total - pruned) * p)``, where
  ``pruned = total - left`` and ``left`` is the previous round's count of non-zero scores
  times the group's BN count.

Over 8 rounds (tick with training of gates / BN shifts / classifier, decision, one tock step)
the library must mask exactly the channels the reference masks, on a CIFAR ResNet-20 (width
0.5) and a VGG-16-BN (width 0.25), with and without the FLOPs term.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.models import get_model
from dpm_gatedecorator import GateDecorator

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 8
RATIO = 0.3        # min_keep_ratio: int(C * 0.3) != ceil(C * 0.3) for every width used here
P = 0.1            # the original's schedule: prune p x the remaining BN channels per round


class OriginalTick:
    """The original's tick decision, in plain Python (see the module docstring)."""

    def __init__(self, model: nn.Module, gd: GateDecorator, groups: List[List[str]],
                 ratio: float, eta: float):
        order = [n for n, m in model.named_modules() if n in gd.gates]  # the original's order
        self.groups = [[n for n in order if n in set(g)] for g in groups]
        self.gates = {n: gd.gates[n] for n in order}
        self.masks = {n: [1] * gbn.num_features for n, gbn in self.gates.items()}
        self.minimal = {n: max(1, int(gbn.num_features * ratio)) for n, gbn in self.gates.items()}
        self.eta = eta
        self.total = sum(len(m) for m in self.masks.values())
        self.pruned_filters = 0
        self.below_minimum = set()  # groups the rules took below their minimum
        self.raw: Dict[str, torch.Tensor] = {}
        self.area: Dict[str, int] = {}
        for n, gbn in self.gates.items():
            gbn.register_forward_hook(self._area_hook(n))

    def _area_hook(self, name):
        def hook(mod, inp, out):
            self.area[name] = out.shape[-1] * out.shape[-2]
        return hook

    def start_scores(self):
        """Hooks on every gate: score += |grad * g| for each backward pass (cal_score)."""
        self.raw = {n: torch.zeros(gbn.num_features) for n, gbn in self.gates.items()}

        def hook(name):
            def h(grad):
                self.raw[name] += (grad.detach() * self.gates[name].g.detach()).abs()
            return h
        self._hooks = [gbn.g.register_hook(hook(n)) for n, gbn in self.gates.items()]

    def stop_scores(self):
        for h in self._hooks:
            h.remove()

    def next_num(self) -> int:
        return int((self.total - self.pruned_filters) * P)

    def prune(self, num: int, eta=None, apply: bool = True):
        """One decision. Returns the (BN name, channel) pairs it masks. ``eta`` overrides
        the FLOPs weight; ``apply=False`` only says what would be masked."""
        eta = self.eta if eta is None else eta
        masks = self.masks if apply else {n: list(m) for n, m in self.masks.items()}
        scale = min(self.area.values()) if eta else 1
        status = []
        for members in self.groups:
            c = len(self.masks[members[0]])
            score = [0.0] * c
            for name in members:
                mask = masks[name]
                reg = eta / scale * self.area[name] * sum(mask)
                raw = self.raw[name].tolist()
                for i in range(c):
                    score[i] += (raw[i] - reg) * mask[i]
            status.append((members, score, self.minimal[members[0]]))
        entries, left = [], 0
        for members, score, minimal in status:
            left += sum(1 for v in score if v != 0) * len(members)
            kept = [v for v in sorted(score)[:-minimal] if v != 0]
            for _ in members:
                entries.extend(kept)
        assert num < len(entries), "the original would fail here (IndexError): smaller P"
        threshold = sorted(entries)[num]
        pruned = []
        for members, score, minimal in status:
            hard = sorted(score)[-minimal]
            for i, v in enumerate(score):
                if v >= hard or v > threshold:
                    continue
                for name in members:
                    if masks[name][i]:
                        pruned.append((name, i))
                    masks[name][i] = 0
            if apply and sum(masks[members[0]]) < minimal:
                self.below_minimum.add(members[0])
        if apply:
            self.pruned_filters = self.total - left
        return pruned


def _trained_looking(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) * 1.2 + 0.1)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def _resnet_groups(model: nn.Module) -> List[List[str]]:
    """The residual groups, written by hand as in the original's ResNet-56 notebook."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    groups = [["bn1"] + [n for n in names if n.startswith("layer1.") and n.endswith(".bn2")]]
    for stage in (2, 3):
        groups.append([f"layer{stage}.0.shortcut.1"] +
                      [n for n in names if n.startswith(f"layer{stage}.") and n.endswith(".bn2")])
    grouped = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in grouped]


def _vgg_groups(model: nn.Module) -> List[List[str]]:
    return [[n] for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


MODELS = {
    # model, width, the hand-written groups
    "resnet20": ("resnet20", 0.5, _resnet_groups),
    "vgg16_bn": ("vgg16_bn", 0.25, _vgg_groups),
}
#: (model, mode) -> (flops_eta, strict_minimum). "taylor": no FLOPs term. "flops": an eta at
#: which the original's rule takes layers below their minimum, compared with the library's
#: strict_minimum=False (the original to the letter). "flops-strict": a smaller eta at which it
#: does not, compared with the default strict_minimum=True.
SETTINGS = {
    ("resnet20", "taylor"): (0.0, True),
    ("resnet20", "flops"): (1e-4, False),
    ("resnet20", "flops-strict"): (3e-5, True),
    ("vgg16_bn", "taylor"): (0.0, True),
    ("vgg16_bn", "flops"): (2e-5, False),
    ("vgg16_bn", "flops-strict"): (2e-6, True),
}


def _trajectory(case: str, eta: float, strict: bool = True, seed: int = 0):
    """8 tick-tock rounds with the library and the reference side by side."""
    name, width, groups_fn = MODELS[case]
    torch.manual_seed(seed)
    model = get_model(name, width=width)
    _trained_looking(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(48, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (48,), generator=gen)
    groups = groups_fn(model)
    gd = GateDecorator(model, x[:1], min_keep_ratio=RATIO, flops_eta=eta, strict_minimum=strict)
    ref = OriginalTick(model, gd, groups, RATIO, eta)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    rounds = []
    for r in range(ROUNDS):
        xb, yb = x[(r % 3) * 16:(r % 3 + 1) * 16], y[(r % 3) * 16:(r % 3 + 1) * 16]
        ref.start_scores()
        gd.tick([(xb[:8], yb[:8]), (xb[8:], yb[8:])], F.cross_entropy)
        ref.stop_scores()
        for n, gbn in gd.gates.items():  # both saw the same passes
            assert torch.allclose(gbn.score, ref.raw[n], rtol=1e-6, atol=0), n
        num = ref.next_num()
        before = {n: gbn.mask.clone() for n, gbn in gd.gates.items()}
        gd.prune(num)
        lib = {(n, int(i)) for n, gbn in gd.gates.items()
               for i in ((before[n] > 0) & (gbn.mask == 0)).nonzero().flatten()}
        plain = set(ref.prune(num, eta=0.0, apply=False))
        want = set(ref.prune(num))
        union = lib | want
        rounds.append({"num": num, "lib": len(lib), "ref": len(want),
                       "agreement": len(lib & want) / len(union) if union else 1.0,
                       "flops_term_changed": plain != want,
                       "masks_equal": all(gbn.mask.tolist() == ref.masks[n]
                                          for n, gbn in gd.gates.items())})
        # tock: one fine-tuning step with the L1 on the gates
        model.train()
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(xb), yb) + gd.gate_l1()).backward()
        opt.step()
    at_min = [g.name for g in gd.groups if int(g.channel_mask().sum()) == g.keep_min]
    return rounds, gd, at_min, ref.below_minimum


@pytest.mark.parametrize("case,mode", sorted(SETTINGS))
def test_same_filters_as_the_original_rules_over_8_rounds(case, mode):
    eta, strict = SETTINGS[(case, mode)]
    rounds, gd, at_min, below = _trajectory(case, eta, strict)
    print(f"\n{case} {mode} flops_eta={eta} strict_minimum={strict}: per-round agreement "
          f"(pruned BN channels lib/ref):",
          " ".join(f"{r['agreement']:.2f}({r['lib']}/{r['ref']})" for r in rounds),
          f"| groups below their minimum: {len(below)}")
    assert all(r["masks_equal"] for r in rounds), rounds
    assert all(r["agreement"] == 1.0 for r in rounds), rounds
    # the scenario exercises the rules: pruning in every round, layers at their minimum
    # (rounded down), and with a residual model channels worth several units
    assert all(r["lib"] > 0 for r in rounds)
    assert at_min, "no layer reached its minimum: the rounding rule is untested"
    if case == "resnet20":
        assert max(g.units for g in gd.groups) > 1
    if mode == "flops":
        assert below, "the original's rule kept every minimum: this eta does not test it"
    elif mode == "flops-strict":
        assert not below, "the original's rule went below a minimum: use a smaller eta"
    if eta:  # the FLOPs term changed the choices (else it would not be tested)
        assert any(r["flops_term_changed"] for r in rounds)


def _g(scores, open_=None, keep=1, units=1):
    s = torch.tensor(scores, dtype=torch.float64)
    o = torch.ones(len(scores), dtype=torch.bool) if open_ is None else torch.tensor(open_)
    return s, o, keep, units


def test_rules_by_hand():
    """Threshold with ties, zero-score channels for free, BN-channel units, on hand-computed
    cases of the selection functions."""
    from dpm_gatedecorator import selection

    a = _g([0.0, 0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0], keep=2)          # one BN
    b = _g([0.2, 0.6, 3.0, 4.0], keep=1, units=3)                      # shared by 3 BNs
    # pool: a -> .5 .5 1 2 3 ; b -> (.2 .6 3) x 3 ; sorted: .2 .2 .2 .5 .5 .6 .6 .6 1 2 3 3 3 3
    chosen, thr, pool = selection.decide([a, b], 3)
    assert pool == 14 and thr == 0.5
    assert chosen[0].nonzero().flatten().tolist() == [0, 1, 2]  # zero-score + both tied .5
    assert chosen[1].nonzero().flatten().tolist() == [0]
    chosen, thr, _ = selection.decide([a, b], 0)   # num = 0 still prunes entry 0 (3 units)
    assert thr == 0.2 and chosen[0].nonzero().flatten().tolist() == [0]
    assert chosen[1].nonzero().flatten().tolist() == [0]
    assert selection.decide([a, b], 14)[2] == 14 and not any(c.any() for c in
                                                              selection.decide([a, b], 14)[0])
    assert [selection.keep_min(c, 0.1) for c in (8, 16, 32, 64)] == [1, 1, 3, 6]


def test_minimum_guard_differs_from_the_original_only_below_the_minimum():
    # two open channels below 0 (FLOPs term), two removed ones (0): the original's minimum
    # (the 2nd largest of all four scores) is a removed channel's 0, so it empties the layer
    from dpm_gatedecorator import selection

    c = _g([-1.0, -2.0, 0.0, 0.0], open_=[True, True, False, False], keep=2)
    d = _g([5.0, 6.0, 7.0], keep=1)
    literal, _, _ = selection.decide([c, d], 1, strict=False)
    assert literal[0].tolist() == [True, True, False, False]
    strict, _, _ = selection.decide([c, d], 1, strict=True)
    assert strict[0].tolist() == [False, False, False, False]
    # where the minimum is met by open channels the two agree
    e = _g([1.0, -2.0, -0.5, 0.0], open_=[True, True, True, False], keep=1)
    both = [selection.decide([e, d], 1, strict=s)[0][0].tolist() for s in (True, False)]
    assert both[0] == both[1] == [False, True, True, False]
