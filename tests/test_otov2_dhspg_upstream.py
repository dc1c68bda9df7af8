"""dpm_otov2.DHSPG with decay=None against OTOv2's own DHSPG rules, step for step.

``UpstreamDHSPG`` below is an independent re-statement, in plain float64 loops over layers
and zero-invariant groups (ZIGs), of the rules of only-train-once 2.x's
``only_train_once/optimizer/dhspg.py`` (identical to the 2.0.16 release), written from
reading that file; it shares no code with ``dpm_otov2``. Rules restated (n = the step
count *including* the current step):

* direction d: ``g (+ wd * x unless adamw)``; SGD momentum buffer starts at g, then
  ``m * buf + (1 - dampening) * g``; Adam buffers start at g and g^2 (no 1 - beta factor),
  then ``b * buf + (1 - b) * g``, bias-corrected by ``1 - b ** n``; ``d = m_hat /
  (sqrt(v_hat) + 1e-8)``.
* partition when ``n - 1 == partition_step``: score ``0.5 cos(-x, -d) / ||cos|| + 0.5
  inv / ||inv||``, ``inv = 1 / (||x|| / D + 1e-6)``; the ``K = int(N * min(target + tol,
  0.999))`` top scores are redundant; per layer the not-redundant count is rounded to a
  multiple of group_divisible (``round``), at least one multiple, the layer's lowest scores
  are kept, a layer with ``m <= group_divisible`` is never penalised.
* trial point ``x - lr d`` (adamw: ``- lr wd x``, or ``- lr wd x / (||x|| + 1e-8)`` for
  ZIG rows with weight_decay_type='l1_norm').
* while ``zero / N < target`` (checked on the sparsity after the previous step): G_p rows get
  ``- lr lam x / (||x|| + 1e-8)``; lam = lmbda while ``n < warm_up_steps``, else the adaptive
  lambda; half-space projection ``<x_hat, x> < eps ||x||^2 -> 0`` on G_p when
  ``n >= warm_up_steps`` and ``n >= half_space_project_steps``.
* zero rows stay zero when fixed_zero_groups or ``n > half_space_project_steps``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpm_otov2 import OTO

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Three prunable layers (conv+BN, conv+BN, linear) and an output layer."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 10), nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


#: each prunable layer: the params whose rows c form ZIG c
LAYERS = [["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias"],
          ["conv2.weight", "conv2.bias", "bn2.weight", "bn2.bias"],
          ["fc1.weight", "fc1.bias"]]


class UpstreamDHSPG:
    """OTOv2's DHSPG rules (see the module docstring), float64, plain loops."""

    def __init__(self, params: dict, variant, lr, lmbda, lmbda_amplify, hat_lmbda_coeff,
                 epsilon, first_momentum, second_momentum, dampening, weight_decay,
                 weight_decay_type, target, tolerance, partition_step, hsp, warm_up,
                 group_divisible, fixed_zero_groups):
        self.x = params
        self.v = dict(variant=variant, lr=lr, lmbda=lmbda, amp=lmbda_amplify,
                      hat=hat_lmbda_coeff, eps=epsilon, b1=first_momentum,
                      b2=second_momentum, damp=dampening, wd=weight_decay,
                      wd_type=weight_decay_type)
        self.target, self.tol = target, tolerance
        self.partition_step, self.hsp, self.warm_up = partition_step, hsp, warm_up
        self.dvs, self.fixed = group_divisible, fixed_zero_groups
        self.n = 0
        self.m1, self.m2 = {}, {}
        self.gp = None  # per layer: set of penalised ZIG indices
        self.num = [self.x[layer[0]].shape[0] for layer in LAYERS]
        self.N = sum(self.num)
        self.zero_count = self._count_zero()

    def row(self, tensors, layer, c):
        return torch.cat([tensors[name][c].reshape(-1) for name in layer])

    def set_row(self, layer, c, value):
        start = 0
        for name in layer:
            w = self.x[name][c].numel()
            self.x[name][c] = value[start:start + w].view_as(self.x[name][c])
            start += w

    def _count_zero(self):
        return sum(1 for layer, m in zip(LAYERS, self.num) for c in range(m)
                   if float(self.row(self.x, layer, c).detach().norm()) == 0.0)

    def direction(self, name, g):
        v, x = self.v, self.x[name]
        g = g.clone()
        if v["variant"] != "adamw":
            g = g + v["wd"] * x
        if v["variant"] == "sgd":
            if v["b1"] > 0:
                self.m1[name] = g if name not in self.m1 else \
                    v["b1"] * self.m1[name] + (1 - v["damp"]) * g
                return self.m1[name]
            return g
        if name not in self.m1:
            self.m1[name], self.m2[name] = g, g * g
        else:
            self.m1[name] = v["b1"] * self.m1[name] + (1 - v["b1"]) * g
            self.m2[name] = v["b2"] * self.m2[name] + (1 - v["b2"]) * g * g
        m_hat = self.m1[name] / (1 - v["b1"] ** self.n)
        v_hat = self.m2[name] / (1 - v["b2"] ** self.n)
        return m_hat / (v_hat.sqrt() + 1e-8)

    def partition(self, d):
        cos, inv, where = [], [], []
        for li, (layer, m) in enumerate(zip(LAYERS, self.num)):
            for c in range(m):
                x, g = self.row(self.x, layer, c), self.row(d, layer, c)
                xn, gn = float(x.norm()), float(g.norm())
                cos.append(float((x * g).sum()) / (max(xn, 1e-8) * max(gn, 1e-8)))
                inv.append(1.0 / (xn / x.numel() + 1e-6))
                where.append((li, c))
        cn = math.sqrt(sum(s * s for s in cos))
        inn = math.sqrt(sum(s * s for s in inv))
        score = [0.5 * a / cn + 0.5 * b / inn for a, b in zip(cos, inv)]
        K = int(self.N * min(self.target + self.tol, 0.999))
        top = set(sorted(range(len(score)), key=lambda i: -score[i])[:K])
        self.gp, self.rounded = [], []
        for li, m in enumerate(self.num):
            idx = [i for i, w in enumerate(where) if w[0] == li]
            if m <= self.dvs:
                self.gp.append(set())
                continue
            not_top = [i for i in idx if i not in top]
            keep = int(max(round(len(not_top) / self.dvs), 1) * self.dvs)
            self.rounded.append((len(not_top), keep))
            kept = sorted(idx, key=lambda i: score[i])[:keep]
            self.gp.append({where[i][1] for i in idx if i not in kept})

    def lam(self, x, g):
        v = self.v
        if self.n < self.warm_up:
            return v["lmbda"]
        inner = float((x * g).sum())
        if inner >= 0:
            return v["lmbda"]
        xn, gn = float(x.norm()), float(g.norm())
        lower, upper = -inner / xn, -(gn * gn * xn / inner)
        lam = min(max(v["amp"] * lower, v["lmbda"]), v["lmbda"] * v["hat"])
        return (lower + upper) / 2 if lam >= upper else lam

    @torch.no_grad()
    def step(self, grads: dict):
        v = self.v
        self.n += 1
        d = {name: self.direction(name, g) for name, g in grads.items()}
        if self.gp is None and self.n - 1 == self.partition_step:
            self.partition(d)
        in_zig = {name for layer in LAYERS for name in layer}
        for name in d:
            if name in in_zig:
                continue
            if v["variant"] == "adamw":
                self.x[name] -= v["lr"] * v["wd"] * self.x[name]
            self.x[name] -= v["lr"] * d[name]
        penalise = self.gp is not None and self.zero_count / self.N < self.target
        for li, (layer, m) in enumerate(zip(LAYERS, self.num)):
            new = []
            for c in range(m):
                x, g = self.row(self.x, layer, c), self.row(d, layer, c)
                xn = float(x.norm())
                hat = x - v["lr"] * g
                if v["variant"] == "adamw":
                    if v["wd_type"] == "l2_norm":
                        hat = hat - v["lr"] * v["wd"] * x
                    else:
                        hat = hat - v["lr"] * v["wd"] * x / (xn + 1e-8)
                if penalise and c in self.gp[li]:
                    if xn > 0:
                        hat = hat - v["lr"] * self.lam(x, g) * x / (xn + 1e-8)
                    if self.n >= self.warm_up and self.n >= self.hsp:
                        if float((hat * x).sum()) < v["eps"] * xn * xn:
                            hat = torch.zeros_like(hat)
                if (self.fixed or self.n > self.hsp) and xn == 0:
                    hat = torch.zeros_like(hat)
                new.append(hat)
            for c in range(m):
                self.set_row(layer, c, new[c])
        self.zero_count = self._count_zero()


