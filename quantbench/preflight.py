"""Everything about a recipe that can be known before any weight is read: the model's config and
architecture, the text sources, the output paths, each planned layer against the export format, and
estimates of disk, memory and time against what the machine has. `validate` prints the plan; `run`
refuses to start when any check fails, listing every problem at once."""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantbench import memory
from quantbench.calibration.sources import local_source_problem
from quantbench.errors import QuantbenchError
from quantbench.export.targets import NATIVE, planned_problems
from quantbench.export.interop import family_problem, grouped_reasons
from quantbench.model_io import (BLOCK_PATHS, FAMILIES, language_model_type, meta_model, model_linears, resolve_device,
                                 resolve_dtype)
from quantbench.quantized_weight import storage_bits
from quantbench.quantizers import needs_hessian
from quantbench.recipe import Recipe
from quantbench.rotation import ROTATABLE_TYPES
from quantbench.scaling import SCALABLE_TYPES
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)
WIKITEXT2_WINDOWS = 141  # WikiText-2 test in windows of 2048 Llama-2 tokens, for estimates only
SPEED_PROBE_SECONDS = 0.05
ACHIEVED_SHARE = 0.4  # of a large matmul's FLOP/s that a whole run's mix of work reaches, for estimates


@dataclass
class Plan:
    """What preflight found: the planned layers and the estimates it checked."""

    model_type: str
    parameters: int
    layers: dict[str, tuple[Scheme, tuple[int, int]]]
    checkpoint_bytes: int
    disk_bytes: int
    free_disk_bytes: int
    host_memory_bytes: int
    available_memory_bytes: int | None
    device_memory_bytes: int | None = None
    device_total_bytes: int | None = None
    estimated_seconds: float | None = None
    streaming: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"model: {self.model_type}, {self.parameters / 1e6:,.1f}M parameters, "
                 f"{len(self.layers)} layers to quantize",
                 f"checkpoint: about {_size(self.checkpoint_bytes)}; writes {_size(self.disk_bytes)} "
                 f"of {_size(self.free_disk_bytes)} free",
                 f"host memory: about {_size(self.host_memory_bytes)}"
                 + (f" of {_size(self.available_memory_bytes)} available" if self.available_memory_bytes else "")
                 + (" (streamed: one block at a time)" if self.streaming else "")]
        if self.device_memory_bytes is not None:
            lines.append(f"device memory: about {_size(self.device_memory_bytes)} of {_size(self.device_total_bytes)}")
        if self.estimated_seconds is not None:
            lines.append(f"time: roughly {_duration(self.estimated_seconds)} on this machine (lm-eval tasks not counted)")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def preflight(recipe: Recipe, force: bool = False, estimate_time: bool = True) -> Plan:
    """Check `recipe` against the model's config (no weights), the files and the machine; raise one
    QuantbenchError listing every problem, or return the plan."""
    problems: list[str] = []
    notes: list[str] = []
    raw = _model_config(recipe, problems, notes)
    for source in [recipe.calibration.source, *recipe.eval.perplexity]:
        if (problem := local_source_problem(source)) is not None:
            field_name = "calibration.source" if source == recipe.calibration.source else "eval.perplexity"
            problems.append(f"{field_name}: {problem}")
    outputs = [("output.dir", recipe.run_dir, "run directory")]
    if recipe.export.enabled and recipe.export.dir:
        outputs.append(("export.dir", recipe.export_dir, "export directory"))
    for field_name, path, what in outputs:
        if (problem := _output_problem(path, force, what)) is not None:
            problems.append(f"{field_name}: {problem}")
    if (problem := _task_names_problem(recipe)) is not None:
        problems.append(f"eval.tasks: {problem}")
    if raw is None:
        _raise(recipe, problems)
    model = meta_model(raw)
    model_type = model.config.model_type
    layers = _planned_layers(recipe, model, problems)
    scaled = sorted({scheme.scaling for scheme, _ in layers.values() if scheme.scaling != "none"})
    if scaled and model_type not in SCALABLE_TYPES:
        problems.append(f"quantize: {' and '.join(scaled)} scaling supports {', '.join(SCALABLE_TYPES)}, not "
                        f"{model_type!r}")
    rotated = _rotated_online(recipe, layers)
    if recipe.export.enabled and recipe.export.format != NATIVE:
        problems.extend(_export_problems(recipe, layers, rotated, model_type))
    notes.extend(_partial_group_notes(layers))
    notes.extend(_small_calibration_notes(recipe, layers))
    language = raw.get("text_config") or raw  # a multimodal release's sizes are its language model's
    plan = _estimate(recipe, model, language, layers, problems, notes, estimate_time)
    _raise(recipe, problems)
    return plan


