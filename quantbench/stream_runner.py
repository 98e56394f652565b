"""`run` for a model of any size: the weights stream from disk block by block, the checkpoint is written
block by block, perplexity (baseline and quantized) is computed in the same pass, and a run that dies
continues with --resume (journal.py). Host memory holds the tensors outside the blocks and one block in
flight; the device holds one block and the activations of one block.

Under torchrun every rank streams the weights itself (read through the page cache, so a machine holds one
copy of the file data however many ranks read it), forwards its share of the calibration sequences and of
the evaluation windows, and keeps its own hidden states in the journal; rank 0 writes the checkpoint parts
and the run directory."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from torch import nn

from quantbench.block_weights import DiskWeights, skeleton_model, weights_folder
from quantbench.distributed import current as current_ranks
from quantbench.distributed import from_main, local_rows
from quantbench.eval.blockwise import BlockwisePerplexity
from quantbench.eval.harness import tokenize_eval_sets
from quantbench.export.checkpoint import RUN_CHECKPOINT_DIR, CheckpointWriter, layer_rotations, model_tensors
from quantbench.fsutil import atomic_directory
from quantbench.journal import Journal
from quantbench.model_io import blocks_path, decoder_blocks, load_tokenizer, model_linears, resolve_device, resolve_dtype
from quantbench.pipeline import BlockContext, EveryBlockStage, QuantizeStage, StageTimer, drive_blocks
from quantbench.recipe import Recipe
from quantbench.results import LayerSize, summarize_layers

log = logging.getLogger(__name__)
OUTSIDE_PART = "outside"


def block_part(index: int) -> str:
    return f"block-{index:05d}"


class StreamedLayers(EveryBlockStage):
    """After the quantize stage: takes each block's quantized layers out of memory, recording their sizes
    and rotations and, with a `writer`, packing them with the block's other tensors into its checkpoint
    part. `finish` does the same for the tensors outside the blocks (and a quantized LM head)."""

    def __init__(self, quantize: QuantizeStage, writer: CheckpointWriter | None) -> None:
        self.quantize, self.writer = quantize, writer
        self.sizes: dict[str, LayerSize] = {}
        self.rotations: dict[str, dict] = {}

    def run_block(self, ctx: BlockContext) -> None:
        with ctx.timer("write"):
            state = {f"{ctx.prefix}.{key}": value for key, value in ctx.block.state_dict().items()}
            self._take(block_part(ctx.index), state, layer_rotations(ctx.block, ctx.prefix + "."), ctx.prefix + ".")

    def finish(self, model: nn.Module, device) -> None:
        inside = blocks_path(model) + "."
        state = {key: value for key, value in model.state_dict().items() if not key.startswith(inside)}
        self._take(OUTSIDE_PART, state, {}, "")

    def _take(self, part: str, state: dict, rotations: dict, prefix: str) -> None:
        names = [name for name in self.quantize.results if name.startswith(prefix)]
        quantized = {name: self.quantize.results.pop(name) for name in names}
        self.sizes.update({name: LayerSize(q.scheme.name, q.numel, q.storage_bits) for name, q in quantized.items()})
        self.rotations.update(rotations)
        if self.writer is not None:
            self.writer.write_part(part, model_tensors(state, quantized), quantized, rotations)

    def state(self) -> dict:
        return {"sizes": {name: asdict(size) for name, size in self.sizes.items()}, "rotations": self.rotations,
                "starved_experts": self.quantize.starved_experts}

    def restore(self, state: dict) -> None:
        self.sizes = {name: LayerSize(**size) for name, size in state["sizes"].items()}
        self.rotations = dict(state["rotations"])
        self.quantize.starved_experts.update(state.get("starved_experts", {}))


def run_streaming(recipe: Recipe, force: bool, progress: bool, resume: bool) -> dict:
    """The streamed counterpart of runner.run_recipe; returns (and writes) the same result record."""
    from quantbench.runner import (finish_result, interop_export, kept_results_error, recipe_calibration_ids,
                                   result_head)

    started = time.perf_counter()
    ranks = current_ranks()
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    timer = StageTimer(device, memory=True)
    with timer("load"):
        model, tokenizer, weights = open_streamed(recipe, dtype)
    with timer("eval_data"):
        eval_ids = tokenize_eval_sets(tokenizer, recipe.eval.perplexity)
    with timer("calibration"):
        input_ids = local_rows(recipe_calibration_ids(recipe, tokenizer))

    journal = Journal(recipe.run_dir, recipe.hash(), recipe.output.journal_every_s)
    saved = journal.open(resume)
    writer = CheckpointWriter(journal.checkpoint_dir) if recipe.export.enabled and ranks.main else None
    quantize = QuantizeStage(recipe.quantize.scheme_for, recipe.quantize.true_sequential, recipe.quantize.hessian,
                             lm_head=recipe.quantize.lm_head, on_device=True, experts=recipe.quantize.experts.policy(),
                             **recipe.block_methods())
    quantized_eval = BlockwisePerplexity(eval_ids, recipe.eval, "quantized")
    layers = StreamedLayers(quantize, writer)
    journal.stages = {"quantized_eval": quantized_eval, "layers": layers, "weights": weights, "quantize": quantize}
    stages = [quantize, quantized_eval, layers, journal]
    baseline_eval = None
    if recipe.eval.baseline:
        baseline_eval = BlockwisePerplexity(eval_ids, recipe.eval, "baseline")
        journal.stages["baseline_eval"] = baseline_eval
        stages.insert(0, baseline_eval)
    start, resume_hidden = 0, None
    if saved is not None:
        journal.restore(saved)
        start, resume_hidden = saved["next_block"], saved["calibration"]
    breakdown = StageTimer(device)
    with timer("blocks"):
        drive_blocks(model, input_ids, device, stages, recipe.calibration.batch_size, progress, breakdown, "quantize blocks",
                     weights=weights, start=start, resume_hidden=resume_hidden, shared_out=ranks.active)
    if not ranks.main:
        if recipe.eval.tasks:  # lm-eval's tasks are spread over the ranks, each scoring the written checkpoint
            placed_tasks(recipe, Path(from_main(None)), tokenizer, dtype, device, journal.dir / f"rank-{ranks.rank}",
                         timer, progress)
        return {}

    result = {
        **result_head(recipe, model, dtype),
        "transforms": [],
        "quantization": {**summarize_layers(model, layers.sizes, model_linears(model)),
                         "rotations": {name: rotation["kind"] for name, rotation in layers.rotations.items()}},
        "nonfinite_weights_zeroed": weights.zeroed,
        "starved_experts": quantize.starved_experts,
        "scaled": quantize.scaled,
        "perplexity": {"baseline": baseline_eval.results if baseline_eval else {}, "quantized": quantized_eval.results},
        "streaming": {"resumed_at_block": start if saved is not None else None, "blocks": len(decoder_blocks(model)),
                      "journal_saves": journal.saves},
        "ranks": ranks.world,
    }
    interop_error = None
    with atomic_directory(recipe.run_dir, force, "run directory") as tmp:
        if writer is not None:
            with timer("export"):
                parts = [block_part(i) for i in range(len(decoder_blocks(model)))] + [OUTSIDE_PART]
                writer.finish(model, tokenizer, parts)
                native = _place_checkpoint(journal.checkpoint_dir, recipe, tmp, force)
                result["checkpoint"] = str(recipe.export_dir)
                interop_error = interop_export(recipe, native, tmp, result)
        if recipe.eval.tasks:
            from_main(str(native))
            result["tasks"] = placed_tasks(recipe, native, tokenizer, dtype, device, journal.dir, timer, progress)
        finish_result(result, recipe, tmp, timer, breakdown, device, started)
    journal.remove()
    if interop_error is not None:
        raise kept_results_error(interop_error, recipe)
    return result


def placed_tasks(recipe: Recipe, native: Path, tokenizer, dtype, device, work: Path, timer: StageTimer,
                 progress: bool) -> dict:
    """lm-eval tasks on whole models placed by free memory (device, then host, then disk under `work`): the
    full-precision one from its checkpoint, the quantized one from the run's native checkpoint."""
    from quantbench.eval.harness import evaluate_tasks
    from quantbench.eval.placed_models import memory_budget, placed_pretrained, placed_quantized

    scores = {"baseline": None}
    if recipe.eval.baseline:
        with timer("tasks_baseline"):
            model = placed_pretrained(recipe.model.name, dtype, memory_budget(device), work / "offload-baseline",
                                      recipe.model.trust_remote_code)
            scores["baseline"] = evaluate_tasks(model, tokenizer, recipe.eval, None, progress)
            del model
    with timer("tasks_quantized"):
        model = placed_quantized(native, dtype, memory_budget(device), work / "offload-quantized")
        scores["quantized"] = evaluate_tasks(model, tokenizer, recipe.eval, None, progress)
    return scores


def open_streamed(recipe: Recipe, dtype):
    """The model as a skeleton with no weights, its tokenizer, and where its weights are read from."""
    from transformers import AutoConfig, GenerationConfig

    from quantbench.model_io import _from_pretrained

    name = recipe.model.name
    config = _from_pretrained(AutoConfig, name, trust_remote_code=recipe.model.trust_remote_code)
    model = skeleton_model(config, dtype, recipe.model.trust_remote_code)
    try:
        model.generation_config = GenerationConfig.from_pretrained(name)
    except OSError:
        pass
    tokenizer = load_tokenizer(name, recipe.model.trust_remote_code)
    return model, tokenizer, DiskWeights(model, weights_folder(name), dtype, recipe.model.nonfinite_weights)


def _place_checkpoint(built: Path, recipe: Recipe, run_tmp: Path, force: bool) -> Path:
    """Move the finished checkpoint where the recipe wants it (one rename on one filesystem)."""
    if not recipe.export.dir:
        target = run_tmp / RUN_CHECKPOINT_DIR
        os.rename(built, target)
        return target
    with atomic_directory(recipe.export_dir, force, "export directory") as staging:
        os.rmdir(staging)
        os.rename(built, staging)
    return recipe.export_dir
