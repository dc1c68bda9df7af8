"""prune_num_heads=True with prune_head_dims=True (issue 11): Torch-Pruning removes, in one
step, whole heads AND the same head dims of every head. A head and a head dim overlap, so
they are two engine groups over the same tensors (the attention group's, one channel per
head, and ``<name>:dims``, one channel per head-dim position across the heads); what both
select is removed together. Tiny timm ViT (fused qkv), attention groups only.
"""
import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch_pruning as tp

sys.path.insert(0, str(Path(__file__).parent))
from depgraph_families import FAMILIES, arch  # noqa: E402
from dpm_depgraph import DecayConfig, DecayMetaPruner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 4


def _pruner(model, x, decay, lr=0.0, iterative_steps=1):
    from timm.models.vision_transformer import Attention
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    ignored = [model.head, model.patch_embed.proj]
    for blk in model.blocks:   # only the attention groups
        ignored += [blk.mlp.fc1, blk.mlp.fc2, blk.attn.proj]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = DecayMetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                 pruning_ratio=0.5, head_pruning_ratio=0.5,
                                 iterative_steps=iterative_steps,
                                 num_heads={a.qkv: a.num_heads for a in attns},
                                 prune_num_heads=True, prune_head_dims=True,
                                 ignored_layers=ignored, decay=decay)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pruner.attach(opt)
    return pruner, opt, attns


def _mask_norms(attn, heads, dims):
    """Norm of the elements of q/k/v rows and proj columns at (head h, dim j) for
    h in ``heads``, j in ``dims`` (timm layout: row c * attn_dim + h * head_dim + j)."""
    hd, d = attn.head_dim, attn.qkv.out_features // 3
    cols = torch.tensor([h * hd + j for h in heads for j in dims])
    rows = torch.cat([cols + c * d for c in range(3)])
    w, b, p = attn.qkv.weight.detach(), attn.qkv.bias.detach(), attn.proj.weight.detach()
    return torch.sqrt(w[rows].pow(2).sum() + b[rows].pow(2).sum() + p[:, cols].pow(2).sum())


def test_heads_and_head_dims_decay_as_two_groups_and_leave_together():
    pytest.importorskip("timm")
    fam = FAMILIES["timm_vit_heads_dims"]
    model, x = fam.build(), fam.inputs()
    pruner, opt, attns = _pruner(model, x, DecayConfig(steps=N, self_rectify=False))
    pruner.step()
    attn = attns[0]
    eng = pruner.engine
    name = next(g for g in eng.groups() if g.startswith("blocks.0.") and
                not g.endswith(":dims"))
    heads_st, dims_st = eng.state(name), eng.state(name + ":dims")
    assert heads_st.decaying.numel() == 4 and dims_st.decaying.numel() == 8
    dec_heads = heads_st.decaying.nonzero().squeeze(1).tolist()
    dec_dims = dims_st.decaying.nonzero().squeeze(1).tolist()
    assert len(dec_heads) == 2 and len(dec_dims) == 4
    live_heads = [h for h in range(4) if h not in dec_heads]
    h0 = [_mask_norms(attn, [h], range(8)) for h in dec_heads]
    j0 = [_mask_norms(attn, range(4), [j]) for j in dec_dims]
    for k in range(1, N + 1):
        opt.step()           # lr = 0: only the decay moves the weights
        _ = model(x)
        for h, n0 in zip(dec_heads, h0):       # a head: one channel, across all its dims
            assert float(_mask_norms(attn, [h], range(8))) == pytest.approx(
                float(n0) * (N - k) / N, rel=2e-6, abs=1e-7)
        for j, n0 in zip(dec_dims, j0):        # a head dim: one channel, across all heads
            assert float(_mask_norms(attn, range(4), [j])) == pytest.approx(
                float(n0) * (N - k) / N, rel=2e-6, abs=1e-7)
    keep_dims = [j for j in range(8) if j not in dec_dims]
    assert float(_mask_norms(attn, live_heads, keep_dims)) > 0
    qkv_before = attn.qkv.weight.detach().view(3, 4, 8, -1)[:, live_heads][:, :, keep_dims]
    pruner.step()                                       # one removal: heads and dims
    assert attn.num_heads == 2 and attn.head_dim == 4 and attn.attn_dim == 8
    assert attn.qkv.out_features == 24 and attn.proj.in_features == 8
    assert torch.equal(attn.qkv.weight.detach().view(3, 2, 4, -1), qkv_before)
    assert eng.num_channels(name) == 2 and eng.num_channels(name + ":dims") == 4
    assert fam.loss(model, x).isfinite()
    opt.step()
    assert fam.loss(model, x).isfinite()


