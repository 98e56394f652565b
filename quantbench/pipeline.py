"""The one block driver (`drive_blocks`): capture the first block's inputs, then per block run every stage
(statistics and quantization in `QuantizeStage`, candidate measurements in the allocation's stage, …) and
propagate the block's outputs as the next block's inputs.

Only one block and one block's activations for all calibration samples live on the compute device at a
time; the rest of the model stays where it was loaded (usually CPU).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.activations import activation_format_of, input_rotation_of, quantize_inputs_of, rotate_inputs_of
from quantbench.block_weights import ResidentWeights
from quantbench.calibration.stats import StopForward, collect_stats, input_sharing
from quantbench.distributed import all_reduce_stats, assign_by_cost, local_rows, share_results
from quantbench.distributed import current as current_ranks
from quantbench.errors import QuantbenchError
from quantbench.experts import StarvedExperts, all_tokens_routed, expert_pattern, merge_parallel_experts
from quantbench.memory import read_peaks, reset_peaks
from quantbench.model_io import block_linears, block_output, blocks_path, decoder_blocks
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers import needs_hessian, needs_stats, quantize_weight
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.quantizers.autoround import AutoRoundOptions, learn_rounding
from quantbench.quantizers.gptq import factor_hessians
from quantbench.quantizers.hadamard import layer_rotation, rotate_stats, rotate_weight
from quantbench.pass_cache import PassCache
from quantbench.residual_outputs import UNKNOWN, ResidualRecorder, fits
from quantbench.scaling import ScalingOptions, check_scalable, scale_block
from quantbench.scheme import DEFAULT_DAMP, Scheme

log = logging.getLogger(__name__)
SchemeLookup = Callable[[str], "Scheme | None"]


@dataclass
class BlockInputs:
    """The hidden states entering block `block`, one tensor per calibration mini-batch, and the keyword
    arguments (attention mask, position ids, rotary embeddings, …) the model passes each block with each
    mini-batch: blocks of different layer types (sliding-window and global attention) get different ones."""

    hidden: list[torch.Tensor]
    block_kwargs: list[list[dict]]  # [block][mini-batch]
    block: int = 0
    shared_out: bool = False  # under torchrun: each rank holds its share of the calibration set, not all of it

    @property
    def kwargs(self) -> list[dict]:
        return self.block_kwargs[self.block]


class StageTimer:
    """Seconds per pipeline stage; synchronises the compute stream around each timed span so GPU work is
    charged to the stage that launched it. `fine=True` also times the Hessian accumulation inside hooks, and
    charges the wait at the start of an outermost span (GPU work launched outside every span) to "waiting".
    `memory=True` also records each stage's peak host RSS and device memory (for a timer whose stages do
    not nest: each stage resets the peaks)."""

    def __init__(self, device: torch.device, fine: bool = False, memory: bool = False) -> None:
        self.device, self.fine, self.memory = device, fine, memory
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, dict[str, float]] = {}
        self._depth = 0

    @contextmanager
    def __call__(self, stage: str):
        if stage == "hessian" and not self.fine:
            yield
            return
        if self.fine and self._depth == 0:
            before = time.perf_counter()
            self._sync()
            self.seconds["waiting"] = self.seconds.get("waiting", 0.0) + time.perf_counter() - before
        else:
            self._sync()
        self._depth += 1
        if self.memory:
            reset_peaks(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            if self.memory:
                peaks = read_peaks(self.device)
                earlier = self.peaks.get(stage, {})
                self.peaks[stage] = {k: max(v, earlier.get(k, 0.0)) for k, v in peaks.items()}

    def _sync(self) -> None:
        # the compute stream only: block transfers on side streams (ResidentWeights.prefetch) keep overlapping
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def summary(self) -> dict[str, float]:
        """Rounded seconds; the stats passes are reported without the Hessian time they contain."""
        out = dict(self.seconds)
        if "hessian" in out and "stats_forward" in out:
            out["stats_forward"] -= out["hessian"]
        return {k: round(v, 3) for k, v in out.items()}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device,
                         batch_size: int) -> BlockInputs:
    """Run the model's forward for every mini-batch with each decoder block replaced by a pass-through that
    records its arguments: what the first block receives, and every block's keyword arguments. No block
    computes (their weights may not even be loaded), and the pass stops at the last block."""
    blocks = decoder_blocks(model)
    captured = BlockInputs(hidden=[], block_kwargs=[[] for _ in blocks])

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                captured.hidden.append(hidden)
            captured.block_kwargs[index].append(kwargs)
            if index == len(blocks) - 1:
                raise StopForward
            return hidden
        return forward

    own_forwards = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's hooks
    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for block, own in zip(blocks, own_forwards):
            if own is None:
                del block.forward
            else:
                block.forward = own
    skipped = [index for index, kwargs in enumerate(captured.block_kwargs) if len(kwargs) != len(captured.hidden)]
    if skipped:
        raise QuantbenchError(f"the model's forward did not run decoder blocks {skipped} (of {len(blocks)}); "
                              "check num_hidden_layers in its config")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [block_output(block(hidden, **kwargs)) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def feed_block(block: nn.Module, inputs: BlockInputs, batches: int | None = None) -> None:
    """Run the block for its hooks' sake; a hook may cut a pass short with StopForward."""
    for hidden, kwargs in list(zip(inputs.hidden, inputs.kwargs))[:batches]:
        try:
            block(hidden, **kwargs)
        except StopForward:
            pass


