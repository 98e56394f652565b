"""What a sampled token costs: `next_tokens` through torch's operators and, on CUDA, through the Triton kernels (one
keyed draw over the whole vocabulary; with top-p, the nucleus's draw settled from it in rounds, the first over
rows × blocks; top-k's floors in two launches, no sort), against the same cuts drawn with `torch.rand` from one
generator (how a draw was made before its noise was keyed: it depended on the row and the batch), and the argmax;
temperature alone, top-k 50, top-p 0.9 and both, for vocabularies of SmolLM2's and Llama 3's sizes, 1–64 rows, and
logits of two spreads: 3 (the nucleus holds a few to 1,500 tokens) and 1 (flat: tens of thousands). Median of
`--repeat` calls, after one; the same logits and cuts every way. On CUDA each call is captured in a CUDA graph and
its replays timed, as a decode step runs it.

    python bench/draw_noise.py --device cpu --repeat 30
    python bench/draw_noise.py --device cuda --repeat 100
"""

from __future__ import annotations

import argparse

import torch

import quantbench.sampling as sampling_module
from quantbench.generate import captured
from quantbench.sampling import Draws, Sampling, next_tokens
from timing import timed


def replayed(call, device: torch.device):
    """`call` itself on the CPU; on CUDA the replay of a CUDA graph capturing it."""
    return call if device.type != "cuda" else captured(call).replay


def drawn_from_a_generator(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """The baseline: every token's score cut in place over the whole vocabulary, noise from `generator`."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(-1)
        before = probabilities.cumsum(-1) - probabilities
        scores = scores.scatter(-1, order, ordered.masked_fill(before >= sampling.top_p, float("-inf")))
    uniform = torch.rand(scores.shape, device=scores.device, generator=generator)
    return (scores - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)


def through(kernels: bool, logits: torch.Tensor, sampling: Sampling, draws: Draws) -> torch.Tensor:
    """next_tokens with the Triton kernels or torch's operators alone."""
    sampling_module._use_kernels = lambda scores: kernels
    return next_tokens(logits, sampling, draws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocabularies", type=int, nargs="+", default=[49_152, 128_256])
    parser.add_argument("--spreads", type=float, nargs="+", default=[3.0, 1.0])
    args = parser.parse_args()
    device = torch.device(args.device)
    kernels = device.type == "cuda"
    cuts = {"temperature": Sampling(0.8, seed=1), "top-k 50": Sampling(0.8, top_k=50, seed=1),
            "top-p 0.9": Sampling(0.8, top_p=0.9, seed=1), "both": Sampling(0.8, top_k=50, top_p=0.9, seed=1)}
    print(f"{'vocabulary':>10} {'rows':>4} {'spread':>6} {'cut':<12} {'generator µs':>12} {'torch µs':>9} "
          + (f"{'kernels µs':>10} {'× torch':>8} " if kernels else "") + f"{'argmax µs':>9}")
    for vocabulary in args.vocabularies:
        for rows in args.rows:
            for spread in args.spreads:
                logits = torch.randn(rows, vocabulary, device=device) * spread
                greedy = timed(replayed(lambda: logits.argmax(-1, keepdim=True), device), device, args.repeat,
                               warmup=True)[0]
                for name, sampling in cuts.items():
                    draws = Draws.of(sampling, range(rows), device)
                    generator = None if device.type == "cuda" else torch.Generator(device).manual_seed(1)
                    before = timed(replayed(lambda: drawn_from_a_generator(logits, sampling, generator), device),
                                   device, args.repeat, warmup=True)[0]
                    ways = [False, True] if kernels else [False]
                    times = [timed(replayed(lambda: through(way, logits, sampling, draws), device), device,
                                   args.repeat, warmup=True)[0] for way in ways]
                    line = f"{vocabulary:>10} {rows:>4} {spread:>6.1f} {name:<12} {1e6 * before:>12.1f} " \
                           f"{1e6 * times[0]:>9.1f} "
                    if kernels:
                        line += f"{1e6 * times[1]:>10.1f} {times[0] / times[1]:>7.2f}× "
                    print(line + f"{1e6 * greedy:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
