"""quantbench: a post-training quantization workbench for large language models."""

from quantbench.export.checkpoint import load_quantized, save_quantized
from quantbench.quantized_weight import QuantizedWeight
from quantbench.scheme import Scheme

__version__ = "0.1.0"
__all__ = ["QuantizedWeight", "Scheme", "__version__", "load_quantized", "save_quantized"]
