"""Compatibility layer: only-train-once 3.0.1 on current PyTorch, without patching site-packages.

``only_train_once`` 3.0.1 (the newest release) was written against PyTorch 1.13-2.x, when the
TorchScript ONNX exporter lived directly in ``torch.onnx``. Recent PyTorch moved that exporter
to ``torch.onnx._internal.torchscript_exporter`` and made the ``torch.export``-based exporter
the default, so with the installed torch (checked: 2.14.1) ``import only_train_once`` fails.
Every shim below installs a module alias or an attribute at runtime; nothing on disk changes.
Each shim is *guarded*: it only acts when the old name is missing, it checks that the new
location still exists, and if a future torch / only-train-once moves things again it raises
:class:`OTOCompatError` naming both versions instead of an obscure ``AttributeError``.

Shims (name -> what it bridges; ``apply()`` returns the names of those it installed):

``onnx_globals``
    ``only_train_once.graph.graph`` and ``.graph.utils`` do
    ``from torch.onnx._globals import GLOBALS`` (they set the ONNX opset and read the shape
    inference flag). Bridged by registering ``sys.modules['torch.onnx._globals']`` as an alias
    of ``torch.onnx._internal.torchscript_exporter._globals``.
``optimize_graph``
    ``Graph._get_trace_graph`` calls ``torch.onnx._optimize_graph`` (for torch >= 1.13) to
    lower the traced graph to ONNX operators, from which OTO builds its dependency graph.
    Bridged by setting ``torch.onnx._optimize_graph`` to
    ``torch.onnx._internal.torchscript_exporter.utils._optimize_graph`` (same pass pipeline).
``trace_no_onnx``
    ``Graph(..., trace_onnx=False)`` uses OTO's private copy of that pipeline
    (``_optimize_trace_graph_no_onnx_operator``), which calls the removed
    ``symbolic_helper.is_caffe2_aten_fallback`` and the old 3-argument
    ``_jit_pass_onnx_unpack_quantized_weights``. Bridged by pointing
    ``only_train_once.graph.graph._optimize_trace_graph_no_onnx_operator`` at torch's current
    pipeline. (``OTO`` itself always traces with ``trace_onnx=True``; this covers direct
    ``Graph`` users.)
``onnx_export``
    ``construct_subnet(ckpt_format='onnx')`` calls ``torch.onnx.export(model, tensor, path)``;
    current torch defaults to ``dynamo=True`` (needs ``onnxscript``, not a dependency) and
    expects a tuple of args. :func:`legacy_onnx_export` is a context manager that, only while
    OTO exports, defaults ``dynamo=False`` and wraps a bare tensor in a tuple.
    :class:`dpm_otov2.OTO` uses it in ``construct_subnet``.
``torch_load``
    OTO saves whole pickled modules (``torch.save(model)``); since torch 2.6
    ``torch.load`` defaults to ``weights_only=True`` and refuses them. :func:`load_subnet`
    loads OTO's files with ``weights_only=False`` (only load files you wrote yourself).
``oto_dhspg``
    only-train-once 3.0.1's ``OTO.dhspg(...)`` does ``from .optimizer import DHSPG``, which the
    package no longer ships (ImportError). Bridged by installing
    ``only_train_once.optimizer.DHSPG`` = a factory that maps 3.0.1's arguments onto
    :class:`dpm_otov2.DHSPG` (``device`` is ignored; HESSO-only knobs other than their
    defaults are rejected), and replacing ``only_train_once.OTO.dhspg`` by
    :func:`dpm_otov2.optim.oto_dhspg_method`, which also takes 2.0.x's ``epsilon``,
    ``lmbda``, ... (3.0.1's method cannot pass them) with OTOv2's tolerance default 0.05.
``hesso_device``
    ``HESSO.identify_redundant_groups`` builds a mask with ``.cuda()``, so HESSO fails on
    CPU-only machines and puts the mask on the wrong GPU on multi-GPU ones.
    :func:`params_device` is a context manager that makes ``Tensor.cuda()`` return the tensor
    on the optimizer's parameter device for the duration of that call only;
    :class:`dpm_otov2.HESSO` uses it (no other code of HESSO calls ``.cuda()``).
``hesso_plain``
    The same for the unchanged class: ``only_train_once.optimizer.HESSO
    .identify_redundant_groups`` is wrapped in :func:`params_device` (the parameters'
    device), so ``only_train_once.OTO(...).hesso(...)`` also runs on CPU-only machines.

Partition shims (:mod:`dpm_otov2.compat_graph`): ``groupnorm_params`` (``nn.GroupNorm``
models raised ``TypeError``), ``norm_partition`` (channel LayerNorm / GroupNorm groups are
not zero-invariant: marked unprunable), ``shared_params`` (a weight-shared parameter listed
once per call site in one group: listed once), ``trace_adaptive_pool`` (a clear error
naming the dummy-input size that traces). With them, OTO's upstream sanity-check
architectures pass at small sizes (``tests/test_otov2_sanity.py``);
``construct_subnet(ckpt_format='torch')``, ``compute_flops`` and ``compute_num_params`` run
unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import sys
import threading
from typing import Any

import torch

__all__ = [
    "OTOCompatError",
    "apply",
    "applied_shims",
    "versions",
    "legacy_onnx_export",
    "load_subnet",
    "params_device",
    "TESTED_OTO_VERSIONS",
]

#: only-train-once releases this layer was written and tested against.
TESTED_OTO_VERSIONS = ("3.0.1",)

_NEW_EXPORTER = "torch.onnx._internal.torchscript_exporter"
_lock = threading.RLock()
_applied: list[str] = []
_done = False


class OTOCompatError(ImportError):
    """only-train-once cannot be made to work with this torch; the message names both versions."""


def versions() -> dict:
    """Installed ``torch`` and ``only-train-once`` versions (``None`` when not installed)."""
    try:
        oto = importlib.metadata.version("only-train-once")
    except importlib.metadata.PackageNotFoundError:
        oto = None
    return {"torch": torch.__version__, "only-train-once": oto}


def _fail(shim: str, what: str) -> "OTOCompatError":
    v = versions()
    return OTOCompatError(
        f"dpm_otov2 compatibility shim {shim!r} cannot bridge torch {v['torch']} and "
        f"only-train-once {v['only-train-once']}: {what}. dpm_otov2 was tested with "
        f"only-train-once {', '.join(TESTED_OTO_VERSIONS)} and torch 2.14.1; this torch or "
        f"only-train-once moved things again. Pin compatible versions or update "
        f"dpm_otov2/compat.py.")


def _import(module: str, shim: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise _fail(shim, f"module {module} is not importable ({e})") from e


def _shim_onnx_globals() -> bool:
    """``torch.onnx._globals`` -> ``torch.onnx._internal.torchscript_exporter._globals``."""
    try:
        importlib.import_module("torch.onnx._globals")
        return False  # old torch: nothing to bridge
    except ImportError:
        pass
    mod = _import(_NEW_EXPORTER + "._globals", "onnx_globals")
    g = getattr(mod, "GLOBALS", None)
    for attr in ("export_onnx_opset_version", "onnx_shape_inference"):
        if g is None or not hasattr(g, attr):
            raise _fail("onnx_globals", f"{_NEW_EXPORTER}._globals.GLOBALS has no {attr!r}")
    sys.modules["torch.onnx._globals"] = mod
    torch.onnx._globals = mod
    return True


def _shim_optimize_graph() -> bool:
    """``torch.onnx._optimize_graph`` -> ``torchscript_exporter.utils._optimize_graph``."""
    if callable(getattr(torch.onnx, "_optimize_graph", None)):
        return False
    utils = _import(_NEW_EXPORTER + ".utils", "optimize_graph")
    fn = getattr(utils, "_optimize_graph", None)
    if not callable(fn):
        raise _fail("optimize_graph", f"{_NEW_EXPORTER}.utils has no _optimize_graph")
    torch.onnx._optimize_graph = fn
    return True


def _shim_trace_no_onnx() -> bool:
    """OTO's private trace-lowering copy -> torch's current pipeline (trace_onnx=False path)."""
    from torch.onnx import symbolic_helper

    if hasattr(symbolic_helper, "is_caffe2_aten_fallback"):
        return False  # OTO's copy still works with this torch
    gmod = sys.modules.get("only_train_once.graph.graph")
    if gmod is None:
        return False  # applied again after only_train_once is imported
    if not hasattr(gmod, "_optimize_trace_graph_no_onnx_operator"):
        raise _fail("trace_no_onnx", "only_train_once.graph.graph has no "
                                     "_optimize_trace_graph_no_onnx_operator")
    gmod._optimize_trace_graph_no_onnx_operator = torch.onnx._optimize_graph
    return True


def _shim_oto_dhspg() -> bool:
    """``only_train_once.optimizer.DHSPG`` (dropped in 3.x, still used by OTO.dhspg)."""
    import only_train_once
    import only_train_once.optimizer as optmod

    if hasattr(optmod, "DHSPG"):
        return False
    if not callable(getattr(only_train_once.OTO, "dhspg", None)):
        return False  # nothing calls it
    from .optim import _oto_dhspg_factory, oto_dhspg_method

    optmod.DHSPG = _oto_dhspg_factory
    only_train_once.OTO.dhspg = oto_dhspg_method  # 2.0.x's arguments (epsilon, lmbda, ...)
    return True


def _shim_hesso_plain() -> bool:
    """``only_train_once.optimizer.HESSO.identify_redundant_groups`` under params_device."""
    from only_train_once.optimizer import HESSO

    orig = getattr(HESSO, "identify_redundant_groups", None)
    if not callable(orig):
        raise _fail("hesso_plain", "HESSO.identify_redundant_groups is gone")
    if getattr(orig, "_dpm_shim", False):
        return False

    @functools.wraps(orig)
    def identify_redundant_groups(self, *args, **kwargs):
        device = next((p.device for g in self.param_groups for p in g["params"]),
                      torch.device("cpu"))
        with params_device(device):
            return orig(self, *args, **kwargs)

    identify_redundant_groups._dpm_shim = True
    HESSO.identify_redundant_groups = identify_redundant_groups
    return True


_orig_cuda = torch.Tensor.cuda
_device_local = threading.local()


def _cuda_to_params_device(self, device=None, non_blocking=False, **kwargs):
    target = getattr(_device_local, "device", None)
    if target is None or device is not None:
        return _orig_cuda(self, device, non_blocking, **kwargs)
    return self.to(target, non_blocking=non_blocking)


_cuda_users = 0


@contextlib.contextmanager
def params_device(device: torch.device | str):
    """While active (in this thread), ``tensor.cuda()`` with no argument moves to ``device``.

    Used around only-train-once code that hard-codes ``.cuda()`` (HESSO) so that it runs on
    the device the parameters live on: the CPU, or the right GPU. ``Tensor.cuda`` is
    restored when the last such block exits; calls with an explicit device, and calls from
    other threads, behave as usual.
    """
    global _cuda_users
    device = torch.device(device)
    with _lock:
        if _cuda_users == 0:
            if torch.Tensor.cuda is not _orig_cuda:
                raise _fail("hesso_device", "torch.Tensor.cuda was replaced by someone else")
            torch.Tensor.cuda = _cuda_to_params_device
        _cuda_users += 1
    prev = getattr(_device_local, "device", None)
    _device_local.device = device
    try:
        yield
    finally:
        _device_local.device = prev
        with _lock:
            _cuda_users -= 1
            if _cuda_users == 0:
                torch.Tensor.cuda = _orig_cuda


def _legacy_export(orig, model, args=(), f=None, *rest, **kwargs):
    import warnings

    kwargs.setdefault("dynamo", False)
    if isinstance(args, torch.Tensor):
        args = (args,)
    with warnings.catch_warnings():
        # the TorchScript exporter is chosen on purpose here (it is what OTO was written for)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        return orig(model, args, f, *rest, **kwargs)


@contextlib.contextmanager
def legacy_onnx_export():
    """Make ``torch.onnx.export`` behave as OTO expects (TorchScript exporter) while active."""
    import inspect

    orig = torch.onnx.export
    try:
        has_dynamo = "dynamo" in inspect.signature(orig).parameters
    except (TypeError, ValueError):
        has_dynamo = False
    if not has_dynamo:  # old torch: TorchScript export is the only one, nothing to do
        yield
        return
    with _lock:
        torch.onnx.export = functools.partial(_legacy_export, orig)
        try:
            yield
        finally:
            torch.onnx.export = orig


def load_subnet(path: str, map_location: Any = None) -> torch.nn.Module:
    """Load a model file written by ``oto.construct_subnet`` (a pickled ``nn.Module``).

    torch >= 2.6 refuses pickled modules by default (``weights_only=True``); OTO writes whole
    modules, so this passes ``weights_only=False``. Only load files you produced yourself.
    """
    import inspect

    if "weights_only" in inspect.signature(torch.load).parameters:
        return torch.load(path, map_location=map_location, weights_only=False)
    return torch.load(path, map_location=map_location)  # pragma: no cover (old torch)


def apply() -> list[str]:
    """Install the shims (idempotent) and import ``only_train_once``; return installed names.

    Raises:
        OTOCompatError: naming the torch and only-train-once versions, if a shim's target
            moved or ``only_train_once`` still fails to import afterwards.
    """
    global _done
    with _lock:
        if _done:
            return list(_applied)
        v = versions()
        if v["only-train-once"] is None:
            raise OTOCompatError("dpm_otov2 needs the only-train-once package "
                                 "(pip install only-train-once==3.0.1)")
        if _shim_onnx_globals():
            _applied.append("onnx_globals")
        if _shim_optimize_graph():
            _applied.append("optimize_graph")
        try:
            import only_train_once  # noqa: F401
            import only_train_once.optimizer  # noqa: F401
        except (ImportError, AttributeError) as e:
            raise _fail("import", f"`import only_train_once` still fails after the shims "
                                  f"({type(e).__name__}: {e})") from e
        if _shim_trace_no_onnx():
            _applied.append("trace_no_onnx")
        if _shim_oto_dhspg():
            _applied.append("oto_dhspg")
        for name in ("OTO",):
            if not hasattr(only_train_once, name):
                raise _fail("import", f"only_train_once has no {name}")
        from only_train_once.optimizer import HESSO

        if not callable(getattr(HESSO, "identify_redundant_groups", None)):
            raise _fail("hesso_device", "HESSO.identify_redundant_groups is gone")
        if _shim_hesso_plain():
            _applied.append("hesso_plain")
        from .compat_graph import apply_graph_shims

        _applied.extend(apply_graph_shims())
        _done = True
        return list(_applied)


def applied_shims() -> list[str]:
    """Names of the shims :func:`apply` installed in this process (empty on old torch)."""
    return list(_applied)
