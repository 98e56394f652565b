"""What a sampled token costs: `next_tokens` with keyed draws (each row's noise hashed from its prompt's and
token's numbers on the device) against the same cuts drawn with `torch.rand` from one generator (how a draw was
made before: its noise depended on the row and the batch), and the argmax; temperature alone, top-k 50 (only the
k largest sorted and given noise) and top-p 0.9 (the whole vocabulary sorted), for vocabularies of SmolLM2's and
Llama 3's sizes and 1–64 rows. Median of `--repeat` calls, after one; the same logits and cuts both ways. On
CUDA each call is captured in a CUDA graph and its replays timed, as a decode step runs it (the keyed draws are
some 40 small kernels a call, the generator's fewer).

    python bench/draw_noise.py --device cpu --repeat 30
    python bench/draw_noise.py --device cuda --repeat 100
"""

from __future__ import annotations

import argparse

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--vocabularies", type=int, nargs="+", default=[49_152, 128_256])
    args = parser.parse_args()
    device = torch.device(args.device)
    cuts = {"temperature": Sampling(0.8, seed=1), "top-k 50": Sampling(0.8, top_k=50, seed=1),
            "top-p 0.9": Sampling(0.8, top_p=0.9, seed=1)}
    print(f"{'vocabulary':>10} {'rows':>4} {'cut':<12} {'generator µs':>12} {'keyed µs':>9} {'speed-up':>8} "
          f"{'argmax µs':>9}")
    for vocabulary in args.vocabularies:
        for rows in args.rows:
            logits = torch.randn(rows, vocabulary, device=device) * 3
            greedy = timed(replayed(lambda: logits.argmax(-1, keepdim=True), device), device, args.repeat,
                           warmup=True)[0]
            for name, sampling in cuts.items():
                draws = Draws.of(sampling, range(rows), device)
                generator = None if device.type == "cuda" else torch.Generator(device).manual_seed(1)
                before = timed(replayed(lambda: drawn_from_a_generator(logits, sampling, generator), device),
                               device, args.repeat, warmup=True)[0]
                keyed = timed(replayed(lambda: next_tokens(logits, sampling, draws), device), device, args.repeat,
                              warmup=True)[0]
                print(f"{vocabulary:>10} {rows:>4} {name:<12} {1e6 * before:>12.1f} {1e6 * keyed:>9.1f} "
                      f"{before / keyed:>7.2f}× {1e6 * greedy:>9.1f}")


if __name__ == "__main__":
    main()
