"""amq compare: layer-by-layer float vs quantized errors, clipping vs rounding.

match.py: what to compare (the Q/DQ nodes of the quantized model, matched to float tensors);
accumulate.py: the metrics, streamed batch by batch; diagnose.py: the rows, the clipping/rounding
diagnosis and the report; page.py: the HTML page; run.py: running the two models on data."""

from amq.analysis.compare.accumulate import (
    KL_BINS,
    KL_EPS,
    KL_MIN_VALUES,
    Comparison,
    LevelHistograms,
    TensorAccumulator,
)
from amq.analysis.compare.diagnose import (
    CLIP_FRACTION,
    COLUMNS,
    OK_SQNR_DB,
    ZEROED_MANY,
    CompareReport,
    TensorRow,
    diagnose,
)
from amq.analysis.compare.match import INT_TYPES, QParams, Target, match, replace_axis
from amq.analysis.compare.page import files, to_html

__all__ = [
    "files",
    "CLIP_FRACTION",
    "COLUMNS",
    "INT_TYPES",
    "KL_BINS",
    "KL_EPS",
    "KL_MIN_VALUES",
    "OK_SQNR_DB",
    "ZEROED_MANY",
    "CompareReport",
    "Comparison",
    "LevelHistograms",
    "QParams",
    "Target",
    "TensorAccumulator",
    "TensorRow",
    "diagnose",
    "match",
    "replace_axis",
    "to_html",
]
