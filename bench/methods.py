"""Quantization methods side by side, over several calibration draws: perplexity mean ± spread per scheme,
and each scheme against a baseline scheme seed by seed (paired difference, t).

    python bench/methods.py --export-ids ids/ --seeds 0 1 2            # here: C4 draws and WikiText-2 ids
    python bench/methods.py --model M --ids ids/ --seeds 0 1 2 --windows 16 --device cuda \
        --schemes int4-g128-rtn awq+int4-g128-rtn int4-g128-gptq-act awq+int4-g128-gptq-act \
        --baseline int4-g128-rtn --json methods.json [--resume] [--pairs A:B ...]
    python bench/methods.py --json methods.json --report --baseline … --pairs int3-g128-autoround:int3-g128-gptq-act

Every run goes through the real pipeline (block by block) and is scored on the same WikiText-2 windows;
a scheme that reads no calibration (unscaled round-to-nearest) is measured once and its row repeated for
the other draws. Each row also keeps the seconds per pipeline stage.
The JSON is rewritten after every run, so a run cut short keeps what it measured and `--resume` does the
rest. A difference between two schemes counts only where the paired t says it is beyond the seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ppl_ladder import quantized_model

from quantbench.model_io import resolve_device
from quantbench.pipeline import StageTimer
from quantbench.quantizers.autoround import AutoRoundOptions
from quantbench.results import environment
from quantbench.scaling import ScalingOptions
from quantbench.scheme import Scheme


def export_ids(args) -> None:
    from quantbench.calibration import calibration_batches
    from quantbench.calibration.sources import load_eval_text
    from quantbench.eval.perplexity import tokenize_eval_text
    from quantbench.model_io import load_tokenizer

    tokenizer, out = load_tokenizer(args.model), Path(args.export_ids)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        ids = calibration_batches(tokenizer, "c4", args.n_samples, args.calibration_seqlen, seed=seed)
        save_file({"input_ids": ids.contiguous()}, str(out / f"c4-seed{seed}.safetensors"))
        print(f"seed {seed}: {tuple(ids.shape)}", flush=True)
    wiki = tokenize_eval_text(tokenizer, load_eval_text("wikitext2")[0])
    save_file({"input_ids": wiki.contiguous()}, str(out / "wikitext2.safetensors"))


def report(args) -> None:
    rows = json.loads(Path(args.json).read_text())["runs"]
    print_table(summarize(rows, args.baseline), args.baseline)
    if args.pairs:
        print_pairs(rows, args.pairs)


def run(args) -> None:
    from quantbench.eval.perplexity import perplexity_of_ids
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    ids_dir = Path(args.ids)
    wiki = load_file(str(ids_dir / "wikitext2.safetensors"))["input_ids"]
    path = Path(args.json) if args.json else None
    rows = json.loads(path.read_text())["runs"] if args.resume and path and path.exists() else []
    done = {(row["seed"], row["scheme"]) for row in rows}
    bf16 = {"auto": None, "on": True, "off": False}[args.bf16]
    scaling = ScalingOptions(grid=args.grid, search_tokens=args.search_tokens, bf16=bf16)
    autoround = AutoRoundOptions(bf16=bf16)
    for seed in args.seeds:
        calibration = load_file(str(ids_dir / f"c4-seed{seed}.safetensors"))["input_ids"]
        for name in ["full precision", *args.schemes]:
            if (seed, name) in done or (name == "full precision" and any(r["scheme"] == name for r in rows)):
                continue
            earlier = next((r for r in rows if r["scheme"] == name and "same_as_seed" not in r), None)
            if earlier and reads_no_calibration(name):  # the same weights for every draw: measured once
                rows.append({**earlier, "seed": seed, "same_as_seed": earlier["seed"]})
                save(path, rows, args.baseline)
                continue
            timer = StageTimer(device)
            model, quantized, bits, seconds = quantized_model(args.model, dtype, name, calibration, device,
                                                              scaling=scaling, autoround=autoround, timer=timer)
            if args.save_checkpoints and name != "full precision":
                from quantbench import save_quantized
                from quantbench.model_io import load_tokenizer

                save_quantized(model, load_tokenizer(args.model), quantized,
                               Path(args.save_checkpoints) / f"{name.replace('+', '_')}-seed{seed}", force=True)
            ppl = perplexity_of_ids(model.to(device), wiki, args.seqlen, args.windows, batch_size=4).ppl
            rows.append({"seed": seed, "scheme": name, "bits_per_weight": bits and round(bits, 3),
                         "wikitext2_ppl": round(ppl, 3), "quantize_s": round(seconds, 1),
                         "stages_s": {stage: round(t, 1) for stage, t in timer.seconds.items()}})
            print(json.dumps(rows[-1]), flush=True)
            save(path, rows, args.baseline)
    print(f"\n{args.model} ({args.dtype}) on {environment(device)['device_name']}; calibration "
          f"{tuple(calibration.shape)} C4 tokens per seed, seeds {args.seeds}; WikiText-2 first {args.windows} "
          f"windows of {args.seqlen}\n")
    print_table(summarize(rows, args.baseline), args.baseline)
    if args.pairs:
        print_pairs(rows, args.pairs)


def save(path: Path | None, rows: list[dict], baseline: str | None) -> None:
    if path:
        path.write_text(json.dumps({"runs": rows, "summary": summarize(rows, baseline)}, indent=2))


def reads_no_calibration(name: str) -> bool:
    """Whether a scheme's weights are the same for every calibration draw (round-to-nearest, unscaled)."""
    if name == "full precision":
        return True
    scheme = Scheme.parse(name)
    return scheme.solver == "rtn" and scheme.scaling == "none" and scheme.activations is None


