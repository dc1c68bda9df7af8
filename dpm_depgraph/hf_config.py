"""Keep a Hugging Face model's ``config`` true to its pruned layers.

Torch-Pruning's LLM example sets ``model.config.num_attention_heads``,
``num_key_value_heads``, ``intermediate_size`` and ``hidden_size`` by hand after pruning, so
that ``save_pretrained`` writes a config that ``from_pretrained`` can rebuild. The decay
pruners remove channels inside ``step()`` / ``finalize()``, so they do it at every physical
removal (:func:`sync_hf_config`). A field is set only when the config has it and every
layer agrees on its value (uniform, local pruning); where layers differ (global pruning,
``pruning_ratio_dict``, Self-Rectifying releasing more in one layer than in another) no
single value describes the model: the field is left as it is and reported.

What is read from the layers (duck-typed, no ``transformers`` import):

* attention with ``q_proj``, ``k_proj`` Linear and an int ``head_dim`` (LLaMA; ViT in
  transformers 5):
  ``num_attention_heads = q_proj.out_features // head_dim``, ``num_key_value_heads``
  likewise from ``k_proj``, ``head_dim``; ``hidden_size = q_proj.in_features``.
* BERT-style self-attention (``query`` Linear, int ``num_attention_heads``):
  ``num_attention_heads``; ``hidden_size = query.in_features``.

ViT's and BERT's configs have no head size: with ``prune_head_dims`` the rebuilt model has
``hidden_size / num_attention_heads`` per head, which matches the pruned one only where
both shrank by the same factor; and a layer kept whole in ``ignored_layers`` that reads the
hidden size (BERT's pooler) keeps its width while a rebuilt one follows ``hidden_size``.
* MLP: ``up_proj.out_features`` (LLaMA-style ``gate_proj``/``up_proj``), the
  ``dense.out_features`` of a ``*Intermediate`` module (BERT) or ``fc1.out_features`` of a
  module with ``fc1``/``fc2`` (ViT in transformers 5): ``intermediate_size``.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

__all__ = ["sync_hf_config", "layer_config_values"]


def _int(module, name):
    v = getattr(module, name, None)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def layer_config_values(model: nn.Module) -> dict:
    """``{config field: [value of each layer]}`` read from the model's layers."""
    seen: dict = {}

    def add(field, value):
        seen.setdefault(field, []).append(int(value))

    for m in model.modules():
        q, k = getattr(m, "q_proj", None), getattr(m, "k_proj", None)
        head_dim = _int(m, "head_dim")
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and head_dim:
            add("num_attention_heads", q.out_features // head_dim)
            add("num_key_value_heads", k.out_features // head_dim)
            add("head_dim", head_dim)
            add("hidden_size", q.in_features)
        query, heads = getattr(m, "query", None), _int(m, "num_attention_heads")
        if isinstance(query, nn.Linear) and heads:
            add("num_attention_heads", heads)
            add("hidden_size", query.in_features)
        up = getattr(m, "up_proj", None)
        if isinstance(up, nn.Linear) and isinstance(getattr(m, "gate_proj", None), nn.Linear):
            add("intermediate_size", up.out_features)
        dense = getattr(m, "dense", None)
        if type(m).__name__.endswith("Intermediate") and isinstance(dense, nn.Linear):
            add("intermediate_size", dense.out_features)
        fc1 = getattr(m, "fc1", None)
        if isinstance(fc1, nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear):
            add("intermediate_size", fc1.out_features)
    return seen


def sync_hf_config(model: nn.Module, warned: set | None = None) -> dict:
    """Set the fields of ``model.config`` that the layers agree on and that differ from
    it. Returns ``{field: sorted distinct values}`` of the fields left because the layers
    differ (empty when the config describes the model, or the model has no HF config).
    With ``warned`` (a set kept by the caller), warn once per such field."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    differ = {}
    for field, values in layer_config_values(model).items():
        if not isinstance(getattr(config, field, None), int):
            continue
        distinct = sorted(set(values))
        if len(distinct) > 1:
            differ[field] = distinct
        elif getattr(config, field) != distinct[0]:
            setattr(config, field, distinct[0])
    for field, values in differ.items():
        if warned is not None and field not in warned:
            warned.add(field)
            warnings.warn(
                f"model.config.{field} was not updated: after this removal the layers have "
                f"different values {values}, which one config field cannot describe; save the "
                f"pruned model with torch.save(model) rather than save_pretrained, or prune "
                f"uniformly (local pruning)", UserWarning, stacklevel=4)
    return differ
