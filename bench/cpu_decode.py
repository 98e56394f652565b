"""Greedy decode on the CPU from quantbench checkpoints: tokens/s dequantized (dense) and packed
(`load_quantized(kernels=True)`), in float32 and bfloat16, in one run; then single matmuls (`--shape`) of each
packed kind at several batches through quantbench's C++ kernel (`packed_matmul(backend="cpu")`), torch's int4
kernel (bfloat16 int4) and the torch fallback, against dense matmuls in the same run.

Each setting is loaded once, warmed up with a short generation, then timed over `--tokens` new tokens,
`--repeat` times (median). Settings, and the matmul table's rows, alternate within each repeat, so the
machine's drift falls on all alike. With `--cold` each matmul call takes the next of enough copies of its
weight to pass the last-level cache: the weight comes from memory, as a decode step's do in a model larger
than the cache (without it a 4096² packed weight stays in a 32 MB cache from call to call).

    python bench/cpu_decode.py runs/quickstart/checkpoint [more checkpoints] --threads 2
    python bench/cpu_decode.py --threads 2 --cold --batches 1 2 4 16 64
    python bench/cpu_decode.py --threads 2 --shape 1536x576 --call-overhead --repeat 15
    python bench/cpu_decode.py CHECKPOINT --threads 2 --prefill 512 --repeat 3   # a prompt's forward instead
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench import load_quantized  # noqa: E402
from quantbench.export.kernels import KernelWeight, cpu_int4, cpu_packed, packed_matmul  # noqa: E402
from quantbench.export.kernels.layout import MX_BLOCK, NV_BLOCK  # noqa: E402
from quantbench.export.kernels.reference import packed_matmul_input_gradient  # noqa: E402

KINDS = ("int4-g128", "int2-g128", "int8-g128", "ternary2", "mxfp4", "nvfp4")
FALLBACK_KINDS = ("int4-g128", "ternary2", "nvfp4")
COLD_BYTES = 256 << 20  # --cold: the copies of a weight a matmul row takes in turn, past the last-level cache
SETTINGS = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True)]


@torch.no_grad()
def tokens_per_s(model, prompt: torch.Tensor, tokens: int) -> float:
    started = time.perf_counter()
    model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokens / (time.perf_counter() - started)


def random_kernel_weight(kind: str, k: int, n: int, generator: torch.Generator) -> KernelWeight:
    """Random codes and scales of a packed kind in the kernel layout (timing only)."""
    bits = int(kind[3]) if kind.startswith("int") else 4
    words = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), dtype=torch.int32, generator=generator)
    def scales(*shape):
        return (torch.rand(*shape, generator=generator) * 0.01 + 1e-3).half()
    if kind.startswith("int"):
        zeros = torch.randint(0, 1 << bits, (k // 128, n), dtype=torch.uint8, generator=generator)
        return KernelWeight("int", bits, (n, k), 128, words, scales(k // 128, n), zeros)
    if kind == "ternary2":
        return KernelWeight("ternary", 4, (n, k), 128, words & 0x55555555, scales(2, k // 128, n))
    block = MX_BLOCK if kind == "mxfp4" else NV_BLOCK
    codes = torch.randint(118, 130, (k // block, n), dtype=torch.uint8, generator=generator) if kind == "mxfp4" \
        else torch.randint(40, 120, (k // block, n), dtype=torch.uint8, generator=generator)
    return KernelWeight(kind, 4, (n, k), block, words, codes, global_scale=1.0)


def call_us(call, calls: int) -> float:
    for _ in range(2):
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e6


def read_rate() -> float:
    """GB/s of x.sum() over 1 GiB of float32 on torch's threads (median of 3): the memory's read rate."""
    x = torch.ones(1 << 28)
    return (1 << 30) / statistics.median(call_us(x.sum, 3) for _ in range(3)) / 1e3


def bytes_read(weight: KernelWeight) -> int:
    """What the C++ kernel reads of a weight: words and scales as stored, MXFP4/NVFP4 scales as float32."""
    if weight.kind in ("mxfp4", "nvfp4"):
        return weight.qweight.numel() * 4 + weight.scales.numel() * 4
    return weight.stored_bytes


def copies(tensors: dict, cold: bool) -> list[dict]:
    """The tensors, and with `cold` enough copies of them to pass COLD_BYTES: a call that takes the next copy
    each time reads its weight from memory, as a model larger than the cache does."""
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    count = max(1, COLD_BYTES // size) if cold else 1
    return [tensors] + [{name: t.clone() for name, t in tensors.items()} for _ in range(count - 1)]


def cycling(call, versions: list):
    """call(version, x) over the versions in turn."""
    versions = itertools.cycle(versions)
    return lambda x: call(next(versions), x)


def packed_versions(weight: KernelWeight, cold: bool) -> list[KernelWeight]:
    return [dataclasses.replace(weight, **tensors) for tensors in copies(weight.tensors(), cold)]


def matmul_table(k: int, n: int, batches: list[int], fallback_batches: int, repeat: int, cold: bool) -> None:
    """µs per call of each packed kind through the CPU kernels (float32 x; int4 also bfloat16), its words in tiles
    as `PackedLinear` keeps them on the CPU (int4 and int8 also in rows of the whole width), int4's gradient in
    x, the torch fallback at the first `fallback_batches` batches, and dense float32 and bfloat16 matmuls; the
    rows alternate `repeat` times (median)."""
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(n, k, generator=generator)
    rows = {("dense", "float32"): cycling(lambda d, x: x @ d["w"].T, copies({"w": dense}, cold))}
    rows["dense", "bfloat16"] = cycling(lambda d, x: x @ d["w"].T, copies({"w": dense.bfloat16()}, cold))
    for dtype in ("float32", "bfloat16"):  # the C++ library's dense rows (dense_cpu.py: up to 4 rows in a model)
        if cpu_packed.available() and (dtype == "float32" or cpu_packed.dense_takes_bfloat16()):
            rows["dense, quantbench's dense rows", dtype] = cycling(
                lambda d, x: cpu_packed.dense_matmul(x, d["w"]),
                copies({"w": dense.to(getattr(torch, dtype))}, cold))
    weights = {kind: random_kernel_weight(kind, k, n, generator) for kind in KINDS}
    read = {}
    for kind, weight in weights.items():
        tiled = packed_versions(weight.in_cpu_tiles(), cold)  # as PackedLinear keeps it on the CPU
        read[kind] = bytes_read(weight)
        rows[kind, "float32"] = cycling(lambda w, x: packed_matmul(x, w, backend="cpu"), tiled)
        if kind in ("int4-g128", "int8-g128"):
            name = f"{kind}, words in rows"
            read[name] = read[kind]
            rows[name, "float32"] = cycling(lambda w, x: packed_matmul(x, w, backend="cpu"),
                                            packed_versions(weight, cold))
        if kind != "int8-g128":  # bfloat16 x: the pair kernel where the CPU has one
            rows[kind, "bfloat16"] = rows[kind, "float32"]
        if kind == "int4-g128":
            rows[f"{kind}, torch's int4 kernel", "bfloat16"] = cycling(lambda w, x: cpu_int4.cpu_int4_matmul(x, w),
                                                                       packed_versions(weight, cold))
    for kind in FALLBACK_KINDS:
        if fallback_batches:
            rows[f"{kind} torch fallback", "float32"] = cycling(lambda w, x: packed_matmul(x, w, backend="torch"),
                                                               packed_versions(weights[kind], cold))
    int4 = weights["int4-g128"]
    if not cold:  # the gradient decodes its whole weight each call: reading it from memory adds little
        rows["int4-g128 gradient in x (grad·W)", "grad"] = \
            lambda grad: cpu_packed.cpu_packed_input_gradient(grad, int4)
        rows["int4-g128 gradient in x, slabs at every batch", "grad"] = \
            lambda grad: cpu_packed.cpu_packed_input_gradient(grad, int4, "slabs")
        if fallback_batches:
            rows["int4-g128 gradient in x, torch fallback", "grad"] = \
                lambda grad: packed_matmul_input_gradient(grad, int4)
    inputs = {(m, dtype): torch.randn(m, k, generator=generator).to(getattr(torch, dtype))
              for m in batches for dtype in ("float32", "bfloat16")}
    inputs |= {(m, "grad"): torch.randn(m, n, generator=generator) for m in batches}  # float32 [M, N]
    times = {(row, m): [] for row in rows for m in batches}
    rates = []
    for _ in range(repeat):
        if cold:  # the memory's rate moves with the neighbours' load: measured beside the calls it divides
            rates.append(read_rate())
        for (name, dtype), call in rows.items():
            for j, m in enumerate(batches):
                if "fallback" not in name or j < fallback_batches:  # the torch fallback: slow, its first batches
                    times[(name, dtype), m].append(call_us(lambda: call(inputs[m, dtype]),
                                                           3 if "fallback" in name else 20))
    reference = {m: statistics.median(times[("dense", "float32"), m]) for m in batches}
    rate = statistics.median(rates) if cold else 0.0
    where = "from memory (each call the next of copies past 256 MB)" if cold else "as the cache keeps them"
    share = (f"; batch 1 of packed weights: % of the read rate, {rate:.1f} GB/s (x.sum() over 1 GiB, "
             f"{', '.join(f'{r:.1f}' for r in rates)})") if cold else ""
    print(f"  one {k}×{n} matmul, µs per call (× dense float32 in the same run), weights read {where}; median of "
          f"{repeat} alternating{share}")
    print("  | weights | x | " + " | ".join(f"batch {m}" for m in batches) + " |")
    print("  |---|---|" + "---:|" * len(batches))
    for (name, dtype) in rows:
        cells = []
        for m in batches:
            if not times[(name, dtype), m]:
                cells.append("—")
                continue
            us = statistics.median(times[(name, dtype), m])
            share = f" · {read[name] / us / 1e3 / rate:.0%}" if cold and m == 1 and name in read else ""
            cells.append(f"{us:,.0f} (×{reference[m] / us:.2f}){share}")
        print(f"  | {name} | {'float32' if dtype == 'grad' else dtype} | " + " | ".join(cells) + " |", flush=True)


def crossing_table(k: int, n: int, batches: list[int]) -> None:
    """µs per call of the C++ kernel's paths, the kernel (a shared decode for four rows), decoded slabs for
    torch's dense matmul and, for bfloat16 x, the weight decoded whole to bfloat16 for torch's bfloat16 matmul, at
    each batch, float32 x and bfloat16 x (in the pair kernel where the CPU has one, but for 2 rows and more on a CPU
    with AMX tiles, where the float32 kernel takes it): where the others overtake the kernel
    (cpu_packed.MATMUL_ROWS, AMX_KERNEL_ROWS)."""
    generator = torch.Generator().manual_seed(1)
    most = ", ".join(f"{kind} {cpu_packed.most_kernel_rows(kind)}" for kind in ("int", "ternary", "nvfp4"))
    print(f"  one {k}×{n} matmul, µs per call, the C++ kernel's paths (most rows of float32 x through the kernel: "
          f"{most}; bfloat16 x in the pair kernel: every batch)")
    print("  | weights | x | path | " + " | ".join(f"batch {m}" for m in batches) + " |")
    print("  |---|---|---|" + "---:|" * len(batches))
    for kind in ("int4-g128", "ternary2", "nvfp4"):
        weight = random_kernel_weight(kind, k, n, generator).in_cpu_tiles()  # as PackedLinear keeps it
        dtypes = (torch.float32, torch.bfloat16) if cpu_packed.takes_bfloat16(weight) else (torch.float32,)
        for dtype in dtypes:
            inputs = {m: torch.randn(m, k, generator=generator).to(dtype) for m in batches}
            for path in ("kernel", "slabs") + (("bfloat16",) if dtype == torch.bfloat16 else ()):
                cells = [f"{call_us(lambda: cpu_packed.cpu_packed_matmul(inputs[m], weight, path), 5):,.0f}"
                         for m in batches]
                name = str(dtype).removeprefix("torch.")
                print(f"  | {kind} | {name} | {path} | " + " | ".join(cells) + " |", flush=True)


def call_overhead_table(k: int, n: int, repeat: int) -> None:
    """What a `PackedLinear` call adds to the C++ kernel's call in Python, one row of x (a decode step's): µs per
    call of the layer and of the library's operator alone on the same words, alternated `repeat` times."""
    from quantbench.export.kernels import PackedLinear
    from quantbench.export.kernels.layout import KIND_CODES

    layer = PackedLinear(random_kernel_weight("int4-g128", k, n, torch.Generator().manual_seed(2)))
    weight = layer.kernel_weight
    scales, zeros = cpu_packed.kernel_scales(weight), cpu_packed._zeros(weight)
    print(f"  one {k}×{n} int4-g128 PackedLinear, one row of x: µs per call, median of {repeat} alternations")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, 1, k).to(dtype)
        prepared = x.reshape(1, k) if dtype == torch.bfloat16 and cpu_packed.takes_bfloat16(weight) \
            else x.reshape(1, k).float()
        def operator():
            return torch.ops.quantbench_cpu.packed_matmul(prepared, weight.qweight, scales, zeros,
                                                          KIND_CODES[weight.kind], weight.bits, weight.group)
        times = [(call_us(lambda: layer(x), 1000), call_us(operator, 1000)) for _ in range(repeat)]
        whole, alone = (statistics.median(t[i] for t in times) for i in (0, 1))
        added = statistics.median(t[0] - t[1] for t in times)
        print(f"  {str(dtype).removeprefix('torch.'):>9}: layer {whole:.1f}, operator alone {alone:.1f}, "
              f"added {added:.1f}", flush=True)