def _raise(recipe: Recipe, problems: list[str]) -> None:
    """One line per problem; a single problem is the whole message."""
    if len(problems) == 1:
        raise QuantbenchError(f"recipe {recipe.name} cannot run: {problems[0]}")
    if problems:
        raise QuantbenchError(f"recipe {recipe.name} cannot run ({len(problems)} problems, nothing was computed):\n"
                              + "\n".join(f"  {p}" for p in problems))


def _model_config(recipe: Recipe, problems: list[str], notes: list[str]) -> dict | None:
    """config.json of the model, read as data: no model code runs before the architecture is known."""
    from transformers import PretrainedConfig

    name = recipe.model.name
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        problems.append(f"model.name: {name} has no config.json; give a Hugging Face model directory or hub id")
        return None
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        problems.append(f"model.name: no such directory {name!r} (a hub id is written org/name)")
        return None
    try:
        raw, _ = PretrainedConfig.get_config_dict(name)
    except (OSError, ValueError) as exc:
        problems.append(f"model.name: cannot read the config of {name!r} ({str(exc).splitlines()[0]}); check the "
                        "name, or offline: source .assets/env.sh so the local caches are used")
        return None
    model_type = language_model_type(raw.get("model_type"))
    if model_type not in BLOCK_PATHS:
        problems.append(f"model.name: model type {model_type!r} is not supported; supported families: {FAMILIES}")
        return None
    if raw.get("auto_map"):
        note = f"{name} ships its own modelling code"
        if recipe.model.trust_remote_code:
            note += "; model.trust_remote_code: true lets transformers run it when the model loads"
            log.warning("%s", note)
        notes.append(note)
    if any(t.name == "rotate" for t in recipe.transforms) and model_type not in ROTATABLE_TYPES:
        problems.append(f"transforms: the model rotation supports {', '.join(ROTATABLE_TYPES)}, not {model_type!r}")
    return raw


def _task_names_problem(recipe: Recipe) -> str | None:
    """An lm-eval task name that no index can hold (a typo), found before anything runs."""
    if not recipe.eval.tasks:
        return None
    from quantbench.eval.lm_eval_bridge import check_task_names

    try:
        check_task_names(recipe.eval.lm_eval.include_path, [request.name for request in recipe.eval.task_requests()])
    except QuantbenchError as exc:
        return str(exc)
    return None


def _output_problem(path: Path, force: bool, what: str) -> str | None:
    if path.exists() and not force:
        return f"{what} {path} already exists; pass --force to replace it or choose another path"
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a directory; choose another path"
    ancestor = _existing_ancestor(path.parent)
    if not ancestor.is_dir():
        return f"cannot create {path}: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot write under {ancestor} (permission denied); choose a writable path"
    return None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _planned_layers(recipe: Recipe, model, problems: list[str]) -> dict[str, tuple[Scheme, tuple[int, int]]]:
    """Layer → (scheme, shape) as the run will quantize it. Under an allocation, each layer's largest
    candidate stands for it (export checks look at every candidate)."""
    linears = model_linears(model)
    layers = {}
    try:
        allocated = recipe.quantize.allocated_schemes()
    except QuantbenchError as exc:
        problems.append(f"quantize.from_allocation: {exc}")
        allocated = {}
    unknown = sorted(set(allocated) - set(linears))
    if unknown:
        problems.append(f"quantize.from_allocation names {len(unknown)} layer(s) the model does not have "
                        f"({', '.join(unknown[:2])}{', …' if len(unknown) > 2 else ''})")
    for name, linear in linears.items():
        shape = (linear.out_features, linear.in_features)
        if recipe.allocation is not None:
            scheme = max(recipe.allocation.candidates, key=lambda s: storage_bits(s, shape))
        else:
            scheme = recipe.quantize.scheme_for(name)
        if scheme is not None:
            layers[name] = (scheme, shape)
    if recipe.quantize.lm_head is not None:
        head = model.get_output_embeddings()
        layers["lm_head"] = (recipe.quantize.lm_head, (head.out_features, head.in_features))
    return layers


