"""What sampling costs a decode end to end: one checkpoint loaded once, then `quantbench.generate.generate` greedy
and sampled (temperature 0.8, top-k 50, top-p 0.9) in turn, `--rounds` times each, with CUDA graphs, eager and
compiled (the compiled step built once: later calls find it in dynamo's cache). Prints each call's decode rate and,
per mode, the median of the sampled over the greedy rate, round by round (the same process and GPU state: the
spread between processes is larger than what sampling costs).

    python bench/sampled_decode.py /tmp/ckpt8b --device cuda --rounds 3 --new-tokens 256
"""

from __future__ import annotations

import argparse
import statistics

import torch

from quantbench.cli import _launch_inductor_kernels_dependent
from quantbench.generate import generate
from quantbench.model_io import load_target
from quantbench.sampling import Sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["graph", "compiled"], choices=["graph", "compiled"])
    args = parser.parse_args()
    device = torch.device(args.device)
    loaded = load_target(args.checkpoint, device, torch.float16, kernels=True)
    model = loaded.model.to(device)
    ways = {"greedy": Sampling(), "sampled": Sampling(0.8, top_k=50, top_p=0.9, seed=1)}
    for mode in args.modes:
        compiled = mode == "compiled"
        if compiled and device.type == "cuda":
            _launch_inductor_kernels_dependent()
        generate(model, loaded.tokenizer, "The capital of France is", 16, compiled=compiled)  # tiles tuned, compiled
        ratios = []
        for round_ in range(args.rounds):
            rates = {}
            for name, sampling in ways.items():
                result = generate(model, loaded.tokenizer, "The capital of France is", args.new_tokens,
                                  compiled=compiled, sampling=sampling, stop_ids=set())
                rates[name] = result.decode_tokens_per_s
                print(f"{mode:<9} round {round_} {name:<8} {rates[name]:8.1f} tok/s "
                      f"({result.steady_steps} steady steps)", flush=True)
            ratios.append(rates["sampled"] / rates["greedy"])
        print(f"{mode}: sampled / greedy, median of {args.rounds} rounds {statistics.median(ratios):.4f} "
              f"(rounds {', '.join(f'{r:.4f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    main()
