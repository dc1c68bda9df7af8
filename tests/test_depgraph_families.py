"""dpm_depgraph reaches as far as Torch-Pruning (issue 11): transformers (HF ViT, BERT,
LLaMA with and without grouped-query attention, timm ViT with fused qkv, torchvision ViT
with nn.MultiheadAttention), grouped convolutions (ResNeXt, RegNet), ConvNeXt,
EfficientNet, on tiny random configs with the arguments of Torch-Pruning's own examples
(tests/depgraph_families.py).
"""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from depgraph_families import FAMILIES, arch, run_decay, run_plain
from dpm_depgraph import DecayConfig, DecayMetaPruner

pytestmark = pytest.mark.usefixtures("one_thread")


def _family(name):
    fam = FAMILIES[name]
    if fam.requires:
        pytest.importorskip(fam.requires)
    return fam


# ResNeXt with Self-Rectifying is slow on a loaded CPU; RegNet covers grouped convolutions
SLOW_SR = {"resnext"}


def _params(names, slow=frozenset()):
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


def _runs(fam, model, x):
    with torch.no_grad():
        out = fam.loss(model, x)
    assert torch.isfinite(out)


@pytest.mark.parametrize("name", _params(FAMILIES))
def test_same_shapes_as_plain_torch_pruning(name):
    """Self-Rectifying off, decay steps 1: the plain pruner's architecture; the model runs
    after every optimizer step in between (checked inside run_decay)."""
    fam = _family(name)
    model0 = fam.build()
    x = fam.inputs()
    base = copy.deepcopy(model0)
    run_plain(fam, base, x)
    model = copy.deepcopy(model0)
    pruner, _ = run_decay(fam, model, x, check=lambda m, p: _runs(fam, m, x))
    assert arch(model) == arch(base)
    assert arch(model) != arch(model0)
    _runs(fam, model, x)


@pytest.mark.parametrize("iterative,decay_steps,between", [(3, 1, 1), (2, 3, 1), (3, 3, 2)])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_shapes_as_plain_torch_pruning_at_any_decay_length(name, iterative, decay_steps,
                                                                between):
    """Self-Rectifying off, any decay length, fewer optimizer steps between pruning steps
    than the decay takes: what still decays at a pruning step counts as removed (heads
    too: Torch-Pruning's local head count compounds over the heads left), so the final
    architecture is the plain pruner's."""
    fam = _family(name)
    model0 = fam.build()
    x = fam.inputs()
    base = copy.deepcopy(model0)
    run_plain(fam, base, x, steps=iterative)
    model = copy.deepcopy(model0)
    run_decay(fam, model, x, steps=iterative, between=between,
              decay=DecayConfig(steps=decay_steps, self_rectify=False))
    assert arch(model) == arch(base)
    _runs(fam, model, x)


@pytest.mark.filterwarnings("ignore:model.config")   # layers may end at different widths
@pytest.mark.parametrize("name", _params(["hf_llama", "hf_llama_gqa", "timm_vit_heads",
                                          "timm_vit_heads_dims",
                                          "tv_vit", "resnext", "regnet"], SLOW_SR))
def test_self_rectifying_releases_whole_units_and_the_model_stays_valid(name):
    """Self-Rectifying with thresholds that release part of what is selected: the model
    has valid shapes and runs after every optimizer step, and at the end."""
    fam = _family(name)
    model = fam.build()
    x = fam.inputs()
    decay = DecayConfig(steps=3, t_rate=-1.0, t_len=0.9, self_rectify=True)
    pruner, _ = run_decay(fam, model, x, steps=3, decay=decay,
                          check=lambda m, p: _runs(fam, m, x))
    assert pruner.engine.counters["released"] > 0
    assert pruner.removals > 0
    _runs(fam, model, x)


def _timm_heads_pruner(model, x, decay, opt_cls):
    from timm.models.vision_transformer import Attention
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    ignored = [model.head, model.patch_embed.proj]
    for blk in model.blocks:   # only the attention groups: heads are the only channels
        ignored += [blk.mlp.fc1, blk.mlp.fc2, blk.attn.proj]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = DecayMetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                 pruning_ratio=0.5, head_pruning_ratio=0.5,
                                 num_heads={a.qkv: a.num_heads for a in attns},
                                 prune_num_heads=True, prune_head_dims=False,
                                 ignored_layers=ignored, decay=decay)
    opt = opt_cls(model.parameters())
    pruner.attach(opt)
    return pruner, opt, attns