def test_release_keeps_whole_heads_and_whole_head_dims():
    """Self-Rectifying releasing at once: every release gives back a whole head or a whole
    head-dim position; the removals keep qkv divisible into heads of equal size."""
    pytest.importorskip("timm")
    fam = FAMILIES["timm_vit_heads_dims"]
    model, x = fam.build(), fam.inputs()
    pruner, opt, attns = _pruner(model, x, DecayConfig(steps=3, t_rate=-1.0, t_len=0.9),
                                 lr=0.01, iterative_steps=2)
    for _ in range(2):
        pruner.step()
        for _ in range(3):
            opt.zero_grad()
            fam.loss(model, x).backward()
            opt.step()
            assert fam.loss(model, x).isfinite()
    pruner.finalize(force=True)
    assert pruner.engine.counters["released"] > 0
    for a in attns:
        assert a.qkv.out_features == 3 * a.num_heads * a.head_dim
    assert fam.loss(model, x).isfinite()


def test_checkpoint_replays_heads_and_head_dims_removals():
    pytest.importorskip("timm")
    fam = FAMILIES["timm_vit_heads_dims"]
    decay = DecayConfig(steps=2, self_rectify=False)
    model, x = fam.build(), fam.inputs()
    model0 = copy.deepcopy(model)
    pruner, opt, attns = _pruner(model, x, decay, lr=0.01, iterative_steps=2)
    pruner.step()
    opt.step()
    opt.step()
    pruner.step()                       # removes heads and dims, marks more
    ckpt = copy.deepcopy({"model": model.state_dict(), "pruner": pruner.state_dict()})
    other, _, other_attns = _pruner(model0, x, decay, lr=0.01, iterative_steps=2)
    other.load_state_dict(ckpt["pruner"])
    model0.load_state_dict(ckpt["model"])
    assert arch(model0) == arch(model)
    assert [a.num_heads for a in other_attns] == [a.num_heads for a in attns]
    assert list(other.num_heads.values()) == list(pruner.num_heads.values()) == [3, 3]
    assert torch.equal(fam.loss(model0, x), fam.loss(model, x))


def _vit8():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=2, num_heads=8,
                             mlp_ratio=1.0, num_classes=5)


def _vit8_kwargs(model, prune_head_dims):
    from timm.models.vision_transformer import Attention
    return dict(ignored_layers=[model.head], global_pruning=True, round_to=2,
                num_heads={m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)},
                prune_num_heads=True, prune_head_dims=prune_head_dims, head_pruning_ratio=0.6)


@pytest.mark.parametrize("prune_head_dims", [False, True], ids=["heads", "heads+dims"])
def test_global_pruning_with_heads_still_decaying_ends_at_plain_shapes(prune_head_dims):
    """Global ranking, whole heads (and head dims), one optimizer step between pruning steps
    with decay.steps=3: heads are still decaying at the next selection. Torch-Pruning ranks
    heads and head dims (and, globally, the attention group's dims against every other
    layer) from one importance vector; the attention group is shown to it without its
    dead heads / head dims, so it ranks what it would on its own smaller model. lr = 0:
    a global ranking compares weights, which must be the plain pruner's."""
    pytest.importorskip("timm")
    from depgraph_families import Family, _image, _plain_loss, _timm_fix, run_decay, run_plain
    fam = Family("vit8", _vit8, _image(), lambda m: _vit8_kwargs(m, prune_head_dims),
                 _plain_loss, _timm_fix)
    model0, x = fam.build(), fam.inputs()
    base = copy.deepcopy(model0)
    run_plain(fam, base, x, steps=3)
    model = copy.deepcopy(model0)
    run_decay(fam, model, x, steps=3, between=1,
              decay=DecayConfig(steps=3, self_rectify=False),
              opt_cls=lambda ps: torch.optim.SGD(ps, lr=0.0))
    assert arch(model) == arch(base)
    assert arch(model) != arch(model0)


def test_heads_and_dims_without_a_live_view_are_zeroed_at_the_next_step(monkeypatch):
    """Where an attention group cannot be shown live (layers other than Linear), heads and
    head dims still decaying at a pruning step are zeroed then, with a warning, and the
    selection still ends at the plain pruner's shapes."""
    pytest.importorskip("timm")
    import dpm_depgraph.live_view as live_view
    import dpm_depgraph.heads_dims as heads_dims
    from depgraph_families import run_decay, run_plain
    monkeypatch.setattr(live_view, "viewable", lambda pruner, name: None)
    monkeypatch.setattr(heads_dims, "viewable", lambda pruner, name: None)
    fam = FAMILIES["timm_vit_heads_dims"]
    model0, x = fam.build(), fam.inputs()
    base = copy.deepcopy(model0)
    run_plain(fam, base, x, steps=2)
    model = copy.deepcopy(model0)
    with pytest.warns(RuntimeWarning, match="zeroed now"):
        run_decay(fam, model, x, steps=2, between=1,
                  decay=DecayConfig(steps=3, self_rectify=False))
    assert arch(model) == arch(base)
