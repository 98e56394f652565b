"""Accuracy and speed of Σ xᵀx for bfloat16 activations: float32 matmul vs tensor cores with float32 output,
both against a float64 reference of the same bfloat16 values.

    python bench/hessian_precision.py

Activations are random with a few channels a hundred times larger (as LLM activations have). Reported:
relative Frobenius error ‖H − H64‖/‖H64‖, the largest error relative to its row's diagonal, and the median time.
"""

from __future__ import annotations

import json
import statistics

import torch


def timed(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def errors(H, reference):
    diag = reference.diagonal().sqrt()
    scaled = (H.double() - reference).abs() / (diag[:, None] * diag[None, :])
    return {"rel_frobenius": ((H.double() - reference).norm() / reference.norm()).item(),
            "max_rel_to_diagonal": scaled.max().item()}


def main() -> None:
    rows = []
    for tokens, width in ((262144, 2048), (262144, 8192), (65536, 576)):
        g = torch.Generator(device="cuda").manual_seed(0)
        scale = torch.ones(width, device="cuda")
        scale[torch.randperm(width, device="cuda", generator=g)[:4]] = 100.0
        x = (torch.randn(tokens, width, device="cuda", generator=g) * scale).to(torch.bfloat16)
        reference = x.double().T @ x.double()
        fp32 = lambda: x.float().T @ x.float()  # noqa: E731
        tensor_cores = lambda: torch.mm(x.T, x, out_dtype=torch.float32)  # noqa: E731
        row = {"tokens": tokens, "width": width,
               "fp32": {**errors(fp32(), reference), "s": timed(fp32)},
               "tensor_cores_fp32_out": {**errors(tensor_cores(), reference), "s": timed(tensor_cores)}}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
