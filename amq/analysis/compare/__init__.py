"""amq compare: layer-by-layer float vs quantized errors, clipping vs rounding (core.py: matching,
accumulation, diagnosis, report; run.py: running the two models on data)."""

from amq.analysis.compare.core import *  # noqa: F401,F403
from amq.analysis.compare.core import _rank_key  # noqa: F401  (the report's row order)
