"""Accuracy and speed of Σ xᵀx for bfloat16 activations in each `quantize.hessian` mode, against float64 of the
same bfloat16 values, accumulated as the pipeline does it (`LayerStats.update` once per calibration mini-batch):

- fp32: activations converted to float32, multiplied without tensor cores;
- tensor_cores: one tensor-core matmul with float32 output per mini-batch;
- compensated (default): tensor-core sums of 128 tokens, Kahan-summed in float32 by one Triton kernel
  (--sums also runs it with other numbers of 128-token dots per Kahan step).

    python bench/hessian_precision.py                       # random activations with outlier channels
    python bench/hessian_precision.py --model M --calibration-ids calibration.safetensors   # real ones
    python bench/hessian_precision.py --cpu     # float32 on the CPU: the pipeline's sum against one addmm_

Reported per case: relative Frobenius error ‖H − H64‖/‖H64‖, the largest error relative to its row's diagonal,
the median time of the whole accumulation (CUDA events) and its dense-equivalent rate 2·tokens·width²/s.
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import timed

from quantbench.calibration import compensated_sum
from quantbench.calibration.stats import HESSIAN_MODES, LayerStats

CUDA = torch.device("cuda")


def errors(H: torch.Tensor, reference: torch.Tensor) -> dict:
    diag = reference.diagonal().sqrt().clamp(min=1e-30)
    scaled = (H.double() - reference).abs() / (diag[:, None] * diag[None, :])
    return {"rel_frobenius": ((H.double() - reference).norm() / reference.norm()).item(),
            "max_rel_to_diagonal": scaled.max().item()}


def accumulate(x: torch.Tensor, batch_tokens: int, mode: str) -> torch.Tensor:
    stats = LayerStats(wants_hessian=True, accumulation=mode)
    for batch in x.split(batch_tokens):
        stats.update(batch)
    return stats.xtx


def measure(x: torch.Tensor, batch_tokens: int, mode: str, reference: torch.Tensor) -> dict:
    run = lambda: accumulate(x, batch_tokens, mode)  # noqa: E731
    seconds = timed(run, CUDA, repeat=3, warmup=True)[0]
    return {**errors(run(), reference), "s": seconds, "tflops": 2 * x.shape[0] * x.shape[1] ** 2 / seconds / 1e12}


def compare(name: str, x: torch.Tensor, batch_tokens: int, sums: list[int]) -> dict:
    reference = x.double().T @ x.double()
    row = {"case": name, "tokens": x.shape[0], "width": x.shape[1], "batch_tokens": batch_tokens}
    for mode in HESSIAN_MODES:
        row[mode] = measure(x, batch_tokens, mode, reference)
    default = compensated_sum.STEPS_PER_SUM
    for steps in sums:  # longer tensor-core sums: fewer Kahan steps, larger summation error
        compensated_sum.STEPS_PER_SUM = steps
        row[f"compensated_sum{steps * compensated_sum.GRAM_STEP}"] = measure(x, batch_tokens, "compensated", reference)
    compensated_sum.STEPS_PER_SUM = default
    print(json.dumps(row), flush=True)
    return row


TUNING = [(128, 64, 1, 8, 3), (128, 64, 1, 8, 4), (128, 128, 1, 8, 2), (128, 128, 1, 8, 3), (128, 64, 2, 8, 2),
          (128, 32, 2, 8, 3), (64, 64, 4, 4, 3), (64, 128, 1, 4, 3), (64, 64, 1, 4, 4), (64, 64, 2, 4, 3),
          (128, 64, 1, 4, 3)]  # tile, step, steps per Kahan sum, warps, stages


def tune(batch_tokens: int) -> list[dict]:
    """Time the compensated kernel's launch configurations on the widest 8B input."""
    x = torch.randn(batch_tokens * 4, 14336, device="cuda").to(torch.bfloat16)
    rows = []
    default = (compensated_sum.GRAM_TILE, compensated_sum.GRAM_STEP, compensated_sum.STEPS_PER_SUM,
               compensated_sum.GRAM_LAUNCH)
    for tile, step, steps, warps, stages in TUNING:
        compensated_sum.GRAM_TILE, compensated_sum.GRAM_STEP, compensated_sum.STEPS_PER_SUM = tile, step, steps
        compensated_sum.GRAM_LAUNCH = {"num_warps": warps, "num_stages": stages}
        run = lambda: accumulate(x, batch_tokens, "compensated")  # noqa: E731
        try:
            seconds = timed(run, CUDA, repeat=3, warmup=True)[0]
        except Exception as error:  # a configuration that does not fit the device's shared memory
            print(f"tile {tile} step {step}×{steps} warps {warps} stages {stages}: {type(error).__name__}", flush=True)
            continue
        row = {"tile": tile, "step": step, "steps_per_sum": steps, "warps": warps, "stages": stages, "s": seconds,
               "tflops": 2 * x.shape[0] * x.shape[1] ** 2 / seconds / 1e12}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (compensated_sum.GRAM_TILE, compensated_sum.GRAM_STEP, compensated_sum.STEPS_PER_SUM,
     compensated_sum.GRAM_LAUNCH) = default
    return rows


