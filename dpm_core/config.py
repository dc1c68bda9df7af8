"""Hyper-parameters of the Decay Pruning Method."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["DecayConfig"]


@dataclass(frozen=True)
class DecayConfig:
    """Settings of Smooth Pruning (SP) and Self-Rectifying (SR).

    Args:
        steps: N, the number of optimizer steps over which a pruned structure decays to
            zero (paper section 3.1; N = 3 to 5 works best, Appendix A).
        t_rate: T_rate, the threshold on the actual escaping rate C_rate (Eq. 4, 6).
            The paper uses 0.2-0.4, and 0.1-0.2 with sparse learning. C_rate lies in
            [-1, 1] (triangle inequality), so with ``self_rectify`` T_rate must lie in
            [-1, 1): at 1 or above nothing is ever released, below -1 only C_len decides.
        t_len: T_len, the threshold on the relative gradient length C_len (Eq. 5, 6).
            The paper uses 0.8, and 0.5 with sparse learning.
        self_rectify: turn Self-Rectifying on (``+SR``) or off (``+SP`` only).

    Raises:
        ValueError: naming the field, when a value is out of range or of the wrong type.
    """

    steps: int = 5
    t_rate: float = 0.3
    t_len: float = 0.8
    self_rectify: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(
                f"DecayConfig.steps must be an int >= 1 (the number of decaying steps N), "
                f"got {self.steps!r}")
        for field in ("t_rate", "t_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"DecayConfig.{field} must be a finite float, got {value!r}")
            object.__setattr__(self, field, float(value))
        if self.t_len < 0:
            raise ValueError(f"DecayConfig.t_len must be >= 0 (C_len is a ratio of norms), "
                             f"got {self.t_len!r}")
        if not isinstance(self.self_rectify, bool):
            raise ValueError(f"DecayConfig.self_rectify must be True or False, "
                             f"got {self.self_rectify!r}")
        if self.self_rectify and not -1.0 <= self.t_rate < 1.0:
            # C_rate = (||x~|| - ||x||) / ||x~ - x|| lies in [-1, 1] (triangle inequality)
            what = ("C_rate can never exceed it, so no channel would ever be released"
                    if self.t_rate >= 1.0 else
                    "C_rate always exceeds it, so releases would depend on C_len alone")
            raise ValueError(f"DecayConfig.t_rate must lie in [-1, 1) with "
                             f"self_rectify=True, got {self.t_rate!r}: C_rate lies in [-1, 1], "
                             f"so {what}; use self_rectify=False to turn Self-Rectifying off")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DecayConfig":
        return cls(**d)
