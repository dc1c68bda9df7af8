"""dpm_otov2: OTOv2's DHSPG with the Decay Pruning Method, on current PyTorch, on any device.

Importing this package applies :mod:`dpm_otov2.compat` (runtime shims that make
only-train-once 3.0.1 import and run with the installed torch), so ``only_train_once`` works
afterwards too. Main entry points:

* :class:`OTO` - ``only_train_once.OTO`` whose ``dhspg(..., decay=None)`` returns
  :class:`DHSPG` and whose ``hesso(..., decay=None)`` is device-agnostic.
* :class:`DHSPG` / :func:`dhspg` - Dual Half-Space Projected Gradient; ``decay=DecayConfig``
  replaces its single-step half-space projection by Smooth Pruning + Self-Rectifying.
* :class:`HESSO` / :func:`hesso` - only-train-once's HESSO on any device, optionally with DPM.
* :func:`load_subnet` - load the files ``construct_subnet`` writes (torch >= 2.6).
"""

from . import compat
from .compat import OTOCompatError, load_subnet

compat.apply()

from .optim import DEFAULT_OPT_PARAMS, DHSPG, dhspg  # noqa: E402
from .hesso_dpm import HESSO, hesso  # noqa: E402
from .oto import OTO  # noqa: E402
from .zig import Zig, build_zigs, zig_slices  # noqa: E402

__all__ = ["OTO", "DHSPG", "dhspg", "HESSO", "hesso", "load_subnet", "compat",
           "OTOCompatError", "DEFAULT_OPT_PARAMS", "Zig", "build_zigs", "zig_slices"]
