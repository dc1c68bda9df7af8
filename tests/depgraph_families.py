"""Tiny random-config models of the families Torch-Pruning's own examples prune, with the
arguments those examples pass (issue 11). Shared by tests/test_depgraph_families.py and
``python tests/depgraph_families.py`` (prints plain vs decay params% per family).

Each family: ``build() -> model``, ``inputs()``, ``kwargs(model) -> dict`` (the example's
pruner arguments), ``loss(model, x)`` and ``fix(model, pruner)``: what the example does by
hand after ``pruner.step()`` (the plain pruner's side only; the decay pruner does it
itself at every removal).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision


def _hf_logits(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits


def _hf_attn_modules(model):
    for m in model.modules():
        names = [n for n in ("q_proj", "k_proj", "v_proj", "query", "key", "value")
                 if isinstance(getattr(m, n, None), nn.Linear)]
        if len(names) == 3:
            yield m, [getattr(m, n) for n in names]


def _hf_fix(model, pruner):
    # the HF examples' manual update (attribute names of transformers 5)
    for m, (q, k, v) in _hf_attn_modules(model):
        heads = pruner.num_heads[q]
        for name in ("num_attention_heads", "num_heads"):
            if hasattr(m, name):
                setattr(m, name, heads)
        for name in ("head_dim", "attention_head_size"):
            if hasattr(m, name):
                setattr(m, name, q.out_features // heads)
        if hasattr(m, "all_head_size"):
            m.all_head_size = q.out_features
        if hasattr(m, "num_key_value_groups"):
            m.num_key_value_groups = heads // pruner.num_heads[k]


def _hf_heads(model):
    return {layer: getattr(m, "num_attention_heads", None) or m.config.num_attention_heads
            for m, layers in _hf_attn_modules(model) for layer in layers}


class Family:
    def __init__(self, name, build, inputs, kwargs, loss, fix=None, requires=None):
        self.name, self.build, self.inputs, self.kwargs = name, build, inputs, kwargs
        self.loss, self.fix, self.requires = loss, fix or (lambda m, p: None), requires


# ----------------------------------------------------------------------------- HF
def _vit():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, num_labels=5))


def _vit_kwargs(model):   # examples/transformers/prune_hf_vit.py
    return dict(ignored_layers=[model.classifier], num_heads=_hf_heads(model),
                prune_head_dims=True, prune_num_heads=False, head_pruning_ratio=0.5,
                output_transform=lambda out: out.logits.sum())


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=16, num_labels=3))


def _bert_kwargs(model):   # examples/transformers/prune_hf_bert.py
    return dict(ignored_layers=[model.classifier, model.bert.pooler], num_heads=_hf_heads(model),
                prune_head_dims=True, prune_num_heads=False,
                output_transform=lambda out: out.logits.sum())


def _llama(heads, kv_heads, hidden, attn="sdpa"):
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32)
        config._attn_implementation = attn
        return LlamaForCausalLM(config)
    return build


def _llama_kwargs(model):   # examples/LLMs/prune_llm.py
    num_heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads[a.q_proj] = model.config.num_attention_heads
        num_heads[a.k_proj] = model.config.num_key_value_heads
        num_heads[a.v_proj] = model.config.num_key_value_heads
    return dict(ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True,
                prune_head_dims=False, head_pruning_ratio=0.5, round_to=4,
                output_transform=lambda out: out.logits.sum())


# ----------------------------------------------------------------------------- timm
def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             mlp_ratio=2.0, num_classes=5)


def _timm_kwargs(prune_num_heads, prune_head_dims=None):
    def kwargs(model):   # examples/transformers/prune_timm_vit.py
        from timm.models.vision_transformer import Attention
        num_heads = {m.qkv: m.num_heads for m in model.modules() if isinstance(m, Attention)}
        dims = not prune_num_heads if prune_head_dims is None else prune_head_dims
        return dict(ignored_layers=[model.head], num_heads=num_heads,
                    prune_num_heads=prune_num_heads, prune_head_dims=dims,
                    head_pruning_ratio=0.5, round_to=2)
    return kwargs


def _both(kwargs):
    """The example's arguments with whole heads AND head dims pruned."""
    def both(model):
        return dict(kwargs(model), prune_num_heads=True, prune_head_dims=True,
                    head_pruning_ratio=0.5)
    return both


def _timm_fix(model, pruner):
    from timm.models.vision_transformer import Attention
    for m in model.modules():
        if isinstance(m, Attention):
            m.num_heads = pruner.num_heads[m.qkv]
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            m.attn_dim = m.qkv.out_features // 3   # timm >= 1.0 reshapes to attn_dim


# ----------------------------------------------------------------------------- torchvision
def _tv_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=2,
                                                num_heads=4, hidden_dim=32, mlp_dim=64,
                                                num_classes=5)


def _tv_vit_kwargs(model):   # examples/torchvision_models/torchvision_pruning.py
    return dict(ignored_layers=[model.heads.head], round_to=model.encoder.layers[0].num_heads)


def _tv_vit_fix(model, pruner):
    model.hidden_dim = model.conv_proj.out_channels


def _resnext():
    from torchvision.models.resnet import Bottleneck, ResNet
    torch.manual_seed(0)
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4, num_classes=5)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    torch.manual_seed(0)
    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)


def _efficientnet():
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
    torch.manual_seed(0)
    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return EfficientNet(setting, dropout=0.0, last_channel=last, num_classes=5)


