r"""Builds of packed_wgmma.cu side by side in one process: each library's best tile (rows for the batch, 1–2
warpgroups, splits) per int4-g128 cell, checked against the torch fallback and timed as the tuner times, beside
fp16 `torch.matmul`. The libraries are int4 with zero points, built from any version of the source:

    git show REV:quantbench/export/kernels/packed_wgmma.cu > /tmp/v.cu
    nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a -DKIND=0 -DBITS=4 \
        -DHAS_ZEROS=1 -DSPAN=0 -Iquantbench/export/kernels /tmp/v.cu -o /tmp/v.so
    python bench/wgmma_builds.py /tmp/v.so /tmp/w.so
"""
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_speed import kernel_weight  # noqa: E402

from quantbench.export.kernels import cuda_wgmma  # noqa: E402
from quantbench.export.kernels.cuda_build import pointer, row_shift, split_workspace  # noqa: E402
from quantbench.export.kernels.cuda_gemv import multiprocessors  # noqa: E402
from quantbench.export.kernels.cuda_mma import rows_for  # noqa: E402
from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402
from quantbench.export.kernels.reference import packed_matmul_reference  # noqa: E402


def main() -> None:
    device = torch.device("cuda")
    names, entries = [], []
    for path in sys.argv[1:]:
        lib = ctypes.CDLL(path)
        f = lib.quantbench_packed_wgmma
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]
        f.argtypes += [ctypes.c_void_p]
        names.append(path.split("/")[-1])
        entries.append(f)
    processors = multiprocessors(device)
    shapes = [(4096, 14336), (14336, 4096), (8192, 8192), (4096, 4096)]
    for k, n in shapes:
        w = kernel_weight("int4-g128", n, k, device)
        dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        for batch in (8, 16, 32, 64):
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            ref = packed_matmul_reference(x.float(), w)
            tol = 0.05 * ref.abs().max().item()
            fp16 = 1e3 * graph_time_ms(lambda: torch.matmul(x, dense.t()), warm=(x,))
            cells = [f"{k}x{n} b{batch:<3} fp16 {fp16:6.1f}"]
            rows = rows_for(batch, w)
            for name, f in zip(names, entries):
                best = None
                for groups in (1, 2):
                    for splits in cuda_wgmma.split_choices(batch, w, rows, groups, processors):
                        out = torch.empty(batch, n, dtype=torch.float16, device=device)
                        part, arr = split_workspace(device, splits, batch, n) if splits > 1 else (None, None)

                        def call():  # the stream at each call: a graph capture runs on its own
                            stream = torch.cuda.current_stream().cuda_stream
                            return f(rows, groups, splits, x.data_ptr(), w.qweight.data_ptr(), w.scales.data_ptr(),
                                     pointer(w.zeros), out.data_ptr(), pointer(part), pointer(arr), batch, n, k,
                                     w.n_groups, row_shift(w), x.stride(0), 1.0, 0, stream)
                        if call():
                            continue
                        torch.cuda.synchronize()
                        if not (out.float() - ref).abs().max().item() <= tol:
                            cells.append(f"{name} g{groups} s{splits} WRONG")
                            continue
                        us = 1e3 * graph_time_ms(call, warm=(x,))
                        if best is None or us < best[0]:
                            best = (us, groups, splits)
                if best:
                    cells.append(f"{name[:28]} {best[0]:6.1f} ×{fp16 / best[0]:.2f} (g{best[1]} s{best[2]})")
            print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
