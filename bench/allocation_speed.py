"""How long the in-context allocation search takes on a model of a given size, measured on random weights
with its dimensions and a few decoder blocks, then extrapolated per block to the full depth:

    python bench/allocation_speed.py --size 8b --blocks 2 --device cuda
    python bench/allocation_speed.py --size smollm2-135m --blocks 2 --device cpu --dtype float32 --n-samples 16
        --seqlen 512 --block-tokens 8192 --compare-probes    # block_output's probes served or run whole

Times the gradient pass (one backward per calibration batch), round 0 (every candidate on every layer) and
one in-context round (re-measure the frontier candidates, quantize), on 128 × 2048 random token ids.
`--block-tokens` adds the block_output measure to round 0 (the block run once per layer and candidate on that
many tokens); `--compare-probes` times round 0 again with its probes run whole instead of served what the
reference forward computed, and checks that the costs agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocation_search import CANDIDATES  # noqa: E402
from random_models import SIZES, build_random_llama_on  # noqa: E402

from quantbench.allocation.gradients import gradient_stats  # noqa: E402
from quantbench.allocation.ilp import solve_ilp  # noqa: E402
from quantbench.allocation.in_context import search_in_context  # noqa: E402
from quantbench.allocation.problem import DEFAULT_TIES, build_problem  # noqa: E402
from quantbench.allocation.sensitivity import CandidateCache, sensitivity_table  # noqa: E402
from quantbench.model_io import model_linears  # noqa: E402
from quantbench.scheme import Scheme  # noqa: E402


def synchronized(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="8b", choices=sorted(SIZES))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--gradient-samples", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--block-tokens", type=int, default=0, help="also measure block_output on this many tokens")
    parser.add_argument("--compare-probes", action="store_true", help="round 0 again with block_output's probes "
                        "run whole (needs --block-tokens); skips the in-context round")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = build_random_llama_on(args.size, getattr(torch, args.dtype), device, layers=args.blocks)
    ids = torch.randint(0, SIZES[args.size]["vocab_size"], (args.n_samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    candidates = [Scheme.parse(name) for name in args.candidates]
    layers = list(model_linears(model))
    seconds = {}
    start = synchronized(device)
    gradients = gradient_stats(model, ids[:args.gradient_samples], layers, device, progress=False)
    seconds["gradients"] = synchronized(device) - start
    if args.compare_probes and not args.block_tokens:
        parser.error("--compare-probes needs --block-tokens")

    def round0(reuse_probes: bool):
        start = synchronized(device)
        table = sensitivity_table(model, ids, lambda name: candidates, device, progress=False, cache=CandidateCache(),
                                  gradients=gradients, block_tokens=args.block_tokens, reuse_probes=reuse_probes)
        return table, synchronized(device) - start

    table, seconds["round0"] = round0(reuse_probes=True)
    compared = {}
    if args.compare_probes:
        whole, seconds["round0_probes_whole"] = round0(reuse_probes=False)
        compared = {"same_block_output": all(table.errors[key].block_output == error.block_output
                                             for key, error in whole.errors.items())}
    else:
        start = synchronized(device)
        search_in_context(model, ids, lambda name: candidates, device,
                          lambda t: solve_ilp(build_problem(t, "output_fisher", budget_bits=3.25)), table,
                          "output_fisher", DEFAULT_TIES, max_rounds=1, gradients=gradients, cache=CandidateCache(),
                          progress=False)
        seconds["in_context_round"] = synchronized(device) - start
    depth = SIZES[args.size]["num_hidden_layers"]
    per_block = {k: v / args.blocks for k, v in seconds.items() if k != "gradients"}
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    full = total + (depth - args.blocks) * block  # the backward's work grows with the parameters
    row = {"size": args.size, "measured_blocks": args.blocks, "depth": depth, "dtype": args.dtype,
           "candidates": len(candidates), "calibration": [args.n_samples, args.seqlen],
           "block_tokens": args.block_tokens, **compared,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "seconds": {k: round(v, 2) for k, v in seconds.items()},
           "per_block": {k: round(v, 2) for k, v in per_block.items()},
           "extrapolated_full_model_seconds": round(sum(v for k, v in per_block.items() if k != "round0_probes_whole")
                                                   * depth
                                                   + seconds["gradients"] * full / total, 1)}
    print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
    main()
