"""`quantbench report`: the leaderboard as leaderboard.md, leaderboard.json and a self-contained
leaderboard.html (inline CSS and JS, plots embedded as data URIs), plus the PNG plots under plots/."""

from __future__ import annotations

import base64
import html
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from quantbench.eval.leaderboard import Group, Leaderboard, Row, build_leaderboard
from quantbench.eval.report_plots import layer_bits_heatmap, quality_plot
from quantbench.fsutil import atomic_directory

PLOTS_DIR = "plots"


@dataclass
class Column:
    title: str
    kind: str  # "text" or "num"
    cell: callable  # Row -> (sort value, text, delta text, delta is good)
    note: callable = lambda row: ""  # Row -> hover text in the HTML


def write_report(runs_dir: str | Path, out_dir: str | Path, force: bool = False) -> Leaderboard:
    board = build_leaderboard(runs_dir)
    with atomic_directory(Path(out_dir), force, "report directory") as tmp:
        (tmp / PLOTS_DIR).mkdir()
        plots = {id(group): draw_plots(group, index, tmp / PLOTS_DIR) for index, group in enumerate(board.groups)}
        (tmp / "leaderboard.json").write_text(json.dumps(report_json(board, runs_dir), indent=2) + "\n")
        (tmp / "leaderboard.md").write_text(report_markdown(board, plots))
        (tmp / "leaderboard.html").write_text(report_html(board, plots, runs_dir))
    return board


def draw_plots(group: Group, index: int, folder: Path) -> list[Path]:
    plots = []
    models = sorted({row.model for row in group.rows if not row.baseline})
    metrics = [f"ppl:{name}" for name in group.datasets] + (["average"] if group.task_names else [])
    for model in models:
        for metric in metrics:
            name = f"group{index + 1}-{_slug(model)}-{_slug(metric.replace('ppl:', ''))}.png"
            plots.append(quality_plot(group, model, metric, folder / name))
    for row in group.rows:
        if row.mixed:
            plots.append(layer_bits_heatmap(row, folder / f"group{index + 1}-{_slug(row.run)}-layer-bits.png"))
    return [plot for plot in plots if plot is not None]


def columns(group: Group) -> list[Column]:
    cols = [
        Column("model", "text", lambda r: _text(r.model)),
        Column("run", "text", lambda r: _text(f"baseline ({r.run})" if r.baseline else r.run)),
        Column("method", "text", lambda r: _text(r.method)),
        Column("scheme", "text", lambda r: _text(r.scheme)),
        Column("bits/weight", "num", lambda r: _number(r.bits, "{:.3f}")),
        Column("size MB", "num", lambda r: _number(r.size_mb, "{:.1f}")),
        Column("compression", "num", lambda r: _number(r.compression, "{:.2f}×")),
    ]
    for dataset in group.datasets:
        cols.append(Column(f"{dataset} ppl ↓", "num",
                           lambda r, d=dataset: _metric(r.ppl.get(d), r.ppl_delta.get(d), "{:.3f}", "{:+.3f}", False)))
    for task in group.task_names:
        cols.append(Column(f"{task} ↑", "num",
                           lambda r, t=task: _metric(r.tasks.get(t), r.task_delta.get(t), "{:.2%}", "{:+.2%}", True),
                           lambda r, t=task: _stderr_note(r.task_stderr.get(t))))
    if group.task_names:
        cols.append(Column("average ↑", "num",
                           lambda r: _metric(r.average, r.average_delta, "{:.2%}", "{:+.2%}", True)))
    cols += [Column("quantize s", "num", lambda r: _number(r.quantize_s, "{:.1f}")),
             Column("device", "text", lambda r: _text(r.device))]
    return cols


def report_json(board: Leaderboard, runs_dir) -> dict:
    return {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs_dir": str(runs_dir),
        "result_files": board.sources,
        "groups": [{"description": group.describe(), "settings": group.settings_dict(),
                    "rows": [row.to_dict() for row in group.rows]} for group in board.groups],
        "skipped": [{"path": path, "reason": reason} for path, reason in board.skipped],
    }


def report_markdown(board: Leaderboard, plots: dict) -> str:
    lines = ["# quantbench leaderboard", "",
             f"{board.sources} result files; deltas are against the full-precision row of the same model; "
             "accuracies are each task's acc_norm where it has one, else acc.", ""]
    for index, group in enumerate(board.groups):
        cols = columns(group)
        lines += [f"## Group {index + 1}: {group.describe()}", "",
                  "| " + " | ".join(col.title for col in cols) + " |",
                  "|" + "|".join("---" if col.kind == "text" else "---:" for col in cols) + "|"]
        for row in group.rows:
            cells = []
            for col in cols:
                _, text, delta, _ = col.cell(row)
                cell = (f"{text} ({delta})" if delta else text).replace("|", "\\|")
                cells.append(f"**{cell}**" if row.baseline and cell else cell)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if (stderr := _largest_stderr(group)) is not None:
            lines += [f"Task scores carry a standard error of up to ±{100 * stderr:.2f} pt in this table.", ""]
        for plot in plots[id(group)]:
            lines += [f"![{plot.stem}]({PLOTS_DIR}/{plot.name})", ""]
    if board.skipped:
        lines += ["## Skipped", ""] + [f"- `{path}`: {reason}" for path, reason in board.skipped] + [""]
    return "\n".join(lines)


