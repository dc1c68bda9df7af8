"""The tick of Gate Decorator: gathering Taylor scores, and the original's tick loop.

:class:`TickMixin` is the part of :class:`~dpm_gatedecorator.GateDecorator` that gathers the
first-order Taylor scores ``|g * dL/dg|`` of the gates during backward passes
(:meth:`~TickMixin.scoring`), and the original's tick (:meth:`~TickMixin.tick`): score while
training everything but the convolutions. It uses the decorator's ``model`` and ``gates``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, List, Optional

import torch
import torch.nn as nn

__all__ = ["TickMixin"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class TickMixin:
    """Scores and the tick (mixed into :class:`~dpm_gatedecorator.GateDecorator`)."""

    @contextlib.contextmanager
    def scoring(self, reset: bool = True, grad_scaler=None):
        """Accumulate Taylor scores ``|g * dL/dg|`` over every backward pass in the block.

        Run your own forward/backward passes (and optimizer steps, if you like) inside.
        ``reset=True`` starts from zero (each tick of the original starts afresh);
        ``reset=False`` keeps adding to the scores of the previous block. A pass with a
        non-finite gate gradient (AMP overflow) is skipped. With mixed precision pass the
        ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` you call, so that every
        pass is divided by the scale it was computed with.

        Each pass's ``dL/dg`` is read from ``g.grad`` once the backward pass has finished
        (its increase over the pass), so under DistributedDataParallel it is the gradient
        averaged over all ranks, exactly as the original's ``DataParallel`` saw the whole
        batch: every rank gets the same scores without any communication of its own.
        """
        if self._scoring:
            raise RuntimeError("gd.scoring() blocks cannot be nested")
        if reset:
            self.reset_scores()
        self._grad_scaler = grad_scaler if grad_scaler is not None and \
            grad_scaler.is_enabled() else None
        self._scoring = True
        self._pass = None
        handles = [gbn.g.register_hook(functools.partial(self._gate_hook, name))
                   for name, gbn in self.gates.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._scoring = False
            self._pass = None
            self._grad_scaler = None

    def _gate_hook(self, name: str, grad: torch.Tensor) -> None:
        # Runs inside the autograd engine when gate `name` receives its gradient.
        if self._pass is not None and name in self._pass["seen"]:
            self._pass = None  # a previous backward failed before its end: start afresh
        if self._pass is None:
            # first gate of this backward pass: remember every gate's .grad before the pass,
            # and run _end_pass once the whole backward (and DDP's averaging) is done.
            self._pass = {"before": {n: (None if gbn.g.grad is None else gbn.g.grad.detach().clone())
                                     for n, gbn in self.gates.items()},
                          "seen": {}}
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_end_pass)
        self._pass["seen"][name] = grad.detach().clone()

    def _queue_end_pass(self) -> None:
        # DistributedDataParallel queues its own end-of-backward callback (which writes the
        # averaged gradients into .grad) after ours; queueing once more runs _end_pass after it.
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    @torch.no_grad()
    def _end_pass(self) -> None:
        state, self._pass = self._pass, None
        if state is None:
            return
        inv = 1.0
        if self._grad_scaler is not None:
            inv = 1.0 / float(self._grad_scaler.get_scale())
        for name, hook_grad in state["seen"].items():
            gbn = self.gates[name]
            if gbn.g.grad is not None:
                before = state["before"][name]
                grad = gbn.g.grad if before is None else gbn.g.grad - before
            else:  # e.g. torch.autograd.grad(): nothing accumulated, use what flowed to g
                grad = hook_grad
            gbn.add_score(grad, inv)

    def reset_scores(self) -> None:
        for gbn in self.gates.values():
            gbn.reset_scores()

    @property
    def scored_batches(self) -> int:
        """Backward passes that contributed to the current scores."""
        return max((gbn.scored_batches for gbn in self.gates.values()), default=0)

    def tick(self, loader: Iterable, loss_fn: Callable, num_batches: Optional[int] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, device=None,
             reset: bool = True, *, train: bool = True, lr: float = 1e-3,
             momentum: float = 0.9, weight_decay: float = 5e-4) -> dict:
        """The original's tick: score while training everything but the convolutions.

        Runs forward/backward over ``loader`` (batches ``(inputs, targets, ...)``, loss
        ``loss_fn(model(inputs), targets)``) inside :meth:`scoring`, with the model in train
        mode, as the original's ``IterRecoverFramework.tick``: the convolutions' parameters
        are frozen (``requires_grad=False`` for the tick, restored after) and after each pass
        an SGD step trains the rest, i.e. :meth:`tick_parameters` (on a CNN with a Linear
        classifier: the gates, the BN shifts and the classifier).

        Args:
            num_batches: stop after this many batches (the original ticks one whole epoch of
                its ``tick_trainset``).
            optimizer: step this optimizer (e.g. your fine-tuning optimizer, as the original
                steps its single optimizer; the frozen convolutions get no gradient, so it
                leaves them alone). Without it, a fresh ``torch.optim.SGD(tick_parameters(),
                lr, momentum, weight_decay)`` is used: the original's settings (its tick runs
                at the schedule's minimum learning rate ``lr_min`` = 1e-3, momentum 0.9,
                weight decay 5e-4).
            train: ``False`` only scores (no optimizer step, nothing frozen, train/eval mode
                left as it is): the behaviour of this method before it followed the original.

        The train/eval flags are restored afterwards; gradients are cleared before each pass
        and at the end. This runs ``self.model``, the bare model: under
        DistributedDataParallel write your own loop inside :meth:`scoring` (toggling
        ``requires_grad`` is not allowed under DDP). Returns ``{"batches": n, "loss": mean}``.
        """
        if num_batches is not None and (isinstance(num_batches, bool) or
                                        not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        frozen, flags = [], {}
        if train:
            if optimizer is None:
                optimizer = torch.optim.SGD(self.tick_parameters(), lr=lr, momentum=momentum,
                                            weight_decay=weight_decay)
            flags = {m: m.training for m in self.model.modules()}
            frozen = [p for p in self._conv_parameters() if p.requires_grad]
        else:
            optimizer = None
        total, n = 0.0, 0
        try:
            for p in frozen:
                p.requires_grad_(False)
            if train:
                self.model.train()
            with self.scoring(reset=reset):
                for batch in loader:
                    if num_batches is not None and n >= num_batches:
                        break
                    x, y = batch[0], batch[1]
                    if device is not None:
                        x, y = x.to(device), y.to(device)
                    self.model.zero_grad(set_to_none=True)
                    loss = loss_fn(self.model(x), y)
                    loss.backward()
                    if optimizer is not None:
                        optimizer.step()
                    total += float(loss.detach())
                    n += 1
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for m, f in flags.items():
                m.training = f
            self.model.zero_grad(set_to_none=True)
        if n == 0:
            raise ValueError("tick() got an empty loader; give it at least one batch")
        return {"batches": n, "loss": total / n}

    def _conv_parameters(self) -> List[nn.Parameter]:
        return [p for m in self.model.modules() if isinstance(m, _CONV)
                for p in m.parameters(recurse=False)]

    def tick_parameters(self) -> List[nn.Parameter]:
        """What the original's tick trains: every trainable parameter except the
        convolutions' (``freeze_conv``). On a CNN with a Linear classifier these are the
        gates, the BN shifts and the classifier."""
        conv = {id(p) for p in self._conv_parameters()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in conv]

    def gate_parameters(self) -> List[nn.Parameter]:
        """The gates and the BN shifts. Not all that the original's tick trains: it also trains
        the final Linear (everything but the convolutions); see :meth:`tick_parameters`."""
        ps = []
        for gbn in self.gates.values():
            ps.append(gbn.g)
            if gbn.bn.affine and gbn.bn.bias.requires_grad:
                ps.append(gbn.bn.bias)
        return ps