#: only-train-once 2.x's optimizer/hyperparameter.py
UPSTREAM_DEFAULTS = {
    "sgd": dict(first_momentum=0.0, second_momentum=0.0, dampening=0.0, weight_decay=0.0,
                lmbda_amplify=2, hat_lmbda_coeff=10),
    "adam": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=0.0,
                 lmbda_amplify=20, hat_lmbda_coeff=1e3),
    "adamw": dict(first_momentum=0.9, second_momentum=0.999, dampening=0.0, weight_decay=1e-2,
                  lmbda_amplify=20, hat_lmbda_coeff=1e3),
}

# settings: (variant, DHSPG kwargs); explicit partition / warm-up / projection steps
SETTINGS = {
    "sgd": ("sgd", dict(lr=0.05, lmbda=5.0, epsilon=0.7, first_momentum=0.9,
                        weight_decay=1e-3, partition_step=2, half_space_project_steps=4,
                        warm_up_steps=5)),
    "sgd-divisible-unfixed": ("sgd", dict(lr=0.05, lmbda=5.0, epsilon=0.7, first_momentum=0.5,
                                          dampening=0.1, partition_step=1,
                                          half_space_project_steps=3, warm_up_steps=2,
                                          group_divisible=2, fixed_zero_groups=False)),
    "adam": ("adam", dict(lr=0.02, lmbda=10.0, epsilon=0.7, partition_step=2,
                          half_space_project_steps=4, warm_up_steps=3)),
    "adamw": ("adamw", dict(lr=0.02, lmbda=10.0, epsilon=0.7, weight_decay=0.05,
                            partition_step=2, half_space_project_steps=3, warm_up_steps=4)),
    "adamw-l1": ("adamw", dict(lr=0.02, lmbda=10.0, epsilon=0.7, weight_decay=0.05,
                               weight_decay_type="l1_norm", partition_step=1,
                               half_space_project_steps=3, warm_up_steps=2)),
}


