"""The sensitivity stage: for every allocated linear, the layer-local proxies and the error of every
candidate scheme (block by block on full-precision inputs, like the quantization pipeline), then the
optional loss-Hessian measures (Hutchinson trace, power-iteration eigenvalue) and the measured KL.

The candidates' codes are kept (`CandidateCache`) so that the allocation chosen afterwards is applied
without quantizing again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from quantbench.allocation.gradients import GradientStats, LayerGradients
from quantbench.allocation.hessian_probes import LossHessian, hutchinson_traces, power_iteration
from quantbench.allocation.probe_serving import ProbeServing
from quantbench.allocation.problem import block_of
from quantbench.allocation.table import CandidateError, LayerSensitivity, SensitivityTable
from quantbench.calibration.stats import LayerStats
from quantbench.distributed import spread
from quantbench.errors import QuantbenchError
from quantbench.fsutil import save_tensors
from quantbench.model_io import block_output
from quantbench.experts import StarvedExperts, all_tokens_routed
from quantbench.pipeline import BlockContext, apply_quantized, collect_block_stats, drive_blocks, starved_experts
from quantbench.recipe import KEEP
from quantbench.quantized_weight import QuantizedWeight, unpack_weight
from quantbench.quantizers import needs_hessian, needs_stats, quantize_weight
from quantbench.quantizers.autoround import AutoRoundOptions, LearnedRounding, learn_rounding
from quantbench.quantizers.gptq import factor_hessians
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.quantizers.hadamard import layer_rotation, rotate_stats, rotate_weight, rotation_for
from quantbench.scaling import ScalingOptions, check_scalable, scaled_in_place
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight

log = logging.getLogger(__name__)
SCALES = "scales"  # key prefix of the scaled candidates' bases in a saved cache
CandidatesFor = Callable[[str], "list[Scheme]"]


@dataclass(frozen=True)
class HessianOptions:
    """How the loss-Hessian measures are taken: on the first `samples` calibration sequences cut to
    `seqlen`, `batch_size` per double backward; Hutchinson stops at `rel_stderr` or `max_probes`, probing
    one decoder block's layers at a time (`scope="block"`) or all layers at once (`"model"`, cheaper and
    noisier: the other layers' cross terms add variance); power iteration stops at `power_tol` or
    `power_iters`."""

    samples: int = 8
    seqlen: int = 512
    batch_size: int = 4
    rel_stderr: float = 0.05
    min_probes: int = 8
    max_probes: int = 64
    scope: str = "block"
    power_iters: int = 20
    power_tol: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class ScaledBasis:
    """Where an AWQ or SmoothQuant candidate quantizes a layer: its weight diag(1/rows)·W·diag(columns), its
    input x/columns (either None where its site left it alone)."""

    rows: torch.Tensor | None
    columns: torch.Tensor | None

    def to_original(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight of the scaled basis as the layer's own input and output see it."""
        if self.columns is not None:
            weight = weight / self.columns.to(weight.device)
        if self.rows is not None:
            weight = weight * self.rows.to(weight.device)[:, None]
        return weight

    def cpu(self) -> "ScaledBasis":
        return ScaledBasis(*(None if t is None else t.detach().cpu() for t in (self.rows, self.columns)))


@dataclass(frozen=True)
class BlockCandidate:
    """A candidate that is measured with its whole block (scaling, AutoRound): the layer's weight once the
    block was scaled (`basis`), the statistics of its input there (for a solver that reads them), and what
    AutoRound learned for it, when it learns."""

    weight: torch.Tensor
    basis: ScaledBasis | None = None
    stats: LayerStats | None = None
    learned: LearnedRounding | None = None


