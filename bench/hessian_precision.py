"""Accuracy and speed of Σ xᵀx for bfloat16 activations: float32 matmul vs tensor cores with float32 output,
both against a float64 reference of the same bfloat16 values, accumulated as the pipeline does it (one
matmul per calibration mini-batch of --batch-tokens, summed in float32).

    python bench/hessian_precision.py

Activations are random with a few channels a hundred times larger (as LLM activations have). Reported:
relative Frobenius error ‖H − H64‖/‖H64‖, the largest error relative to its row's diagonal, and the median time.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import timed

CUDA = torch.device("cuda")


def errors(H, reference):
    diag = reference.diagonal().sqrt()
    scaled = (H.double() - reference).abs() / (diag[:, None] * diag[None, :])
    return {"rel_frobenius": ((H.double() - reference).norm() / reference.norm()).item(),
            "max_rel_to_diagonal": scaled.max().item()}


def accumulate(x: torch.Tensor, batch_tokens: int, tensor_cores: bool) -> torch.Tensor:
    H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    for chunk in x.split(batch_tokens):
        if tensor_cores:
            H.add_(torch.mm(chunk.T, chunk, out_dtype=torch.float32))
        else:
            chunk = chunk.float()
            H.addmm_(chunk.T, chunk)
    return H


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-tokens", type=int, default=8 * 2048, help="tokens per calibration mini-batch")
    args = parser.parse_args()
    rows = []
    for tokens, width in ((262144, 2048), (262144, 8192), (65536, 576)):
        g = torch.Generator(device="cuda").manual_seed(0)
        scale = torch.ones(width, device="cuda")
        scale[torch.randperm(width, device="cuda", generator=g)[:4]] = 100.0
        x = (torch.randn(tokens, width, device="cuda", generator=g) * scale).to(torch.bfloat16)
        reference = x.double().T @ x.double()
        fp32 = lambda: accumulate(x, args.batch_tokens, tensor_cores=False)  # noqa: E731
        tensor_cores = lambda: accumulate(x, args.batch_tokens, tensor_cores=True)  # noqa: E731
        row = {"tokens": tokens, "width": width, "batch_tokens": args.batch_tokens,
               "fp32": {**errors(fp32(), reference), "s": timed(fp32, CUDA, repeat=5, warmup=True)[0]},
               "tensor_cores_fp32_out": {**errors(tensor_cores(), reference), "s": timed(tensor_cores, CUDA, repeat=5, warmup=True)[0]}}
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
