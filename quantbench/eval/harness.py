"""What `eval:` asks for (perplexity windows, lm-eval tasks), run on a model in memory or on a path."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from quantbench.calibration.sources import load_eval_text
from quantbench.eval.lm_eval_bridge import run_tasks
from quantbench.eval.perplexity import perplexity_of_ids, tokenize_eval_text
from quantbench.recipe import EvalSection


def tokenize_eval_sets(tokenizer, datasets: list[str]) -> dict[str, tuple[torch.Tensor, str]]:
    eval_ids = {}
    for dataset in datasets:
        text, fingerprint = load_eval_text(dataset)
        eval_ids[dataset] = (tokenize_eval_text(tokenizer, text), fingerprint)
    return eval_ids


def evaluate_perplexity(model: nn.Module, eval_ids: dict, settings: EvalSection, device: torch.device,
                        progress: bool = False) -> dict:
    with on_device(model, device):
        results = {}
        for dataset, (ids, fingerprint) in eval_ids.items():
            ppl = perplexity_of_ids(model, ids, settings.seqlen, settings.max_windows, settings.batch_size,
                                    progress, dataset)
            ppl.text_fingerprint = fingerprint
            results[dataset] = ppl.to_dict()
        return results


def evaluate_tasks(model: nn.Module, tokenizer, settings: EvalSection, device: torch.device | None,
                   progress: bool = False) -> dict:
    """lm-eval tasks on `model`, moved to `device` for the duration (None: a model already placed)."""
    lm_eval = settings.lm_eval
    with on_device(model, device):
        return run_tasks(model, tokenizer, settings.task_requests(), lm_eval.batch_size, lm_eval.include_path,
                         seed=lm_eval.seed, progress=progress)


@contextmanager
def on_device(model: nn.Module, device: torch.device | None):
    if device is None:
        yield model
        return
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def evaluate_target(target: str, settings: EvalSection, device: torch.device, dtype: torch.dtype | None,
                    progress: bool = False, kernels: bool = False) -> dict:
    """Evaluate a hub id, a model folder, a quantbench checkpoint or a run directory.

    The record has the shape of a run's result.json: a plain model's figures are its `baseline`, a
    checkpoint's are `quantized`, so `quantbench report` puts either on the leaderboard. With `kernels` a
    checkpoint runs as it is served: its packed layers through the packed-weight kernels
    (`load_quantized(kernels=True)`), never dense, so a checkpoint whose dense model would not fit the
    device is evaluated on it.
    """
    from quantbench.export.checkpoint import checkpoint_skeleton, read_checkpoint, tie_as_stored
    from quantbench.model_io import load_target, model_linears
    from quantbench.results import LayerSize, environment, parameter_count, summarize_layers

    started = time.perf_counter()
    loaded = load_target(target, device, dtype, kernels)
    model, tokenizer, path = loaded.model, loaded.tokenizer, loaded.checkpoint
    quantized = path is not None
    summary = None
    if quantized:
        checkpoint = read_checkpoint(path)
        sizes = {layer.name: LayerSize(layer.scheme.name, layer.shape[0] * layer.shape[1], 8 * layer.stored_bytes)
                 for layer in checkpoint.layers.values()}
        shapes = checkpoint_skeleton(path, model.dtype)  # the parameters as stored, whatever runs them
        tie_as_stored(shapes, checkpoint.qconfig)
        rotations = {name: rotation["kind"] for name, rotation in checkpoint.qconfig.get("rotations", {}).items()}
        summary = summarize_layers(shapes, sizes, model_linears(shapes), rotations)
    timings = {}
    side = "quantized" if quantized else "baseline"
    tick = time.perf_counter()
    ppl = evaluate_perplexity(model, tokenize_eval_sets(tokenizer, settings.perplexity), settings, device, progress)
    timings["eval"] = time.perf_counter() - tick
    record = {
        "name": Path(target).name if Path(target).exists() else target,
        "model": (checkpoint.qconfig.get("base_model") if quantized else None) or target,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "parameters": parameter_count(model),
        "evaluated": str(path) if quantized else target,
        "kernels": kernels,
        "quantization": summary,
        "perplexity": {side: ppl},
    }
    if settings.tasks:
        tick = time.perf_counter()
        record["tasks"] = {side: evaluate_tasks(model, tokenizer, settings, device, progress)}
        timings["tasks"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    record.update(timings_s=timings, environment=environment(device),
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return record