class CandidateCache:
    """The quantized weight of every (layer, candidate), on CPU, so the final allocation reuses them, and the
    keys whose candidate was quantized in a Hadamard-rotated basis (a layer whose input the model rotation
    already rotates online keeps that rotation and is quantized as it is, as in the pipeline), and the basis
    of every scaled (AWQ, SmoothQuant) candidate."""

    def __init__(self) -> None:
        self.weights: dict[tuple[str, str], QuantizedWeight | TritPlaneWeight] = {}
        self.rotated: set[tuple[str, str]] = set()
        self.scaled: dict[tuple[str, str], ScaledBasis] = {}

    def rotation(self, layer: str, scheme: str) -> RandomHadamard | None:
        """The online rotation the candidate needs on top of whatever the layer already does."""
        quantized = self.get(layer, scheme)
        return rotation_for(quantized.scheme, quantized.shape[1]) if (layer, scheme) in self.rotated else None

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.weights

    def get(self, layer: str, scheme: str) -> QuantizedWeight | TritPlaneWeight:
        return self.weights[(layer, scheme)]

    def save(self, path: str | Path) -> None:
        """All codes in one safetensors file (packed as export packs them), keyed `layer|scheme|tensor`."""
        tensors, shapes = {}, {}
        for (layer, scheme), weight in self.weights.items():
            for key, tensor in weight.pack().items():
                tensors[f"{layer}|{scheme}|{key}"] = tensor.contiguous()
            shapes[f"{layer}|{scheme}"] = list(weight.shape)
        for (layer, scheme), basis in self.scaled.items():
            for side in ("rows", "columns"):
                if getattr(basis, side) is not None:
                    tensors[f"{SCALES}|{layer}|{scheme}|{side}"] = getattr(basis, side).contiguous()
        rotated = [f"{layer}|{scheme}" for layer, scheme in self.rotated]
        save_tensors(tensors, path, {"shapes": json.dumps(shapes), "rotated": json.dumps(rotated)})

    @classmethod
    def load(cls, path: str | Path) -> "CandidateCache":
        cache = cls()
        with safe_open(str(path), "pt") as handle:
            keys = set(handle.keys())
            shapes = json.loads(handle.metadata()["shapes"])
            cache.rotated = {tuple(entry.split("|")) for entry in json.loads(handle.metadata()["rotated"])}
            for entry, shape in shapes.items():
                layer, scheme = entry.split("|")
                tensors = {key.rsplit("|", 1)[1]: handle.get_tensor(key) for key in handle.keys()
                           if key.startswith(entry + "|")}
                cache.weights[(layer, scheme)] = unpack_weight(Scheme.parse(scheme), tuple(shape), tensors)
                if Scheme.parse(scheme).scaling != "none":
                    sides = {side: handle.get_tensor(f"{SCALES}|{entry}|{side}") if f"{SCALES}|{entry}|{side}" in keys
                             else None for side in ("rows", "columns")}
                    cache.scaled[(layer, scheme)] = ScaledBasis(**sides)
        return cache

    def effective_weight(self, layer: str, scheme: str, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight the layer computes with, in its original input basis (a rotated candidate's
        dequantized W·R rotated back, a scaled one's scaled back), decoded on `device`."""
        weight = self.get(layer, scheme).to(device).dequantize(torch.float32)
        rotation = self.rotation(layer, scheme)
        weight = rotation.rows_inverse(weight) if rotation else weight
        basis = self.scaled.get((layer, scheme))
        return (basis.to_original(weight) if basis else weight).to(dtype)


class SensitivityStage:
    """A block stage of the driver: every linear with candidates is quantized with each of them on the inputs
    the block receives in this pass (from the upstream blocks as quantized so far), and the errors recorded.

    Per candidate: its exact storage, ‖ΔW‖², the GPTQ objective tr(ΔW A ΔWᵀ) per token (A = XᵀX of the
    layer's input here) and, with the gradient statistics of the full-precision model, the first-order,
    diagonal-Fisher and output-Fisher estimates of the loss change (allocation/gradients.py). With
    `block_tokens`, also the change of the block's output with only that layer quantized, weighted per unit
    by the block output's squared gradient, on the first `block_tokens` calibration tokens (`block_output`).
    Layers keep their full-precision weights; the codes go to `cache`.

    A scaled (AWQ, SmoothQuant) or AutoRound candidate acts on a whole block: per such scheme, the block's
    layers offered it are scaled together as the pipeline would scale them (`scaling`'s options) and/or
    learn their rounding together (`autoround`'s), then each layer is measured as above, alone, on its
    effective weight in its own basis; the block is restored after.
    """

    def __init__(self, candidates_for: CandidatesFor, cache: CandidateCache | None = None,
                 gradients: GradientStats | None = None, block_tokens: int = 0,
                 experts: StarvedExperts = StarvedExperts(), scaling: ScalingOptions = ScalingOptions(),
                 autoround: AutoRoundOptions = AutoRoundOptions(), reuse_probes: bool = True) -> None:
        self.candidates_for, self.gradients, self.block_tokens = candidates_for, gradients, block_tokens
        self.reuse_probes = reuse_probes  # block_output's probes served what the reference computed
        self.scaling, self.autoround, self.model_type = scaling, autoround, ""
        self.experts = experts  # its threshold: experts routed fewer tokens are measured on all tokens
        self.starved_experts: dict[str, dict] = {}  # full name → routed tokens and what was done
        self.cache = cache if cache is not None or not block_tokens else CandidateCache()
        self.layers: dict[str, LayerSensitivity] = {}
        self.errors: dict[tuple[str, str], CandidateError] = {}

    def begin(self, model: nn.Module, device: torch.device) -> None:
        self.model_type = model.config.model_type

    def needs_block(self, prefix: str, linear_names) -> bool:
        return any(self.candidates_for(f"{prefix}.{name}") for name in linear_names)

    reads_inputs = needs_block  # every candidate is measured on the block's inputs

    @torch.no_grad()
    def run_block(self, ctx: BlockContext) -> None:
        candidates = {name: self.candidates_for(ctx.full_name(name)) for name in ctx.linears}
        linears = {name: ctx.linears[name] for name, schemes in candidates.items() if schemes}
        if not linears:
            return
        groups = ctx.input_groups(linears)
        shared = {follower: group[0] for group in groups for follower in group[1:]}
        with ctx.timer("stats_forward"):
            stats = collect_block_stats(ctx, list(linears), set(linears), shared)
            if starved := starved_experts(list(linears), stats, set(linears), self.experts):
                self.starved_experts.update({ctx.full_name(name): {"routed_tokens": stats[name].n_samples,
                                                                   "action": "all-token statistics"}
                                             for name in starved})
                with all_tokens_routed(ctx.block):
                    stats.update(collect_block_stats(ctx, starved, set(starved), shared))
        probe = _BlockProbe(ctx, self.gradients, self.block_tokens, self.reuse_probes) if self.block_tokens else None
        rotated: dict = {}  # (id of shared stats, rotation seed) → Rᵀ(Σxᵀx)R, reused across candidates
        with ctx.timer("candidates"):
            factor_hessians([(scheme, stats[name]) for name, schemes in candidates.items() if name in stats
                             for scheme in schemes if scheme.scaling == "none"], next(ctx.block.parameters()).device)
            errors = {}
            for scheme, group in self._block_candidates(ctx, candidates, shared):
                for name, candidate in group.items():
                    errors[(name, scheme)] = self._measure(ctx, name, scheme, stats[name], rotated, probe, candidate)
            jobs = [(name, scheme) for name in linears for scheme in candidates[name] if (name, scheme) not in errors]
            errors.update(self._spread(ctx, jobs, stats, rotated, probe))
            for name, linear in linears.items():
                self.layers[ctx.full_name(name)] = layer_proxies(ctx.full_name(name), linear, stats[name])
                for scheme in candidates[name]:
                    self.errors[(ctx.full_name(name), scheme.name)] = errors[(name, scheme)]

    def _spread(self, ctx: BlockContext, jobs: list[tuple[str, Scheme]], stats: dict, rotated: dict,
                probe: "_BlockProbe | None") -> dict:
        """Measure (layer, candidate) jobs; under torchrun each rank measures those bin-packed to it
        (columns² × rows) and every rank receives all the errors and cached codes. Every rank has seen the
        whole calibration set, so the table is the one a single process measures."""
        def measure(job: tuple[str, Scheme]) -> dict:
            name, scheme = job
            error = self._measure(ctx, name, scheme, stats[name], rotated, probe)
            key = (ctx.full_name(name), scheme.name)
            cached = None if self.cache is None else (self.cache.weights[key], key in self.cache.rotated)
            return {job: (error, cached)}

        def cost(job: tuple[str, Scheme]) -> float:
            linear = ctx.linears[job[0]]
            return float(linear.in_features ** 2 * linear.out_features)

        measured = spread(jobs, cost, measure)
        for (name, scheme), (_, cached) in measured.items():
            if cached is not None:
                key = (ctx.full_name(name), scheme.name)
                self.cache.weights[key] = cached[0]
                if cached[1]:
                    self.cache.rotated.add(key)
        return {job: error for job, (error, _) in measured.items()}

    def _measure(self, ctx: BlockContext, name: str, scheme: Scheme, stats: LayerStats, rotated: dict,
                 probe: "_BlockProbe | None", block: "BlockCandidate | None" = None) -> CandidateError:
        full_name, linear = ctx.full_name(name), ctx.linears[name]
        grads = self.gradients.layers.get(full_name) if self.gradients else None
        error = quantize_candidate(full_name, linear, scheme, stats, self.cache, rotated, grads, block)
        if probe is not None:
            error.block_output = probe.cost(linear, self.cache.effective_weight(
                full_name, scheme.name, linear.weight.dtype, linear.weight.device))
        return error

    def _block_candidates(self, ctx: BlockContext, candidates: dict[str, list[Scheme]], shared: dict):
        """For each candidate scheme that acts on the whole block, (scheme, layer → BlockCandidate): the block
        scaled and/or its rounding learned with every layer offered the scheme in it, one scheme at a time, the
        block restored before each is yielded. A scaled block's statistics are measured again, as the
        pipeline measures them after scaling."""
        offered: dict[Scheme, list[str]] = {}
        for name, schemes in candidates.items():
            for scheme in schemes:
                if scheme.learns_from_block:
                    offered.setdefault(scheme, []).append(name)
        for scheme, names in offered.items():
            group = {}
            wanted = dict.fromkeys(names, scheme)
            with contextlib.ExitStack() as scaled:
                bases = {}
                if scheme.scaling != "none":
                    check_scalable(self.model_type)
                    bases = scaled.enter_context(scaled_in_place(ctx, wanted, self.model_type, self.scaling))
                stats = {}
                if bases and needs_stats(scheme):
                    stats = collect_block_stats(ctx, names, set(names) if needs_hessian(scheme) else set(),
                                                {f: lead for f, lead in shared.items() if f in names})
                learned = {}
                if scheme.solver == "autoround":
                    learned = learn_rounding(ctx.block, {name: ctx.linears[name] for name in names}, wanted,
                                             list(zip(ctx.inputs.hidden, ctx.inputs.kwargs)), self.autoround)
                for name in names:  # a layer its sites left alone may still be clipped: measured as scaled too
                    basis = ScaledBasis(*bases.get(name, (None, None))) if scheme.scaling != "none" else None
                    group[name] = BlockCandidate(ctx.linears[name].weight.detach().clone(), basis, stats.get(name),
                                                 learned.get(name))
            yield scheme, group


class _BlockProbe:
    """The block's full-precision output on its first calibration tokens, and the gradient-weighted change
    of that output when one layer computes with another weight. With `reuse`, each probe is served what the
    reference forward computed before the layer (probe_serving.py): the same costs, bit for bit."""

    def __init__(self, ctx: BlockContext, gradients: GradientStats | None, tokens: int, reuse: bool = True) -> None:
        self.block, self.kwargs, self.hidden = ctx.block, [], []
        seen = 0
        for hidden, kwargs in zip(ctx.inputs.hidden, ctx.inputs.kwargs):
            if seen >= tokens:
                break
            self.hidden.append(hidden)
            self.kwargs.append(kwargs)
            seen += hidden.shape[0] * hidden.shape[1]
        self.serving = ProbeServing(self.block, list(ctx.linears.values()), len(self.hidden)) if reuse else None
        self.reference = [block_output(self._reference(batch, h, k)).float()
                          for batch, (h, k) in enumerate(zip(self.hidden, self.kwargs))]
        weight = gradients.blocks.get(ctx.prefix) if gradients else None
        self.weight = weight.to(self.reference[0].device) if weight is not None else None
        self.tokens = sum(r.shape[0] * r.shape[1] for r in self.reference)

    def cost(self, linear: nn.Linear, weight: torch.Tensor) -> float:
        original = linear.weight.data
        linear.weight.data = weight
        try:
            total = 0.0
            for batch, (h, k, ref) in enumerate(zip(self.hidden, self.kwargs, self.reference)):
                output = (self.serving.probe(linear, batch, lambda: self.block(h, **k)) if self.serving else
                          self.block(h, **k))
                change = (block_output(output).float() - ref).square()
                total += float((change * self.weight).sum() if self.weight is not None else change.sum())
        finally:
            linear.weight.data = original
        return 0.5 * total / self.tokens if self.weight is not None else total / self.tokens

    def _reference(self, batch: int, hidden: torch.Tensor, kwargs: dict):
        forward = lambda: self.block(hidden, **kwargs)  # noqa: E731
        return self.serving.recorded(batch, forward) if self.serving else forward()


def layer_proxies(name: str, linear: nn.Linear, stats: LayerStats) -> LayerSensitivity:
    xtx = stats.xtx.double() / max(1, stats.n_samples)
    return LayerSensitivity(name=name, out_features=linear.out_features, in_features=linear.in_features,
                            xtx_trace=float(xtx.trace()), xtx_top_eig=top_eigenvalue_psd(xtx))


def top_eigenvalue_psd(matrix: torch.Tensor) -> float:
    """λ_max of a symmetric PSD matrix by LOBPCG (dense eigvalsh below the size where LOBPCG pays)."""
    n = matrix.shape[0]
    if n < 64:
        return float(torch.linalg.eigvalsh(matrix)[-1])
    start = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=matrix.dtype).to(matrix.device)
    values, _ = torch.lobpcg(matrix, k=1, X=start, largest=True, tol=1e-6, niter=200)
    return float(values[0])


def quantize_candidate(name: str, linear: nn.Linear, scheme: Scheme, stats: LayerStats,
                       cache: CandidateCache | None, rotated_stats: dict | None = None,
                       gradients: LayerGradients | None = None, block: BlockCandidate | None = None) -> CandidateError:
    """Quantize a copy of the layer's weight with `scheme` and measure ‖ΔW‖² and tr(ΔW XᵀX ΔWᵀ) per token
    (both invariant under the rotation of a Hadamard candidate, so measured in its basis) and, with the
    layer's gradient statistics, the first-order, Fisher and output-Fisher loss estimates (on ΔW in the
    layer's own input basis). A candidate measured with its block (`block`) quantizes the weight the block
    left (scaled, in the scaled input's statistics; by the learned rounding) and is measured in the layer's
    own basis."""
    own = linear.weight.float()
    basis = block.basis if block is not None else None
    source = block.weight.float() if block is not None else own
    rotation = layer_rotation(linear, scheme)
    weight = rotate_weight(source, rotation) if rotation else source
    layer_stats = stats
    if basis is not None:  # the solver reads the scaled block's statistics; the error is measured on `stats`
        layer_stats = block.stats
        if rotation is not None and layer_stats is not None:
            layer_stats = rotate_stats(layer_stats, rotation)
    elif rotation is not None:
        key = (id(stats), rotation.seed)
        rotated_stats = {} if rotated_stats is None else rotated_stats
        if key not in rotated_stats:
            rotated_stats[key] = rotate_stats(stats, rotation)
        layer_stats = rotated_stats[key]
    learned = block.learned if block is not None else None
    quantized = quantize_weight(weight.clone(), scheme, learned if learned is not None else layer_stats, name)
    decoded = quantized.dequantize(torch.float32).to(weight.device)
    if basis is None:
        delta = decoded - weight
        row_errors = ((delta @ layer_stats.xtx) * delta).sum(1) / max(1, layer_stats.n_samples)
        plain = rotation.rows_inverse(delta) if rotation is not None else delta  # ΔW in the layer's input basis
    else:
        plain = basis.to_original(rotation.rows_inverse(decoded) if rotation is not None else decoded) - own
        delta = plain
        row_errors = ((plain @ stats.xtx) * plain).sum(1) / max(1, stats.n_samples)
    if cache is not None:
        cache.weights[(name, scheme.name)] = quantized.to("cpu")
        if rotation is not None:
            cache.rotated.add((name, scheme.name))
        if basis is not None:
            cache.scaled[(name, scheme.name)] = basis.cpu()
    error = CandidateError(layer=name, scheme=scheme.name, storage_bits=int(quantized.storage_bits),
                           weight_error=float(delta.double().square().sum()), output_error=float(row_errors.sum()))
    if gradients is not None:
        device = delta.device
        error.first_order = float((gradients.grad.to(device) * plain).abs().sum())
        error.fisher = 0.5 * float((gradients.fisher.to(device) * plain.square()).sum())
        error.output_fisher = 0.5 * float((gradients.out_sq.to(device) * row_errors).sum())
    return error


def loss_hessian_measures(model: nn.Module, input_ids: torch.Tensor, layers: dict[str, LayerSensitivity],
                          device: torch.device, options: HessianOptions, trace: bool, eigenvalue: bool,
                          progress: bool = True) -> None:
    """Fill `hessian_trace` (per weight, with its standard error) and/or `top_eigenvalue` of each layer, from
    products with the Hessian of the model's loss on calibration data. The whole model runs on `device`."""
    ids = input_ids[:options.samples, :options.seqlen]
    with _whole_model_on(model, device):
        modules = [model.get_submodule(name) for name in layers]
        hessian = LossHessian(model, ids, modules, batch_size=options.batch_size)
        names = list(layers)
        if trace:
            for members in tqdm(_probe_groups(names, options.scope), desc="hutchinson", unit="group",
                                disable=not progress):
                estimates = hutchinson_traces(lambda vs, m=members: hessian(vs, only=m),
                                              [hessian.weights[i] for i in members], rel_stderr=options.rel_stderr,
                                              min_probes=options.min_probes, max_probes=options.max_probes,
                                              seed=options.seed,
                                              products=lambda probes, m=members: hessian.products(probes, only=m))
                for i, estimate in zip(members, estimates):
                    info, numel = layers[names[i]], hessian.weights[i].numel()
                    info.hessian_trace = estimate.trace / numel
                    info.hessian_trace_stderr = estimate.stderr / numel
                    info.hessian_probes = estimate.probes
        if eigenvalue:
            for i in tqdm(range(len(names)), desc="power iteration", unit="layer", disable=not progress):
                found = power_iteration(hessian.for_layer(i), hessian.weights[i], max_iters=options.power_iters,
                                        tol=options.power_tol, seed=options.seed)
                layers[names[i]].top_eigenvalue = found.value
                layers[names[i]].eigenvalue_converged = found.converged


def _probe_groups(names: list[str], scope: str) -> list[list[int]]:
    if scope == "model":
        return [list(range(len(names)))]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(block_of(name), []).append(i)
    return list(groups.values())


@torch.no_grad()
def measured_kl(model: nn.Module, input_ids: torch.Tensor, errors: dict, cache: CandidateCache,
                device: torch.device, batch_size: int = 4, progress: bool = True) -> None:
    """For every (layer, candidate): quantize that layer alone and measure the mean per-token KL divergence
    KL(p_full ‖ p_quantized) of the next-token distribution on `input_ids`."""
    with _whole_model_on(model, device):
        batches = [batch.to(device) for batch in input_ids.split(batch_size)]
        reference = [torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1) for b in batches]
        probabilities = [ref.exp() for ref in reference]
        for (layer, scheme), error in tqdm(errors.items(), desc="measured KL", unit="candidate",
                                           disable=not progress):
            linear = model.get_submodule(layer)
            original = linear.weight.data
            linear.weight.data = cache.effective_weight(layer, scheme, original.dtype, device)
            try:
                total, tokens = 0.0, 0
                for batch, ref, p in zip(batches, reference, probabilities):
                    logq = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
                    total += float((p * (ref - logq)).sum(dtype=torch.float64))
                    tokens += batch.numel()
                error.kl = total / tokens
            finally:
                linear.weight.data = original


