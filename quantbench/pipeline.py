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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.activations import activation_format_of, input_rotation_of, quantize_inputs_of, rotate_inputs_of
from quantbench.calibration.stats import StopForward, collect_stats, input_sharing
from quantbench.model_io import block_linears, blocks_path, decoder_blocks, move_except_blocks
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers import needs_hessian, needs_stats, quantize_weight
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.quantizers.hadamard import rotate_stats, rotate_weight, rotation_for
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)
SchemeLookup = Callable[[str], "Scheme | None"]


@dataclass
class BlockInputs:
    """The hidden states entering a block, one tensor per calibration mini-batch, and the keyword
    arguments (attention mask, position ids, rotary embeddings, …) the model passed with each."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class StageTimer:
    """Seconds per pipeline stage; synchronises the device around each timed span so GPU work is
    charged to the stage that launched it. `fine=True` also times the Hessian accumulation inside hooks."""

    def __init__(self, device: torch.device, fine: bool = False) -> None:
        self.device, self.fine = device, fine
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        if stage == "hessian" and not self.fine:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def summary(self) -> dict[str, float]:
        """Rounded seconds; the stats passes are reported without the Hessian time they contain."""
        out = dict(self.seconds)
        if "hessian" in out and "stats_forward" in out:
            out["stats_forward"] -= out["hessian"]
        return {k: round(v, 3) for k, v in out.items()}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device,
                         batch_size: int) -> BlockInputs:
    """Run the model up to its first decoder block for every mini-batch, keeping what the block receives."""
    first_block = decoder_blocks(model)[0]
    captured = BlockInputs(hidden=[], kwargs=[])

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [_block_output(block(hidden, **kwargs)) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


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
    _sharing: list[list[str]] | None = None

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def input_groups(self, names) -> list[list[str]]:
        """`names` grouped by the input tensor they read, in forward order (q/k/v, o, gate/up, down)."""
        if self._sharing is None:
            self._sharing = input_sharing(self.block, self.linears,
                                          lambda: feed_block(self.block, self.inputs, batches=1))
        wanted = set(names)
        return [[n for n in group if n in wanted] for group in self._sharing if wanted & set(group)]


class BlockStage(Protocol):
    """A step the driver runs on every block, in order, before it propagates the block's outputs."""

    def run_block(self, ctx: BlockContext) -> None: ...


@torch.no_grad()
def drive_blocks(model: nn.Module, input_ids: torch.Tensor, device: torch.device, stages: list[BlockStage],
                 batch_size: int = 8, progress: bool = True, timer: StageTimer | None = None,
                 desc: str = "blocks") -> None:
    """The one block driver: capture what the first block receives, then for every block move it to the
    device, run each stage on it, and run the block (as the stages left it) to make the next block's
    inputs. Only one block and one block's activations for the calibration samples live on the device."""
    timer = timer or StageTimer(device)
    home = next(model.parameters()).device
    prefix = blocks_path(model)
    move_except_blocks(model, device)
    try:
        with timer("capture"):
            inputs = capture_block_inputs(model, input_ids, device, batch_size)
        for index, block in enumerate(tqdm(decoder_blocks(model), desc=desc, unit="block", disable=not progress)):
            with timer("transfer"):
                block.to(device)
            ctx = BlockContext(index, f"{prefix}.{index}", block, block_linears(block), inputs, timer)
            for stage in stages:
                stage.run_block(ctx)
            with timer("propagate"):
                inputs.hidden = run_block(block, inputs)
            with timer("transfer"):
                block.to(home)
    finally:
        model.to(home)


class QuantizeStage:
    """Quantize every linear that `scheme_for(full_name)` assigns a scheme, in place (see quantize_block);
    `results` collects the QuantizedWeights (on CPU) by full name."""

    def __init__(self, scheme_for: SchemeLookup, true_sequential: bool = True, hessian: str = "fp32") -> None:
        self.scheme_for, self.true_sequential = scheme_for, true_sequential
        self.tensor_cores = hessian == "tensor_cores"
        self.results: dict[str, QuantizedWeight] = {}

    def run_block(self, ctx: BlockContext) -> None:
        schemes = {name: scheme for name in ctx.linears if (scheme := self.scheme_for(ctx.full_name(name)))}
        for name, quantized in quantize_block(ctx, schemes, self.true_sequential, self.tensor_cores).items():
            self.results[ctx.full_name(name)] = quantized


