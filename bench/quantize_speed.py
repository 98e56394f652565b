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
import json
import time
from pathlib import Path

import torch

from quantbench.model_io import load_model, model_linears, resolve_device
from quantbench.pipeline import StageTimer, quantize_model
from quantbench.results import environment
from quantbench.scheme import Scheme
from random_models import SIZES, build_random_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local directory (calibrates on C4)")
    source.add_argument("--random", choices=list(SIZES), help="random-weight Llama of these dimensions")
    parser.add_argument("--scheme", default="int4-g128-gptq")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--calibration-ids", help="safetensors with input_ids [n, seqlen] (see ppl_ladder.py "
                        "--export-ids), instead of tokenizing C4 here")
    parser.add_argument("--hessian", choices=["compensated", "fp32", "tensor_cores"], default="compensated")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    scheme = Scheme.parse(args.scheme)
    if args.random:
        model = build_random_llama(args.random, dtype)
        ids = torch.randint(0, SIZES[args.random]["vocab_size"], (args.n_samples, args.seqlen),
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
    timer = StageTimer(device, fine=True)
    start = time.perf_counter()
    quantize_model(model, ids, lambda _name: scheme, device, batch_size=args.batch_size, progress=False, timer=timer,
                   hessian=args.hessian)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    breakdown = timer.summary()
    figures = {
        "model": args.model or f"random {args.random}", "scheme": scheme.name, "hessian": args.hessian, "dtype": str(dtype).removeprefix("torch."),
        "params": sum(p.numel() for p in model.parameters()), "linears": len(linears),
        "calibration": list(ids.shape), "total_s": round(total, 2), "breakdown_s": breakdown,
        "other_s": round(total - sum(breakdown.values()), 2),
        "device": environment(device)["device_name"], "torch": torch.__version__,
    }
    if device.type == "cuda":
        figures["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