@dataclass
class BlockContext:
    """One decoder block as the driver hands it to each stage: the block on the compute device, its
    linears (by name within the block), and the inputs it receives in this pass (the outputs of the blocks
    before it, as the stages before have left them: quantized where a stage quantized them)."""

    index: int
    prefix: str  # full name of the block, e.g. model.layers.3
    block: nn.Module
    linears: dict[str, nn.Linear]
    inputs: BlockInputs
    timer: StageTimer
    # input groups found so far, by block class and linear names: blocks alike share inputs alike (the driver
    # hands every block of a run the same dict, so the model's forward is traced once per kind of block)
    sharing: dict[tuple, list[list[str]]] = field(default_factory=dict)
    # likewise, by kind of block and last linear: the submodule whose input is the residual (residual_outputs.py)
    residuals: dict[tuple, str | None] = field(default_factory=dict)
    # the block's outputs on `inputs` as it now computes, where a stage had them without a forward
    outputs: list[torch.Tensor] | None = None
    # whether a later block reads the outputs (the driver propagates them); a stage need not make them if not
    wants_outputs: bool = True

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def input_groups(self, names) -> list[list[str]]:
        """`names` grouped by the input tensor they read, in forward order (q/k/v, o, gate/up, down)."""
        kind = (type(self.block), tuple(self.linears))
        if kind not in self.sharing:
            def run_once() -> None:
                with all_tokens_routed(self.block):  # every expert's layers show up, routed to or not
                    feed_block(self.block, self.inputs, batches=1)

            self.sharing[kind] = input_sharing(self.block, self.linears, run_once)
        wanted = set(names)
        return [[n for n in group if n in wanted] for group in self.sharing[kind] if wanted & set(group)]


class BlockStage(Protocol):
    """A step the driver runs on every block, in order, before it propagates the block's outputs. A stage
    may also define (or only define) `begin(model, device)`: after the first block's inputs are captured,
    with the tensors outside the blocks on the device; `after_block(ctx)`: once the block's outputs are the
    next block's inputs, in `ctx.inputs`; `finish(model, device)`: after the last block driven. A stage that
    changes what the block computes leaves `ctx.outputs` None, or sets it to the block's outputs as it now
    computes (the driver then propagates those instead of running the block). A stage that works on some
    blocks only may define `needs_block(prefix, linear_names) -> bool`: when every stage does, the driver
    stops after the last block one of them needs (the blocks after it are neither loaded nor run). A stage
    may also say which blocks' inputs it reads (`reads_inputs(prefix, linear_names) -> bool`; round-to-nearest
    reads none): when every stage does, the driver runs a block forward only where a later block's inputs are
    read, so a recipe without calibrated solvers makes no forward at all."""

    def run_block(self, ctx: BlockContext) -> None: ...


