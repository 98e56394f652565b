"""Compiles the package's Triton kernels to sm_90 machine code on a machine without a GPU, through the real
launchers: Triton's compiler and its ptxas run on the CPU, and nothing is launched.

Run as a script with TRITON_INTERPRET=0 (tests/test_triton_for_hopper.py does): prints one JSON object, each
launched kernel's name → the byte sizes of the cubins compiled for it, and "kernels" → every launched kernel the
package defines (a `@triton.jit` function that some module launches as `name[grid]`)."""

import importlib
import json
import pkgutil
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).parent))


class HopperOnPaper:
    """Triton's driver interface as far as compiling needs it: an sm_90 target, device 0, no stream."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


cubins: dict[str, list[int]] = defaultdict(list)


def compile_only(run):
    def compiled(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        cubins[self.fn.__name__].append(len(kernel.asm["cubin"]))
        return kernel
    return compiled


def launched_kernels() -> set[str]:
    import quantbench

    names = set()
    for module_info in pkgutil.walk_packages(quantbench.__path__, "quantbench."):
        if module_info.name.endswith("__main__"):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and value.__module__ == module.__name__:
                names.add(name)
    sources = "\n".join(path.read_text() for path in Path(quantbench.__path__[0]).rglob("*.py"))
    return {name for name in names if re.search(rf"\b{name}\)?\[", sources)}


def packed_matmuls() -> None:
    from test_kernels import WEIGHTS

    from quantbench.export.kernels import packed_matmul, to_kernel_layout
    from quantbench.export.kernels.layout import to_base3_layout
    from quantbench.export.kernels.matmul import TileConfig

    def run(label, dtype, batch, tile, base3=False):
        stored = WEIGHTS[label]
        packed = to_base3_layout(stored) if base3 else to_kernel_layout(stored)
        packed_matmul(torch.zeros(batch, stored.shape[1], dtype=dtype), packed, backend="triton", config=tile)

    half, bf16 = torch.float16, torch.bfloat16
    run("int4-g128-rtn", half, 1, TileConfig(1, 32, 64, 2, pairs=True))
    run("int4-g32 act_order", half, 1, TileConfig(1, 32, 64, 1, half=True))
    run("int4-g32 act_order", bf16, 16, TileConfig(16, 32, 64, 1, expand=False))
    run("int8-pc-rtn", half, 16, TileConfig(16, 32, 64, 2, half=True))
    run("int2-g64-rtn", torch.float32, 32, TileConfig(32, 32, 64, 1))
    run("mxfp4-rtn", bf16, 1, TileConfig(1, 16, 64, 3))
    run("nvfp4-rtn", half, 4, TileConfig(1, 16, 64, 3, rows=2))
    run("ternary2-g64", half, 4, TileConfig(1, 32, 64, 1, rows=4))
    run("ternary2-g64", bf16, 1, TileConfig(1, 32, 128, 2, lut=True), base3=True)
    run("ternary2 per row", half, 2, TileConfig(1, 32, 128, 1, rows=2), base3=True)


def gptq_columns() -> None:
    from test_gptq_speed import inverse_factor

    from quantbench.formats import format_for
    from quantbench.quantizers.gptq import _Block
    from quantbench.quantizers.gptq_fused import solve_block_fused
    from quantbench.scheme import Scheme

    for name in ("int4-g16-gptq", "nvfp4-gptq"):
        scheme = Scheme.parse(name)
        W = torch.randn(19, 32)
        fmt = format_for(scheme).for_weight(W)
        group = scheme.group_size or fmt.block_size
        fit_offsets = tuple(range(0, 32, group))
        solve_block_fused(fmt, _Block.of(W, inverse_factor(32, 1), len(fit_offsets)), fit_offsets, group)


def compensated_gram() -> None:
    from quantbench.calibration import compensated_sum

    total, carry = torch.zeros(96, 96), torch.zeros(96, 96)
    compensated_sum._triton_gram(total, carry, torch.zeros(300, 96, dtype=torch.bfloat16))


def sampling() -> None:
    from quantbench import sampling_kernels

    scores = torch.zeros(3, 5000)
    keys, counts = torch.arange(3), torch.zeros(3, dtype=torch.int64)
    sampling_kernels.keyed_draw(scores, torch.zeros(3), keys, counts)
    sampling_kernels.nucleus_draw(scores, torch.zeros(3), keys, counts, 0.9)
    sampling_kernels.topk_floors(scores, 50)


def split_attention() -> None:
    from quantbench.export.kernels.split_attention import split_decode_attention

    query = torch.zeros(2, 8, 1, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 2, 300, 64, dtype=torch.bfloat16)
    split_decode_attention(query, cache, cache, torch.ones(2, 1, 1, 300, dtype=torch.bool), 0.125)
    split_decode_attention(query.half(), cache.half(), cache.half(), None, 0.125)


if __name__ == "__main__":
    driver.set_active(HopperOnPaper())
    JITFunction.run = compile_only(JITFunction.run)
    for launches in (packed_matmuls, gptq_columns, compensated_gram, sampling, split_attention):
        launches()
    print(json.dumps({**cubins, "kernels": sorted(launched_kernels())}))
