"""Hugging Face ``transformers.Trainer`` glue: a callback that runs a decay pruner's schedule.

``transformers`` is an optional dependency (``pip install -e '.[hf]'``); it is imported only
here, so ``import dpm_depgraph`` works without it.

    pruner = DecayMetaPruner(model, example_inputs, importance=..., pruning_ratio=0.5,
                             iterative_steps=4, ignored_layers=[model.lm_head],
                             decay=DecayConfig(steps=5))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DecayPruningCallback(pruner, prune_every=50)])
    trainer.train()      # attaches, prunes every 50 optimizer steps, finalizes at the end

The Trainer's optimizer is accelerate's ``AcceleratedOptimizer``; ``pruner.attach`` hooks
the torch optimizer inside it (:func:`dpm_core.optim_utils.unwrap_optimizer`). A physical
removal replaces parameters by smaller ones and re-points that optimizer's
``param_groups`` (shared with the wrapper) with its state (AdamW's ``exp_avg``,
``exp_avg_sq``, ``step``) sliced, so the Trainer's optimizer, its learning-rate scheduler
(which only reads and writes each group's ``lr``), gradient clipping and ``model.zero_grad``
(which walk ``model.parameters()``) keep working without being rebuilt.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .pruner import DecayPrunerMixin

__all__ = ["DecayPruningCallback", "STATE_FILE"]

#: the file, in each Trainer checkpoint folder, that holds the pruner's state
STATE_FILE = "dpm_pruner.pt"


def _positive_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"DecayPruningCallback: {name} must be an int >= {minimum}, got "
                         f"{value!r}")
    return value


class DecayPruningCallback(TrainerCallback):
    """Drive a decay pruner from a ``transformers.Trainer``.

    The k-th call of ``pruner.step()`` (k = 0, 1, ..., ``iterative_steps`` - 1) runs once the
    Trainer has made ``start_step + k * prune_every`` optimizer steps (k = 0 with
    ``start_step=0``: at the start of training); between pruning steps the selected
    channels decay inside the optimizer's steps and are removed at the next pruning step;
    at the end of training ``pruner.finalize(force=True)`` removes what is still decaying.

    Args:
        pruner: a decay pruner (``DecayMetaPruner``, ``DecayGroupNormPruner``, ...) built on
            the model given to the Trainer. It is attached to the Trainer's optimizer when
            training begins (or at the first step where the optimizer exists).
        prune_every: optimizer steps between two pruning steps; give the decay time to
            finish (``>= pruner.decay.steps``) to use Smooth Pruning fully.
        iterative_steps: how many pruning steps to run (default: the pruner's own
            ``iterative_steps``, which its pruning-ratio schedule is spread over).
        start_step: optimizer steps to train before the first pruning step.
        regularize: call ``pruner.regularize(model)`` before every optimizer step (the
            sparse-learning penalty of ``DecayGroupNormPruner`` / ``DecayBNScalePruner``).
        finalize: call ``pruner.finalize(force=True)`` when training ends.

    After training, ``finalized`` holds what ``finalize`` returned and ``pruning_steps``
    the global steps at which ``pruner.step()`` ran.

    Checkpoints: every Trainer checkpoint (``save_strategy``) gets the pruner's state as
    ``dpm_pruner.pt`` in its folder. A model pruned physically no longer fits the freshly
    built one, so to resume, build the model, pruner and callback as in the first run and
    call :meth:`restore` before ``trainer.train(resume_from_checkpoint=...)``::

        callback.restore(checkpoint)   # replays the removals: the model has the saved shapes
        trainer.train(resume_from_checkpoint=checkpoint) Single-process training only: a
    DistributedDataParallel wrapper does not follow replaced parameters (see
    ``dpm_core.distributed.rewrap_ddp`` for hand-written loops).
    """

    def __init__(self, pruner, prune_every: int = 1, iterative_steps: int | None = None,
                 start_step: int = 0, regularize: bool = False, finalize: bool = True):
        if not isinstance(pruner, DecayPrunerMixin):
            raise TypeError(f"DecayPruningCallback expects a decay pruner (DecayMetaPruner, "
                            f"DecayGroupNormPruner, decay_pruner(...)(...)), got "
                            f"{type(pruner).__name__}; a plain Torch-Pruning pruner removes "
                            f"channels at once and replaces parameters the Trainer's optimizer "
                            f"does not follow")
        self.pruner = pruner
        self.prune_every = _positive_int("prune_every", prune_every, 1)
        self.iterative_steps = _positive_int(
            "iterative_steps", pruner.iterative_steps if iterative_steps is None
            else iterative_steps, 1)
        self.start_step = _positive_int("start_step", start_step, 0)
        self.regularize = bool(regularize)
        self.finalize = bool(finalize)
        self.pruning_steps: list[int] = []
        self.finalized: dict | None = None

    # ------------------------------------------------------------------ helpers
    def _attach(self, args, model, optimizer) -> bool:
        if optimizer is None:
            return False
        if getattr(args, "world_size", 1) > 1:
            raise NotImplementedError(
                "DecayPruningCallback supports single-process training only: a physical "
                "removal replaces parameters, which the DistributedDataParallel wrapper the "
                "Trainer built does not follow. Prune in a single process, or write the loop "
                "by hand with dpm_core.distributed.rewrap_ddp")
        if model is not None and model is not self.pruner.model:
            raise ValueError("DecayPruningCallback: the pruner was built on another model than "
                             "the Trainer's; build it on the model you pass to Trainer(model=...)")
        self.pruner.attach(optimizer)   # no-op when already attached to it
        return True

    def _next_pruning_at(self) -> int:
        return self.start_step + self.pruner.current_step * self.prune_every

    def _maybe_prune(self, state) -> None:
        if self.pruner.current_step < self.iterative_steps \
                and state.global_step >= self._next_pruning_at():
            self.pruner.step()
            if self.regularize:
                self.pruner.update_regularizer()
            self.pruning_steps.append(state.global_step)

    # ------------------------------------------------------------------ checkpoints
    def restore(self, checkpoint_dir: str) -> None:
        """Bring a freshly built model and pruner to the state saved in a Trainer checkpoint
        folder (its ``dpm_pruner.pt``): the physical removals are replayed on the model,
        the decay state, the schedule position and ``pruning_steps`` restored. Call it
        before ``trainer.train(resume_from_checkpoint=checkpoint_dir)``, which then loads
        the weights and the optimizer state into the pruned shapes."""
        path = os.path.join(os.fspath(checkpoint_dir), STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"DecayPruningCallback.restore(): no {STATE_FILE} in {checkpoint_dir!s}; give "
                f"a checkpoint folder (output_dir/checkpoint-N) written by a Trainer that had "
                f"this callback")
        if self.pruner.optimizer is not None:
            raise RuntimeError("DecayPruningCallback.restore(): the pruner is attached to an "
                               "optimizer already; restore into a freshly built model, pruner "
                               "and callback, before trainer.train(resume_from_checkpoint=...)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        # the pruner replays removals through an attached optimizer: a throwaway one here,
        # the Trainer builds its own from the pruned model and loads its saved state
        self.pruner.attach(torch.optim.SGD(self.pruner.model.parameters(), lr=0.0))
        try:
            self.pruner.load_state_dict(saved["pruner"])
        finally:
            self.pruner.detach()
        self.pruning_steps = [int(s) for s in saved["pruning_steps"]]

    def on_save(self, args, state, control, **kwargs):
        if self.pruner.optimizer is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"DecayPruningCallback: the Trainer's checkpoint folder {folder} was "
                          f"not found, so the pruner's state was not saved with it",
                          UserWarning, stacklevel=2)
            return
        torch.save({"pruner": self.pruner.state_dict(), "pruning_steps": list(self.pruning_steps)},
                   os.path.join(folder, STATE_FILE))

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._attach(args, model, optimizer):
            return
        last = self.start_step + (self.iterative_steps - 1) * self.prune_every \
            + self.pruner.decay.steps
        if state.max_steps and last > state.max_steps:
            warnings.warn(
                f"DecayPruningCallback: the schedule runs until optimizer step {last} (start_step "
                f"{self.start_step} + {self.iterative_steps - 1} x prune_every {self.prune_every} "
                f"+ decay steps {self.pruner.decay.steps}) but training stops at {state.max_steps}; "
                f"what is still decaying then is removed abruptly by finalize(force=True). Lower "
                f"start_step or prune_every, or train longer", UserWarning, stacklevel=2)
        self._maybe_prune(state)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.pruner.optimizer is None and self._attach(args, model, optimizer):
            self._maybe_prune(state)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.regularize and self.pruner.optimizer is not None:
            self.pruner.regularize(self.pruner.model)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.pruner.optimizer is not None:
            self._maybe_prune(state)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.finalize or self.pruner.optimizer is None:
            return
        if self.pruner.current_step < self.iterative_steps:
            warnings.warn(
                f"DecayPruningCallback: training ended after {self.pruner.current_step} of "
                f"{self.iterative_steps} pruning steps, so the model is pruned less than "
                f"planned; lower start_step / prune_every or train longer", UserWarning,
                stacklevel=2)
        self.finalized = self.pruner.finalize(force=True)
