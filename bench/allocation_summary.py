"""Sum up bench/allocation_search.py runs over calibration seeds: per budget and eval set, the searched mix
against the best uniform scheme, as mean and spread (min–max) over the seeds, and the share of the gap to full
precision that the search closes.

    python bench/allocation_summary.py runs/bench-allocation-search/seed* --out runs/bench-allocation-search

Two uniform references per budget B: the best uniform candidate of size ≤ B, and the stricter "equal or
larger": the best among every candidate up to the first size at or above B (a uniform scheme slightly larger
than the budget counts against the mix). A win is claimed only when the ranges over seeds do not overlap.
Writes allocation_summary.json and allocation_summary_<set>.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "n": len(values)}


def uniform_stats(reports: list[dict], name: str) -> dict[str, dict]:
    """Scheme → {bits, ppl: spread over the seeds that ran it} on eval set `name`."""
    runs: dict[str, dict] = {}
    for report in reports:
        for row in report.get("uniform", []):
            entry = runs.setdefault(row["scheme"], {"bits": row["bits_per_weight"], "ppl": []})
            entry["ppl"].append(row["ppl"][name])
    return {scheme: {"bits": e["bits"], "ppl": spread(e["ppl"])} for scheme, e in runs.items()}


def best_uniform(uniform: dict[str, dict], limit: float) -> tuple[str, dict] | None:
    within = [(u["ppl"]["mean"], scheme) for scheme, u in uniform.items() if u["bits"] <= limit + 1e-9]
    if not within:
        return None
    scheme = min(within)[1]
    return scheme, uniform[scheme]


def summarise(reports: list[dict]) -> dict:
    sets = list(reports[0]["full_precision"])
    summary: dict = {"seeds": [r.get("seed") for r in reports], "model": reports[0]["model"],
                     "device": reports[0]["device"], "calibration": reports[0]["calibration"],
                     "full_precision": reports[0]["full_precision"], "budgets": []}
    budgets = sorted({row["budget"] for r in reports for row in r.get("searched", [])})
    solvers = sorted({(row["solver"], row["metric"]) for r in reports for row in r.get("searched", [])})
    for budget in budgets:
        entry: dict = {"budget": budget, "sets": {}}
        for name in sets:
            base = reports[0]["full_precision"][name]
            uniform = uniform_stats(reports, name)
            sizes = sorted({u["bits"] for u in uniform.values()})
            larger = [b for b in sizes if b >= budget - 1e-9]
            references = {"uniform_at_most_budget": best_uniform(uniform, budget),
                          "uniform_equal_or_larger": best_uniform(uniform, larger[0] if larger else sizes[-1])}
            row: dict = {"full_precision": base}
            for key, found in references.items():
                if found:
                    row[key] = {"scheme": found[0], "bits": found[1]["bits"], "ppl": found[1]["ppl"]}
            for solver, metric in solvers:
                ppls = [s["ppl"][name] for r in reports for s in r.get("searched", [])
                        if s["budget"] == budget and s["solver"] == solver and s["metric"] == metric]
                bits = [s["bits_per_weight"] for r in reports for s in r.get("searched", [])
                        if s["budget"] == budget and s["solver"] == solver and s["metric"] == metric]
                if not ppls:
                    continue
                result = {"bits": round(max(bits), 4), "ppl": spread(ppls)}
                for key in references:
                    if key in row:
                        ref = row[key]["ppl"]
                        result[f"gap_closed_vs_{key}"] = round(
                            1 - (result["ppl"]["mean"] - base) / (ref["mean"] - base), 3)
                        result[f"beyond_spread_vs_{key}"] = result["ppl"]["max"] < ref["min"]
                        result[f"not_worse_vs_{key}"] = result["ppl"]["min"] <= ref["max"]
                row[f"{solver} ({metric})"] = result
            entry["sets"][name] = row
        summary["budgets"].append(entry)
    if any("spearman" in r for r in reports):
        kinds = {kind for r in reports for kind in r.get("spearman", {})}
        summary["spearman"] = {
            kind: {metric: spread([r["spearman"][kind][metric] for r in reports if metric in r.get("spearman", {})
                                   .get(kind, {})])
                   for metric in {m for r in reports for m in r.get("spearman", {}).get(kind, {})}}
            for kind in kinds}
    return summary


def plot(summary: dict, reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, base in summary["full_precision"].items():
        uniform = uniform_stats(reports, name)
        fig, ax = plt.subplots(figsize=(8.5, 5.5))
        for scheme, u in uniform.items():
            p = u["ppl"]
            ax.errorbar(u["bits"], p["mean"], yerr=[[p["mean"] - p["min"]], [p["max"] - p["mean"]]], fmt="s",
                        color="0.45", ms=5, capsize=2)
            ax.annotate(scheme, (u["bits"], p["mean"]), fontsize=6, xytext=(4, 3), textcoords="offset points",
                        color="0.35")
        labels = [k for b in summary["budgets"] for k in b["sets"][name] if "(" in k]
        for label, marker in zip(dict.fromkeys(labels), "o^vDP*X"):
            points = [(b["sets"][name][label]["bits"], b["sets"][name][label]["ppl"]) for b in summary["budgets"]
                      if label in b["sets"][name]]
            ax.errorbar([x for x, _ in points], [p["mean"] for _, p in points],
                        yerr=[[p["mean"] - p["min"] for _, p in points], [p["max"] - p["mean"] for _, p in points]],
                        fmt=marker + "-", ms=5, capsize=3, label=label)
        ax.axhline(base, color="k", lw=0.8, ls=":", label=f"full precision ({base:.2f})")
        ax.set(xlabel="bits per weight (as stored)", ylabel=f"perplexity ({name})", yscale="log",
               title=f"{Path(summary['model']).name}, mean and range over seeds {summary['seeds']}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5)
        fig.tight_layout()
        fig.savefig(out / f"allocation_summary_{name}.png", dpi=130)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="folders holding allocation_search.json, one per seed")
    parser.add_argument("--out", default="runs/bench-allocation-search")
    args = parser.parse_args()
    reports = [json.loads((Path(run) / "allocation_search.json").read_text()) for run in args.runs]
    summary = summarise(reports)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocation_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, reports, out)
    for entry in summary["budgets"]:
        for name, row in entry["sets"].items():
            ref = row.get("uniform_equal_or_larger", {})
            for label, result in row.items():
                if "(" in label:
                    print(f"{entry['budget']:5} {name:16} {label:32} {result['bits']:.3f} bits "
                          f"ppl {result['ppl']['mean']:8.2f} [{result['ppl']['min']:.2f}, {result['ppl']['max']:.2f}]"
                          f"  vs {ref.get('scheme')} {ref.get('ppl', {}).get('mean')}: gap closed "
                          f"{result.get('gap_closed_vs_uniform_equal_or_larger')}")
    print(json.dumps(summary.get("spearman", {})))
    print(f"wrote {out / 'allocation_summary.json'}")


if __name__ == "__main__":
    main()