def _head_norms(attn):
    """Per head: the norm of its q, k, v rows (weight and bias) and proj columns, indexed
    by hand from timm's layout (rows c * attn_dim + h * head_dim + j)."""
    hd, d = attn.head_dim, attn.qkv.out_features // 3
    w, b, p = attn.qkv.weight.detach(), attn.qkv.bias.detach(), attn.proj.weight.detach()
    out = []
    for h in range(d // hd):
        rows = torch.cat([torch.arange(c * d + h * hd, c * d + (h + 1) * hd) for c in range(3)])
        cols = torch.arange(h * hd, (h + 1) * hd)
        out.append(torch.sqrt(w[rows].pow(2).sum() + b[rows].pow(2).sum()
                              + p[:, cols].pow(2).sum()))
    return torch.stack(out)


def test_decaying_heads_follow_n_step_norms_then_leave_whole():
    pytest.importorskip("timm")
    fam = FAMILIES["timm_vit_heads"]
    model, x = fam.build(), fam.inputs()
    n = 4
    pruner, opt, attns = _timm_heads_pruner(
        model, x, DecayConfig(steps=n, self_rectify=False),
        lambda ps: torch.optim.Adam(ps, lr=1e-3))
    pruner.step()
    attn = attns[0]
    norms0 = _head_norms(attn)
    name = next(g for g in pruner.engine.groups() if g.startswith("blocks.0."))
    st = pruner.engine.state(name)
    decaying = st.decaying.clone()
    assert st.decaying.numel() == 4 and int(decaying.sum()) == 2   # one DPM channel per head
    for step in range(1, n + 1):
        opt.zero_grad()
        fam.loss(model, x).backward()
        opt.step()
        _runs(fam, model, x)
        norms = _head_norms(attn)
        expect = norms0[decaying] * (n - step) / n
        assert torch.allclose(norms[decaying], expect, rtol=1e-4, atol=1e-6)
        assert bool((norms[~decaying] > 0).all())
    assert bool((_head_norms(attn)[decaying] == 0).all())        # exactly zero, still there
    assert attn.num_heads == 4 and attn.qkv.out_features == 96

    kept = (~decaying).nonzero().squeeze(1)
    rows = torch.cat([torch.arange(c * 32 + h * 8, c * 32 + (h + 1) * 8)
                      for c in range(3) for h in kept.tolist()]).sort().values
    before = opt.state[attn.qkv.weight]["exp_avg"][rows].clone()
    w_before = attn.qkv.weight.detach()[rows].clone()
    pruner.step()                                                 # removes the zeroed heads
    assert attn.num_heads == 2 and attn.head_dim == 8 and attn.attn_dim == 16
    assert attn.qkv.out_features == 48 and attn.proj.in_features == 16
    assert torch.equal(attn.qkv.weight.detach(), w_before)
    assert torch.equal(opt.state[attn.qkv.weight]["exp_avg"], before)   # carried, sliced
    for p in model.parameters():
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.dim():
                assert v.shape == p.shape
    _runs(fam, model, x)
    opt.zero_grad()
    fam.loss(model, x).backward()
    opt.step()
    _runs(fam, model, x)


def test_release_frees_a_whole_head():
    """A head is one DPM channel: a release gives back all of its q, k, v rows and proj
    columns at once (the engine releases channels, and the channel is the head)."""
    pytest.importorskip("timm")
    fam = FAMILIES["timm_vit_heads"]
    model, x = fam.build(), fam.inputs()
    pruner, opt, attns = _timm_heads_pruner(
        model, x, DecayConfig(steps=3, t_rate=-1.0, t_len=0.0),   # releases at once
        lambda ps: torch.optim.SGD(ps, lr=0.01))
    pruner.step()
    norms0 = _head_norms(attns[0])
    opt.zero_grad()
    fam.loss(model, x).backward()
    opt.step()
    name = next(g for g in pruner.engine.groups() if g.startswith("blocks.0."))
    assert pruner.engine.counters["released"] >= 2
    assert not bool(pruner.engine.state(name).decaying.any())
    # released heads were scaled back up as a whole: no row of them is left near zero
    assert bool((_head_norms(attns[0]) > 0.5 * norms0).all())
    pruner.step()
    _runs(fam, model, x)
