"""Matmul kernels that run from packed weights: Triton and CUDA on GPUs, a torch fallback everywhere.

layout.py     the packed layout the kernels read, and the conversion from stored weights
reference.py  the torch fallback (decodes a slab of inputs at a time)
triton_matmul.py  the Triton kernels (imported only when used)
packed_gemv.cu, cuda_gemv.py  the CUDA decode kernel for 1–16 rows of float16 x, built with nvcc and cached
matmul.py     `packed_matmul`: backend choice and tile tuning
modules.py    `PackedLinear`, what `load_quantized(..., kernels=True)` puts in place of nn.Linear
fused.py      layers that read one input (q/k/v, gate/up) sharing one packed weight and one launch
"""

from quantbench.export.kernels.layout import KernelWeight, kernel_unsupported_reason, to_kernel_layout
from quantbench.export.kernels.matmul import packed_matmul
from quantbench.export.kernels.modules import PackedLinear

__all__ = ["KernelWeight", "PackedLinear", "kernel_unsupported_reason", "packed_matmul", "to_kernel_layout"]