def decode_table(checkpoint: Path, tokens: int, repeat: int, gated: bool = False) -> None:
    """Dense and packed decode in float32 and bfloat16; with `gated` also packed with gated MLPs
    (load_quantized's `gated_mlps`: gate and up as one fused.GatedMLP)."""
    prompt = torch.arange(1, 9)[None]
    settings = [(dtype, kernels, False) for dtype, kernels in SETTINGS]
    settings += [(dtype, True, True) for dtype, kernels in SETTINGS if kernels and gated]
    models = {}
    for dtype, kernels, gated_mlps in settings:
        model = load_quantized(checkpoint, dtype=dtype, kernels=kernels, gated_mlps=gated_mlps)
        models[dtype, kernels, gated_mlps] = model
        tokens_per_s(model, prompt, 4)  # the packed layers' one-time conversions happen here
    rates = {setting: [] for setting in settings}
    for _ in range(repeat):
        for setting, model in models.items():
            rates[setting].append(tokens_per_s(model, prompt, tokens))
    print(f"  {checkpoint}: {tokens} new tokens, median of {repeat}")
    dense32 = statistics.median(rates[torch.float32, False, False])
    for (dtype, kernels, gated_mlps), values in rates.items():
        rate = statistics.median(values)
        kind = "dense" if not kernels else "packed, gated" if gated_mlps else "packed"
        print(f"  {str(dtype).removeprefix('torch.'):>9} {kind:>15}: {rate:6.1f} tok/s "
              f"({rate / dense32:.2f}× dense float32; {', '.join(f'{v:.1f}' for v in values)})", flush=True)


