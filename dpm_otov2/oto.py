"""``dpm_otov2.OTO``: only-train-once's ``OTO`` with working optimizers and subnet export.

The one-line change for an OTO training script::

    from only_train_once import OTO          # before
    from dpm_otov2 import OTO                # after (everything else unchanged)

    optimizer = oto.dhspg(lr=0.1, target_group_sparsity=0.7)                      # OTOv2
    optimizer = oto.dhspg(lr=0.1, target_group_sparsity=0.7, decay=DecayConfig())  # + DPM
"""

from __future__ import annotations

import contextlib

import torch

from . import compat

compat.apply()

import only_train_once  # noqa: E402

from .optim import DHSPG, dhspg  # noqa: E402

__all__ = ["OTO", "contiguous_parameters"]


@contextlib.contextmanager
def contiguous_parameters(model):
    """Within the block, every 4-D parameter of ``model`` stored ``channels_last`` is in the
    default (contiguous) memory format; afterwards ``model`` is put back in ``channels_last``
    (the pruned model included). Parameter objects stay the same (only ``.data`` moves)."""
    nhwc = any(p.dim() == 4 and not p.is_contiguous()
               and p.is_contiguous(memory_format=torch.channels_last)
               for p in model.parameters())
    if not nhwc:
        yield
        return
    model.to(memory_format=torch.contiguous_format)
    try:
        yield
    finally:
        model.to(memory_format=torch.channels_last)


class OTO(only_train_once.OTO):
    """``only_train_once.OTO`` whose ``dhspg`` / ``hesso`` accept ``decay=`` and run anywhere.

    Unlike the original, building it leaves every module's train/eval mode as it was
    (only-train-once traces the model in eval mode and leaves it there, so a training loop
    that does not call ``model.train()`` would silently train BatchNorm in eval mode).
    """

    def __init__(self, model=None, dummy_input=None, *args, **kwargs):
        modes = [(m, m.training) for m in model.modules()] if model is not None else []
        try:
            super().__init__(model, dummy_input, *args, **kwargs)
        finally:
            for m, training in modes:
                m.train(training)

    def dhspg(self, lr: float = 0.1, *, decay=None, **kwargs) -> DHSPG:
        """A :class:`dpm_otov2.DHSPG` over this model's zero-invariant groups.

        Takes the keyword arguments of :class:`~dpm_otov2.DHSPG` (both only-train-once 2.0.x
        and 3.0.1 spellings); ``decay=DecayConfig(...)`` turns on the Decay Pruning Method.
        """
        return dhspg(self, lr, decay=decay, **kwargs)

    def hesso(self, lr: float = 0.1, *, decay=None, **kwargs):
        """only-train-once's HESSO, device-agnostic, optionally with Decay Pruning."""
        from .hesso_dpm import hesso

        return hesso(self, lr, decay=decay, **kwargs)

    def construct_subnet(self, *args, **kwargs):
        """As in only-train-once; ``ckpt_format='onnx'`` uses the TorchScript exporter.

        It prunes the model in place (new, smaller parameters). What became of each
        parameter is recorded for :meth:`subnet_optimizer`, and an optimizer that still
        holds replaced parameters warns (:class:`~dpm_otov2.subnet.StaleOptimizerWarning`)
        when it is stepped.

        A model trained in ``channels_last`` memory format works too: only-train-once
        reshapes parameters with ``view``, which NHWC strides refuse, so the parameters are
        made contiguous for the pruning (same tensors, same values) and the pruned model is
        put back in ``channels_last``.
        """
        from .subnet import record_pruning

        with compat.legacy_onnx_export(), contiguous_parameters(self._model), \
                record_pruning(self._model) as record:
            out = super().construct_subnet(*args, **kwargs)
        self._prune_record = record
        return out

    def subnet_optimizer(self, optimizer, model=None):
        """Keep training the subnet: a new optimizer with ``optimizer``'s state carried.

        Same class and per-group hyper-parameters over the pruned model's parameters, each
        per-parameter state tensor (momentum buffer, Adam moments) sliced to the kept
        positions; a :class:`DHSPG` / HESSO hands over to ``torch.optim.SGD`` / ``Adam`` /
        ``AdamW`` with its lr, momentum, betas and weight decay. ``model``: the pruned model
        (default: the one this OTO traced, which ``construct_subnet`` pruned in place; a
        copy from :meth:`compressed_model` works too). See :mod:`dpm_otov2.subnet`.
        """
        from .subnet import subnet_optimizer

        record = getattr(self, "_prune_record", None)
        if record is None:
            raise RuntimeError("subnet_optimizer: call construct_subnet(...) first (on this "
                               "dpm_otov2.OTO); it records how each parameter was pruned")
        return subnet_optimizer(optimizer, record, self._model if model is None else model)

    def compressed_model(self, map_location=None):
        """Load the model ``construct_subnet`` wrote (see :func:`compat.load_subnet`)."""
        if not self.compressed_model_path:
            raise RuntimeError("no compressed model yet: call construct_subnet(out_dir=...) "
                               "first")
        return compat.load_subnet(self.compressed_model_path, map_location)

    def full_group_sparse_model(self, map_location=None):
        """Load the full group-sparse model ``construct_subnet`` wrote."""
        if not self.full_group_sparse_model_path:
            raise RuntimeError("no full group-sparse model yet: call "
                               "construct_subnet(out_dir=...) first")
        return compat.load_subnet(self.full_group_sparse_model_path, map_location)
