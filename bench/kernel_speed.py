"""Packed-weight matmul kernels against fp16 torch.matmul, and decode speed of a random 1B-class Llama.

Per shape (inputs K × outputs N) and batch: GPU time per call measured with CUDA events around CUDA
graphs of (L2 flush, call) × n minus graphs of the flushes alone (a 4-bit 8192² weight fits in an H100's
L2; graphs remove the host's launch overhead, as in a graph-captured decode step), the achieved bandwidth (bytes the
call must read and write / time) as a share of the device's HBM bandwidth, and the speed-up over fp16.

    python bench/kernel_speed.py --device cuda [--json out.json]
    python bench/kernel_speed.py --device cuda --skip-matmul --size 8b --decode-batches 1 8 --fuse
    python bench/kernel_speed.py --device cuda --skip-matmul --size 8b --only-fused --compile   # forward compiled
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch._inductor import config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench.export.kernels import PackedLinear, decode_attention, packed_matmul, to_kernel_layout  # noqa: E402
from quantbench.export.kernels.cuda_build import DEPENDENT_LAUNCH_ENV  # noqa: E402
from quantbench.export.kernels.fused import fuse_packed_siblings  # noqa: E402
from quantbench.export.kernels.layout import KernelWeight, to_base3_layout  # noqa: E402
from quantbench.export.kernels.mlp_order import fold_down_orders  # noqa: E402
from quantbench.export.kernels.matmul import ENGINES_ENV, TILES_ENV, chosen_tile, graph_time_ms, tuned_configs  # noqa: E402
from quantbench.generate import captured  # noqa: E402
from random_models import random_weight  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K inputs, N outputs)
BATCHES = [1, 4, 16]
HBM_BYTES_PER_S = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
VARIANTS = {"int4-g128 act_order": "int4-g128-gptq-act", "int4-g128": "int4-g128-gptq",
            "int8-g128 act_order": "int8-g128-gptq-act",
            "int2-g128 act_order": "int2-g128-gptq-act", "ternary2": "ternary2-ptqtp",
            "ternary2 base-3": "ternary2-ptqtp", "mxfp4": "mxfp4-rtn", "nvfp4": "nvfp4-rtn"}
LAYOUTS = {"ternary2 base-3": to_base3_layout}  # the others: to_kernel_layout
TINYGEMM = "tinygemm int4-g128 (bf16)"
UNFOLDED = " unfolded"  # a decode label's suffix: the down projections keep their act_order (no fold_down_orders)
GATED = " gated"  # another: gate and up as one fused.GatedMLP whose kernels store silu(gate)·up


def scheme_label(label: str) -> str:
    """The variant of a decode label, without its suffixes."""
    return label.removesuffix(GATED).removesuffix(UNFOLDED)


def kernel_weight(label: str, n: int, k: int, device) -> KernelWeight:
    label = scheme_label(label)
    return LAYOUTS.get(label, to_kernel_layout)(random_weight(VARIANTS[label], n, k, device))


def peak_bandwidth(device) -> tuple[str, float | None]:
    name = torch.cuda.get_device_name(device)
    for key, value in HBM_BYTES_PER_S.items():
        if key in name:
            return name, value
    return name, None


def measured_copy_bandwidth(device) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    stop.record()
    stop.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(stop) / 1e3)


class Timer:
    def __init__(self, repeat: int):
        self.repeat = repeat

    def __call__(self, fn, x: torch.Tensor) -> float:
        """Median µs per call with the weights on a cold L2 cache and x cached (written by the kernel before, in
        a model), replayed from CUDA graphs (no host launch overhead)."""
        return 1e3 * graph_time_ms(fn, calls=self.repeat, rounds=5, warm=(x,))


def kernel_bytes(weight: KernelWeight, batch: int, k: int, n: int) -> int:
    return weight.stored_bytes + 2 * batch * (k + n)


def bench_matmuls(device, timer: Timer, peak: float | None, shapes, batches, variants, rows: list,
                  saved=lambda: None) -> list[dict]:
    """Appends a row per (shape, batch) to `rows` and calls `saved` after each, so a run cut short keeps
    what it measured."""
    for k, n in shapes:
        dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        weights = {label: kernel_weight(label, n, k, device) for label in variants}
        tinygemm = tinygemm_int4(n, k, device)
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=torch.float16)
            fp16_us = timer(lambda: torch.matmul(x, dense.t()), x)
            row = {"shape": f"{k}x{n}", "batch": batch, "fp16_us": fp16_us,
                   "fp16_pct_hbm": _pct(2 * n * k + 2 * batch * (k + n), fp16_us, peak)}
            for label, weight in weights.items():
                us = timer(lambda: packed_matmul(x, weight), x)
                row[label] = {"us": us, "speedup": fp16_us / us,
                              "pct_hbm": _pct(kernel_bytes(weight, batch, k, n), us, peak),
                              "max_rel_error": _error_against_torch(x, weight),
                              "engine": chosen_tile(x, weight).engine}
            if tinygemm is not None:
                x_bf16 = x.to(torch.bfloat16)
                us = timer(lambda: tinygemm(x_bf16), x_bf16)
                row[TINYGEMM] = {"us": us, "speedup": fp16_us / us,
                                 "pct_hbm": _pct(n * k // 2 + 4 * n * (k // 128) + 2 * batch * (k + n), us, peak)}
            rows.append(row)
            saved()
            print(_format_row(row), flush=True)
    return rows


def _error_against_torch(x: torch.Tensor, weight: KernelWeight) -> float:
    """The tuned kernel against the torch fallback on the same weight: max |difference| / max |result|
    (float16 outputs: about 1e-3 is rounding; a wrong kernel is off by order one)."""
    got = packed_matmul(x, weight).float()
    expected = packed_matmul(x.float(), weight, backend="torch")
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _pct(nbytes: int, us: float, peak: float | None) -> float | None:
    return None if peak is None else 100 * nbytes / (us * 1e-6) / peak


def tinygemm_int4(n: int, k: int, device, group: int = 128):
    """torch's built-in int4 matmul (`aten._weight_int4pack_mm`, bfloat16, asymmetric groups of 128) on
    random codes, as a callable x → x·Wᵀ; None, with the reason printed, where this torch lacks it."""
    try:
        g = torch.Generator(device=device).manual_seed(0)
        codes = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        scales_and_zeros = torch.rand(k // group, n, 2, generator=g, device=device).to(torch.bfloat16) * 0.01

        def matmul(x):
            return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)

        matmul(torch.zeros(1, k, device=device, dtype=torch.bfloat16))
        return matmul
    except (RuntimeError, AttributeError) as exc:
        print(f"tinygemm int4 unavailable here: {str(exc).splitlines()[0]}", flush=True)
        return None


def _format_row(row: dict) -> str:
    parts = [f"{row['shape']:>11} b{row['batch']:<3} fp16 {row['fp16_us']:7.1f} µs"]
    for label in [*VARIANTS, TINYGEMM]:
        if label not in row:
            continue
        r = row[label]
        pct = "" if r["pct_hbm"] is None else f" {r['pct_hbm']:4.0f}% of peak"
        wrong = " WRONG RESULT" if r.get("max_rel_error", 0) > 0.05 else ""
        engine = f" [{r['engine']}]" if "engine" in r else ""
        parts.append(f"{label} {r['us']:7.1f} µs ×{r['speedup']:.2f}{pct}{engine}{wrong}")
    return " | ".join(parts)


FLOOR = "no matmul (floor)"


@torch.library.custom_op("quantbench_bench::no_matmul", mutates_args=())
def no_matmul(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Uninitialised memory of a linear's output shape. An opaque operator that takes x, so that a compiler
    keeps (does not eliminate as dead) everything that computes x."""
    return x.new_empty(*x.shape[:-1], out_features)


