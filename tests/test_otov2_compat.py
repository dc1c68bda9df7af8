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
