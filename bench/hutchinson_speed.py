"""Loss-Hessian products for Hutchinson's probes: one call a probe against `LossHessian.products` (a batch's
forward and gradient shared by the probes), on a real model's layers, in the same run.

    python bench/hutchinson_speed.py                      # SmolLM2-135M, the first two blocks' q, v and down
    python bench/hutchinson_speed.py --random 1b --probes 8 --seqlen 512 --device cuda   # random weights
    python bench/hutchinson_speed.py --traces 0.1        # whole trace estimates: rounds against one probe a round

Prints seconds for each route and whether the products are the same floats; with --traces, the seconds,
probes and estimates of `hutchinson_traces` (shared products) with its rounds after `--probes` (the first
round) and with one probe a round after it, as it probed before.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantbench.allocation import hessian_probes
from quantbench.allocation.hessian_probes import LossHessian, hutchinson_traces, rademacher_like
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
    parser.add_argument("--traces", type=float, help="time whole estimates to this relative standard error")
    parser.add_argument("--max-probes", type=int, default=64)
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
    if args.traces:
        compare_rounds(hessian, args, device)
        return
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


def compare_rounds(hessian: LossHessian, args, device: torch.device) -> None:
    rounds = hessian_probes._round_size

    def one_a_round(samples, taken, rel_stderr, min_probes, max_probes):
        return rounds(samples, taken, rel_stderr, min_probes, max_probes) if taken < min_probes else 1

    def estimate():
        return hutchinson_traces(hessian, hessian.weights, rel_stderr=args.traces, min_probes=args.probes,
                                 max_probes=args.max_probes, products=hessian.products)

    hessian.products([[torch.ones_like(w) for w in hessian.weights]])  # warm-up
    row = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "rel_stderr": args.traces, "first_round": args.probes}
    for label, rule in (("rounds", rounds), ("one_a_round", one_a_round)):
        hessian_probes._round_size = rule
        seconds, estimates = timed(estimate, device)
        row[label] = {"s": round(seconds, 2), "probes": estimates[0].probes,
                      "worst_rel_stderr": round(max(e.relative_stderr for e in estimates), 4),
                      "traces": [round(e.trace, 4) for e in estimates]}
    hessian_probes._round_size = rounds
    row["speedup"] = round(row["one_a_round"]["s"] / row["rounds"]["s"], 2)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