def by_scheme(rows: list[dict]) -> dict[str, dict[int, dict]]:
    grouped: dict[str, dict[int, dict]] = {}
    for row in rows:
        grouped.setdefault(row["scheme"], {})[row["seed"]] = row
    return grouped


def paired(first: dict[int, dict], second: dict[int, dict]) -> dict | None:
    """first minus second, seed by seed: mean, spread, t, and how many seeds the first is lower on."""
    seeds = sorted(set(first) & set(second))
    diffs = [first[s]["wikitext2_ppl"] - second[s]["wikitext2_ppl"] for s in seeds]
    if len(diffs) < 2:
        return None
    spread = statistics.stdev(diffs)
    return {"n": len(diffs), "mean": statistics.mean(diffs), "std": spread,
            "t": statistics.mean(diffs) / (spread / math.sqrt(len(diffs))) if spread else math.inf,
            "lower": sum(d < 0 for d in diffs)}


def summarize(rows: list[dict], baseline: str | None) -> list[dict]:
    grouped, summary = by_scheme(rows), []
    for name, runs in grouped.items():
        values = [run["wikitext2_ppl"] for run in runs.values()]
        entry = {"scheme": name, "bits_per_weight": next(iter(runs.values()))["bits_per_weight"], "n": len(values),
                 "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                 "quantize_s": statistics.mean(run["quantize_s"] for run in runs.values())}
        if baseline in grouped and name not in (baseline, "full precision"):
            if comparison := paired(runs, grouped[baseline]):
                entry["paired"] = comparison
        summary.append(entry)
    return summary


def print_pairs(rows: list[dict], pairs: list[str]) -> None:
    """`A:B` pairs, each A minus B seed by seed."""
    grouped = by_scheme(rows)
    print("\n| scheme | minus | seeds | difference, paired | t | lower on |\n|---|---|---:|---:|---:|---:|")
    for pair in pairs:
        first, second = pair.split(":")
        comparison = paired(grouped.get(first, {}), grouped.get(second, {}))
        if comparison:
            print(f"| {first} | {second} | {comparison['n']} | {comparison['mean']:+.2f} ± {comparison['std']:.2f} | "
                  f"{comparison['t']:.1f} | {comparison['lower']}/{comparison['n']} |")
        else:
            print(f"| {first} | {second} | <2 | | | |")


def print_table(summary: list[dict], baseline: str | None) -> None:
    print(f"| scheme | bits/weight | seeds | WikiText-2 ppl | minus {baseline or 'a baseline'}, paired | t | quantize s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for e in summary:
        bits = f"{e['bits_per_weight']:.3f}" if e["bits_per_weight"] else "—"
        paired = e.get("paired")
        versus = f"{paired['mean']:+.2f} ± {paired['std']:.2f} ({paired['lower']}/{paired['n']} lower)" if paired else ""
        t = f"{paired['t']:.1f}" if paired else ""
        print(f"| {e['scheme']} | {bits} | {e['n']} | {e['mean']:.2f} ± {e['std']:.2f} | {versus} | {t} | "
              f"{e['quantize_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--export-ids", help="write c4-seed<S>.safetensors and wikitext2.safetensors here and stop")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--calibration-seqlen", type=int, default=2048)
    parser.add_argument("--ids", help="the folder --export-ids wrote")
    parser.add_argument("--schemes", nargs="+", default=["int4-g128-rtn", "awq+int4-g128-rtn"])
    parser.add_argument("--baseline", help="the scheme every other is compared with, seed by seed")
    parser.add_argument("--pairs", nargs="*", default=[], help="also A:B pairs, A minus B seed by seed")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--grid", type=int, default=20, help="AWQ's α grid")
    parser.add_argument("--search-tokens", type=int, default=65536, help="calibration tokens AWQ's search runs on")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="AWQ's search and AutoRound's steps under bfloat16 autocast (auto: on a GPU)")
    parser.add_argument("--json")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", action="store_true", help="print the tables of --json and measure nothing")
    parser.add_argument("--save-checkpoints", help="write each quantized model here as a native checkpoint "
                        "(<scheme>-seed<S>/; bench/checkpoint_parts.py moves them through small-file channels)")
    args = parser.parse_args()
    export_ids(args) if args.export_ids else report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
