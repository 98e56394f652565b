"""Leaderboard rows from every result.json under a folder, grouped so that only like numbers share a column.

Two figures are comparable only when they were measured the same way: same perplexity text, window length
and window count, same lm-eval task, shots and document limit. Each distinct set of such settings is one
`Group` (one table); a run whose settings differ in any of them lands in another group, never in the same
column. Full-precision rows come from runs' `baseline` sections and from `quantbench eval` of plain models;
quantized rows are compared with the baseline of the same model in the same group.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from quantbench.errors import QuantbenchError

RESULT_FILE = "result.json"
BASELINE = "full precision"
BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class Row:
    run: str
    model: str
    method: str
    scheme: str
    baseline: bool
    settings: tuple
    source: str
    bits: float | None = None
    size_mb: float | None = None
    fp16_size_mb: float | None = None
    ppl: dict[str, float] = field(default_factory=dict)
    tasks: dict[str, float] = field(default_factory=dict)
    task_stderr: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    quantize_s: float | None = None
    device: str = ""
    finished_at: str = ""
    layer_bits: dict[str, float] = field(default_factory=dict)
    ppl_delta: dict[str, float] = field(default_factory=dict)
    task_delta: dict[str, float] = field(default_factory=dict)
    average_delta: float | None = None

    @property
    def compression(self) -> float | None:
        if self.size_mb and self.fp16_size_mb:
            return self.fp16_size_mb / self.size_mb
        return None

    @property
    def mixed(self) -> bool:
        return self.method.startswith("mixed")

    def to_dict(self) -> dict:
        return {"run": self.run, "model": self.model, "method": self.method, "scheme": self.scheme,
                "baseline": self.baseline, "bits_per_weight": self.bits, "size_mb": self.size_mb,
                "compression_vs_fp16": self.compression, "ppl": self.ppl, "ppl_delta": self.ppl_delta,
                "tasks": self.tasks, "task_stderr": self.task_stderr, "task_delta": self.task_delta,
                "average": self.average, "average_delta": self.average_delta, "quantize_s": self.quantize_s,
                "device": self.device, "finished_at": self.finished_at, "source": self.source}


@dataclass
class Group:
    settings: tuple
    rows: list[Row]

    @property
    def datasets(self) -> list[str]:
        return [entry[1] for entry in self.settings if entry[0] == "ppl"]

    @property
    def task_names(self) -> list[str]:
        return [entry[1] for entry in self.settings if entry[0] == "task"]

    def describe(self) -> str:
        parts = [f"{name} ppl: {windows} windows × {seqlen} tokens"
                 for _, name, seqlen, windows, _ in (e for e in self.settings if e[0] == "ppl")]
        tasks = [e for e in self.settings if e[0] == "task"]
        for (shots, limit, samples), names in _group_tasks(tasks).items():
            docs = f"{samples} docs" if samples else "all docs"
            parts.append(f"{', '.join(names)}: {docs}, {shots}-shot")
        return "; ".join(parts) or "no evaluations"

    def settings_dict(self) -> dict:
        ppl = {name: {"seqlen": seqlen, "windows": windows, "text_fingerprint": fingerprint}
               for _, name, seqlen, windows, fingerprint in (e for e in self.settings if e[0] == "ppl")}
        tasks = {name: {"lm_eval_task": task, "num_fewshot": shots, "limit": limit, "samples": samples}
                 for _, name, task, shots, limit, samples in (e for e in self.settings if e[0] == "task")}
        return {"perplexity": ppl, "tasks": tasks}


@dataclass
class Leaderboard:
    groups: list[Group]
    skipped: list[tuple[str, str]]
    sources: int


def build_leaderboard(runs_dir: str | Path) -> Leaderboard:
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise QuantbenchError(f"{runs_dir} is not a directory; give the folder that holds run directories")
    paths = sorted(path for path in runs_dir.rglob(RESULT_FILE)
                   if not any(part.startswith(".") for part in path.relative_to(runs_dir).parts))  # staging dirs
    if not paths:
        raise QuantbenchError(f"no {RESULT_FILE} under {runs_dir}; run `quantbench run RECIPE` or "
                              "`quantbench eval MODEL --output DIR` first")
    rows, skipped = [], []
    for path in paths:
        try:
            found = rows_of_result(json.loads(path.read_text()), str(path.relative_to(runs_dir)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            skipped.append((str(path), f"unreadable result ({type(exc).__name__}: {exc})"))
            continue
        if not found:
            skipped.append((str(path), "no perplexity or task figures"))
        rows.extend(found)
    return Leaderboard(group_rows(rows), skipped, len(paths))


def rows_of_result(result: dict, source: str) -> list[Row]:
    """A run gives a quantized row and, when it evaluated the full-precision model too, a baseline row."""
    rows = []
    for side in ("baseline", "quantized"):
        ppl = (result.get("perplexity") or {}).get(side) or {}
        tasks = (result.get("tasks") or {}).get(side) or {}
        if not ppl and not tasks.get("tasks"):
            continue
        row = _row(result, side == "baseline", source, ppl, tasks)
        rows.append(row)
    return rows


def _row(result: dict, baseline: bool, source: str, ppl: dict, tasks: dict) -> Row:
    quantization = result.get("quantization") or {}
    model_bytes = quantization.get("model_bytes") or {}
    fp16_bytes = model_bytes.get("fp16") or 2 * (result.get("parameters") or 0)
    fp16_mb = fp16_bytes / 1e6 if fp16_bytes else None
    environment = result.get("environment") or {}
    device = environment.get("device", "")
    if device.startswith("cuda") and environment.get("device_name"):
        device = environment["device_name"]
    settings = tuple(sorted(("ppl", name, p["seqlen"], p["windows"], p.get("text_fingerprint", ""))
                            for name, p in ppl.items()))
    task_results = tasks.get("tasks") or {}
    settings += tuple(sorted(("task", name, t["lm_eval_task"], t["num_fewshot"], t["limit"], t["samples"])
                             for name, t in task_results.items()))
    method = BASELINE if baseline else method_of(quantization.get("schemes") or {},
                                                 rotated=bool(result.get("transforms")))
    if not baseline and result.get("kernels"):  # scored through the packed-weight kernels: a frontier of its own
        method += ", packed kernels"
    row = Row(run=result.get("name", source), model=_model_label(result.get("model", "?")), method=method,
              scheme=result.get("dtype", "") if baseline else scheme_summary(quantization.get("schemes") or {}),
              baseline=baseline, settings=settings, source=source,
              ppl={name: p["ppl"] for name, p in ppl.items()},
              tasks={name: t["score"] for name, t in task_results.items() if t.get("score") is not None},
              task_stderr={name: t["stderr"].get(t["score_metric"]) for name, t in task_results.items()
                           if t.get("score_metric")},
              average=tasks.get("average"), device=device, finished_at=result.get("finished_at", ""))
    if baseline:
        row.bits, row.size_mb, row.fp16_size_mb = 16.0, fp16_mb, fp16_mb
    else:
        row.bits = quantization.get("avg_bits_per_weight")
        row.size_mb = model_bytes["quantized"] / 1e6 if model_bytes.get("quantized") else None
        row.fp16_size_mb = fp16_mb
        row.quantize_s = (result.get("timings_s") or {}).get("quantize")
        row.layer_bits = quantization.get("layer_bits") or {}
    return row


def method_of(schemes: dict[str, int], rotated: bool = False) -> str:
    """Solver and number-format family (`GPTQ int`, `RTN MXFP4`, `PTQTP ternary`), `W+A` when activations are
    quantized too, `Hadamard …` for per-layer rotated schemes, `QuaRot …` on a rotated model; runs of
    several schemes are `mixed …`. Each method gets its own Pareto frontier."""
    from quantbench.scheme import Scheme

    methods = set()
    for name in schemes:
        try:
            scheme = Scheme.parse(name)
        except QuantbenchError:
            methods.add("?")
            continue
        family = scheme.format if scheme.format in ("int", "ternary") else scheme.format.upper()
        hadamard = "Hadamard " if scheme.transform == "hadamard" else ""
        scaling = {"awq": "AWQ ", "smoothquant": "SmoothQuant "}.get(scheme.scaling, "")
        solver = "AutoRound" if scheme.solver == "autoround" else scheme.solver.upper()
        methods.add(f"{scaling}{hadamard}{solver} {family}{' W+A' if scheme.activations else ''}")
    label = " / ".join(sorted(methods)) or "?"
    label = f"mixed {label}" if len(schemes) > 1 else label
    return f"QuaRot {label}" if rotated else label


def scheme_summary(schemes: dict[str, int]) -> str:
    if len(schemes) == 1:
        return next(iter(schemes))
    return ", ".join(f"{name} ×{count}" for name, count in Counter(schemes).most_common())


def _model_label(model: str) -> str:
    path = Path(model)
    return path.name if (model.startswith((".", "/")) or path.exists()) else model


def group_rows(rows: list[Row]) -> list[Group]:
    by_settings: dict[tuple, list[Row]] = {}
    for row in rows:
        by_settings.setdefault(row.settings, []).append(row)
    groups = [Group(settings, _dedupe_baselines(members)) for settings, members in by_settings.items()]
    for group in groups:
        _fill_deltas(group)
        group.rows.sort(key=_rank)
    groups.sort(key=lambda g: (-len(g.rows), g.describe()))
    return groups


def _dedupe_baselines(rows: list[Row]) -> list[Row]:
    """One full-precision row per model: the newest, when several runs evaluated the same baseline."""
    newest: dict[str, Row] = {}
    for row in rows:
        if row.baseline and (row.model not in newest or row.finished_at > newest[row.model].finished_at):
            newest[row.model] = row
    return [row for row in rows if not row.baseline or newest[row.model] is row]


def _fill_deltas(group: Group) -> None:
    baselines = {row.model: row for row in group.rows if row.baseline}
    for row in group.rows:
        base = baselines.get(row.model)
        if row.baseline or base is None:
            continue
        row.ppl_delta = {name: value - base.ppl[name] for name, value in row.ppl.items() if name in base.ppl}
        row.task_delta = {name: value - base.tasks[name] for name, value in row.tasks.items() if name in base.tasks}
        if row.average is not None and base.average is not None:
            row.average_delta = row.average - base.average
        if base.fp16_size_mb and row.fp16_size_mb is None:
            row.fp16_size_mb = base.fp16_size_mb


def _rank(row: Row) -> tuple:
    """Baselines first, then best first: lowest perplexity on the first dataset, else highest task average."""
    first_ppl = next(iter(sorted(row.ppl.items())), (None, None))[1]
    quality = first_ppl if first_ppl is not None else -(row.average or 0.0)
    return (not row.baseline, row.model, quality if math.isfinite(quality) else math.inf, row.run)


def _group_tasks(tasks: list[tuple]) -> dict[tuple, list[str]]:
    groups: dict[tuple, list[str]] = {}
    for _, name, _task, shots, limit, samples in tasks:
        groups.setdefault((shots, limit, samples), []).append(name)
    return groups


def block_layer_grid(layer_bits: dict[str, float]) -> tuple[list[int], list[str], dict[tuple[int, str], float]]:
    """Per-layer bits as (block indices, layer types, {(block, type): bits}); layers outside blocks are left out."""
    cells, blocks, kinds = {}, set(), []
    for name, bits in layer_bits.items():
        match = BLOCK_INDEX.search(name)
        if not match:
            continue
        kind = name.rsplit(".", 1)[-1]
        block = int(match.group(1))
        cells[(block, kind)] = bits
        blocks.add(block)
        if kind not in kinds:
            kinds.append(kind)
    return sorted(blocks), kinds, cells
