"""amq: post-training quantization of ONNX models (INT4/INT8/INT16 QDQ)."""

from amq.api import QuantizeResult, prepare, quantize
from amq.config import Config, load_config
from amq.errors import AmqError
from amq.plan import QuantPlan

__version__ = "0.1.0"
__all__ = [
    "AmqError",
    "Config",
    "QuantPlan",
    "QuantizeResult",
    "__version__",
    "load_config",
    "prepare",
    "quantize",
]
