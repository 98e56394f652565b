"""Matmul kernels that run from packed weights: Triton and CUDA on GPUs, C++ and torch's int4 kernel on CPUs,
a torch fallback everywhere.

layout.py     the packed layout the kernels read, and the conversion from stored weights
reference.py  the torch fallback (decodes a slab of inputs at a time)
triton_matmul.py  the Triton kernels (imported only when used)
packed_decode.cuh  the CUDA kernels' shared decoding (LOP3 field tricks, E2M1 bits, input pairs)
packed_gemv.cu, cuda_gemv.py  the CUDA-core decode kernel for 1–16 rows of float16 x
packed_mma.cu, cuda_mma.py  the tensor-core kernel (mma.sync on weights decoded in registers) for 1–64 rows
packed_wgmma.cu, cuda_wgmma.py  Hopper's warpgroup tensor-core kernel (wgmma, the weight decoded as A) for 1–64 rows
tensor_core_decode.cuh  the two tensor-core kernels' decoding (words of 4 outputs, scales, code pairs)
cuda_build.py  builds the CUDA kernels with nvcc, one cached library per kernel and weight type
library_cache.py  where the compiled libraries are cached, and their atomic build
cpu_int4.py   int4 on the CPU through torch's own int4 kernel (bfloat16 x)
packed_cpu.cpp, cpu_packed.py  quantbench's CPU kernels for every other layout and dtype, built with the host's
              C++ compiler on first use
dense_cpu.py  a loaded model's dense linears (its lm_head) on the CPU: a decode step's rows through that library
matmul.py     `packed_matmul`: backend choice and tile tuning
modules.py    `PackedLinear`, what `load_quantized(..., kernels=True)` puts in place of nn.Linear
fused.py      layers that read one input (q/k/v, gate/up) sharing one packed weight and one launch
"""

from quantbench.export.kernels.layout import KernelWeight, kernel_unsupported_reason, to_kernel_layout
from quantbench.export.kernels.matmul import packed_matmul
from quantbench.export.kernels.modules import PackedLinear

__all__ = ["KernelWeight", "PackedLinear", "kernel_unsupported_reason", "packed_matmul", "to_kernel_layout"]
