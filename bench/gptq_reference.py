"""quantbench's GPTQ against the reference implementation (IST-DASLab/gptq: its `gptq.py` and `quant.py`,
imported from a fetched copy, never vendored) on the same calibration windows, model, device and evaluation.

Step 1, where `datasets` and the C4 shard are (here): draw 128 × 512 windows per seed with the reference's own
`datautils.get_c4` (its sampling code, reading the local C4 shard), and the WikiText-2 test ids:

    python bench/gptq_reference.py draw --reference /path/to/gptq --model .assets/models/smollm2-135m-dithered \
        --seeds 0 1 2 3 4 --out ids/

Step 2, on the device (both implementations, every seed and scheme; `--device cpu` also works):

    python bench/gptq_reference.py run --reference /path/to/gptq --model MODEL --ids ids/ --json parity.json [--resume]

Runs are independent: `run --seeds S --json S.json` processes on different machines (or one after another) can
be merged by `summary S.json … --json all.json`, which prints the table. Do not run several on one GPU: the
reference is bound by Python's kernel launches, and processes time-slicing one GPU slowed it 6× (three at
once) or stalled it (ten).

Step 3, `objectives` (CPU, or `--device cuda`): both implementations on the same layer problems, compared by
the GPTQ objective (see `objectives` below).

Two ablations isolate what differs (`run --implementations …`): `reference-float16-scales` runs the reference
on quantbench's grids (scales rounded to float16 as checkpoints store them), `quantbench-float32-scales` runs
quantbench's solve with unrounded scales.

Both run block by block through quantbench's block driver with true-sequential groups (q/k/v, o, gate/up,
down), damp 0.01, block size 128, asymmetric grids, and are scored by the same perplexity code on the first
16 WikiText-2 windows of 2,048 tokens. Prints mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantbench.calibration.stats import input_sharing
from quantbench.model_io import load_model
from quantbench.pipeline import drive_blocks, feed_block
from quantbench.scheme import Scheme

SCHEMES = ["int4-g128-gptq", "int4-g128-gptq-act-static", "int3-g128-gptq", "int3-g128-gptq-act-static"]


def draw(args) -> None:
    """Calibration windows drawn by the reference's get_c4, reading the local C4 shard."""
    import datasets

    sys.path.insert(0, args.reference)
    import datautils

    load = datasets.load_dataset

    from quantbench.model_io import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    shard = load("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    # the reference's sampler fails on a document of exactly seqlen tokens (randint(0, -1)): leave those out
    lengths = [len(tokenizer(text).input_ids) for text in shard["text"]]
    shard = shard.select([i for i, n in enumerate(lengths) if n != args.seqlen])

    def local_c4(*_args, **_kwargs):
        # the reference asks for its own config name and a validation shard; only the training shard is
        # local (the validation windows it also draws are not used here)
        return shard

    datasets.load_dataset = local_c4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        loader, _ = datautils.get_c4(args.n_samples, seed, args.seqlen, args.model)
        ids = torch.cat([inp for inp, _ in loader])
        save_file({"input_ids": ids.contiguous()}, str(out / f"c4-seed{seed}.safetensors"))
        print(f"seed {seed}: {tuple(ids.shape)}", flush=True)
    from quantbench.calibration.sources import load_eval_text
    from quantbench.eval.perplexity import tokenize_eval_text

    wiki = tokenize_eval_text(tokenizer, load_eval_text("wikitext2")[0])
    save_file({"input_ids": wiki.contiguous()}, str(out / "wikitext2.safetensors"))


class ReferenceStage:
    """A block stage that quantizes with the reference's GPTQ class: per true-sequential group, its
    add_batch hooks see the group's inputs, then fasterquant writes the quantized weights in place."""

    def __init__(self, scheme: Scheme) -> None:
        from gptq import GPTQ
        from quant import Quantizer

        self.GPTQ, self.Quantizer, self.scheme = GPTQ, Quantizer, scheme

    def run_block(self, ctx) -> None:
        groups = input_sharing(ctx.block, ctx.linears, lambda: feed_block(ctx.block, ctx.inputs, batches=1))
        for group in groups:
            solvers = {}
            for name in group:
                solvers[name] = self.GPTQ(ctx.linears[name])
                solvers[name].quantizer = self.Quantizer()
                solvers[name].quantizer.configure(self.scheme.bits, perchannel=True, sym=False, mse=False)
            handles = [ctx.linears[name].register_forward_hook(
                lambda _m, inp, out, name=name: solvers[name].add_batch(inp[0].data, out.data)) for name in group]
            feed_block(ctx.block, ctx.inputs)
            for handle in handles:
                handle.remove()
            for name, solver in solvers.items():
                with contextlib.redirect_stdout(io.StringIO()):  # it prints its time and error per layer
                    solver.fasterquant(blocksize=128, percdamp=self.scheme.damp, groupsize=self.scheme.group_size or -1,
                                       actorder=self.scheme.act_order, static_groups=self.scheme.static_groups)
                solver.free()


IMPLEMENTATIONS = {
    "quantbench": "quantbench's GPTQ",
    "reference": "the reference's GPTQ",
    "quantbench-float32-scales": "quantbench's GPTQ with unrounded float32 scales (eager solve; an ablation, "
                                 "not a storable checkpoint)",
    "reference-float16-scales": "the reference's GPTQ on quantbench's grids (scales rounded to float16 as "
                                "quantbench stores them; an ablation)",
}


@contextlib.contextmanager
def ablation(implementation: str, scheme: Scheme):
    """Swap in what an ablation changes, for the duration of one run."""
    if implementation == "quantbench-float32-scales":
        from quantbench.formats import integer

        storable, store, kernel = integer._storable, integer.IntFormat.store_scales, os.environ.get(
            "QUANTBENCH_GPTQ_KERNEL")
        integer._storable = lambda scale: torch.where(scale > 0, scale, torch.ones_like(scale))
        integer.IntFormat.store_scales = lambda _self, scale: scale.float()
        os.environ["QUANTBENCH_GPTQ_KERNEL"] = "0"  # the fused kernel rounds scales itself
        try:
            yield
        finally:
            integer._storable, integer.IntFormat.store_scales = storable, store
            os.environ.pop("QUANTBENCH_GPTQ_KERNEL") if kernel is None else os.environ.update(
                QUANTBENCH_GPTQ_KERNEL=kernel)
    elif implementation == "reference-float16-scales":
        from quant import Quantizer

        from quantbench.formats import format_for

        find_params, fmt = Quantizer.find_params, format_for(scheme)

        def quantbench_grid(self, x, weight=False):
            find_params(self, x, weight)
            params = fmt.fit(x.flatten(1))
            self.scale, self.zero = params.scale.reshape(-1, 1), params.zero.reshape(-1, 1)

        Quantizer.find_params = quantbench_grid
        try:
            yield
        finally:
            Quantizer.find_params = find_params
    else:
        yield


def run(args) -> None:
    import logging

    from quantbench.eval.perplexity import perplexity_of_ids
    from quantbench.pipeline import quantize_model
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    logging.getLogger("quantbench").setLevel(logging.ERROR)
    sys.path.insert(0, args.reference)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":  # the reference synchronises CUDA unconditionally; on the CPU there is nothing to wait for
        torch.cuda.synchronize = torch.cuda.empty_cache = lambda *_args: None
    ids_dir = Path(args.ids)
    wiki = load_file(str(ids_dir / "wikitext2.safetensors"))["input_ids"]
    seeds = args.seeds or sorted(int(p.stem.removeprefix("c4-seed")) for p in ids_dir.glob("c4-seed*.safetensors"))
    rows = json.loads(Path(args.json).read_text())["runs"] if args.resume and Path(args.json).exists() else []
    # float32 activations and the CPU accumulate the Hessian in float32 whatever the mode
    hessian = args.hessian if device.type == "cuda" and args.dtype in ("bfloat16", "float16") else "fp32"
    done = {(r["seed"], r["scheme"], r["implementation"]) for r in rows
            if r.get("hessian", "fp32") == hessian or r["implementation"] == "reference"}
    for seed in seeds:
        calibration = load_file(str(ids_dir / f"c4-seed{seed}.safetensors"))["input_ids"]
        for name in args.schemes:
            scheme = Scheme.parse(name)
            for implementation in args.implementations:
                if (seed, name, implementation) in done:
                    continue
                model, _ = load_model(args.model, dtype)
                start = time.perf_counter()
                with ablation(implementation, scheme):
                    if implementation.startswith("quantbench"):
                        quantize_model(model, calibration, lambda _layer: scheme, device, progress=False,
                                       hessian=args.hessian)
                    else:
                        drive_blocks(model, calibration, device, [ReferenceStage(scheme)], progress=False)
                seconds = time.perf_counter() - start
                ppl = perplexity_of_ids(model.to(device), wiki, 2048, args.windows, batch_size=4).ppl
                rows.append({"seed": seed, "scheme": name, "implementation": implementation,
                             "hessian": hessian if implementation.startswith("quantbench") else "fp32",
                             "dtype": args.dtype, "wikitext2_ppl": round(ppl, 3), "quantize_s": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
                if args.json:  # after every run: a run cut short keeps what it measured
                    Path(args.json).write_text(json.dumps({"runs": rows, "summary": summarize(rows)}, indent=2))
    print(f"\n{args.model} ({args.dtype}) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; "
          f"{len(seeds)} calibration seeds of {tuple(calibration.shape)} C4 windows (reference get_c4); "
          f"WikiText-2 first {args.windows} windows of 2,048\n")
    print_summary(rows, args.json)


def objectives(args) -> None:
    """Both implementations on the same layer problems: the real Hessians of some of the model's layers
    (calibrated by quantbench's int4 GPTQ), each solved by quantbench's `gptq_quantize` and by the
    reference's `fasterquant`, compared by the GPTQ objective tr((W − Q)H(W − Q)ᵀ). Whole-model perplexity
    amplifies any float-rounding difference chaotically; the per-layer objective shows what the
    implementations themselves do."""
    from factor_objectives import recorded_hessians

    from quantbench.quantizers.gptq import gptq_quantize, layer_objective

    sys.path.insert(0, args.reference)
    from gptq import GPTQ
    from quant import Quantizer

    device = torch.device(args.device)
    if device.type == "cpu":  # the reference synchronises CUDA unconditionally; on the CPU there is nothing to wait for
        torch.cuda.synchronize = torch.cuda.empty_cache = lambda *_args: None
    model, _ = load_model(args.model, torch.float32)
    ids = load_file(str(Path(args.ids) / f"c4-seed{args.seed}.safetensors"))["input_ids"][: args.samples]
    solves = [(w.to(device), h.to(device)) for w, h in recorded_hessians(model, ids, set(args.blocks), device)]

    def reference(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        layer.weight.data = weight.clone()
        solver = GPTQ(layer)
        solver.H, solver.nsamples = hessian.clone(), 1
        solver.quantizer = Quantizer()
        solver.quantizer.configure(scheme.bits, perchannel=True, sym=False, mse=False)
        with contextlib.redirect_stdout(io.StringIO()):
            solver.fasterquant(blocksize=128, percdamp=scheme.damp, groupsize=scheme.group_size or -1,
                               actorder=scheme.act_order, static_groups=scheme.static_groups)
        return layer.weight.data

    rows = []
    for name in args.schemes:
        scheme = Scheme.parse(name)
        ratios, identical, agreeing = [], 0, []
        for w, h in solves:
            ours = gptq_quantize(w, h, scheme).dequantize(torch.float32)
            ratios.append(layer_objective(w, ours, h) / layer_objective(w, reference(w, h, scheme), h) - 1)
            with ablation("reference-float16-scales", scheme):
                theirs = reference(w, h, scheme)
            identical += torch.equal(theirs, ours)
            agreeing.append((theirs == ours).float().mean().item())
        rows.append({"scheme": name, "solves": len(ratios), "mean_pct": 100 * statistics.mean(ratios),
                     "median_pct": 100 * statistics.median(ratios), "min_pct": 100 * min(ratios),
                     "max_pct": 100 * max(ratios), "quantbench_higher": sum(r > 0 for r in ratios),
                     "equal": sum(r == 0 for r in ratios),
                     # the reference on quantbench's float16 grids: layers with the same weights, bit for bit,
                     # and the share of equal weights (float rounding flips a code now and then, and GPTQ's
                     # error feedback carries each flip into every later column)
                     "identical_on_quantbench_grids": identical,
                     "equal_weights_on_quantbench_grids": statistics.mean(agreeing)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def merge(args) -> None:
    rows = [row for path in args.parts for row in json.loads(Path(path).read_text())["runs"]]
    print_summary(rows, args.json)


def print_summary(rows: list[dict], json_path: str | None) -> None:
    summary = summarize(rows)
    print("| scheme | implementation | dtype | Hessian | runs | mean ppl | std | min | max |\n"
          "|---|---|---|---|---:|---:|---:|---:|---:|")
    for row in summary:
        print(f"| {row['scheme']} | {row['implementation']} | {row['dtype']} | {row['hessian']} | {row['n']} | "
              f"{row['mean']:.2f} | {row['std']:.2f} | {row['min']:.2f} | {row['max']:.2f} |")
    if json_path:
        Path(json_path).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2))


def summarize(rows: list[dict]) -> list[dict]:
    def key(row: dict) -> tuple:
        return row["scheme"], row["implementation"], row.get("dtype", "float32"), row.get("hessian", "fp32")

    keys = sorted({key(r) for r in rows}, key=lambda k: (SCHEMES.index(k[0]) if k[0] in SCHEMES else 99, *k[1:]))
    out = []
    for group in keys:
        scheme, implementation, dtype, hessian = group
        values = [r["wikitext2_ppl"] for r in rows if key(r) == group]
        out.append({"scheme": scheme, "implementation": implementation, "dtype": dtype, "hessian": hessian,
                    "n": len(values),
                    "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values), "max": max(values)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    step1 = sub.add_parser("draw")
    step2 = sub.add_parser("run")
    for step in (step1, step2):
        step.add_argument("--reference", required=True, help="folder holding the reference's gptq.py, quant.py")
        step.add_argument("--model", default=".assets/models/smollm2-135m-dithered")
    step1.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    step1.add_argument("--n-samples", type=int, default=128)
    step1.add_argument("--seqlen", type=int, default=512)
    step1.add_argument("--out", required=True)
    step2.add_argument("--ids", required=True, help="the folder `draw` wrote")
    step2.add_argument("--seeds", type=int, nargs="+", help="these seeds only (default: every seed in --ids)")
    step2.add_argument("--schemes", nargs="+", default=SCHEMES)
    step2.add_argument("--implementations", nargs="+", default=["quantbench", "reference"], choices=IMPLEMENTATIONS,
                       help="; ".join(f"{k}: {v}" for k, v in IMPLEMENTATIONS.items()))
    step2.add_argument("--hessian", default="compensated")
    step2.add_argument("--windows", type=int, default=16)
    step2.add_argument("--device", default="cuda")
    step2.add_argument("--dtype", default="float32")
    step2.add_argument("--json")
    step2.add_argument("--resume", action="store_true", help="keep the runs already in --json and do the rest")
    step3 = sub.add_parser("summary", help="merge the --json files of several runs")
    step3.add_argument("parts", nargs="+")
    step3.add_argument("--json", help="write the merged runs and summary here")
    step4 = sub.add_parser("objectives", help="both implementations on the same layer problems")
    step4.add_argument("--reference", required=True)
    step4.add_argument("--model", default=".assets/models/smollm2-135m-dithered")
    step4.add_argument("--ids", required=True, help="the folder `draw` wrote")
    step4.add_argument("--seed", type=int, default=0)
    step4.add_argument("--samples", type=int, default=32)
    step4.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 10, 20, 29])
    step4.add_argument("--schemes", nargs="+", default=SCHEMES)
    step4.add_argument("--device", default="cpu", help="cuda: quantbench solves with its fused kernel "
                       "(QUANTBENCH_GPTQ_KERNEL=0: without)")
    step4.add_argument("--json")
    args = parser.parse_args()
    {"draw": draw, "run": run, "summary": merge, "objectives": objectives}[args.step](args)


if __name__ == "__main__":
    main()
