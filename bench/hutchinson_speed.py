"""Loss-Hessian products for Hutchinson's probes: one call a probe against `LossHessian.products` (a batch's
forward and gradient shared by the probes), on a real model's layers, in the same run.

    python bench/hutchinson_speed.py                      # SmolLM2-135M, the first two blocks' q, v and down
    python bench/hutchinson_speed.py --random 1b --probes 8 --seqlen 512 --device cuda   # random weights

Prints seconds for each route and whether the products are the same floats.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantbench.allocation.hessian_probes import LossHessian, rademacher_like
from quantbench.calibration import calibration_batches
from quantbench.model_io import load_model
from random_models import SIZES, build_random_llama_on

LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--random", choices=list(SIZES), help="random weights of these dimensions, random tokens")
    parser.add_argument("--blocks", type=int, default=2, help="the first N blocks' q, v and down projections")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.random:
        model = build_random_llama_on(args.random, torch.float32, device)
        ids = torch.randint(0, model.config.vocab_size, (args.samples, args.seqlen),
                            generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_model(args.model, torch.float32)
        model.to(device)
        ids = calibration_batches(tokenizer, "c4", args.samples, args.seqlen, seed=0)
    layers = [model.get_submodule(f"model.layers.{b}.{name}") for b in range(args.blocks) for name in LAYERS]
    hessian = LossHessian(model, ids, layers, batch_size=args.samples)
    generator = torch.Generator().manual_seed(0)
    probes = [[rademacher_like(w, generator) for w in hessian.weights] for _ in range(args.probes)]
    hessian.products(probes[:1])  # warm-up
    one_s, one = timed(lambda: [hessian(vs) for vs in probes], device)
    shared_s, shared = timed(lambda: hessian.products(probes), device)
    same = all(torch.equal(a, b) for x, y in zip(one, shared) for a, b in zip(x, y))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"device": name, "model": args.random or args.model, "threads": torch.get_num_threads(), "layers": len(layers),
                      "probes": args.probes, "tokens": list(ids.shape), "one_call_a_probe_s": round(one_s, 2),
                      "shared_s": round(shared_s, 2), "speedup": round(one_s / shared_s, 2),
                      "same_floats": same}))


if __name__ == "__main__":
    main()
