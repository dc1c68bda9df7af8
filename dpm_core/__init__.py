"""dpm_core: the shared Decay Pruning Method engine.

``DecayConfig`` holds N, T_rate, T_len and the Self-Rectifying switch; ``DecayEngine``
keeps per-channel decay state and runs Smooth Pruning and Self-Rectifying from an
optimizer's step hooks; ``dpm_core.functional`` has the paper's equations as pure
functions.
"""

from . import functional
from .config import DecayConfig
from .engine import ChannelState, DecayEngine, EngineHandle

__all__ = ["DecayConfig", "DecayEngine", "ChannelState", "EngineHandle", "functional"]
__version__ = "0.1.0"
