"""Zero-shot / few-shot benchmarks through lm-evaluation-harness on a model already in memory.

The quantized model is handed to lm-eval's `HFLM` as a live `PreTrainedModel`, so what is scored is exactly
what `quantbench` built (simulated activation quantization hooks included), with no reload.

Task names are lm-eval's. When an include path holds a task named `<name>_local` (the offline copies built
by `../shared/tools/materialize_assets.py`), that one runs in place of the stock task, which cannot build
offline; the result still carries the requested name and records which task ran.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from quantbench.distributed import current as current_ranks
from quantbench.distributed import spread
from quantbench.errors import QuantbenchError
from quantbench.recipe import ZERO_SHOT_SUITE  # noqa: F401  (the seven zero-shot tasks papers report)

log = logging.getLogger(__name__)
LOCAL_SUFFIX = "_local"
# the headline metric of a task: length-normalised accuracy where the task has it, else accuracy
SCORE_METRICS = ("acc_norm", "acc")


@dataclass(frozen=True)
class TaskRequest:
    name: str
    num_fewshot: int | None = None
    limit: int | None = None


def run_tasks(model: nn.Module, tokenizer, requests: list[TaskRequest], batch_size: int = 16,
              include_path: list[str] | tuple[str, ...] = (), bootstrap_iters: int = 1000,
              seed: int = 1234, progress: bool = True, per_document: bool = False) -> dict:
    """Score `model` on lm-eval tasks; returns {"tasks": {name: {...}}, "average": mean score}. With
    `per_document`, each task also keeps `documents`: its headline metric per document id, for paired
    comparisons of two models on the same documents (`paired_difference`)."""
    from lm_eval import simple_evaluate

    if not requests:
        return {"tasks": {}, "average": None}
    _quiet_lm_eval()
    manager = task_manager(tuple(_existing_dirs(include_path)), tuple(request.name for request in requests))
    resolved = {request.name: resolve_task(request.name, manager) for request in requests}
    lm = _lm_class(progress)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def score(group: list[TaskRequest]) -> dict[str, dict]:
        num_fewshot, limit = group[0].num_fewshot, group[0].limit
        task_names = [resolved[request.name] for request in group]
        try:
            with _alone():
                output = simple_evaluate(model=lm, tasks=task_names, num_fewshot=num_fewshot, limit=limit,
                                         task_manager=manager, log_samples=per_document,
                                         bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                                         torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")
        except (KeyError, ValueError, FileNotFoundError) as exc:
            raise QuantbenchError(
                f"lm-eval could not run {', '.join(task_names)}: {type(exc).__name__}: {exc}. Offline, stock tasks "
                f"cannot build (no train splits); point eval.lm_eval.include_path at local task configs "
                f"(.assets/lm_eval_tasks)") from None
        return {request.name: task_summary(output, resolved[request.name], num_fewshot, limit) for request in group}

    if current_ranks().active:  # a task per job, spread over the ranks (lm-eval runs each rank's model alone)
        by_name = spread(list(requests), cost=lambda request: float(request.limit or 10_000),
                         run=lambda request: score([request]))
        scored = {request.name: by_name[request.name] for request in requests}
    else:
        scored = {}
        for group in _by_settings(requests).values():
            scored.update(score(group))
    scores = [task["score"] for task in scored.values() if task["score"] is not None]
    return {"tasks": scored, "average": sum(scores) / len(scores) if scores else None}


def task_manager(include_path: tuple[str, ...], names: tuple[str, ...] = ()):
    """lm-eval's task index. Where every task in `names` is in the include path (itself or its `_local`
    copy), only the include path is indexed (milliseconds); else every stock task too (about 15,000 YAML
    files: 6–19 s on a 2-core machine), unless a name is refused first (`check_task_names`). Each index is
    built once per process."""
    local = _local_index(include_path, names)
    return local if local is not None else _task_index(include_path, True)


def check_task_names(include_path, names) -> None:
    """Refuse, in a second or two and without the stock index, a name that neither the include path nor any
    stock task's YAML file holds (a typo): every task, group and tag of the full index is written in one.
    Names that pass may still be refused by the full index when the tasks run."""
    _local_index(tuple(_existing_dirs(include_path)), tuple(names))


def _local_index(include_path: tuple[str, ...], names: tuple[str, ...]):
    """The include path's index where it holds every name; None where the stock index is needed; raises for a
    name that no index can hold."""
    narrow = _task_index(include_path, False) if include_path and names else None
    missing = [name for name in names if narrow is None or not _in_index(name, narrow)]
    if narrow is not None and not missing:
        return narrow
    local_names = set(narrow.all_tasks) if narrow is not None else set()
    unmentioned, written = _stock_task_scan([name for name in missing if name not in local_names
                                             and name + LOCAL_SUFFIX not in local_names])
    if unmentioned:
        raise _not_found(unmentioned[0], local_names | written)
    return None


_NAME_LINE = re.compile(r"^\s*(?:task|group|tag)\s*:\s*([\w.\-]+)", re.M)


def _stock_task_scan(names: list[str]) -> tuple[list[str], set[str]]:
    """The names (glob patterns aside) that no YAML file of lm-eval's stock tasks contains as text: no task,
    group or tag of the full index can have them, as every one is written in a YAML file. Where there are such
    names, also the names the files write on their `task:`, `group:` and `tag:` lines (for hints)."""
    left = {name for name in names if not any(c in name for c in "*?[")}
    spec = importlib.util.find_spec("lm_eval")
    written: set[str] = set()
    if not left or spec is None or spec.origin is None:
        return [], written
    for path in (Path(spec.origin).parent / "tasks").rglob("*.yaml"):
        text = path.read_text(errors="ignore")
        left = {name for name in left if name not in text}
        if not left:
            return [], set()
        written.update(_NAME_LINE.findall(text))
    return [name for name in names if name in left], written


def _not_found(name: str, available) -> QuantbenchError:
    """Refusal of an unknown task, with the available names that contain it or are spelt close to it."""
    close = sorted(task for task in available if name in task)[:8]
    close += [task for task in difflib.get_close_matches(name, available, n=8) if task not in close]
    hint = f"; similar: {', '.join(close[:8])}" if close else ""
    return QuantbenchError(f"lm-eval task {name!r} not found (include paths searched for {name + LOCAL_SUFFIX!r} "
                           f"too){hint}")


@functools.lru_cache(maxsize=8)
def _task_index(include_path: tuple[str, ...], stock_tasks: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=stock_tasks)


def _in_index(name: str, manager) -> bool:
    """Whether `name` (or its `_local` copy) is a task of this index; a group or tag is not enough, since its
    members may be stock tasks that only the full index holds."""
    available = manager.all_subtasks
    return name in available or name + LOCAL_SUFFIX in available


def _lm_class(progress: bool):
    from lm_eval.models.huggingface import HFLM

    if progress:
        return HFLM

    class QuietHFLM(HFLM):
        """HFLM without its per-request progress bars (`--quiet` runs write logs, not terminals)."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def resolve_task(name: str, manager) -> str:
    available = set(manager.all_tasks)
    if not name.endswith(LOCAL_SUFFIX) and name + LOCAL_SUFFIX in available:
        return name + LOCAL_SUFFIX
    if name in available:
        return name
    raise _not_found(name, available)


