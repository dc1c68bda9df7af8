"""``python -m benchmarks`` is ``dpm-bench``."""
import sys

from .cli import main

sys.exit(main())
