"""quantbench: a post-training quantization workbench for large language models."""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["QuantizedWeight", "Scheme", "__version__", "load_quantized", "save_quantized"]

_LAZY = {"QuantizedWeight": "quantbench.quantized_weight", "Scheme": "quantbench.scheme",
         "load_quantized": "quantbench.export.checkpoint", "save_quantized": "quantbench.export.checkpoint"}


def __getattr__(name: str):
    """Import the heavy modules (torch, transformers) only when their names are used, so that the command
    line starts fast."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantbench' has no attribute {name!r}")
