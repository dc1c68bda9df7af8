"""dpm_core.optim_utils.unwrap_optimizer: the engine finds the torch optimizer inside the
wrappers that training frameworks hand out (no accelerate needed here: a stand-in wrapper
that behaves like accelerate's AcceleratedOptimizer)."""

import pytest
import torch
import torch.nn as nn

from dpm_core import DecayConfig, DecayEngine
from dpm_core.optim_utils import unwrap_optimizer


class ForwardingWrapper(torch.optim.Optimizer):
    """Like accelerate's AcceleratedOptimizer: an Optimizer subclass that never runs
    Optimizer.__init__ (so hooks registered on it fail) and forwards to ``.optimizer``."""

    def __init__(self, optimizer):  # noqa: D107 - no super().__init__, on purpose
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _sgd():
    return torch.optim.SGD([nn.Parameter(torch.randn(4, 3))], lr=0.1)


def test_plain_optimizer_is_returned_as_is():
    opt = _sgd()
    assert unwrap_optimizer(opt) is opt


def test_nested_forwarding_wrappers_are_unwrapped():
    opt = _sgd()
    assert unwrap_optimizer(ForwardingWrapper(opt)) is opt
    assert unwrap_optimizer(ForwardingWrapper(ForwardingWrapper(opt))) is opt


def test_optimizer_with_own_param_groups_is_not_unwrapped():
    # an optimizer that merely keeps another one as .optimizer (not a forwarding wrapper)
    opt = _sgd()
    outer = torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1)
    outer.optimizer = opt
    assert unwrap_optimizer(outer) is outer


@pytest.mark.parametrize("bad, hint", [
    ("scheduler", "learning-rate scheduler"),
    ("params", "parameters, not an optimizer"),
    ("none", "got NoneType"),
])
def test_non_optimizers_get_a_clear_type_error(bad, hint):
    opt = _sgd()
    obj = {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 1),
           "params": [p for g in opt.param_groups for p in g["params"]],
           "none": None}[bad]
    with pytest.raises(TypeError, match="attach\\(\\) expects a torch.optim.Optimizer") as e:
        DecayEngine().attach(obj)
    assert hint in str(e.value)


def test_engine_attached_through_a_wrapper_decays_on_wrapper_steps():
    w = nn.Parameter(torch.randn(4, 3))
    inner = torch.optim.SGD([w], lr=0.0)
    wrapper = ForwardingWrapper(inner)
    engine = DecayEngine(DecayConfig(steps=2, self_rectify=False))
    engine.add_group("g", [(w, 0)])
    engine.attach(wrapper)
    assert engine.optimizer is inner
    engine.attach(wrapper)   # the same optimizer again: a no-op, not "already attached"
    engine.mark("g", [1])
    norm0 = float(w.detach()[1].norm())
    for _ in range(2):
        w.grad = torch.zeros_like(w)
        wrapper.step()
    assert engine.step_count == 2
    assert float(w.detach()[1].norm()) == 0.0 and norm0 > 0
