"""Per-framework runners: one module per framework, one small interface.

``get_runner(name)`` returns a runner with ``check_available()`` (raises
:class:`FrameworkUnavailable` with what to do when the adapter package is missing) and
``run(model, (train, test), method, config, example_inputs=...) -> RunResult``.
"""
from __future__ import annotations

from .base import (METHOD_LABELS, METHODS, BaseRunner, FrameworkUnavailable, RunConfig, RunResult,
                   decay_config)

FRAMEWORKS = ("depgraph", "otov2", "gatedecorator")


def get_runner(name: str) -> BaseRunner:
    key = (name or "").strip().lower()
    if key == "depgraph":
        from .depgraph import DepGraphRunner
        return DepGraphRunner()
    if key == "otov2":
        from .otov2 import OTOv2Runner
        return OTOv2Runner()
    if key == "gatedecorator":
        from .gatedecorator import GateDecoratorRunner
        return GateDecoratorRunner()
    raise ValueError(f"unknown framework {name!r}; known: {', '.join(FRAMEWORKS)}")


def available_frameworks() -> dict:
    """``{framework: None if usable else the reason why not}``."""
    out = {}
    for f in FRAMEWORKS:
        try:
            get_runner(f).check_available()
            out[f] = None
        except FrameworkUnavailable as e:
            out[f] = str(e)
    return out


__all__ = ["FRAMEWORKS", "METHODS", "METHOD_LABELS", "BaseRunner", "FrameworkUnavailable",
           "RunConfig", "RunResult", "decay_config", "get_runner", "available_frameworks"]
