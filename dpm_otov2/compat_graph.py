"""Shims for only-train-once 3.0.1's *partition* (graph and zero-invariant groups) faults.

:mod:`dpm_otov2.compat` makes the package import on current torch; these fix what its
dependency-graph partition gets wrong on some architectures, measured with OTO's own
upstream sanity-check models (``tests/test_otov2_sanity.py`` ports them). Each is installed by
:func:`dpm_otov2.compat.apply` at runtime (nothing on disk changes), is idempotent, and raises
:class:`~dpm_otov2.compat.OTOCompatError` naming the torch and only-train-once versions when
the upstream code it wraps has moved.

``groupnorm_params``
    ``GroupNormOTO.get_param_groups()`` takes no ``param_names`` (every other operator does),
    so building the param groups of any model with ``nn.GroupNorm`` raises ``TypeError``
    (fixed upstream after 3.0.1). Replaced by one with the common signature that lists the
    GroupNorm's weight/bias as per-channel (``ACCESSORY``) entries; its ``prune_out_dim``
    also lowers ``num_groups`` when every channel is its own group.
``norm_partition``
    A normalisation over the channels (``LayerNorm``/``RMSNorm`` over the pruned dim, e.g.
    ConvNeXt's channel LayerNorm, or a ``GroupNorm`` with more than one channel per group)
    mixes all channels of a ZIG's layer: removing a zeroed channel changes the mean and
    variance of the others, so such a group is *not* zero-invariant and its subnet differs
    from the full model (measured on ConvNeXt: max abs diff 0.4-1.4). 3.0.1 marks these
    groups prunable; after ``OTO.partition_pzigs`` every node group containing such a node
    is marked unprunable (trained normally, never removed), and so is every group feeding a
    concat that such a norm follows. Their ids are kept in
    ``oto._graph.dpm_norm_unprunable``.
``shared_params``
    A module applied more than once (weight sharing) has its parameters listed once per call
    site in one OTO param group, so optimizers that loop over a group's params update them
    twice per step, and the decay engine refuses the group. ``NodeGroup.get_param_groups``
    is wrapped to list each ``(parameter, transform)`` once.
``trace_adaptive_pool``
    Tracing a model whose ``AdaptiveAvgPool2d`` output size does not divide its input size
    at the dummy input's resolution (torchvision ``vgg11_bn`` at 32x32: a 1x1 map pooled to
    7x7) fails inside torch's ONNX lowering with ``SymbolicValueError``. ``Graph``'s trace is
    wrapped so that this raises a ``ValueError`` naming the pooling layer, its sizes and the
    smallest dummy-input size that traces.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys

import torch

__all__ = ["apply_graph_shims", "adaptive_pool_hint"]


def _fail(shim: str, what: str):
    from .compat import _fail as fail

    return fail(shim, what)


def _operator_module():
    from .compat import _import

    return _import("only_train_once.operation.operator", "groupnorm_params")


# ------------------------------------------------------------------ groupnorm_params
def _shim_groupnorm_params() -> bool:
    ops = _operator_module()
    gn = getattr(ops, "GroupNormOTO", None)
    if gn is None or not callable(getattr(gn, "get_param_groups", None)):
        raise _fail("groupnorm_params", "only_train_once.operation.operator.GroupNormOTO "
                                        "(or its get_param_groups) is gone")
    if getattr(gn.get_param_groups, "_dpm_shim", False):
        return False
    if "param_names" in inspect.signature(gn.get_param_groups).parameters:
        return False  # fixed upstream: nothing to bridge
    TT = ops.TensorTransform

    def get_param_groups(self, param_names=(), **kwargs):
        names = list(param_names) if param_names else list(self.name_to_param)
        names = [n for n in names if n in self.name_to_param]
        return {"op": "groupnorm", "p_names": names,
                "params": [self.name_to_param[n] for n in names],
                "p_transform": [TT.ACCESSORY] * len(names)}

    def prune_out_dim(self, pruned_idxes=(), **kwargs):
        m = self.module
        per_group = m.num_channels // m.num_groups
        keep = sorted(set(range(m.num_channels)) - set(int(i) for i in pruned_idxes))
        m.num_channels = len(keep)
        if per_group == 1:
            m.num_groups = len(keep)
        if m.affine:
            m.weight = self.prune_param_and_grad(m.weight, keep, 0)
            m.bias = self.prune_param_and_grad(m.bias, keep, 0)

    get_param_groups._dpm_shim = True
    gn.get_param_groups = get_param_groups
    gn.prune_out_dim = prune_out_dim
    return True


# ------------------------------------------------------------------ norm_partition
def _channel_mixing(op) -> bool:
    """Does this OTO operator normalise over the channels its group would prune?

    By class name: only-train-once 3.0.1 imports its own modules twice (as
    ``only_train_once.operation`` and, via a ``sys.path`` entry, as ``operation``).
    """
    name = type(op).__name__
    if name == "LayerNormOTO":
        return True
    if name == "GroupNormOTO":
        m = getattr(op, "module", None)
        return m is None or m.num_channels // m.num_groups > 1
    return False


def mark_norm_groups_unprunable(graph) -> list[str]:
    """Mark every node group holding a channel-mixing normalisation unprunable; return ids."""
    marked = []

    def unprunable(ng):
        if ng.is_prunable and not ng.is_auxiliary:
            ng.is_prunable = False
            marked.append(ng.id)

    for ng in list(graph.node_groups.values()):
        if not any(n.op is not None and _channel_mixing(n.op) for n in ng.nodes.values()):
            continue
        if ng.is_auxiliary:  # the norm follows a concat: its channels come from these groups
            for dep in getattr(ng, "dependent_node_groups", []):
                unprunable(dep)
        else:
            unprunable(ng)
    graph.dpm_norm_unprunable = marked
    return marked


def _shim_norm_partition() -> bool:
    import only_train_once

    ops = _operator_module()
    for name in ("LayerNormOTO", "GroupNormOTO"):
        if not isinstance(getattr(ops, name, None), type):
            raise _fail("norm_partition", f"only_train_once.operation.operator.{name} is gone")
    cls = only_train_once.OTO
    orig = getattr(cls, "partition_pzigs", None)
    if not callable(orig):
        raise _fail("norm_partition", "only_train_once.OTO.partition_pzigs is gone")
    if getattr(orig, "_dpm_shim", False):
        return False

    @functools.wraps(orig)
    def partition_pzigs(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        graph = getattr(self, "_graph", None)
        if graph is None or not hasattr(graph, "node_groups"):
            raise _fail("norm_partition", "OTO._graph.node_groups is missing after "
                                          "partition_pzigs")
        mark_norm_groups_unprunable(graph)
        return out

    partition_pzigs._dpm_shim = True
    cls.partition_pzigs = partition_pzigs
    return True


# ------------------------------------------------------------------ shared_params
def _dedupe_param_group(group: dict) -> dict:
    params = group.get("params")
    if not params:
        return group
    keys = [(id(p), int(t)) for p, t in zip(params, group.get("p_transform") or [])]
    if len(set(keys)) == len(keys):
        return group
    seen, keep = set(), []
    for i, k in enumerate(keys):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    for attr in ("p_names", "params", "p_transform", "op_names"):
        if isinstance(group.get(attr), list) and len(group[attr]) == len(keys):
            group[attr] = [group[attr][i] for i in keep]
    return group


def _node_group_modules() -> list:
    """only-train-once's ``graph.node_group`` module, and its second copy: 3.0.1's
    ``dependency_graph`` appends the package directory to ``sys.path`` and imports
    ``graph.node_group`` as a top-level module, so two ``NodeGroup`` classes are in use."""
    import os

    from .compat import _import

    mod = _import("only_train_once.graph.node_group", "shared_params")
    mods = [mod]
    twin = sys.modules.get("graph.node_group")
    if twin is not None and twin is not mod and os.path.dirname(
            os.path.dirname(os.path.abspath(getattr(twin, "__file__", "") or ""))) \
            == os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__))):
        mods.append(twin)
    return mods


def _shim_shared_params() -> bool:
    installed = False
    for mod in _node_group_modules():
        cls = getattr(mod, "NodeGroup", None)
        orig = getattr(cls, "get_param_groups", None)
        if not callable(orig):
            raise _fail("shared_params", f"{mod.__name__}.NodeGroup.get_param_groups is gone")
        if getattr(orig, "_dpm_shim", False):
            continue

        def wrap(orig):
            @functools.wraps(orig)
            def get_param_groups(self, *args, **kwargs):
                return _dedupe_param_group(orig(self, *args, **kwargs))

            get_param_groups._dpm_shim = True
            return get_param_groups

        cls.get_param_groups = wrap(orig)
        installed = True
    return installed


# ------------------------------------------------------------------ trace_adaptive_pool
def adaptive_pool_hint(model, dummy_input) -> str:
    """Which ``AdaptiveAvgPool2d`` layers cannot be lowered at this input size, and the
    smallest input size (same aspect) at which their input is a multiple of their output."""
    seen: list[tuple[str, tuple, tuple]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.AdaptiveAvgPool2d):
            def pre(mod, args, name=name):
                seen.append((name, tuple(args[0].shape[-2:]),
                             torch.nn.modules.utils._pair(mod.output_size)))
            hooks.append(m.register_forward_pre_hook(pre))
    x = dummy_input
    try:
        with torch.no_grad():
            model(*x) if isinstance(x, (tuple, list)) else model(x)
    except Exception:  # noqa: BLE001 - the hint is best effort
        pass
    finally:
        for h in hooks:
            h.remove()
    first = x[0] if isinstance(x, (tuple, list)) else x
    in_hw = tuple(first.shape[-2:]) if isinstance(first, torch.Tensor) else None
    parts, need = [], None
    for name, (h, w), out in seen:
        out = tuple(o if o is not None else s for o, s in zip(out, (h, w)))
        if h % out[0] == 0 and w % out[1] == 0:
            continue
        parts.append(f"`{name}` pools a {h}x{w} map to {out[0]}x{out[1]}")
        if in_hw and in_hw[0] % h == 0 and in_hw[1] % w == 0:
            rh, rw = in_hw[0] // h, in_hw[1] // w
            size = (rh * out[0] * math.ceil(h / out[0]), rw * out[1] * math.ceil(w / out[1]))
            need = size if need is None else (max(need[0], size[0]), max(need[1], size[1]))
    if not parts:
        return ("an adaptive average pool's output size does not divide its input size at "
                "this dummy input; use a dummy input at which it does (e.g. the model's "
                "training resolution)")
    msg = "; ".join(parts)
    if need:
        msg += (f"; a dummy input of {need[0]}x{need[1]} (or any size at which the pooled "
                f"map is a multiple of the output size) traces")
    return msg


def _shim_trace_adaptive_pool() -> bool:
    from .compat import _import

    mod = _import("only_train_once.graph.graph", "trace_adaptive_pool")
    cls = getattr(mod, "Graph", None)
    orig = getattr(cls, "_get_trace_graph", None)
    if not callable(orig):
        raise _fail("trace_adaptive_pool", "only_train_once.graph.graph.Graph._get_trace_graph "
                                           "is gone")
    if getattr(orig, "_dpm_shim", False):
        return False

    @functools.wraps(orig)
    def _get_trace_graph(self, model, dummy_input, *args, **kwargs):
        try:
            return orig(self, model, dummy_input, *args, **kwargs)
        except RuntimeError as e:
            if "adaptive_avg_pool" not in str(e):
                raise
            raise ValueError(
                "only-train-once traces the model through torch's TorchScript ONNX lowering, "
                "which cannot express adaptive_avg_pool2d when the output size does not "
                "divide the input size: " + adaptive_pool_hint(model, dummy_input)
                + ". Pass such a dummy_input to OTO(model, dummy_input) (training at "
                "another resolution is fine), or pool to 1x1.") from e

    _get_trace_graph._dpm_shim = True
    cls._get_trace_graph = _get_trace_graph
    return True


def apply_graph_shims() -> list[str]:
    """Install the partition shims (after ``only_train_once`` imported); return new names."""
    done = []
    for name, fn in (("groupnorm_params", _shim_groupnorm_params),
                     ("norm_partition", _shim_norm_partition),
                     ("shared_params", _shim_shared_params),
                     ("trace_adaptive_pool", _shim_trace_adaptive_pool)):
        if fn():
            done.append(name)
    return done
