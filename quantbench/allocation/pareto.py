"""The Pareto frontier of predicted cost against size: one allocation per budget, the uniform schemes
beside it, written as JSON and drawn as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from quantbench.allocation.ilp import Allocation
from quantbench.allocation.table import SensitivityTable
from quantbench.errors import QuantbenchError


def uniform_points(table: SensitivityTable, metric: str) -> list[dict]:
    """Every candidate that every layer has, applied to all layers: its size and predicted cost."""
    numel = sum(info.numel for info in table.layers.values())
    points = []
    for scheme in table.candidates:
        if all((layer, scheme) in table.errors for layer in table.layers):
            bits = sum(table.errors[(layer, scheme)].storage_bits for layer in table.layers)
            cost = sum(table.cost(layer, scheme, metric) for layer in table.layers)
            points.append({"scheme": scheme, "bits_per_weight": bits / numel, "objective": cost})
    return sorted(points, key=lambda p: p["bits_per_weight"])


def frontier(budgets: list[float], results: list[Allocation | QuantbenchError]) -> list[dict]:
    points = []
    for budget, result in zip(budgets, results):
        if isinstance(result, QuantbenchError):
            points.append({"budget": budget, "feasible": False, "error": str(result)})
        else:
            points.append({**result.summary(), "budget": budget, "feasible": True,
                           "schemes": result.scheme_counts()})
    return points


def write_frontier(directory: str | Path, metric: str, points: list[dict], uniform: list[dict],
                   evaluated: list[dict] | None = None) -> tuple[Path, Path]:
    """`pareto.json` and `pareto.png` (predicted cost vs bits; with a perplexity panel when points were scored)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / "pareto.json", directory / "pareto.png"
    json_path.write_text(json.dumps({"metric": metric, "frontier": points, "uniform": uniform,
                                     "evaluated": evaluated or []}, indent=1) + "\n")
    plot_frontier(png_path, metric, points, uniform, evaluated or [])
    return json_path, png_path


def plot_frontier(path: Path, metric: str, points: list[dict], uniform: list[dict], evaluated: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if evaluated else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    feasible = [p for p in points if p["feasible"]]
    ax.plot([p["bits_per_weight"] for p in feasible], [max(p["objective"], 1e-30) for p in feasible],
            "o-", ms=3, label="ILP allocation")
    for p in uniform:
        ax.plot(p["bits_per_weight"], max(p["objective"], 1e-30), "s", ms=6, alpha=0.8)
        ax.annotate(p["scheme"], (p["bits_per_weight"], max(p["objective"], 1e-30)), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="bits per weight (scales counted)", ylabel=f"predicted cost ({metric})", yscale="log",
           title="Pareto frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evaluated:
        ax = axes[0][1]
        for label in sorted({e["label"] for e in evaluated}):
            rows = sorted((e for e in evaluated if e["label"] == label), key=lambda e: e["bits_per_weight"])
            ax.plot([e["bits_per_weight"] for e in rows], [e["ppl"] for e in rows], "o-", label=label)
        ax.set(xlabel="bits per weight (scales counted)", ylabel="perplexity", yscale="log",
               title="measured")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_measured(path: Path, full_precision: float, uniform: list[dict], series: dict[str, list[tuple]],
                  title: str) -> None:
    """Measured perplexity against size on one pair of axes: every uniform scheme (labelled squares) and
    each allocator's mixes (`series`: label → [(bits per weight, ppl)]), full precision as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for point in uniform:
        ax.plot(point["bits_per_weight"], point["ppl"], "s", color="0.45", ms=6)
        ax.annotate(point["scheme"], (point["bits_per_weight"], point["ppl"]), fontsize=6.5, xytext=(4, 3),
                    textcoords="offset points", color="0.3")
    for (label, rows), marker in zip(series.items(), "o^vDP*"):
        rows = sorted(rows)
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker + "-", ms=5, label=label)
    ax.axhline(full_precision, color="k", lw=0.8, ls=":", label=f"full precision ({full_precision:.2f})")
    ax.set(xlabel="bits per weight (as stored: scales, zero points, padding)", ylabel="perplexity", yscale="log",
           title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
