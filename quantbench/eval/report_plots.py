"""The leaderboard's PNG plots: bits/weight against quality with each method's Pareto frontier, and a
per-layer bits heatmap for mixed-precision runs."""

from __future__ import annotations

from pathlib import Path

from quantbench.eval.leaderboard import Group, Row, block_layer_grid

MARKERS = "osD^vP*X<>h"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both fewer bits and better quality, in order of bits."""
    front, best = [], None
    for bits, quality in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if best is None or (quality < best if lower_is_better else quality > best):
            front.append((bits, quality))
            best = quality
    return front


def quality_plot(group: Group, model: str, metric: str, path: Path) -> Path | None:
    """Bits/weight against `metric` ("ppl:<dataset>" or "average") for one model's rows of a group."""
    rows = [row for row in group.rows if row.model == model]
    quantized = [row for row in rows if not row.baseline and row.bits is not None and _value(row, metric) is not None]
    if not quantized:
        return None
    plt = _pyplot()
    lower_is_better = metric.startswith("ppl:")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    methods = sorted({row.method for row in quantized})
    for index, method in enumerate(methods):
        members = [row for row in quantized if row.method == method]
        points = [(row.bits, _value(row, metric)) for row in members]
        color = f"C{index}"
        ax.scatter(*zip(*points), marker=MARKERS[index % len(MARKERS)], s=46, color=color, label=method, zorder=3)
        front = pareto_front(points, lower_is_better)
        if len(front) > 1:
            ax.plot(*zip(*front), color=color, linewidth=1.2, alpha=0.8, drawstyle="steps-post", zorder=2)
    for row, above in _label_sides(quantized, metric, lower_is_better):
        ax.annotate(row.run, (row.bits, _value(row, metric)), textcoords="offset points",
                    xytext=(5, 4 if above else -11), fontsize=7, color="0.25")
    for row in rows:
        if row.baseline and _value(row, metric) is not None:
            ax.axhline(_value(row, metric), color="0.4", linestyle="--", linewidth=1,
                       label=f"{row.scheme or 'full precision'} baseline")
    label = f"{metric.split(':', 1)[1]} perplexity" if lower_is_better else "average task score"
    if lower_is_better:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.invert_yaxis()
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.margins(x=0.1, y=0.08)
    ax.set_xlabel("bits per weight (scales counted)")
    ax.set_ylabel(label + (" (log, better up)" if lower_is_better else " (better up)"))
    ax.set_title(f"{model}: bits per weight vs {label}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def layer_bits_heatmap(row: Row, path: Path) -> Path | None:
    blocks, kinds, cells = block_layer_grid(row.layer_bits)
    if not cells:
        return None
    import numpy as np

    plt = _pyplot()
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for (block, kind), bits in cells.items():
        grid[kinds.index(kind), blocks.index(block)] = bits
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(blocks) + 2.5), 0.38 * len(kinds) + 1.6), dpi=110)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("decoder block")
    ax.set_title(f"{row.run}: bits per weight of each layer", fontsize=10)
    fig.colorbar(image, ax=ax, label="bits/weight", fraction=0.03, pad=0.01)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _label_sides(rows: list[Row], metric: str, lower_is_better: bool) -> list[tuple[Row, bool]]:
    """Each point's label goes above it when it sits higher on the plot than its nearest neighbour in bits,
    below otherwise, so that two close points label away from each other."""
    ordered = sorted(rows, key=lambda row: row.bits)
    height = [(-1 if lower_is_better else 1) * _value(row, metric) for row in ordered]
    sides = []
    for index, row in enumerate(ordered):
        neighbours = [j for j in (index - 1, index + 1) if 0 <= j < len(ordered)]
        nearest = min(neighbours, key=lambda j: abs(ordered[j].bits - row.bits), default=None)
        sides.append((row, nearest is None or height[index] >= height[nearest]))
    return sides


def _value(row: Row, metric: str) -> float | None:
    if metric == "average":
        return row.average
    return row.ppl.get(metric.split(":", 1)[1])