@contextmanager
def _whole_model_on(model: nn.Module, device: torch.device):
    """The whole model on `device` in float32 for the duration; moved and cast back afterwards."""
    param = next(model.parameters())
    home, dtype = param.device, param.dtype
    model.to(device=device, dtype=torch.float32)
    try:
        yield
    finally:
        model.to(device=home, dtype=dtype)


def apply_allocation(model: nn.Module, schemes: dict[str, str], cache: CandidateCache) -> dict:
    """Make every allocated layer compute as its cached candidate (online rotation included), for good;
    returns the QuantizedWeights that export packs."""
    quantized = {}
    if scaled := sorted({scheme for layer, scheme in schemes.items() if (layer, scheme) in cache.scaled}):
        raise QuantbenchError(f"{', '.join(scaled)} quantize a scaled basis that the model's other layers must "
                              "share; such an allocation is quantized again (allocation.requantize: true)")
    for layer, scheme in schemes.items():
        if scheme == KEEP:
            continue
        linear = model.get_submodule(layer)
        weight = cache.get(layer, scheme)
        apply_quantized(linear, weight.to(linear.weight.device), cache.rotation(layer, scheme))
        quantized[layer] = weight
    return quantized


@contextmanager
def allocated_weights(model: nn.Module, schemes: dict[str, str], cache: CandidateCache):
    """For the duration, every allocated layer computes with its cached candidate's effective weight (no
    hooks: a rotated candidate is rotated back into the weight); the original weights come back after."""
    originals = {}
    try:
        for layer, scheme in schemes.items():
            if scheme == KEEP:
                continue
            linear = model.get_submodule(layer)
            originals[layer] = linear.weight.data
            linear.weight.data = cache.effective_weight(layer, scheme, originals[layer].dtype, originals[layer].device)
        yield
    finally:
        for layer, weight in originals.items():
            model.get_submodule(layer).weight.data = weight