def _rotated_online(recipe: Recipe, layers: dict) -> set[str]:
    rotated = {name for name, (scheme, _) in layers.items() if scheme.transform == "hadamard"}
    if any(t.name == "rotate" and t.online_down_proj for t in recipe.transforms):
        rotated |= {name for name in layers if name.endswith("mlp.down_proj")}
    return rotated


def _export_problems(recipe: Recipe, layers: dict, rotated: set[str], model_type: str) -> list[str]:
    target = recipe.export.format
    if (problem := family_problem(model_type)) is not None:
        return [f"export.format {target} cannot hold this model: {problem}; keep export.format: quantbench"]
    fix = "choose schemes it stores for those layers (docs/export.md), or keep export.format: quantbench"
    if recipe.allocation is None:
        return [f"export.format {target} cannot store {reason.strip()}; {fix}"
                for reason in grouped_reasons(planned_problems(target, layers, rotated))]
    lines = []
    for candidate in recipe.allocation.candidates:
        found = planned_problems(target, {name: (candidate, shape) for name, (_, shape) in layers.items()},
                                 rotated if candidate.transform == "hadamard" else set())
        if found:
            lines.append(f"allocation.candidates: {candidate.name} cannot be exported as {target} "
                         f"({next(iter(grouped_reasons(found))).strip()}); drop it or keep export.format: quantbench")
    return lines


def _partial_group_notes(layers: dict) -> list[str]:
    partial: dict[tuple[int, int], int] = {}
    for scheme, (_, in_features) in layers.values():
        if scheme.group_size and in_features % scheme.group_size:
            key = (scheme.group_size, in_features)
            partial[key] = partial.get(key, 0) + 1
    return [f"group size {group} does not divide {width} inputs in {count} layer(s): their last group is "
            f"shorter (stored and counted as such; GPTQ and compressed-tensors export refuse them)"
            for (group, width), count in sorted(partial.items())]


# GPTQ at 3 bits or fewer on fewer calibration tokens than this many per input column of a layer varies widely
# with the draw: 4,096 tokens on SmolLM2-135M (2.7 per input of down_proj) gave 115-191 against RTN's 148 (100-104
# with a tenfold dampening, which at 65,536 tokens spreads far more than the default: docs/quality.md)
TOKENS_PER_INPUT_FOR_LOW_BIT_GPTQ = 16


def _small_calibration_notes(recipe: Recipe, layers: dict) -> list[str]:
    def low_bit_gptq(scheme: Scheme) -> bool:
        return scheme.solver == "gptq" and scheme.bits <= 3

    allocated = recipe.allocation is not None and any(map(low_bit_gptq, recipe.allocation.candidates))
    widest = max((in_features for scheme, (_, in_features) in layers.values() if allocated or low_bit_gptq(scheme)),
                 default=0)
    tokens = recipe.calibration.n_samples * recipe.calibration.seqlen
    if not widest or tokens >= TOKENS_PER_INPUT_FOR_LOW_BIT_GPTQ * widest:
        return []
    return [f"calibration: {tokens:,} tokens for GPTQ at 3 bits or fewer on layers of up to {widest:,} inputs; "
            f"below about {TOKENS_PER_INPUT_FOR_LOW_BIT_GPTQ} tokens per input ("
            f"{TOKENS_PER_INPUT_FOR_LOW_BIT_GPTQ * widest:,} here) its result varies widely with the calibration "
            "draw and can lose to round-to-nearest; more calibration, or a larger dampening (`-damp0.1` in the "
            "scheme), steadies it (docs/quality.md, \"GPTQ on a small calibration\")"]