class EveryBlockStage:
    """Base of a stage that works on every block and reads no calibration inputs (evaluation windows of its
    own, the checkpoint writer, the journal): it keeps every block driven, but not the forwards that make
    calibration inputs no stage reads (`blocks_to_drive`)."""

    def needs_block(self, prefix: str, linear_names) -> bool:
        return True

    def reads_inputs(self, prefix: str, linear_names) -> bool:
        return False


@torch.no_grad()
def drive_blocks(model: nn.Module, input_ids: torch.Tensor, device: torch.device, stages: list[BlockStage],
                 batch_size: int = 8, progress: bool = True, timer: StageTimer | None = None,
                 desc: str = "blocks", weights=None, start: int = 0,
                 resume_hidden: list[torch.Tensor] | None = None, shared_out: bool = False) -> None:
    """The one block driver: capture what the first block receives (and every block's keyword arguments),
    then for every block load it on the device, run each stage on it, and run the block (as the stages left
    it) to make the next block's inputs. Only one block and one block's activations for the calibration
    samples live on the device.

    `weights` says where blocks come from (ResidentWeights: the model in memory, the default; DiskWeights:
    read from the checkpoint as their turn comes). A resumed run starts at block `start` with the hidden
    states a journal kept (`resume_hidden`); the keyword arguments (masks, positions) are captured anew.
    `shared_out`: `input_ids` is this rank's share of the calibration set, so statistics are summed across
    ranks (distributed.py)."""
    timer = timer or StageTimer(device)
    weights = weights or ResidentWeights(model)
    prefix = blocks_path(model)
    try:
        with timer("transfer"):
            weights.load_outside(model, device)
        with timer("capture"):
            inputs = capture_block_inputs(model, input_ids, device, batch_size)
            inputs.shared_out = shared_out
        if resume_hidden is not None:
            inputs.hidden = [hidden.to(device) for hidden in resume_hidden]
        _each(stages, "begin", model, device)
        blocks = decoder_blocks(model)
        end, fed = blocks_to_drive(stages, blocks, prefix)
        sharing: dict[tuple, list[list[str]]] = {}
        residuals: dict[tuple, str | None] = {}
        for index in tqdm(range(start, end), desc=desc, unit="block", disable=not progress,
                          initial=start, total=end):
            block, inputs.block = blocks[index], index
            with timer("transfer"):
                weights.load_block(block, f"{prefix}.{index}", device)
            if index + 1 < end and hasattr(weights, "prefetch"):
                with timer("transfer"):
                    weights.prefetch(blocks[index + 1], device)  # overlaps this block's stages
            ctx = BlockContext(index, f"{prefix}.{index}", block, block_linears(block), inputs, timer, sharing,
                               residuals, wants_outputs=index < fed)
            _each(stages, "run_block", ctx)
            if index < fed:
                with timer("propagate"):
                    inputs.hidden = ctx.outputs if ctx.outputs is not None else run_block(block, inputs)
            _each(stages, "after_block", ctx)
            with timer("transfer"):
                weights.release_block(block)
        if hasattr(weights, "wait"):
            with timer("transfer"):
                weights.wait()
        _each(stages, "finish", model, device)
    finally:
        with timer("transfer"):
            weights.release_outside(model)


def blocks_to_drive(stages: list, blocks: list[nn.Module], prefix: str) -> tuple[int, int]:
    """How many blocks, from the first, the driver hands the stages, and how many of those it runs forward to
    make the next block's inputs. All of them, unless every stage says which blocks it needs (`needs_block`):
    then up to the last one some stage needs (none: 0); and all of those, unless every stage says which blocks'
    inputs it reads (`reads_inputs`): then those before the last such block."""
    def wanted(method: str) -> list[int]:
        return [index for index, block in enumerate(blocks)
                if any(getattr(stage, method)(f"{prefix}.{index}", block_linears(block)) for stage in stages)]

    if not all(hasattr(stage, "needs_block") for stage in stages):
        return len(blocks), len(blocks)
    needed = wanted("needs_block")
    end = needed[-1] + 1 if needed else 0
    if not all(hasattr(stage, "reads_inputs") for stage in stages):
        return end, end
    reading = [index for index in wanted("reads_inputs") if index < end]
    return end, reading[-1] if reading else 0