@no_matmul.register_fake
def _no_matmul_shape(x, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class NoMatmul(torch.nn.Module):
    """A linear that returns uninitialised memory: the decode step without its weight matmuls."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return no_matmul(x, self.out_features)


def quantize_model(model, label: str | None, device, fuse: bool = False, head: bool = False) -> None:
    """Swap every linear of the decoder blocks for a PackedLinear holding random codes of variant `label`
    (act_order then folded out of the down projections unless the label says UNFOLDED, and with `fuse` q/k/v
    and gate/up sharing one fused weight, gated where the label ends in GATED, as load_quantized builds them),
    or for NoMatmul (label FLOOR); with `head`, lm_head too (a recipe's `quantize.lm_head`)."""
    if label is None:
        return
    if head and label != FLOOR:
        model.lm_head = PackedLinear(kernel_weight(label, model.lm_head.out_features, model.lm_head.in_features,
                                                   device))
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            replacement = (NoMatmul(module.out_features) if label == FLOOR else
                           PackedLinear(kernel_weight(label, module.out_features, module.in_features, device)))
            setattr(model.model.layers.get_submodule(parent), attr, replacement)
    if label != FLOOR and UNFOLDED not in label:
        fold_down_orders(model)
    if fuse and label != FLOOR:
        fuse_packed_siblings(model, gated=label.endswith(GATED))


_written: set[tuple[Path, str, bool]] = set()


def checkpoint_model(label: str, size: str, device, folder: Path, fuse: bool, head: bool):
    """A checkpoint of random codes of `label` written under `folder` (once a run: the decode batches share
    it), then loaded onto `device` as a user loads one: load_quantized(kernels=True), q/k/v and gate/up fused
    with `fuse`. Prints the load's time."""
    from quantbench import load_quantized
    from random_models import write_random_checkpoint

    scheme = scheme_label(label)
    if scheme in LAYOUTS:
        raise SystemExit(f"--from-checkpoint: load_quantized does not build the layout of {label!r}")
    directory = folder / scheme.replace(" ", "-")
    if (directory, size, head) not in _written:
        write_random_checkpoint(directory, size, VARIANTS[scheme], torch.float16, device, head=head)
        _written.add((directory, size, head))
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    model = load_quantized(directory, device, torch.float16, kernels=True, fuse=fuse,
                           fold_orders=UNFOLDED not in label, gated_mlps=label.endswith(GATED))
    torch.cuda.synchronize(device)
    print(f"loaded {directory} onto {device} in {time.perf_counter() - started:.1f} s "
          f"({len(model.quantbench_kernel_skips)} layers left dense)", flush=True)
    return model


def decode_speed(device, new_tokens: int, prompt: int, size: str, batch: int, fuse: bool, variants,
                 rows: list, saved=lambda: None, floor: bool = False, compiled: bool = False,
                 head: bool = False, dependent=("auto",), cache_length: int | None = None,
                 checkpoints: Path | None = None, attention: str | None = None) -> list[dict]:
    for label in ["fp16", *variants, *([FLOOR] if floor else [])]:
        rows.extend(decode_one(label, None if label == "fp16" else label, device, new_tokens, prompt, size, batch,
                               fuse, compiled, head, dependent, cache_length, checkpoints, attention))
        saved()
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def prepared_decode(variant: str | None, device, new_tokens: int, prompt: int, size: str = "1b", batch: int = 1,
                    fuse: bool = False, compiled: bool = False, attention: str | None = None, head: bool = False,
                    cache_length: int | None = None, checkpoints: Path | None = None):
    """A random model of `size` with its decoder linears swapped for `variant` (None: fp16), prefilled with
    `prompt` tokens, and `step`, one decode step in place (static cache of `cache_length` positions, default
    prompt + new_tokens + 8: attention reads all of it at every step), warmed up; `attention` picks
    transformers' attention implementation (its default: sdpa); `head` packs lm_head too. With `checkpoints`,
    a packed model is a checkpoint written there and loaded (`checkpoint_model`). Returns (step, decoder
    weight bytes)."""
    from transformers import StaticCache

    from random_models import build_random_llama_on

    if checkpoints is not None and variant not in (None, FLOOR):
        model = checkpoint_model(variant, size, device, checkpoints, fuse, head)
    else:
        model = build_random_llama_on(size, torch.float16, device)
        quantize_model(model, variant, device, fuse, head)
    if attention:
        if attention == decode_attention.ATTENTION:
            decode_attention.register()
        model.set_attn_implementation(attention)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.model.layers.parameters(),
                                                             *model.model.layers.buffers()])
    cache = StaticCache(config=model.config, max_cache_len=cache_positions(prompt, new_tokens, cache_length))
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    logits = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                   use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([prompt], device=device)
    if compiled:  # after the prefill, which initialised the static cache's layers: one graph, the decode step.
        # The whole forward, because compiling layer by layer recompiles per layer on the cache's guards and
        # stops compiling at dynamo's recompile limit, 8 layers.
        model.forward = torch.compile(model.forward, dynamic=False)

    @torch.no_grad()
    def step():
        out = model(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    for _ in range(3):  # tunes the kernels' tiles and warms up
        step()
    return step, weight_bytes


def enable_inductor_pdl() -> None:
    """inductor's Triton kernels launch dependent (TORCHINDUCTOR_ENABLE_PDL); exits where torch has no such option."""
    try:
        inductor_config.triton.enable_pdl  # noqa: B018 (setting an unknown option would pass silently)
    except AttributeError:
        raise SystemExit(f"--pdl: torch {torch.__version__}'s inductor has no dependent launch "
                         "(torch._inductor.config.triton.enable_pdl)") from None
    inductor_config.triton.enable_pdl = True


@torch.no_grad()
def decode_one(label: str, variant: str | None, device, new_tokens: int, prompt: int, size: str = "1b",
               batch: int = 1, fuse: bool = False, compiled: bool = False, head: bool = False,
               dependent=("auto",), cache_length: int | None = None, checkpoints: Path | None = None,
               attention: str | None = None) -> list[dict]:
    """Tokens/s of one model; a packed one once per `dependent` setting of the CUDA kernels' dependent
    launch ("auto", "on", "off"), each its own CUDA graph, the decode positions running on through them."""
    cache_length = cache_positions(prompt, new_tokens, cache_length)
    step, weight_bytes = prepared_decode(variant, device, new_tokens, prompt, size, batch, fuse, compiled,
                                         attention=attention, head=head, cache_length=cache_length,
                                         checkpoints=checkpoints)
    packed = variant not in (None, FLOOR)
    packed_head = head and packed
    inductor_pdl = compiled and getattr(inductor_config.triton, "enable_pdl", False)
    eager_tok_s = batch * _tokens_per_s(step, 16, device)
    settings = list(dependent) if packed else [None]
    rows = []
    for setting in settings:
        if setting is not None:
            os.environ[DEPENDENT_LAUNCH_ENV] = {"auto": "auto", "on": "1", "off": "0"}[setting]
        graph = captured(step)
        graph_tok_s = batch * _tokens_per_s(graph.replay, (new_tokens - 24) // len(settings), device)
        print(f"decode {label:>20} ({size}, batch {batch}{', fused' if fuse and variant else ''}"
              f"{', compiled' if compiled else ''}{', Triton dependent launch' if inductor_pdl else ''}"
              f"{', lm_head packed' if packed_head else ''}"
              f"{f', packed kernels dependent launch {setting}' if setting else ''}"
              f"{f', attention {attention}' if attention else ''}, cache {cache_length}): "
              f"{graph_tok_s:7.1f} tok/s (CUDA graph), {eager_tok_s:6.1f} tok/s eager, "
              f"decoder weights {weight_bytes / 2**20:.0f} MiB", flush=True)
        rows.append({"model": label, "size": size, "batch": batch, "fused": fuse and variant is not None,
                     "compiled": compiled, "inductor_pdl": inductor_pdl, "lm_head_packed": packed_head,
                     "dependent_launch": setting, "attention": attention, "cache_length": cache_length,
                     "block_weight_bytes": weight_bytes,
                     "from_checkpoint": checkpoints is not None and packed,
                     "eager_tok_s": eager_tok_s, "cuda_graph_tok_s": graph_tok_s})
        del graph
    os.environ.pop(DEPENDENT_LAUNCH_ENV, None)
    return rows


def cache_positions(prompt: int, new_tokens: int, asked: int | None = None) -> int:
    """The static cache's length: `asked`, else what a run takes (prompt, new tokens and the warm-up steps)."""
    return asked or prompt + new_tokens + 8


def _tokens_per_s(step, n: int, device) -> float:
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize(device)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--cache-length", type=int,
                        help="static cache positions (attention reads all of them every step, so tok/s depends on "
                             "it; default: prompt + new tokens + 8)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--size", default="1b", help="random Llama dimensions for the decode runs (1b, 8b, …)")
    parser.add_argument("--decode-batches", nargs="+", type=int, default=[1])
    parser.add_argument("--fuse", action="store_true", help="also decode with q/k/v and gate/up fused")
    parser.add_argument("--only-fused", action="store_true", help="decode with q/k/v and gate/up fused only")
    parser.add_argument("--floor", action="store_true",
                        help="also decode with the decoder's matmuls skipped: the ceiling any kernel can reach")
    parser.add_argument("--compile", action="store_true", help="decode with the model's forward torch.compile'd")
    parser.add_argument("--head", action="store_true", help="decode with lm_head packed too")
    parser.add_argument("--unfolded", action="store_true",
                        help="also decode each act_order variant with act_order left in its down projections")
    parser.add_argument("--gated", action="store_true",
                        help="with fused layers, also decode each variant with gate and up as one fused.GatedMLP, "
                             "whose kernels store silu(gate)·up (the MLP's activation no kernel of its own)")
    parser.add_argument("--from-checkpoint", type=Path, metavar="DIR",
                        help="decode packed models as users get them: a checkpoint of random codes written under "
                             "DIR, then load_quantized(kernels=True) onto the device (not modules swapped in memory)")
    parser.add_argument("--dependent-launch", nargs="+", choices=["auto", "on", "off"], default=["auto"],
                        help="decode packed models once per setting of the CUDA kernels' dependent launch "
                             "(QUANTBENCH_DEPENDENT_LAUNCH; auto: on with --pdl)")
    parser.add_argument("--pdl", action="store_true",
                        help="with --compile: inductor's Triton kernels launch dependent too (TORCHINDUCTOR_ENABLE_PDL)")
    parser.add_argument("--attention", default=decode_attention.ATTENTION,
                        help="transformers' attention implementation of every decoded model, fp16 included (default "
                        f"{decode_attention.ATTENTION}, what load_quantized(kernels=True) gives a model on sdpa: a "
                        "decode step's grouped heads without copies of the cache; sdpa, eager, …)")
    parser.add_argument("--skip-matmul", action="store_true")
    parser.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in SHAPES], help="KxN (inputs×outputs)")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES)
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if not v.startswith(("int8", "int2"))
                                                          and v != "int4-g128"],
                        choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="written after every row")
    parser.add_argument("--tiles", type=Path, help="tuned tiles read from and saved to this file (QUANTBENCH_KERNEL_TILES)")
    parser.add_argument("--engines", help="tile candidates from these engines only: triton, cuda, mma, wgmma or a "
                                          "comma-separated list (QUANTBENCH_KERNEL_ENGINES)")
    args = parser.parse_args()
    if args.cache_length is not None and args.cache_length < cache_positions(args.prompt, args.new_tokens):
        parser.error(f"--cache-length {args.cache_length}: a run takes up to prompt + new tokens + 8 = "
                     f"{cache_positions(args.prompt, args.new_tokens)} positions")
    if args.engines:
        os.environ[ENGINES_ENV] = args.engines
    if args.tiles:
        os.environ[TILES_ENV] = str(args.tiles)
    if args.pdl:
        enable_inductor_pdl()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("bench/kernel_speed.py times GPU kernels; run it with --device cuda on a GPU")
    name, peak = peak_bandwidth(device)
    copy_bw = measured_copy_bandwidth(device)
    one = torch.zeros(1, device=device)
    floor_us = Timer(args.repeat)(lambda: one.add_(1), one)
    print(f"{time.strftime('%Y-%m-%d')} {name}, torch {torch.__version__}; HBM peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'}, device copy {copy_bw / 1e12:.2f} TB/s; "
          f"timer floor (a one-element kernel) {floor_us:.1f} µs")
    result = {"device": name, "torch": torch.__version__, "peak_bytes_per_s": peak, "copy_bytes_per_s": copy_bw,
              "floor_us": floor_us, "matmul": [], "decode": []}

    def saved():
        result["tuned"] = {" ".join(map(str, key)): dataclasses.asdict(config) for key, config in tuned_configs().items()}
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    if not args.skip_matmul:
        bench_matmuls(device, Timer(args.repeat), peak, [tuple(map(int, s.split("x"))) for s in args.shapes],
                      args.batches, args.variants, result["matmul"], saved)
    if not args.skip_decode:
        unfolded = [v + UNFOLDED for v in args.variants if args.unfolded and "act_order" in v]
        gated = [v + GATED for v in args.variants if args.gated]
        for batch in args.decode_batches:
            for fuse in ([True] if args.only_fused else [False, True] if args.fuse else [False]):
                decode_speed(device, args.new_tokens, args.prompt, args.size, batch, fuse,
                             [*args.variants, *unfolded, *gated],
                             result["decode"], saved, args.floor, args.compile, args.head, args.dependent_launch,
                             args.cache_length, args.from_checkpoint, args.attention)


if __name__ == "__main__":
    main()
