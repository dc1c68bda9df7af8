"""dpm_otov2.compat: only-train-once 3.0.1 on the installed torch, each shim and its guard."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import dpm_otov2
from dpm_otov2 import compat
from benchmarks.models import get_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet_oto(model, x):
    from dpm_otov2 import OTO

    return OTO(model, x)


def _zero_some_groups(oto, frac=0.5, seed=0):
    import numpy as np

    np.random.seed(seed)
    oto.random_set_zero_groups(target_group_sparsity=frac)


def test_import_and_shims_listed():
    import only_train_once

    assert hasattr(only_train_once, "OTO")
    applied = compat.applied_shims()
    # on torch 2.14.1 the exporter moved: both import shims are needed
    if not hasattr(torch.onnx, "_internal") or "torch.onnx._globals" in sys.modules:
        assert set(applied) <= {"onnx_globals", "optimize_graph", "trace_no_onnx", "oto_dhspg",
                                "hesso_plain", "groupnorm_params", "norm_partition",
                                "shared_params", "trace_adaptive_pool"}
    v = compat.versions()
    assert v["torch"] == torch.__version__ and v["only-train-once"]


def test_shim_onnx_globals():
    # shim "onnx_globals": OTO's `from torch.onnx._globals import GLOBALS` works
    from torch.onnx._globals import GLOBALS

    assert hasattr(GLOBALS, "export_onnx_opset_version")
    import only_train_once.graph.graph as gg

    assert gg.GLOBALS is GLOBALS


def test_shim_optimize_graph_and_partition():
    # shim "optimize_graph": OTO(model, dummy_input) traces and partitions the ZIGs
    assert callable(torch.onnx._optimize_graph)
    model = get_model("small_cnn", width=0.5)
    oto = _quiet_oto(model, torch.randn(1, 3, 16, 16))
    groups = list(oto._graph.get_param_groups())
    prunable = [g for g in groups if g["is_prunable"] and not g["is_auxiliary"]]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(g["num_groups"] for g in prunable) == sorted(c.out_channels for c in convs)


def test_shim_trace_no_onnx_graph():
    # shim "trace_no_onnx": Graph(..., trace_onnx=False) lowers the trace with torch's pipeline
    from only_train_once.graph import Graph

    model = get_model("small_cnn", width=0.5).eval()
    g = Graph(model, torch.randn(1, 3, 16, 16), trace_onnx=False)
    assert len(g.nodes) > 0


def test_construct_subnet_torch_flops_params(tmp_path):
    # construct_subnet + FLOPs/params (no shim needed) + shim "torch_load" (load_subnet)
    torch.manual_seed(0)
    model = get_model("vgg16_bn", width=0.125)
    x = torch.randn(2, 3, 32, 32)
    oto = _quiet_oto(model, x[:1])
    _zero_some_groups(oto, 0.5)
    model.eval()
    y = model(x)
    flops, params = oto.compute_flops()["total"], oto.compute_num_params()
    oto.construct_subnet(out_dir=str(tmp_path))
    assert os.path.exists(oto.compressed_model_path)
    assert os.path.exists(oto.full_group_sparse_model_path)
    sub = oto.compressed_model().eval()
    assert (sub(x) - y).abs().max().item() < 1e-4
    full = oto.full_group_sparse_model().eval()
    assert sum(p.numel() for p in full.parameters()) * 1e-6 == pytest.approx(params)
    osub = _quiet_oto(sub, x[:1])
    assert osub.compute_flops()["total"] < 0.6 * flops
    assert osub.compute_num_params() < 0.6 * params
    with pytest.raises(Exception):  # torch's default refuses OTO's pickled modules
        torch.load(oto.compressed_model_path)


def test_construct_subnet_channels_last(tmp_path):
    # a model trained in channels_last (the benchmarks' cifar profile): only-train-once's
    # view() refuses NHWC strides; the subnet must come out right and NHWC again
    torch.manual_seed(0)
    model = get_model("resnet20", width=0.25).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    oto = _quiet_oto(model, x[:1])
    _zero_some_groups(oto, 0.5)
    model.eval()
    y = model(x)
    n_dense = sum(p.numel() for p in model.parameters())
    oto.construct_subnet(out_dir=str(tmp_path))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)  # back in NHWC, not just contiguous
    assert sum(p.numel() for p in model.parameters()) < 0.8 * n_dense
    sub = oto.compressed_model().eval()
    assert sum(p.numel() for p in sub.parameters()) < 0.8 * n_dense
    assert (sub(x) - y).abs().max().item() < 1e-4
    assert (model(x) - y).abs().max().item() < 1e-4  # pruned in place, same function


def test_construct_subnet_onnx(tmp_path):
    # shim "onnx_export": ckpt_format='onnx' uses the TorchScript exporter, only while exporting
    onnx = pytest.importorskip("onnx")
    model = get_model("small_cnn", width=0.5)
    oto = _quiet_oto(model, torch.randn(1, 3, 16, 16))
    _zero_some_groups(oto, 0.5)
    export_before = torch.onnx.export
    oto.construct_subnet(out_dir=str(tmp_path), ckpt_format="onnx")
    assert torch.onnx.export is export_before
    m = onnx.load(oto.compressed_model_path)
    n_params = sum(int(torch.tensor(list(t.dims)).prod()) for t in m.graph.initializer)
    assert n_params < sum(p.numel() for p in get_model("small_cnn", width=0.5).parameters())


def test_shim_hesso_device_cpu():
    # shim "hesso_device": HESSO's hard-coded .cuda() follows the parameters' device
    model = get_model("small_cnn", width=0.5)
    x = torch.randn(4, 3, 16, 16)
    oto = _quiet_oto(model, x[:1])
    opt = oto.hesso(lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=4)
    y = torch.randint(0, 10, (4,))
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.curr_group_sparsity >= 0.49
    assert torch.Tensor.cuda is compat._orig_cuda  # restored after HESSO's call


def test_params_device_context():
    with compat.params_device("cpu"):
        t = torch.zeros(3).cuda()
        assert t.device.type == "cpu"
    assert torch.Tensor.cuda is compat._orig_cuda


# ---------------------------------------------------------------- guards: clear errors
def _expect_versions(msg: str):
    assert torch.__version__ in msg
    assert str(compat.versions()["only-train-once"]) in msg


def test_guard_onnx_globals_moved_again(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.onnx._globals", raising=False)
    monkeypatch.delattr(torch.onnx, "_globals", raising=False)
    monkeypatch.setattr(compat, "_NEW_EXPORTER", "torch.onnx._moved_again")
    with pytest.raises(compat.OTOCompatError) as e:
        compat._shim_onnx_globals()
    assert "onnx_globals" in str(e.value)
    _expect_versions(str(e.value))


def test_guard_optimize_graph_moved_again(monkeypatch):
    monkeypatch.delattr(torch.onnx, "_optimize_graph", raising=False)
    monkeypatch.setattr(compat, "_NEW_EXPORTER", "torch.onnx._moved_again")
    with pytest.raises(compat.OTOCompatError) as e:
        compat._shim_optimize_graph()
    assert "optimize_graph" in str(e.value)
    _expect_versions(str(e.value))


def test_guard_trace_no_onnx_renamed(monkeypatch):
    import only_train_once.graph.graph as gg
    from torch.onnx import symbolic_helper

    if hasattr(symbolic_helper, "is_caffe2_aten_fallback"):
        pytest.skip("old torch: OTO's own pipeline works, nothing to bridge")
    monkeypatch.delattr(gg, "_optimize_trace_graph_no_onnx_operator")
    with pytest.raises(compat.OTOCompatError) as e:
        compat._shim_trace_no_onnx()
    _expect_versions(str(e.value))


def test_guard_import_still_failing(monkeypatch):
    monkeypatch.setattr(compat, "_done", False)
    monkeypatch.setattr(compat, "_applied", [])
    monkeypatch.setitem(sys.modules, "only_train_once", None)
    with pytest.raises(compat.OTOCompatError) as e:
        compat.apply()
    assert "still fails" in str(e.value)
    _expect_versions(str(e.value))


def test_guard_hesso_cuda_replaced(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    with pytest.raises(compat.OTOCompatError):
        with compat.params_device("cpu"):
            pass


def test_dpm_otov2_exports():
    for name in ("OTO", "DHSPG", "dhspg", "HESSO", "hesso", "load_subnet"):
        assert hasattr(dpm_otov2, name)
    import only_train_once

    assert issubclass(dpm_otov2.OTO, only_train_once.OTO)


def test_shim_oto_dhspg_plain_only_train_once():
    # shim "oto_dhspg": an unchanged only_train_once.OTO(...).dhspg(...) builds our DHSPG
    import only_train_once

    model = get_model("small_cnn", width=0.5)
    oto = only_train_once.OTO(model, torch.randn(1, 3, 16, 16))
    opt = oto.dhspg(lr=0.1, target_group_sparsity=0.3, start_pruning_step=5, device="cuda")
    assert isinstance(opt, dpm_otov2.DHSPG)
    assert opt.partition_step == 5 and opt.target_group_sparsity == 0.3
    with pytest.raises(ValueError, match="HESSO setting"):
        oto.dhspg(pruning_periods=4)


def test_dpm_otov2_oto_keeps_train_mode():
    import torch
    import torch.nn as nn
    from dpm_otov2 import OTO

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a mixed state must come back exactly as it was
    OTO(model, torch.randn(1, 3, 8, 8))
    assert model.training and model[0].training and not model[1].training


# ---------------------------------------------------------------- partition shims (3.0.1 faults)
def _sanity(kind):
    from otov2_sanity_models import build

    model, x = build(kind)
    return model, _quiet_oto(model, x[:1]), x


def _subnet_diff(model, oto, x, tmp_path):
    model.eval()
    with torch.no_grad():
        y = model(x)
    oto.construct_subnet(out_dir=str(tmp_path))
    with torch.no_grad():
        return (oto.compressed_model().eval()(x) - y).abs().max().item()


def test_shim_groupnorm_params(tmp_path):
    # shim "groupnorm_params": GroupNorm models build their param groups (3.0.1: TypeError)
    model, oto, x = _sanity("diffusion_unet")
    groups = oto._graph.get_param_groups()
    listed = {n for g in groups for n in g["p_names"]}
    gn = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert {f"{n}.weight" for n in gn} <= listed
    # one channel per group: channel-wise prunable, and num_groups follows num_channels
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(8, 8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 3))
    o = _quiet_oto(m, torch.randn(1, 3, 8, 8))
    _zero_some_groups(o, 0.5)
    diff = _subnet_diff(m, o, torch.randn(2, 3, 8, 8), tmp_path)
    assert diff < 1e-5 and m[1].num_groups == m[1].num_channels < 8


def test_shim_norm_partition_convnext(tmp_path):
    # shim "norm_partition": ConvNeXt's channel LayerNorm groups are not zero-invariant
    model, oto, x = _sanity("convnext")
    marked = oto._graph.dpm_norm_unprunable
    assert marked
    assert all(not oto._graph.node_groups[i].is_prunable for i in marked)
    for ng_id in marked:  # what 3.0.1 did: leave them prunable
        oto._graph.node_groups[ng_id].is_prunable = True
    _zero_some_groups(oto, 0.5)
    assert _subnet_diff(model, oto, x, tmp_path) > 1e-3  # hence the shim


def test_shim_norm_partition_groupnorm_after_concat():
    # a GroupNorm after a concat (U-Net skip): the groups feeding the concat are unprunable
    model, oto, _ = _sanity("diffusion_unet")
    up1_in = [ng for ng in oto._graph.node_groups.values()
              if any(n.startswith("down1.") for n in ng.param_names)]
    assert up1_in and all(not ng.is_prunable for ng in up1_in)
    assert oto._graph.dpm_norm_unprunable


def test_shim_shared_params_listed_once():
    # shim "shared_params": a conv applied twice is listed once in its group
    from dpm_core import DecayConfig

    model, oto, _ = _sanity("weight_share")
    ng = next(ng for ng in oto._graph.node_groups.values() if "conv2.weight" in ng.param_names)
    raw = type(ng).get_param_groups.__wrapped__(ng)
    assert raw["p_names"].count("conv2.weight") == 2  # the 3.0.1 fault
    assert ng.get_param_groups()["p_names"].count("conv2.weight") == 1
    oto.dhspg(lr=0.1, decay=DecayConfig(steps=3))  # the engine accepts the group
    # and an optimizer looping over the group's params steps the shared weight once
    opt = oto.dhspg(lr=0.1, start_pruning_step=100)
    w = model.conv2.weight
    before = w.detach().clone()
    model.train()
    model(torch.randn(2, 3, 8, 8)).square().mean().backward()
    opt.step()
    torch.testing.assert_close(w.detach(), before - 0.1 * w.grad)


def test_shim_hesso_plain_class_cpu():
    # shim "hesso_plain": an unchanged only_train_once.OTO(...).hesso(...) runs on CPU
    import only_train_once

    model = get_model("small_cnn", width=0.5)
    x = torch.randn(4, 3, 16, 16)
    oto = only_train_once.OTO(model, x[:1])
    opt = oto.hesso(lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=3)
    assert type(opt).__module__.startswith("only_train_once")
    y = torch.randint(0, 10, (4,))
    model.train()
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.curr_group_sparsity > 0.3
    assert torch.Tensor.cuda is compat._orig_cuda


def test_shim_trace_adaptive_pool_clear_error():
    # shim "trace_adaptive_pool": the raw SymbolicValueError becomes a ValueError with a size
    def net():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.AdaptiveAvgPool2d((7, 7)),
            torch.nn.Flatten(), torch.nn.Linear(4 * 49, 2))

    with pytest.raises(ValueError, match=r"`3` pools a 2x2 map to 7x7.*28x28") as e:
        _quiet_oto(net(), torch.randn(1, 3, 8, 8))
    assert "adaptive_avg_pool2d" in str(e.value.__cause__)
    _quiet_oto(net(), torch.randn(1, 3, 28, 28))  # the size it names traces


@pytest.mark.parametrize("shim,target", [
    ("groupnorm_params", ("only_train_once.operation.operator", "GroupNormOTO")),
    ("norm_partition", ("only_train_once", "OTO.partition_pzigs")),
    ("shared_params", ("only_train_once.graph.node_group", "NodeGroup.get_param_groups")),
    ("trace_adaptive_pool", ("only_train_once.graph.graph", "Graph._get_trace_graph")),
    ("hesso_plain", ("only_train_once.optimizer", "HESSO.identify_redundant_groups")),
])
def test_guard_partition_shims_moved(shim, target, monkeypatch):
    import importlib

    from dpm_otov2 import compat_graph

    mod = importlib.import_module(target[0])
    *owner_path, attr = target[1].split(".")
    owner = mod
    for part in owner_path:
        owner = getattr(owner, part)
    monkeypatch.setattr(owner, attr, None)  # gone (a base class may still define it)
    fn = {"groupnorm_params": compat_graph._shim_groupnorm_params,
          "norm_partition": compat_graph._shim_norm_partition,
          "shared_params": compat_graph._shim_shared_params,
          "trace_adaptive_pool": compat_graph._shim_trace_adaptive_pool,
          "hesso_plain": compat._shim_hesso_plain}[shim]
    with pytest.raises(compat.OTOCompatError) as e:
        fn()
    assert shim in str(e.value)
    _expect_versions(str(e.value))


def test_zig_slices_take_a_repeated_param_once():
    # dpm_otov2.zig: a param listed twice with the same transform is one slice (the engine
    # refuses a tensor listed twice in one group), once per distinct transform otherwise
    from only_train_once.transform import TensorTransform as TT

    from dpm_otov2.zig import zig_slices

    w, b = torch.nn.Parameter(torch.randn(4, 2, 3, 3)), torch.nn.Parameter(torch.randn(4))
    group = {"id": "g", "num_groups": 4, "params": [w, b, w, b],
             "p_transform": [TT.BASIC] * 4, "is_prunable": True, "is_auxiliary": False}
    assert [id(s[0]) for s in zig_slices(group)] == [id(w), id(b)]