def _each(stages: list, hook: str, *args) -> None:
    for stage in stages:
        if (method := getattr(stage, hook, None)) is not None:
            method(*args)


class QuantizeStage:
    """Quantize every linear that `scheme_for(full_name)` assigns a scheme, in place (see quantize_block);
    `results` collects the QuantizedWeights by full name, on CPU (with `on_device`, where they were computed,
    for a next stage that packs and drops them block by block). With `lm_head`, `finish` also quantizes the
    LM head (untied from the embedding) by that scheme. Layers whose scheme scales them (AWQ, SmoothQuant)
    are scaled first (scaling.py, with `scaling`'s options); `scaled` records what was done per site.
    `reuse_passes`: each statistics pass is served what the one before computed unchanged (pass_cache.py),
    and the block's outputs come from the last pass where they can (residual_outputs.py), bit for bit what
    the forwards would give."""

    def __init__(self, scheme_for: SchemeLookup, true_sequential: bool = True, hessian: str = "compensated",
                 lm_head: Scheme | None = None, on_device: bool = False,
                 experts: StarvedExperts = StarvedExperts(), scaling: ScalingOptions = ScalingOptions(),
                 autoround: AutoRoundOptions = AutoRoundOptions(), reuse_passes: bool = True) -> None:
        self.scheme_for, self.true_sequential, self.lm_head = scheme_for, true_sequential, lm_head
        self.hessian, self.on_device, self.experts, self.scaling = hessian, on_device, experts, scaling
        self.autoround, self.reuse_passes = autoround, reuse_passes
        self.results: dict[str, QuantizedWeight] = {}
        self.starved_experts: dict[str, dict] = {}  # full name → routed tokens and what was done
        self.scaled: dict[str, dict] = {}  # full producer name → scaling method and what it chose
        self.model_type = ""

    def begin(self, model: nn.Module, device: torch.device) -> None:
        self.model_type = model.config.model_type

    def state(self) -> dict:
        """What a streamed run's journal keeps for --resume (the quantized weights are written per block)."""
        return {"starved_experts": dict(self.starved_experts), "scaled": dict(self.scaled)}

    def restore(self, state: dict) -> None:
        self.starved_experts.update(state.get("starved_experts", {}))
        self.scaled.update(state.get("scaled", {}))

    def finish(self, model: nn.Module, device: torch.device) -> None:
        if self.lm_head is not None:
            self.results["lm_head"] = quantize_linear(untie_lm_head(model), self.lm_head)

    def needs_block(self, prefix: str, linear_names) -> bool:
        return any(self.scheme_for(f"{prefix}.{name}") for name in linear_names)

    def reads_inputs(self, prefix: str, linear_names) -> bool:
        """Whether a scheme here reads calibration inputs: a solver's statistics, AutoRound's training, or
        the activations that AWQ and SmoothQuant scale by."""
        schemes = [scheme for name in linear_names if (scheme := self.scheme_for(f"{prefix}.{name}"))]
        return any(needs_stats(scheme) or scheme.solver == "autoround" or scheme.scaling != "none"
                   for scheme in schemes)

    def run_block(self, ctx: BlockContext) -> None:
        schemes = {name: scheme for name in ctx.linears if (scheme := self.scheme_for(ctx.full_name(name)))}
        if any(scheme.scaling != "none" for scheme in schemes.values()):
            check_scalable(self.model_type)
            with ctx.timer("scaling"):
                self.scaled.update(scale_block(ctx, schemes, self.model_type, self.scaling))
        for name, quantized in quantize_block(ctx, schemes, self.true_sequential, self.hessian, self.on_device,
                                              self.experts, self.starved_experts, self.autoround,
                                              self.reuse_passes).items():
            self.results[ctx.full_name(name)] = quantized