def quantize_model(model: nn.Module, input_ids: torch.Tensor, scheme_for: SchemeLookup, device: torch.device,
                   batch_size: int = 8, progress: bool = True, true_sequential: bool = True,
                   timer: StageTimer | None = None, hessian: str = "fp32") -> dict[str, QuantizedWeight]:
    """Quantize every decoder-block linear that `scheme_for(full_name)` assigns a scheme, in place: the block
    driver with the quantize stage alone. The model's weights are replaced by their dequantized values; the
    returned QuantizedWeights (on CPU) hold the codes that export packs."""
    stage = QuantizeStage(scheme_for, true_sequential, hessian)
    drive_blocks(model, input_ids, device, [stage], batch_size, progress, timer, desc="quantize blocks")
    return stage.results


def quantize_block(ctx: BlockContext, schemes: dict[str, Scheme], true_sequential: bool,
                   tensor_cores: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize a block's linears. When a solver reads calibration statistics, the linears are grouped by the
    input they share (q/k/v, o, gate/up, down) and, with `true_sequential`, each group is calibrated on inputs
    produced by the already-quantized earlier groups; layers sharing an input share one Hessian.
    `tensor_cores` accumulates the Hessians of half-precision CUDA activations on tensor cores."""
    linears, timer = ctx.linears, ctx.timer
    stats_layers = {name for name, scheme in schemes.items() if needs_stats(scheme)}
    hessian_layers = {name for name, scheme in schemes.items() if needs_hessian(scheme)}
    if not stats_layers:  # a statistics pass costs a block forward: skip it when no solver reads one
        with timer("solve"):
            return {name: quantize_linear(linears[name], scheme) for name, scheme in schemes.items()}
    groups = ctx.input_groups(schemes)
    stages = groups if true_sequential else [[name for group in groups for name in group]]
    results = {}
    for stage in stages:
        shared = {follower: group[0] for group in groups for follower in group[1:] if follower in stage}
        stats = dict.fromkeys(stage)
        if stats_layers & set(stage):
            with timer("stats_forward"):
                with collect_stats({name: linears[name] for name in stage}, hessian_layers & set(stage), shared,
                                   stop_when_seen=True, timed=timer, tensor_cores=tensor_cores) as stats:
                    feed_block(ctx.block, ctx.inputs)
        with timer("solve"):
            for names in _solve_together(stage, schemes, stats):
                results.update(quantize_linears([linears[n] for n in names], names, schemes[names[0]], stats[names[0]]))
    return results


def _solve_together(stage: list[str], schemes: dict[str, Scheme], stats: dict) -> list[list[str]]:
    """Layers with one scheme and one LayerStats object are solved as one matrix (rows are independent)."""
    batches: dict[tuple, list[str]] = {}
    for name in stage:
        batches.setdefault((schemes[name], id(stats[name])), []).append(name)
    return list(batches.values())


def quantize_linears(layers: list[nn.Linear], names: list[str], scheme: Scheme, stats=None) -> dict[str, QuantizedWeight]:
    """Quantize layers that share a scheme and an input by stacking their rows into one solve.

    Under a Hadamard transform the stacked weight and the statistics are rotated first and every layer
    rotates its input from then on. A layer whose input is already rotated online (the model rotation's
    down_proj) is quantized as it is: its weight and the statistics collected through its hook are
    already in the rotated basis.
    """
    weight = torch.cat([layer.weight.data for layer in layers]) if len(layers) > 1 else layers[0].weight.data
    rotation = None if input_rotation_of(layers[0]) is not None else rotation_for(scheme, weight.shape[1])
    if rotation is not None:
        weight = rotate_weight(weight, rotation)
        if stats is not None and needs_stats(scheme):
            stats = rotate_stats(stats, rotation)
    quantized = quantize_weight(weight, scheme, stats, " + ".join(names))
    parts = quantized.split_rows([layer.out_features for layer in layers]) if len(layers) > 1 else [quantized]
    for layer, part in zip(layers, parts):
        apply_quantized(layer, part, rotation)
    return {name: part.to("cpu") for name, part in zip(names, parts)}


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