def random_cases(batch_tokens: int, sums: list[int]) -> list[dict]:
    rows = []
    for tokens, width in ((262144, 4096), (262144, 14336), (65536, 576)):
        g = torch.Generator(device="cuda").manual_seed(0)
        scale = torch.ones(width, device="cuda")
        scale[torch.randperm(width, device="cuda", generator=g)[:4]] = 100.0
        x = (torch.randn(tokens, width, device="cuda", generator=g) * scale).to(torch.bfloat16)
        rows.append(compare(f"random {width}", x, batch_tokens, sums))
        del x
        torch.cuda.empty_cache()
    return rows


def model_cases(model_path: str, calibration_ids: str, batch_tokens: int, layers: list[int],
                sums: list[int]) -> list[dict]:
    """The inputs of q_proj (the attention input) and down_proj of some blocks, on the calibration windows."""
    from safetensors.torch import load_file

    from quantbench.model_io import decoder_blocks, load_model

    model, _ = load_model(model_path, torch.bfloat16)
    model.to(CUDA)
    ids = load_file(calibration_ids)["input_ids"]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for index in layers:
        block = decoder_blocks(model)[index]
        for part, module in (("q_proj", block.self_attn.q_proj), ("down_proj", block.mlp.down_proj)):
            key = f"layer {index} {part}"
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, key=key: seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch.to(CUDA), use_cache=False)
    for hook in hooks:
        hook.remove()
    rows = [compare(key, torch.cat(parts), batch_tokens, sums) for key, parts in seen.items()]
    return rows


def cpu_cases(batch_tokens: int) -> list[dict]:
    """float32 activations on the CPU, in the thread count torch was given: the pipeline's sum (its upper
    triangle, mirrored) against one `addmm_` per mini-batch, both against float64."""
    rows = []
    for tokens, width in ((16384, 576), (16384, 1536), (8192, 4096)):
        x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0))
        reference = x.double().T @ x.double()

        def addmm() -> torch.Tensor:
            total = torch.zeros(width, width)
            for batch in x.split(batch_tokens):
                total.addmm_(batch.T, batch)
            return total

        row = {"case": f"random {width}", "tokens": tokens, "width": width, "batch_tokens": batch_tokens,
               "threads": torch.get_num_threads()}
        for name, run in (("addmm", addmm), ("pipeline", lambda: accumulate(x, batch_tokens, "fp32"))):
            seconds, H = timed(run, torch.device("cpu"), repeat=3, warmup=True)
            row[name] = {**errors(H, reference), "s": seconds, "gflops": 2 * tokens * width ** 2 / seconds / 1e9}
        row["speedup"] = row["addmm"]["s"] / row["pipeline"]["s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-tokens", type=int, default=8 * 2048, help="tokens per calibration mini-batch")
    parser.add_argument("--model", help="real activations of this model (bfloat16) instead of random ones")
    parser.add_argument("--calibration-ids", help="safetensors with input_ids [n, seqlen] (ppl_ladder.py --export-ids)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    parser.add_argument("--sums", type=int, nargs="*", default=[],
                        help="other numbers of 128-token dots per Kahan step in the compensated mode")
    parser.add_argument("--tune", action="store_true", help="time the compensated kernel's launch configurations")
    parser.add_argument("--cpu", action="store_true", help="the float32 sum on the CPU (use --batch-tokens 2048)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.cpu:
        rows = cpu_cases(args.batch_tokens)
    elif args.tune:
        rows = tune(args.batch_tokens)
    elif args.model:
        rows = model_cases(args.model, args.calibration_ids, args.batch_tokens, args.layers, args.sums)
    else:
        rows = random_cases(args.batch_tokens, args.sums)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