def _setup(kwargs, variant):
    torch.manual_seed(0)
    model = Net().double()
    oto = OTO(model, torch.randn(1, 3, 6, 6, dtype=torch.float64))
    # K = int(24 * 0.95) = 22 of the 24 ZIGs are redundant: some layer has none left, and
    # OTOv2's rule keeps group_divisible of them
    opt = oto.dhspg(variant=variant, target_group_sparsity=0.5, tolerance_group_sparsity=0.45,
                    **kwargs)
    ref_model = copy.deepcopy(model)
    dflt = UPSTREAM_DEFAULTS[variant]
    kw = {k: kwargs.get(k, dflt.get(k)) for k in (
        "lmbda_amplify", "hat_lmbda_coeff", "first_momentum", "second_momentum", "dampening",
        "weight_decay")}
    ref = UpstreamDHSPG(dict(ref_model.named_parameters()), variant, kwargs["lr"],
                        kwargs["lmbda"], kw["lmbda_amplify"], kw["hat_lmbda_coeff"],
                        kwargs["epsilon"], kw["first_momentum"], kw["second_momentum"],
                        kw["dampening"], kw["weight_decay"],
                        kwargs.get("weight_decay_type", "l2_norm"), 0.5, 0.45,
                        kwargs["partition_step"], kwargs["half_space_project_steps"],
                        kwargs["warm_up_steps"], kwargs.get("group_divisible", 1),
                        kwargs.get("fixed_zero_groups", True))
    return model, opt, ref_model, ref


@pytest.mark.parametrize("name", list(SETTINGS))
def test_decay_none_follows_upstream_step_for_step(name):
    variant, kwargs = SETTINGS[name]
    model, opt, ref_model, ref = _setup(kwargs, variant)
    # the optimizer's ZIG layers are the reference's layers (same OTO param groups)
    ids = {id(p): n for n, p in model.named_parameters()}
    zig_layer = {}
    for z in opt.zigs:
        names = sorted(ids[id(p)] for p in z.params())
        assert names in [sorted(layer) for layer in LAYERS], names
        zig_layer[z.name] = [sorted(layer) for layer in LAYERS].index(names)
    assert len(zig_layer) == len(LAYERS)
    g = torch.Generator().manual_seed(1)
    max_diff, projected_at = 0.0, None
    for step in range(14):
        x = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=g)
        for m in (model, ref_model):
            m.train()
            m.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if step == 0:  # a parameter without a gradient: skipped, its moments start later
                m.fc2.bias.grad = None
        opt.step()
        ref.step({n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None})
        for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
            max_diff = max(max_diff, float((a - b).abs().max()))
        assert max_diff < 1e-9, (name, step, max_diff)
        masks = opt.group_masks()
        for zname, li in zig_layer.items():
            pen = set(masks[zname]["penalised"].nonzero().flatten().tolist())
            assert pen == (ref.gp[li] if ref.gp is not None else set()), (name, step, zname)
            zero = set(masks[zname]["zero"].nonzero().flatten().tolist())
            ref_zero = {c for c in range(ref.num[li])
                        if float(ref.row(ref.x, LAYERS[li], c).norm()) == 0}
            assert zero == ref_zero, (name, step, zname)
        if projected_at is None and opt.curr_num_zero_groups > 0:
            projected_at = ref.n
    # the run exercised the rules: the keep-one rule, projection, reaching the target
    assert any(not_top == 0 for not_top, _ in ref.rounded), ref.rounded
    assert projected_at == max(kwargs["half_space_project_steps"], kwargs["warm_up_steps"])
    assert opt.curr_num_zero_groups >= math.ceil(0.5 * ref.N)
    print(name, "max |param - reference|", max_diff, "projection from step", projected_at,
          "zero groups", opt.curr_num_zero_groups, "of", ref.N)
