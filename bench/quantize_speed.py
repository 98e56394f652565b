"""Wall time to quantize a whole model, split into where it goes: capture of block-0 inputs, moving
blocks, calibration forward passes, Hessian accumulation, the solve, and re-propagation.

    python bench/quantize_speed.py --model HuggingFaceTB/SmolLM2-135M-Instruct --device cpu --n-samples 32
    python bench/quantize_speed.py --random smollm2-135m --device cuda      # same dims, random weights
    python bench/quantize_speed.py --random 1b --device cuda

Real models calibrate on C4; random ones on random tokens (the time does not depend on the values).
The device is synchronised around every timed span, so GPU work is charged to the stage that ran it.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
from pathlib import Path

import torch

from quantbench.model_io import load_model, model_linears, resolve_device
from quantbench.pipeline import StageTimer, quantize_model
from quantbench.results import environment
from quantbench.scheme import Scheme
from random_models import MOE_SIZES, SIZES, build_random_llama, build_random_llama_on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local directory (calibrates on C4)")
    source.add_argument("--random", choices=[*SIZES, *MOE_SIZES], help="random-weight model of these dimensions "
                        "(mixture-of-experts ones are built on the GPU only)")
    parser.add_argument("--scheme", default="int4-g128-gptq")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--calibration-ids", help="safetensors with input_ids [n, seqlen] (see ppl_ladder.py "
                        "--export-ids), instead of tokenizing C4 here")
    parser.add_argument("--hessian", choices=["compensated", "fp32", "tensor_cores"], default="compensated")
    compare = parser.add_mutually_exclusive_group()  # each runs the one copy of the model
    compare.add_argument("--compare-overlap", action="store_true", help="also run without prefetching the next "
                        "block and compare codes and time")
    parser.add_argument("--reuse-passes", choices=["on", "off"], default="on", help="off: every statistics pass "
                        "and the propagation run the block whole (pass_cache.py, residual_outputs.py)")
    compare.add_argument("--compare-reuse", action="store_true", help="also run with --reuse-passes switched, "
                        "and compare codes, weights and time")
    parser.add_argument("--layers", type=int, help="random models: keep only the first N decoder blocks")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    scheme = Scheme.parse(args.scheme)
    if args.random:  # built on the device when it is a GPU (seconds, not minutes), then kept on the host
        model = (build_random_llama_on(args.random, dtype, device, args.layers).to("cpu")
                 if device.type == "cuda" or args.random in MOE_SIZES else
                 build_random_llama(args.random, dtype, layers=args.layers))
        torch.cuda.empty_cache() if device.type == "cuda" else None
        ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seqlen),
                            generator=torch.Generator().manual_seed(0))
    else:
        from quantbench.calibration import calibration_batches
        from quantbench.quiet import quiet_libraries

        quiet_libraries()
        model, tokenizer = load_model(args.model, dtype)
        if args.calibration_ids:
            from safetensors.torch import load_file

            ids = load_file(args.calibration_ids)["input_ids"][: args.n_samples, : args.seqlen]
        else:
            ids = calibration_batches(tokenizer, "c4", args.n_samples, args.seqlen, seed=0)

    linears = model_linears(model)
    twin = copy.deepcopy(model) if args.compare_overlap or args.compare_reuse else None
    reuse = args.reuse_passes == "on"
    timer = StageTimer(device, fine=True)
    peak_mb(device)  # from here: the quantization's own peak, not the model's build
    collections = garbage_collection_timer()
    start = time.perf_counter()
    starved = {}
    codes = quantize_model(model, ids, lambda _name: scheme, device, batch_size=args.batch_size, progress=False,
                           timer=timer, hessian=args.hessian, starved=starved, reuse_passes=reuse)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    gc.callbacks.remove(collections)
    peak = peak_mb(device)
    overlap = compare_overlap(twin, ids, scheme, device, args, codes, model) if args.compare_overlap else None
    switched = compare_reuse(twin, ids, scheme, device, args, codes, model) if args.compare_reuse else None
    breakdown = timer.summary()
    figures = {
        "model": args.model or f"random {args.random}", "scheme": scheme.name, "hessian": args.hessian,
        "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()), "linears": len(linears),
        "calibration": list(ids.shape), "total_s": round(total, 2), "breakdown_s": breakdown,
        "other_s": round(total - sum(breakdown.values()), 2),
        "garbage_collection_s": round(collections.seconds, 2),  # inside the spans above or "other"
        "device": environment(device)["device_name"], "torch": torch.__version__,
        "fused_kernel": os.environ.get("QUANTBENCH_GPTQ_KERNEL", "1") != "0",
        "prefetch": os.environ.get("QUANTBENCH_PREFETCH", "1") != "0",
        "reuse_passes": reuse,
    }
    if any(".experts." in name for name in linears):
        figures["expert_layers"] = sum(".experts." in name for name in linears)
        figures["starved_expert_layers"] = {action: sum(n["action"] == action for n in starved.values())
                                            for action in sorted({n["action"] for n in starved.values()})}
        figures["fewest_routed_tokens"] = min((n["routed_tokens"] for n in starved.values()), default=None)
    if peak is not None:
        figures["peak_cuda_mb"] = peak
    if overlap:
        figures["without_prefetch"] = overlap
    if switched:
        figures["reuse_passes_" + ("off" if reuse else "on")] = switched
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def garbage_collection_timer():
    """A gc callback that adds up the seconds Python's garbage collector ran (registered until removed)."""
    def callback(phase: str, _info: dict) -> None:
        if phase == "start":
            callback.started = time.perf_counter()
        else:
            callback.seconds += time.perf_counter() - callback.started
    callback.seconds, callback.started = 0.0, 0.0
    gc.callbacks.append(callback)
    return callback


def peak_mb(device) -> int | None:
    """The GPU memory's peak since the last call (None on the CPU); the next run's peak starts from here."""
    if device.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def compare_overlap(twin, ids, scheme, device, args, codes, model) -> dict:
    """The same quantization with block transfers not overlapped (QUANTBENCH_PREFETCH=0): its time, and
    whether it gives the same codes and weights."""
    os.environ["QUANTBENCH_PREFETCH"] = "0"
    start = time.perf_counter()
    plain = quantize_model(twin, ids, lambda _name: scheme, device, batch_size=args.batch_size, progress=False,
                           hessian=args.hessian)
    seconds = time.perf_counter() - start
    os.environ["QUANTBENCH_PREFETCH"] = "1"
    return {"total_s": round(seconds, 2), **agreement(plain, codes, twin, model)}


def compare_reuse(twin, ids, scheme, device, args, codes, model) -> dict:
    """The same quantization with --reuse-passes switched (on ↔ off): its time and breakdown, and whether it
    gives the same codes and weights."""
    timer = StageTimer(device, fine=True)
    start = time.perf_counter()
    other = quantize_model(twin, ids, lambda _name: scheme, device, batch_size=args.batch_size, progress=False,
                           timer=timer, hessian=args.hessian, reuse_passes=args.reuse_passes == "off")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"total_s": round(seconds, 2), "breakdown_s": timer.summary(), "peak_cuda_mb": peak_mb(device),
            **agreement(other, codes, twin, model)}


def agreement(other: dict, codes: dict, twin, model) -> dict:
    """Whether a second quantization gave the first one's codes, and left its model with the same weights."""
    return {"same_codes": all(torch.equal(other[name].codes, codes[name].codes) for name in codes),
            "same_weights": all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(),
                                                                  model.state_dict().values()))}


if __name__ == "__main__":
    main()
