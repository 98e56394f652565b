"""Export: bit packing and the checkpoint writer/loader."""

from quantbench.export.checkpoint import checkpoint_layers, load_quantized, save_quantized
from quantbench.export.packing import pack_bits, unpack_bits

__all__ = ["checkpoint_layers", "load_quantized", "pack_bits", "save_quantized", "unpack_bits"]
