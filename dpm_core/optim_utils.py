"""Find the ``torch.optim.Optimizer`` inside the optimizer objects that training frameworks
hand out.

``accelerate.Accelerator.prepare`` (and therefore ``transformers.Trainer``) returns an
``accelerate.optimizer.AcceleratedOptimizer``: a ``torch.optim.Optimizer`` subclass that
never runs ``Optimizer.__init__`` and forwards ``param_groups``, ``state`` and ``step()`` to
the optimizer it wraps (``.optimizer``). Step hooks registered on the wrapper never fire,
so the decay engine must hook the wrapped optimizer; since the wrapper shares its
``param_groups`` with it, re-pointing parameters in one re-points them in both.
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_optimizer"]

_MAX_DEPTH = 8


def unwrap_optimizer(optimizer, caller: str = "attach()") -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of ``optimizer``.

    An object is unwrapped when it holds a torch optimizer as ``.optimizer`` and shares
    that optimizer's ``param_groups`` list (a pure forwarding wrapper, like accelerate's
    ``AcceleratedOptimizer``, possibly nested). Anything else that is a
    ``torch.optim.Optimizer`` is returned as it is; anything that is not raises a
    ``TypeError`` naming ``caller``.
    """
    found = optimizer
    for _ in range(_MAX_DEPTH):
        inner = getattr(found, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is found:
            break
        try:
            shared = found.param_groups is inner.param_groups
        except AttributeError:
            shared = False
        if not shared:
            break
        found = inner
    if not isinstance(found, torch.optim.Optimizer):
        hint = ""
        if isinstance(optimizer, torch.optim.lr_scheduler.LRScheduler) or \
                type(optimizer).__name__.endswith(("Scheduler", "LR")):
            hint = " (a learning-rate scheduler: pass the optimizer it schedules)"
        elif not hasattr(optimizer, "param_groups") and hasattr(optimizer, "__iter__"):
            hint = (" (parameters, not an optimizer: build one, e.g. "
                    "torch.optim.SGD(model.parameters(), lr=...))")
        raise TypeError(f"{caller} expects a torch.optim.Optimizer (or a wrapper of one, such as "
                        f"accelerate's AcceleratedOptimizer), got {type(optimizer).__name__}"
                        f"{hint}")
    return found