def task_summary(output: dict, task: str, num_fewshot: int | None, limit: int | None) -> dict:
    raw = output["results"][task]
    metrics, stderr = {}, {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, _filter = key.split(",", 1)
        if metric.endswith("_stderr"):
            stderr[metric.removesuffix("_stderr")] = _finite(value)
        else:
            metrics[metric] = _finite(value)
    score_metric = next((m for m in SCORE_METRICS if metrics.get(m) is not None), None)
    samples = output.get("n-samples", {}).get(task, {})
    config = output.get("configs", {}).get(task, {})
    summary = {
        "lm_eval_task": task,
        "num_fewshot": config.get("num_fewshot", num_fewshot),
        "limit": limit,
        "samples": samples.get("effective"),
        "metrics": metrics,
        "stderr": stderr,
        "score_metric": score_metric,
        "score": metrics[score_metric] if score_metric else None,
    }
    if "samples" in output and score_metric:
        summary["documents"] = {int(doc["doc_id"]): float(doc[score_metric]) for doc in output["samples"][task]}
    return summary


def paired_difference(first: dict, second: dict) -> dict:
    """first − second on the documents both scored (task summaries with `documents`): the mean difference of
    the headline metric and its standard error over documents, which is far below either score's own standard
    error when the two models agree on most documents."""
    shared = sorted(set(first["documents"]) & set(second["documents"]))
    if len(shared) < 2:
        raise QuantbenchError("a paired comparison needs at least two documents scored by both models")
    diffs = [first["documents"][d] - second["documents"][d] for d in shared]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return {"documents": len(diffs), "difference": mean, "stderr": math.sqrt(variance / len(diffs)),
            "disagreements": sum(d != 0 for d in diffs)}


@contextlib.contextmanager
def _alone():
    """lm-eval returns results only where LOCAL_RANK is 0 (it takes torchrun ranks for tensor-parallel
    copies of one evaluation); each rank here evaluates its own tasks with its own model."""
    local_rank = os.environ.pop("LOCAL_RANK", None)
    try:
        yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def _by_settings(requests: list[TaskRequest]) -> dict[tuple, list[TaskRequest]]:
    groups: dict[tuple, list[TaskRequest]] = {}
    for request in requests:
        groups.setdefault((request.num_fewshot, request.limit), []).append(request)
    return groups


def _existing_dirs(paths) -> list[str]:
    existing = []
    for path in paths:
        if Path(path).is_dir():
            existing.append(str(Path(path).resolve()))
        else:
            log.warning("lm-eval include path %s does not exist; stock tasks only", path)
    return existing


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _quiet_lm_eval() -> None:
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