def sensitivity_table(model: nn.Module, input_ids: torch.Tensor, candidates_for: CandidatesFor,
                      device: torch.device, measure: Iterable[str] = (), hessian: HessianOptions = HessianOptions(),
                      kl_samples: int = 4, batch_size: int = 8, progress: bool = True,
                      cache: CandidateCache | None = None,
                      after_phase: Callable[[SensitivityTable], None] | None = None,
                      gradients: GradientStats | None = None, block_tokens: int = 0,
                      experts: StarvedExperts = StarvedExperts(), scaling: ScalingOptions = ScalingOptions(),
                      autoround: AutoRoundOptions = AutoRoundOptions(), reuse_probes: bool = True) -> SensitivityTable:
    """The whole stage on full-precision inputs: the candidates block by block (the block driver with the
    sensitivity stage alone), then the costly measures named in `measure`: `trace` (Hutchinson),
    `eigenvalue` (power iteration), `kl` (needs a cache; one is made if none given). `gradients` adds the
    gradient-based measures, `block_tokens` the block-output one (see SensitivityStage); `experts` sets the
    routed-token count below which an expert is measured on every calibration token; `scaling` and
    `autoround` are the options of the candidates that scale or learn their block; `reuse_probes`: see
    SensitivityStage.
    `after_phase(table)` is called once the candidates and then each measure are done (to save partial work);
    `table.meta["seconds"]` holds each phase's time."""
    measure = set(measure)
    cache = cache if cache is not None else CandidateCache()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    stage = SensitivityStage(candidates_for, cache, gradients, block_tokens, experts, scaling, autoround, reuse_probes)
    drive_blocks(model, input_ids, device, [stage], batch_size, progress, desc="sensitivity")
    layers, errors = stage.layers, stage.errors
    if not layers:
        raise ValueError("no layer has candidates")
    seconds["candidates"] = round(time.perf_counter() - started, 2)
    table = SensitivityTable(layers, errors, list(dict.fromkeys(scheme for _, scheme in errors)),
                             {"seconds": seconds, "starved_experts": stage.starved_experts})
    phases = {"trace": lambda: loss_hessian_measures(model, input_ids, layers, device, hessian, True, False, progress),
              "eigenvalue": lambda: loss_hessian_measures(model, input_ids, layers, device, hessian, False, True,
                                                          progress),
              "kl": lambda: measured_kl(model, input_ids[:kl_samples, :hessian.seqlen], errors, cache, device,
                                        progress=progress)}
    for name, phase in phases.items():
        if after_phase is not None:
            after_phase(table)
        if name in measure:
            started = time.perf_counter()
            phase()
            seconds[name] = round(time.perf_counter() - started, 2)
    if after_phase is not None:
        after_phase(table)
    return table