def _regnet():
    from torchvision.models.regnet import BlockParams, RegNet
    torch.manual_seed(0)
    return RegNet(BlockParams.from_init_params(depth=4, w_0=16, w_a=8.0, w_m=2.0, group_width=8),
                  num_classes=5)


def _classifier_kwargs(attr):
    def kwargs(model):
        head = model.get_submodule(attr)
        return dict(ignored_layers=[head])
    return kwargs


def _image(size=16):
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _tokens():
    return torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))


def _one_sequence():
    return torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))


def _plain_loss(model, x):
    return model(x).logsumexp(-1).mean()


def _hf_loss(model, x):
    return _hf_logits(model, x).logsumexp(-1).mean()


FAMILIES = {
    "hf_vit": Family("hf_vit", _vit, _image(), _vit_kwargs, _hf_loss, _hf_fix, "transformers"),
    "hf_bert": Family("hf_bert", _bert, _tokens, _bert_kwargs, _hf_loss, _hf_fix, "transformers"),
    # Torch-Pruning 1.6.1 builds its graph of LLaMA only with dpm_depgraph.torch_pruning_fixes
    # (run_plain). GQA: eager attention, whose repeat_kv tells Torch-Pruning that k/v are
    # shared (with sdpa's enable_gqa it fails: "shape '[12, -1]' is invalid", its issue
    # #516); 12 query heads over 2 KV heads, since with 4 over 2 its second step leaves as
    # many query as KV heads, stops treating the layer as GQA and drops the head group.
    "hf_llama": Family("hf_llama", _llama(4, 4, 32), _one_sequence, _llama_kwargs, _hf_loss,
                       _hf_fix, "transformers"),
    "hf_llama_gqa": Family("hf_llama_gqa", _llama(16, 2, 64, "eager"), _one_sequence,
                           _llama_kwargs, _hf_loss, _hf_fix, "transformers"),
    "timm_vit": Family("timm_vit", _timm_vit, _image(), _timm_kwargs(False), _plain_loss,
                       _timm_fix, "timm"),
    "timm_vit_heads": Family("timm_vit_heads", _timm_vit, _image(), _timm_kwargs(True),
                             _plain_loss, _timm_fix, "timm"),
    "timm_vit_heads_dims": Family("timm_vit_heads_dims", _timm_vit, _image(),
                                  _timm_kwargs(True, True), _plain_loss, _timm_fix, "timm"),
    "hf_vit_heads_dims": Family("hf_vit_heads_dims", _vit, _image(), _both(_vit_kwargs),
                                _hf_loss, _hf_fix, "transformers"),
    "tv_vit": Family("tv_vit", _tv_vit, _image(), _tv_vit_kwargs, _plain_loss, _tv_vit_fix),
    "resnext": Family("resnext", _resnext, _image(32), _classifier_kwargs("fc"), _plain_loss),
    "convnext": Family("convnext", _convnext, _image(32), _classifier_kwargs("classifier.2"),
                       _plain_loss),
    "efficientnet": Family("efficientnet", _efficientnet, _image(32),
                           _classifier_kwargs("classifier.1"), _plain_loss),
    "regnet": Family("regnet", _regnet, _image(32), _classifier_kwargs("fc"), _plain_loss),
}


def arch(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def run_plain(fam, model, x, steps=2, ratio=0.5):
    from dpm_depgraph import torch_pruning_fixes
    kw = fam.kwargs(model)
    with warnings.catch_warnings(), torch_pruning_fixes():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=ratio, iterative_steps=steps, **kw)
        for _ in range(steps):
            pruner.step()
            fam.fix(model, pruner)
    return pruner


def run_decay(fam, model, x, steps=2, ratio=0.5, decay=None, check=None, opt_cls=None,
              between=None):
    """The decay pruner on the same arguments; ``between`` optimizer steps between pruning
    steps (default ``decay.steps``: what was selected is zeroed by the next step; fewer:
    it is still decaying); ``check(model, pruner)`` after every optimizer step."""
    from dpm_depgraph import DecayConfig, DecayMetaPruner
    kw = fam.kwargs(model)
    decay = decay or DecayConfig(steps=1, self_rectify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = DecayMetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                 pruning_ratio=ratio, iterative_steps=steps, decay=decay, **kw)
    opt = (opt_cls or (lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)))(model.parameters())
    pruner.attach(opt)

    def train(n):
        for _ in range(n):
            opt.zero_grad()
            fam.loss(model, x).backward()
            opt.step()
            if check is not None:
                check(model, pruner)

    for _ in range(steps):
        pruner.step()
        train(decay.steps if between is None else between)
    pruner.finalize(force=True)
    train(1)
    return pruner, opt


def parity(name):
    """``(plain params %, decay params %, shapes equal)`` with Self-Rectifying off."""
    fam = FAMILIES[name]
    model0 = fam.build()
    x = fam.inputs()
    base = copy.deepcopy(model0)
    run_plain(fam, base, x)
    model = copy.deepcopy(model0)
    run_decay(fam, model, x)
    with torch.no_grad():
        fam.loss(model, x)
    n0 = n_params(model0)
    return 100 * n_params(base) / n0, 100 * n_params(model) / n0, arch(base) == arch(model)


if __name__ == "__main__":
    import sys
    for name in sys.argv[1:] or FAMILIES:
        try:
            a, b, same = parity(name)
            print(f"{name:16s} plain TP {a:5.1f}% params, decay (SR off) {b:5.1f}%, "
                  f"shapes equal: {'yes' if same else 'no'}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{name:16s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