@torch.no_grad()
def prefill_table(checkpoint: Path, tokens: int, repeat: int) -> None:
    """Tokens/s of one forward over a `tokens`-long prompt (batch 1), dense and packed, float32 and bfloat16; and
    packed bfloat16 as on a CPU without AMX tiles (cpu_packed.has_amx False: the pair kernel at every batch),
    alternated `repeat` times."""
    prompt = torch.randint(3, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    settings = {f"{str(dtype).removeprefix('torch.')} {'packed' if kernels else 'dense'}":
                load_quantized(checkpoint, dtype=dtype, kernels=kernels) for dtype, kernels in SETTINGS}
    amx = cpu_packed.has_amx
    def as_without_amx():
        cpu_packed.has_amx = lambda: False
        try:
            return settings["bfloat16 packed"](prompt)
        finally:
            cpu_packed.has_amx = amx
    calls = {name: (lambda model=model: model(prompt)) for name, model in settings.items()}
    calls["bfloat16 packed, as without AMX"] = as_without_amx
    times = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up: the packed layers' one-time conversions
    for _ in range(repeat):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    print(f"  {checkpoint}: a {tokens}-token prompt's forward, median of {repeat} (AMX tiles: {amx()})")
    for name, values in times.items():
        print(f"  {name:>30}: {tokens / statistics.median(values):8.1f} tok/s "
              f"({', '.join(f'{tokens / v:.1f}' for v in values)})", flush=True)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((line for line in lines if line.startswith("flags")), "")
    vectors = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    extras = [name for flag, name in ((" avx512_bf16", "AVX512_BF16"), (" amx_tile", "AMX")) if flag in flags]
    return ", ".join(filter(None, [names[0] if names else platform.machine(), vectors, *extras]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="*")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", default="4096x4096", help="KxN of the matmuls timed alone")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--fallback-batches", type=int, default=1, help="batches the slow torch fallback runs")
    parser.add_argument("--cold", action="store_true",
                        help="each matmul call reads its weight from memory (copies past the cache), as in a model")
    parser.add_argument("--crossing", type=int, nargs="*", metavar="BATCH",
                        help="time the C++ kernel's paths (kernel, slabs, decoded bfloat16) at these batches "
                             "instead")
    parser.add_argument("--gated", action="store_true",
                        help="also decode packed checkpoints with gated MLPs (load_quantized's gated_mlps)")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="time a prompt of this many tokens through the checkpoints instead of decoding")
    parser.add_argument("--call-overhead", action="store_true",
                        help="time what a PackedLinear call adds to the kernel's (one row of x) instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d')} {cpu_name()}, {args.threads} threads; torch {torch.__version__}")
    for checkpoint in args.checkpoints:
        if args.prefill:
            prefill_table(checkpoint, args.prefill, args.repeat)
        else:
            decode_table(checkpoint, args.tokens, args.repeat, args.gated)
    if args.prefill:
        return
    k, n = map(int, args.shape.split("x"))
    if args.call_overhead:
        call_overhead_table(k, n, args.repeat)
    elif args.crossing:
        crossing_table(k, n, args.crossing)
    else:
        matmul_table(k, n, args.batches, args.fallback_batches, args.repeat, args.cold)


if __name__ == "__main__":
    main()