def quantize_model(model: nn.Module, input_ids: torch.Tensor, scheme_for: SchemeLookup, device: torch.device,
                   batch_size: int = 8, progress: bool = True, true_sequential: bool = True,
                   timer: StageTimer | None = None, hessian: str = "compensated",
                   experts: StarvedExperts = StarvedExperts(), starved: dict | None = None,
                   scaling: ScalingOptions = ScalingOptions(), scaled: dict | None = None,
                   autoround: AutoRoundOptions = AutoRoundOptions(),
                   reuse_passes: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize every decoder-block linear that `scheme_for(full_name)` assigns a scheme, in place: the block
    driver with the quantize stage alone. The model's weights are replaced by their dequantized values; the
    returned QuantizedWeights (on CPU) hold the codes that export packs. Under torchrun each rank calibrates
    on its share of `input_ids` (distributed.py). `starved` receives the experts
    routed too few calibration tokens, and what was done about them (`experts`); `scaled`, what AWQ and
    SmoothQuant chose where a scheme asks for them (`scaling`: their options). `reuse_passes`: see
    QuantizeStage."""
    stage = QuantizeStage(scheme_for, true_sequential, hessian, experts=experts, scaling=scaling, autoround=autoround,
                          reuse_passes=reuse_passes)
    drive_blocks(model, local_rows(input_ids), device, [stage], batch_size, progress, timer, desc="quantize blocks",
                 shared_out=current_ranks().active)
    if starved is not None:
        starved.update(stage.starved_experts)
    if scaled is not None:
        scaled.update(stage.scaled)
    return stage.results


def quantize_block(ctx: BlockContext, schemes: dict[str, Scheme], true_sequential: bool,
                   hessian: str = "compensated", on_device: bool = False,
                   experts: StarvedExperts = StarvedExperts(), notes: dict | None = None,
                   autoround: AutoRoundOptions = AutoRoundOptions(),
                   reuse_passes: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize a block's linears. When a solver reads calibration statistics, the linears are grouped by the
    input they share (q/k/v, o, gate/up, down) and, with `true_sequential`, each group is calibrated on inputs
    produced by the already-quantized earlier groups; layers sharing an input share one Hessian. The experts
    of a mixture-of-experts block are calibrated on the tokens routed to them, one stage per projection;
    `experts` says what happens to one routed too few tokens, and `notes` (full name → what was done)
    records it. `hessian` says how Σ xᵀx is accumulated (calibration.stats.HESSIAN_MODES). AutoRound layers
    are learned together first (quantizers/autoround.py), on the block's inputs with the other layers in
    full precision; the other layers then calibrate on the block as AutoRound left it. With `reuse_passes`,
    each true-sequential pass is served the submodule outputs the pass before computed unchanged
    (pass_cache.py), and the last stage's pass also keeps what gives the block's outputs without a forward
    where it can (residual_outputs.py), or else hands the propagation what it computed: the outputs are set
    in `ctx.outputs`."""
    notes = {} if notes is None else notes
    linears, timer = ctx.linears, ctx.timer
    rounded = {name: scheme for name, scheme in schemes.items() if scheme.solver == "autoround"}
    results = {}
    if rounded:
        with timer("autoround"):
            learned = learn_rounding(ctx.block, linears, rounded, list(zip(ctx.inputs.hidden, ctx.inputs.kwargs)),
                                     autoround, across_ranks=ctx.inputs.shared_out)
        with timer("solve"):
            for name, scheme in rounded.items():
                results.update(quantize_linears([linears[name]], [name], scheme, learned[name], on_device))
        schemes = {name: scheme for name, scheme in schemes.items() if name not in rounded}
    stats_layers = {name for name, scheme in schemes.items() if needs_stats(scheme)}
    hessian_layers = {name for name, scheme in schemes.items() if needs_hessian(scheme)}
    if not stats_layers:  # a statistics pass costs a block forward: skip it when no solver reads one
        with timer("solve"):
            return results | {name: quantize_linears([linears[name]], [name], scheme, on_device=on_device)[name]
                              for name, scheme in schemes.items()}
    with timer("stats_forward"):  # one forward finds which layers share an input
        groups = ctx.input_groups(schemes)
    stages = merge_parallel_experts(groups) if true_sequential else [[name for group in groups for name in group]]
    kept = None
    batches = len(ctx.inputs.hidden)  # a pass serves every batch but its first
    cache = PassCache(ctx.block, batches) if reuse_passes and len(stages) > 1 and batches > 1 else None
    for stage in stages:
        shared = {follower: group[0] for group in groups for follower in group[1:] if follower in stage}
        stats = dict.fromkeys(stage)
        if stats_layers & set(stage):
            def collect(names: list[str], recorder: ResidualRecorder | None = None,
                        cache: PassCache | None = None) -> dict:
                with timer("stats_forward"):
                    collected = collect_block_stats(ctx, names, hessian_layers, shared, hessian, timer, recorder,
                                                    cache)
                    if ctx.inputs.shared_out:
                        all_reduce_stats(collected, {name: linears[name].in_features for name in names},
                                         next(ctx.block.parameters()).device)
                    return collected

            last = stage is stages[-1]
            recorder = _residual_recorder(ctx, stage) if reuse_passes and last and ctx.wants_outputs else None
            if cache:  # the last pass records for the propagation where no residual gives the outputs
                cache.next_pass([linears[name] for name in stage],
                                record=not last or (not recorder and ctx.wants_outputs))
            stats = collect(stage, recorder, cache)
            kept = _kept_residual(ctx, stage, recorder) if recorder else None
            if starved := starved_experts(stage, stats, stats_layers, experts):
                schemes = _handle_starved(ctx, starved, stats, schemes, experts, collect, notes)
        elif cache:
            cache.clear()  # what the last pass recorded may read this stage's layers
        with timer("solve"):
            results.update(_solve_spread(ctx, _solve_together(stage, schemes, stats), schemes, stats, on_device))
    if kept:
        with timer("propagate"):
            ctx.outputs = kept.outputs()
    elif cache and cache.recorded:
        with timer("propagate"):
            cache.next_pass([], record=False)  # no statistics hooks to keep: any module may be served
            ctx.outputs = [block_output(cache.run(batch, lambda: ctx.block(hidden, **kwargs)))
                           for batch, (hidden, kwargs) in enumerate(zip(ctx.inputs.hidden, ctx.inputs.kwargs))]
    return results


def _residual_recorder(ctx: BlockContext, stage: list[str]) -> ResidualRecorder | None:
    """Hooks for the block's outputs from this (its last) stage's pass, where the stage is one linear that
    is not an expert, its kind of block is not known to lack a residual source, and the tensors fit."""
    if len(stage) != 1 or expert_pattern(stage[0]) is not None:
        return None
    source, layer = ctx.residuals.get(_residual_kind(ctx, stage), UNKNOWN), ctx.linears[stage[0]]
    if source is None or not fits(ctx.inputs.hidden, layer):
        return None
    return ResidualRecorder(ctx.block, layer, source)


def _kept_residual(ctx: BlockContext, stage: list[str], recorder: ResidualRecorder):
    if recorder.source != UNKNOWN:  # found, or found missing: blocks of this kind need not look again
        ctx.residuals[_residual_kind(ctx, stage)] = recorder.source
    return recorder.kept()


def _residual_kind(ctx: BlockContext, stage: list[str]) -> tuple:
    return type(ctx.block), tuple(ctx.linears), stage[0]


def _solve_spread(ctx: BlockContext, batches: list[list[str]], schemes: dict[str, Scheme], stats: dict,
                  on_device: bool) -> dict[str, QuantizedWeight]:
    """Solve each batch of layers (one scheme, one input). Across ranks, each rank solves the batches
    bin-packed to it by cost (columns² × rows, GPTQ's) and applies the codes the others broadcast."""
    linears, ranks = ctx.linears, current_ranks()
    owners = assign_by_cost([linears[names[0]].in_features ** 2 * sum(linears[n].out_features for n in names)
                             for names in batches], ranks.world)
    own = [names for names, owner in zip(batches, owners) if owner == ranks.rank]
    factor_hessians([(schemes[names[0]], stats[names[0]]) for names in own], next(ctx.block.parameters()).device)
    results = {}
    for names in own:
        results.update(quantize_linears([linears[n] for n in names], names, schemes[names[0]], stats[names[0]],
                                        on_device))
    if not ranks.active:
        return results
    shared = share_results({name: weight.to("cpu") for name, weight in results.items()}, set(owners))
    device = next(ctx.block.parameters()).device
    for names, owner in zip(batches, owners):
        if owner != ranks.rank:
            layers = [linears[n] for n in names]
            rotation = layer_rotation(layers[0], schemes[names[0]])
            for name, layer in zip(names, layers):
                received = shared[name].to(device)  # decoded where the owner decoded it
                apply_quantized(layer, received, rotation)
                results[name] = received if on_device else shared[name]
    return {name: results[name] for names in batches for name in names}  # one order on every rank


def collect_block_stats(ctx: BlockContext, names: list[str], hessian_for: set[str], shared: dict[str, str],
                        accumulation: str = "compensated", timed: Callable[[str], object] | None = None,
                        recorder: ResidualRecorder | None = None, cache: PassCache | None = None) -> dict:
    """The statistics of the named linears over one pass of the block's calibration inputs (`shared`:
    follower → leader, as `collect_stats` takes it). A pass may stop once every hooked layer has run, unless
    it holds experts: those not routed to in a batch do not run, and stopping at the last one would cut
    others' tokens short. A `recorder` (residual_outputs.py) is handed each batch's input and output (None
    where its hooks stopped the pass); a `cache` (pass_cache.py) serves and records submodule outputs."""
    stop = recorder is None and not any(expert_pattern(name) for name in names)
    with collect_stats({name: ctx.linears[name] for name in names}, hessian_for & set(names),
                       {f: lead for f, lead in shared.items() if f in names}, stop_when_seen=stop, timed=timed,
                       accumulation=accumulation) as collected:
        with recorder or nullcontext():
            for batch, (hidden, kwargs) in enumerate(zip(ctx.inputs.hidden, ctx.inputs.kwargs)):
                def forward(hidden=hidden, kwargs=kwargs):
                    return ctx.block(hidden, **kwargs)

                try:
                    out = block_output(cache.run(batch, forward) if cache else forward())
                except StopForward:
                    out = None
                if recorder:
                    recorder.batch_done(hidden, out)
    return collected


def starved_experts(stage: list[str], stats: dict, stats_layers: set[str], experts: StarvedExperts) -> list[str]:
    """The expert layers of `stage` whose calibration saw fewer than `experts.min_tokens` routed tokens."""
    return [name for name in stage if name in stats_layers and expert_pattern(name) is not None
            and stats[name].n_samples < experts.min_tokens]


def _handle_starved(ctx: BlockContext, starved: list[str], stats: dict, schemes: dict[str, Scheme],
                    experts: StarvedExperts, collect: Callable[[list[str]], dict], notes: dict) -> dict[str, Scheme]:
    """Give starved experts all-token statistics, or RTN (`experts.action`); note each in `notes`."""
    routed = {name: stats[name].n_samples for name in starved}
    rtn = [name for name in starved if experts.action == "rtn" and schemes[name].solver == "gptq"]
    again = [name for name in starved if name not in rtn]
    if again:
        with all_tokens_routed(ctx.block):
            stats.update(collect(again))
    schemes = dict(schemes)
    for name in rtn:
        schemes[name] = schemes[name].model_copy(update={"solver": "rtn", "act_order": False,
                                                          "static_groups": False, "damp": DEFAULT_DAMP})
    for name in starved:
        action = "rtn" if name in rtn else "all-token statistics"
        notes[ctx.full_name(name)] = {"routed_tokens": routed[name], "action": action}
    for action in sorted({notes[ctx.full_name(name)]["action"] for name in starved}):
        names = [name for name in starved if notes[ctx.full_name(name)]["action"] == action]
        log.warning("%s: %d expert layer(s) routed fewer than %d calibration tokens (fewest %d), given %s: %s%s",
                    ctx.prefix, len(names), experts.min_tokens, min(routed[n] for n in names), action,
                    ", ".join(names[:3]), ", …" if len(names) > 3 else "")
    return schemes


def _solve_together(stage: list[str], schemes: dict[str, Scheme], stats: dict) -> list[list[str]]:
    """Layers with one scheme and one LayerStats object are solved as one matrix (rows are independent)."""
    batches: dict[tuple, list[str]] = {}
    for name in stage:
        batches.setdefault((schemes[name], id(stats[name])), []).append(name)
    return list(batches.values())


def quantize_linears(layers: list[nn.Linear], names: list[str], scheme: Scheme, stats=None,
                     on_device: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize layers that share a scheme and an input by stacking their rows into one solve.

    Under a Hadamard transform the stacked weight and the statistics are rotated first and every layer
    rotates its input from then on. A layer whose input is already rotated online (the model rotation's
    down_proj) is quantized as it is: its weight and the statistics collected through its hook are
    already in the rotated basis.
    """
    weight = torch.cat([layer.weight.data for layer in layers]) if len(layers) > 1 else layers[0].weight.data
    rotation = layer_rotation(layers[0], scheme)
    if rotation is not None:
        weight = rotate_weight(weight, rotation)
        if stats is not None and needs_stats(scheme):
            stats = rotate_stats(stats, rotation)
    quantized = quantize_weight(weight, scheme, stats, " + ".join(names))
    parts = quantized.split_rows([layer.out_features for layer in layers]) if len(layers) > 1 else [quantized]
    for layer, part in zip(layers, parts):
        apply_quantized(layer, part, rotation)
    return {name: part if on_device else part.to("cpu") for name, part in zip(names, parts)}


def quantize_linear(linear: nn.Linear, scheme: Scheme, stats=None) -> QuantizedWeight:
    """Quantize one linear in place and return the codes on CPU."""
    return quantize_linears([linear], ["linear"], scheme, stats)["linear"]


def apply_quantized(linear: nn.Linear, quantized: QuantizedWeight, rotation: RandomHadamard | None = None) -> None:
    """Make `linear` compute as its quantized self: the dequantized weight, its input rotated online when
    the weight was quantized in a rotated basis, and quantized on the fly when the scheme says so."""
    linear.weight.data = quantized.dequantize(linear.weight.dtype).to(linear.weight.device)
    if rotation is not None:
        rotate_inputs_of(linear, rotation)
    quantize_inputs_of(linear, quantized.scheme.activations)


def snapshot_linears(model: nn.Module, names) -> dict:
    """A copy (on CPU) of what the named linears compute with: weight and online input transforms."""
    modules = {name: model.get_submodule(name) for name in names}
    return {name: (module.weight.detach().to("cpu", copy=True), input_rotation_of(module),
                   activation_format_of(module)) for name, module in modules.items()}


def restore_linears(model: nn.Module, snapshot: dict) -> None:
    """Put the linears back as `snapshot_linears` found them (undoing quantization and its hooks)."""
    for name, (weight, rotation, fmt_name) in snapshot.items():
        module = model.get_submodule(name)
        module.weight.data = weight.to(module.weight.device, copy=True)
        rotate_inputs_of(module, rotation)
        quantize_inputs_of(module, fmt_name)


def untie_lm_head(model: nn.Module) -> nn.Linear:
    """Give lm_head its own weight (a copy of the embedding) so it can be quantized alone."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return head