def _estimate(recipe: Recipe, model, raw: dict, layers: dict, problems: list[str], notes: list[str],
              estimate_time: bool) -> Plan:
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    weight_bytes = torch.finfo(dtype).bits // 8
    params = {id(p): p for p in model.parameters()}
    n_params = sum(p.numel() for p in params.values())
    quantized_params = sum(out * inp for _, (out, inp) in layers.values())
    checkpoint = sum(storage_bits(scheme, shape) for scheme, shape in layers.values()) // 8 + (
        n_params - quantized_params) * weight_bytes
    activations = _activation_bytes(recipe, raw, layers, weight_bytes)
    model_bytes = n_params * weight_bytes
    available = memory.available_host_bytes()
    streaming = _streams(recipe, model_bytes, available, problems)

    copies = 1 + (recipe.export.enabled and recipe.export.format != NATIVE)
    disk = (checkpoint * copies if recipe.export.enabled else 0) + (_journal_bytes(recipe, raw, weight_bytes)
                                                                    if streaming else 0)
    free_disk = shutil.disk_usage(_existing_ancestor(recipe.run_dir)).free
    if disk > free_disk:
        problems.append(f"disk: the checkpoint{' and the journal' if streaming else ''} need about {_size(disk)} but "
                        f"{_size(free_disk)} are free under {_existing_ancestor(recipe.run_dir)}; free space or set "
                        "output.dir elsewhere")
    held = (_largest_block_bytes(model, weight_bytes) + _outside_bytes(model, weight_bytes)) if streaming else model_bytes
    host = held + (activations if device.type == "cpu" else 0)
    plan = Plan(model.config.model_type, n_params, layers, checkpoint, disk, free_disk, host, available, notes=notes,
                streaming=streaming)
    cal = recipe.calibration
    if available is not None and host > available:
        problems.append(f"memory: this run needs about {_size(host)} of host memory ({_size(held)} of weights"
                        + (f", {_size(activations)} of block activations for {cal.n_samples:,} × {cal.seqlen:,} "
                           "calibration tokens" if device.type == "cpu" else "")
                        + f") but {_size(available)} are available; lower calibration.n_samples, seqlen or "
                        "batch_size (or eval.batch_size), or use a larger machine")
    if device.type == "cuda":
        plan.device_memory_bytes = activations + _largest_block_bytes(model, weight_bytes)
        plan.device_total_bytes = torch.cuda.get_device_properties(device).total_memory
        if plan.device_memory_bytes > plan.device_total_bytes:
            problems.append(f"device memory: calibration needs about {_size(plan.device_memory_bytes)} on {device} "
                            f"but it has {_size(plan.device_total_bytes)}; lower calibration.n_samples or seqlen")
    if estimate_time and not problems:
        plan.estimated_seconds = _flops(recipe, raw, n_params, layers) / (_measured_flops(device, dtype) * ACHIEVED_SHARE)
    return plan


def streaming_blockers(recipe: Recipe) -> list[str]:
    """What in `recipe` needs the whole model in memory, so that it cannot stream."""
    blockers = []
    if recipe.transforms:
        blockers.append("transforms (the model rotation touches every block at once)")
    if recipe.allocation is not None:
        blockers.append("an allocation section (the search quantizes each block many times)")
    return blockers


def _streams(recipe: Recipe, model_bytes: int, available: int | None, problems: list[str]) -> bool:
    """Whether the run streams: `model.streaming: on`, or `auto` when the weights would fill more than half
    the available host memory and nothing in the recipe needs the whole model."""
    blockers = streaming_blockers(recipe)
    if recipe.model.streaming == "on" and blockers:
        problems.append("model.streaming: on cannot stream a recipe with " + "; ".join(blockers)
                        + "; drop them or set model.streaming: off")
    if recipe.model.streaming == "off" or blockers:
        return False
    streams = recipe.model.streaming == "on" or (available is not None and model_bytes > available / 2)
    if streams and recipe.eval.tasks and not recipe.export.enabled:
        problems.append("eval.tasks: a streamed run scores lm-eval tasks on the quantized model read back from its "
                        "checkpoint; set export.enabled: true")
    return streams


def _journal_bytes(recipe: Recipe, raw: dict, weight_bytes: int) -> int:
    """A streamed run's journal: the hidden states entering a block, for calibration and evaluation windows
    (two saves may coexist for a moment)."""
    ev = recipe.eval
    windows = ev.max_windows or WIKITEXT2_WINDOWS * 2048 // ev.seqlen
    tokens = recipe.calibration.n_samples * recipe.calibration.seqlen + windows * ev.seqlen * len(ev.perplexity) * (
        2 if ev.baseline else 1)
    return 2 * tokens * raw.get("hidden_size", 0) * weight_bytes


