"""How much a tensor-core batch-1 decode that folds the code bias out of float32 sums would lose, on CPU.

The planned path: each weight's code q becomes the float16 1024 + q by one LOP3 (exact), the products with x
sum in float32 inside m16n8k16 products (each exact: 11-bit mantissas), and the bias is taken out once per
scale group and output: s · (Σ (1024 + q)·x − (1024 + z)·Σ x). The sums then carry terms about 1024 / |q − z|
times larger than the result, so float32 loses about 10 of its 24 bits to cancellation. This measures that
against the exact float64 result and against float16's own rounding of the output, for int4 groups of 128
with zero points, on random x and on x with outlier channels.

    python bench/folded_bias_error.py [--inputs 4096 --outputs 512 --group 128 --seed 0]
"""

from __future__ import annotations

import argparse

import torch

MMA_K = 16  # inputs summed inside one product


def float32_running(terms: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension, one term after another into a float32 sum."""
    terms = terms.float()
    total = torch.zeros(terms.shape[:-1], dtype=torch.float32)
    for i in range(terms.shape[-1]):
        total = total + terms[..., i]
    return total


def float32_chunked(products: torch.Tensor) -> torch.Tensor:
    """Σ over the last dimension in float32, MMA_K at a time into a running float32 sum (one product after
    another along K, as one thread's accumulator fragment)."""
    return float32_running(products.float().unflatten(-1, (-1, MMA_K)).sum(-1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    n, k, group = args.outputs, args.inputs, args.group
    q = torch.randint(0, 16, (n, k), generator=g).double()
    z = torch.randint(0, 16, (n, k // group), generator=g).double()
    s = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half().double()
    outliers = torch.ones(k, dtype=torch.float64)
    outliers[torch.randperm(k, generator=g)[: k // 100]] = 50.0
    for label, x in (("x ~ N(0, 1)", torch.randn(k, generator=g, dtype=torch.float64)),
                     ("x with 1% outlier channels ×50", torch.randn(k, generator=g, dtype=torch.float64) * outliers)):
        x = x.half().double()  # x arrives in float16
        w = (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
        exact = w @ x
        qg, xg = q.view(n, -1, group), x.view(-1, group)
        biased = float32_chunked((1024 + qg) * xg)  # [n, groups]: Σ (1024 + q)·x per group, float32
        sum_x = float32_chunked(xg.expand(n, -1, -1))
        per_group = s.float() * (biased - (1024 + z.float()) * sum_x)
        folded = float32_running(per_group)  # the groups' results, summed in float32
        unbiased = float32_running(s.float() * float32_chunked((qg - z.unsqueeze(-1)) * xg))  # q − z exact
        scale = exact.abs().max().item()
        output_rounding = (exact.half().double() - exact).abs().max().item() / scale
        for name, got in (("folded bias", folded), ("q − z decoded exactly", unbiased)):
            error = (got.double() - exact).abs().max().item() / scale
            print(f"{label:32} {name:24} max |error| / max |result| = {error:.2e} "
                  f"(float16 output rounding: {output_rounding:.2e}; ×{error / output_rounding:.3f} of it)")


if __name__ == "__main__":
    main()