def report_html(board: Leaderboard, plots: dict, runs_dir) -> str:
    sections = []
    for index, group in enumerate(board.groups):
        cols = columns(group)
        head = "".join(f'<th data-kind="{col.kind}" title="sort">{html.escape(col.title)}</th>' for col in cols)
        body = "".join(_html_row(row, cols) for row in group.rows)
        figures = "".join(
            f'<figure><img alt="{html.escape(plot.stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(plot.read_bytes()).decode()}"></figure>' for plot in plots[id(group)])
        stderr = _largest_stderr(group)
        caveat = f" Task scores: standard error up to ±{100 * stderr:.2f} pt (hover a cell)." if stderr else ""
        sections.append(f"<section><h2>Group {index + 1}</h2>"
                        f"<p class=\"settings\">{html.escape(group.describe())}.{caveat}</p>"
                        f"<div class=\"scroll\"><table class=\"board\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
                        f"<div class=\"plots\">{figures}</div></section>")
    skipped = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(r)}</li>" for p, r in board.skipped)
    skipped_html = f"<section><h2>Skipped</h2><ul>{skipped}</ul></section>" if skipped else ""
    generated = time.strftime("%Y-%m-%d %H:%M")
    return HTML_PAGE.format(runs=html.escape(str(runs_dir)), sources=board.sources, generated=generated,
                            sections="".join(sections), skipped=skipped_html, style=STYLE, script=SCRIPT)


def _html_row(row: Row, cols: list[Column]) -> str:
    cells = []
    for col in cols:
        value, text, delta, good = col.cell(row)
        sort_value = "" if value is None else html.escape(str(value))
        delta_html = f' <span class="delta {"good" if good else "bad"}">{html.escape(delta)}</span>' if delta else ""
        note = col.note(row)
        title = f' title="{html.escape(note)}"' if note else ""
        cells.append(f'<td data-value="{sort_value}"{title}>{html.escape(text)}{delta_html}</td>')
    return f'<tr class="{"baseline" if row.baseline else "run"}">{"".join(cells)}</tr>'


def _text(value: str) -> tuple:
    return value, value, "", True


def _number(value: float | None, fmt: str) -> tuple:
    return value, "" if value is None else fmt.format(value), "", True


def _metric(value: float | None, delta: float | None, fmt: str, delta_fmt: str, higher_is_better: bool) -> tuple:
    if value is None:
        return None, "", "", True
    if delta is None:
        return value, fmt.format(value), "", True
    good = delta >= 0 if higher_is_better else delta <= 0
    return value, fmt.format(value), delta_fmt.format(delta).replace("%", " pt"), good


def _stderr_note(stderr: float | None) -> str:
    return "" if stderr is None else f"standard error ±{100 * stderr:.2f} pt"


def _largest_stderr(group: Group) -> float | None:
    errors = [e for row in group.rows for e in row.task_stderr.values() if e is not None]
    return max(errors) if errors else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 2px}p.meta,p.settings{color:#57606a;margin:2px 0 10px}
.scroll{overflow-x:auto}table.board{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
.board th,.board td{border-bottom:1px solid #d8dee4;padding:5px 9px;text-align:right;white-space:nowrap}
.board th:nth-child(-n+4),.board td:nth-child(-n+4),.board th:last-child,.board td:last-child{text-align:left}
.board td:nth-child(2),.board td:nth-child(4){white-space:normal;min-width:9em;max-width:17em}
.board th{background:#f3f5f7;cursor:pointer;user-select:none;position:sticky;top:0}
.board th:hover{background:#e6eaef}.board th.asc::after{content:" ▲"}.board th.desc::after{content:" ▼"}
.board tr.baseline td{background:#fff6d6;font-weight:600}.board tr.run:hover td{background:#f6f8fa}
.delta{font-size:11px;font-weight:400;margin-left:3px}.delta.good{color:#1a7f37}.delta.bad{color:#cf222e}
.plots{display:flex;flex-wrap:wrap;gap:12px;margin-top:14px}.plots figure{margin:0}
.plots img{max-width:100%;border:1px solid #d8dee4}
"""

# Sorting keeps full-precision rows on top, so deltas always read against a visible baseline.
SCRIPT = """
document.querySelectorAll("table.board").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = !th.classList.contains("asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("asc", "desc"); });
      th.classList.add(ascending ? "asc" : "desc");
      var numeric = th.dataset.kind === "num";
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var raw = row.cells[column].dataset.value;
        if (!numeric) return raw;
        return raw === "" ? NaN : parseFloat(raw);
      }
      rows.sort(function (a, b) {
        var pinned = (b.classList.contains("baseline") ? 1 : 0) - (a.classList.contains("baseline") ? 1 : 0);
        if (pinned) return pinned;
        var x = key(a), y = key(b);
        if (numeric) {
          if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
          return ascending ? x - y : y - x;
        }
        return ascending ? x.localeCompare(y) : y.localeCompare(x);
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>quantbench leaderboard</title><style>{style}</style></head>
<body><h1>quantbench leaderboard</h1>
<p class="meta">{sources} result files under <code>{runs}</code>, generated {generated}. Click a column to sort;
the highlighted rows are full precision and the small figures are deltas against them (accuracy in points).
Task scores are acc_norm where the task has it, else acc. Only runs evaluated with identical settings share a
table.</p>
{sections}{skipped}
<script>{script}</script></body></html>
"""
