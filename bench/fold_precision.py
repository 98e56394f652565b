"""How precise a batch-1 int4 matmul stays if the tensor cores multiply the biased codes and the bias is taken out
afterwards, against the CUDA-core kernel's arithmetic, both against float64 (CPU; a design check: the folded
kernel was written, compiled and dropped for its instruction count, docs/performance.md).

- The CUDA-core kernel (`packed_gemv.cu`): each code pair becomes q − z exactly in float16, its product with x
  is added in float16 (one rounding per fused multiply-add) over 8 word rows, and the scale applies in float32.
- Folded: B holds 1024 + 2^b·q exactly in float16 (one LOP3 per code pair, b = 0 or 4 by the code's place in
  its word); the products, exact in float32, are summed in float32 per 16 inputs (one m16n8k16 product) and
  across products; per scale group the sums of x over the same inputs (a product with B = 1) take the bias
  out: Σ (q − z)·x = Σ_b 2^-b·(S_b − 1024·X_b) − z·Σ_b X_b.

    python bench/fold_precision.py [--outputs 512] [--inputs 4096] [--seeds 3]

Prints, per x (Gaussian, and Gaussian with a few channels 50× larger, as activations have), the largest
error of each way relative to the largest output, the mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

GROUP = 128
FLUSH_INPUTS = 64  # 8 word rows of 8 codes: the CUDA-core kernel's float16 run before its scale applies
PRODUCT_INPUTS = 16  # one m16n8k16 product


def weights(outputs: int, inputs: int, generator: torch.Generator):
    codes = torch.randint(0, 16, (outputs, inputs), generator=generator)
    zeros = torch.randint(0, 16, (outputs, inputs // GROUP), generator=generator)
    scales = (torch.rand(outputs, inputs // GROUP, generator=generator) * 0.02 + 0.005).half()
    return codes, zeros, scales


def reference(x: torch.Tensor, codes, zeros, scales) -> torch.Tensor:
    dequantized = (codes - zeros.repeat_interleave(GROUP, 1)).double() * scales.double().repeat_interleave(GROUP, 1)
    return dequantized @ x.double()


def cuda_cores(x: torch.Tensor, codes, zeros, scales) -> torch.Tensor:
    """float16 sums of (q − z)·x with one rounding per step over each run of 64 inputs, then × scale in float32."""
    values = (codes - zeros.repeat_interleave(GROUP, 1)).float()  # exact in float16
    total = torch.zeros(codes.shape[0], dtype=torch.float32)
    for start in range(0, codes.shape[1], FLUSH_INPUTS):
        acc = torch.zeros(codes.shape[0], dtype=torch.float16)
        for k in range(start, start + FLUSH_INPUTS):
            acc = (acc.float() + values[:, k] * x[k].float()).half()  # a fused multiply-add: one rounding
        total += scales[:, start // GROUP].float() * acc.float()
    return total.double()


def folded(x: torch.Tensor, codes, zeros, scales) -> torch.Tensor:
    """float32 sums of (1024 + 2^b·q)·x per product of 16 inputs, the bias taken out per group."""
    place = torch.arange(codes.shape[1]) % 2  # codes at bits 4i: even places b = 0, odd b = 4 (after the byte shift)
    unit = torch.where(place == 0, 1.0, 16.0)
    biased = (1024 + unit * codes).float()  # exact in float16: at most 1024 + 16 · 15
    xf = x.float()
    total = torch.zeros(codes.shape[0], dtype=torch.float32)
    for g in range(codes.shape[1] // GROUP):
        sums = {b: torch.zeros(codes.shape[0], dtype=torch.float32) for b in (0, 1)}
        ones = {b: torch.zeros((), dtype=torch.float32) for b in (0, 1)}
        for start in range(g * GROUP, (g + 1) * GROUP, PRODUCT_INPUTS):
            k = torch.arange(start, start + PRODUCT_INPUTS)
            for b in (0, 1):
                mine = k[place[k] == b]
                sums[b] = sums[b] + (biased[:, mine] * xf[mine]).sum(1, dtype=torch.float32)
                ones[b] = ones[b] + xf[mine].sum(dtype=torch.float32)
        z = zeros[:, g].float()
        value = ((sums[0] - 1024 * ones[0]) + (sums[1] - 1024 * ones[1]) / 16) - z * (ones[0] + ones[1])
        total += scales[:, g].float() * value
    return total.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=int, default=512)
    parser.add_argument("--inputs", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    for label in ("gaussian x", "gaussian x, 1% of channels ×50"):
        errors = {"CUDA cores (float16 sums)": [], "folded (float32 sums, bias out per group)": []}
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            codes, zeros, scales = weights(args.outputs, args.inputs, generator)
            x = torch.randn(args.inputs, generator=generator)
            if "×50" in label:
                x[torch.randperm(args.inputs, generator=generator)[: args.inputs // 100]] *= 50
            x = x.half()
            expected = reference(x, codes, zeros, scales)
            scale = expected.abs().max().item()
            for name, way in zip(errors, (cuda_cores, folded)):
                errors[name].append((way(x, codes, zeros, scales) - expected).abs().max().item() / scale)
        for name, values in errors.items():
            print(f"{label:32} {name:42} max |error| / max |y|: {statistics.mean(values):.2e} "
                  f"± {statistics.pstdev(values):.1e} over {args.seeds} seeds")


if __name__ == "__main__":
    main()