def _outside_bytes(model, weight_bytes: int) -> int:
    from quantbench.model_io import decoder_blocks

    inside = {id(p) for p in decoder_blocks(model).parameters()}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in inside) * weight_bytes


def _activation_bytes(recipe: Recipe, raw: dict, layers: dict, weight_bytes: int) -> int:
    """The largest of calibration and evaluation: a block's inputs and outputs for every calibration
    token, one batch's temporaries (MLP, attention scores), the Hessians of one block; or one evaluation
    batch's logits."""
    cal, ev = recipe.calibration, recipe.eval
    hidden, inner = raw.get("hidden_size", 0), raw.get("intermediate_size") or 4 * raw.get("hidden_size", 0)
    heads = raw.get("num_attention_heads", 1)
    tokens = cal.n_samples * cal.seqlen
    batch_tokens = min(cal.batch_size, cal.n_samples) * cal.seqlen
    block_io = 2 * tokens * hidden * weight_bytes
    temporaries = batch_tokens * (3 * inner + 4 * hidden) * 4 + min(cal.batch_size, cal.n_samples) * heads * cal.seqlen ** 2 * 4
    hessians = (3 * hidden ** 2 + inner ** 2) * 4 if any(needs_hessian(s) for s, _ in layers.values()) else 0
    logits = 3 * ev.batch_size * ev.seqlen * raw.get("vocab_size", 0) * 4
    return max(block_io + temporaries + hessians, logits)


def _largest_block_bytes(model, weight_bytes: int) -> int:
    from quantbench.model_io import decoder_blocks

    return max(sum(p.numel() for p in block.parameters()) for block in decoder_blocks(model)) * weight_bytes


def _flops(recipe: Recipe, raw: dict, n_params: int, layers: dict) -> float:
    """Rough work of a run: block forwards over the calibration tokens (capture, statistics, propagation),
    Hessians and GPTQ solves, and the evaluation windows (twice with the baseline)."""
    cal, ev = recipe.calibration, recipe.eval
    block_params = sum(out * inp for _, (out, inp) in layers.values())
    stats = any(needs_hessian(s) for s, _ in layers.values())
    work = 2 * block_params * cal.n_samples * cal.seqlen * (3 if stats else 1)
    for scheme, (out, inp) in layers.values():
        if scheme.solver in ("gptq", "ptqtp") or recipe.allocation is not None:
            work += inp ** 3 + 2 * out * inp ** 2
        work += _block_method_work(recipe, scheme, out, inp)
        if recipe.allocation is not None:  # each candidate that scales or learns a block does so once per block
            work += sum(_block_method_work(recipe, candidate, out, inp) for candidate in recipe.allocation.candidates)
    if stats:
        work += sum(2 * cal.n_samples * cal.seqlen * inp ** 2 for _, (_, inp) in layers.values()) / 2
    windows = ev.max_windows or WIKITEXT2_WINDOWS * 2048 // ev.seqlen
    evaluations = (2 if ev.baseline else 1) * len(ev.perplexity)
    work += 2 * n_params * windows * ev.seqlen * evaluations
    if recipe.allocation is not None:
        work *= 1 + len(recipe.allocation.candidates) / 2
    return float(work)


def _block_method_work(recipe: Recipe, scheme: Scheme, out: int, inp: int) -> float:
    """The extra work of a layer's AutoRound steps or AWQ search."""
    cal, work = recipe.calibration, 0.0
    if scheme.solver == "autoround":  # a forward and a backward of the layer per step, on one mini-batch
        work += 6 * out * inp * recipe.quantize.autoround.steps * cal.batch_size * cal.seqlen
    if scheme.scaling == "awq":  # each of a block's ~4 sites runs the block once per α on the search tokens
        tokens = min(recipe.quantize.scaling.search_tokens, cal.n_samples * cal.seqlen)
        work += 8 * out * inp * recipe.quantize.scaling.grid * tokens
    return work


def _measured_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul on the run's device and dtype, timed for a moment."""
    n = 1024 if device.type == "cpu" else 4096
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no random draw: the global RNG stays untouched
    a @ a
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < SPEED_PROBE_SECONDS or runs < 2:
        a @ a
        runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return 2 * n ** 3 * runs / (time.perf_counter() - start)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:,.1f} h"
