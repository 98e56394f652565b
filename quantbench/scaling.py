"""AWQ and SmoothQuant as a block stage: per input channel, scale a layer's input by 1/s and its weight
columns by s, with 1/s folded into the operation that produces the input, so the model computes the same
function and nothing runs online.

A *site* is such a producer and the layers reading its output: a block's attention norm and q/k/v; its MLP
norm and every gate/up (each expert's, the shared expert's, the router); an up projection and the down
projection after it (per expert); v_proj and o_proj when their widths match (no grouped-query attention).
A site is scaled when a quantized reader's scheme asks for it; its other readers get the same s (exact).

- AWQ (Lin et al.): s = mean|x|^α, normalised so that √(max s · min s) = 1, for α on a grid in [0, 1); the α whose
  fake-quantized readers (their scheme's round-to-nearest grid) give the least block output error on a
  sample of the calibration tokens wins (α = 0 is no scaling, so the search never loses to it); a site inside
  an MLP whose output joins the residual directly is scored on the MLP alone, the same error. Then each
  AWQ layer other than q/k clips its groups' ranges by the factor with the least output error
  tr(ΔHΔᵀ) per group on all calibration tokens.
- SmoothQuant (Xiao et al.): s = max|x|^α / max|W|^(1−α) per input channel, α the migration strength.

The stage runs before the quantize stage, which then calibrates and quantizes the scaled layers.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.activations import activation_format_of, input_rotation_of, quantize_inputs_of, rotate_inputs_of
from quantbench.calibration.stats import collect_stats
from quantbench.distributed import all_reduce_stats, reduce_in_place, sum_across_ranks
from quantbench.distributed import current as current_ranks
from quantbench.errors import QuantbenchError
from quantbench.experts import router_name
from quantbench.model_io import ATTENTION_READERS, MLP_READERS, block_linears, block_output, trial_autocast
from quantbench.quantizers.hadamard import rotation_for
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import DEFAULT_DAMP, Scheme

log = logging.getLogger(__name__)

NORMS = {  # model type → (the norm before attention, the norm before the MLP, added to its weight in use)
    **{kind: ("input_layernorm", "post_attention_layernorm", 0.0)
       for kind in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "ernie4_5", "seed_oss", "helium",
                    "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "glm4_moe", "ernie4_5_moe",
                    "hunyuan_v1_moe", "dots1", "exaone_moe", "solar_open", "gpt_oss")},
    **dict.fromkeys(("gemma", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"),
                    ("input_layernorm", "post_attention_layernorm", 1.0)),
    **{kind: ("input_layernorm", "pre_feedforward_layernorm", 1.0) for kind in ("gemma2", "gemma3_text", "gemma3")},
}
SCALABLE_TYPES = tuple(NORMS)
POST_MLP_NORM = ("gemma2", "gemma3_text", "gemma3")  # their MLP output is normalised before it joins the residual
LAYER_NORMS = "its attention and MLP read LayerNorms whose biases would need folding as well, which is not built yet"
UNSCALED_BECAUSE = {
    "opt": "its MLP reads a LayerNorm whose bias would need folding as well, which is not built yet",
    **dict.fromkeys(("gpt_neox", "starcoder2", "stablelm", "phimoe", "phi", "gptj", "falcon", "bloom"), LAYER_NORMS),
    **dict.fromkeys(("olmo2", "olmo3", "exaone4", "flex_olmo"),
                    "its norms come after attention and the MLP, so no norm before them takes the scales"),
    **dict.fromkeys(("glm4", "afmoe"), "its norms after attention and after the MLP are not handled yet"),
    "granitemoe": "its experts sit under `block_sparse_moe`, which the sites do not describe yet",
    **dict.fromkeys(("apertus", "arcee"),
                    "its MLP has no gate: a scale between up and down would pass through its activation"),
    **dict.fromkeys(("cohere", "cohere2"),
                    "one LayerNorm feeds attention and the MLP in parallel, which the sites do not describe yet"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "glm4_moe_lite"),
                    "its latent attention normalises the compressed q and kv inside the attention"),
}
UP_BEFORE_DOWN = {"down_proj": ("up_proj", "gate_up_proj"), "w2": ("w3",)}
NO_UP_SITE = ("gpt_oss",)  # its experts clamp up and add 1 to it: a scale between up and down would not pass
NOT_CLIPPED = ("q_proj", "k_proj", "qkv_proj")  # as AWQ: clipping query/key ranges hurts attention scores
CLIP_RATIOS = tuple(1 - 0.5 * k / 20 for k in range(10))  # AWQ's grid: 1.0 down to 0.775


@dataclass
class Site:
    """A producer of a block's activations and the modules that read them (by name within the block).
    `producer` is a norm (`offset`: what its forward adds to the weight) or a linear whose output rows
    `rows` (a slice: the up half of a fused gate/up) feed the readers."""

    producer: str
    readers: list[str]
    is_norm: bool
    offset: float = 0.0
    rows: slice = field(default_factory=lambda: slice(None))


def check_scalable(kind: str) -> None:
    if kind not in NORMS:
        why = UNSCALED_BECAUSE.get(kind, "its blocks are not laid out like Llama's")
        raise QuantbenchError(f"AWQ and SmoothQuant scaling support {', '.join(SCALABLE_TYPES)}, not {kind!r}: {why}")


def block_sites(block: nn.Module, model_type: str) -> list[Site]:
    """The sites of one decoder block, in forward order. A layer that already rotates its input online (the
    model rotation's down_proj) has no site: a scale before the rotation is no scale after it."""
    attention_norm, mlp_norm, offset = NORMS[model_type]
    modules = dict(block.named_modules())
    leaf = {name: name.rsplit(".", 1)[-1] for name in modules}
    linears = block_linears(block)
    attention = [n for n in linears if n.startswith("self_attn.") and leaf[n] in ATTENTION_READERS]
    router = router_name(block.mlp)
    mlp = [n for n in modules if n.startswith("mlp.") and (leaf[n] in MLP_READERS or (router and n == f"mlp.{router}"))]
    sites = [Site(attention_norm, attention, True, offset)]
    v, o = modules.get("self_attn.v_proj"), modules.get("self_attn.o_proj")
    if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
        sites.append(Site("self_attn.v_proj", ["self_attn.o_proj"], False))
    sites.append(Site(mlp_norm, mlp, True, offset))
    for name in linears if model_type not in NO_UP_SITE else ():
        parent, _, own = name.rpartition(".")
        for producer in UP_BEFORE_DOWN.get(own, ()):
            if f"{parent}.{producer}" in linears:
                rows = slice(linears[name].in_features, None) if producer == "gate_up_proj" else slice(None)
                sites.append(Site(f"{parent}.{producer}", [name], False, rows=rows))
                break
    return [site for site in sites if site.readers
            and not any(input_rotation_of(modules[name]) is not None for name in site.readers)]


def fold_scales(block: nn.Module, site: Site, scales: torch.Tensor) -> None:
    """Divide the site's input by `scales` at its producer and multiply every reader's weight columns by them
    (in float64, stored back in each tensor's dtype): the block computes the same function."""
    s = scales.double()
    producer = block.get_submodule(site.producer)
    if site.is_norm:
        _assign(producer.weight, (producer.weight.double() + site.offset) / s - site.offset)
    else:
        _assign(producer.weight[site.rows], producer.weight[site.rows].double() / s[:, None])
        if producer.bias is not None:
            _assign(producer.bias[site.rows], producer.bias[site.rows].double() / s)
    for name in site.readers:
        weight = block.get_submodule(name).weight
        _assign(weight, weight.double() * s)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def fake_quantized(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`weight` through the scheme's round-to-nearest grid (its solver's options dropped), in float32; under
    the hadamard transform, quantized as W·R and rotated back."""
    rtn = scheme.model_copy(update={"solver": "rtn", "act_order": False, "static_groups": False,
                                    "damp": DEFAULT_DAMP, "scaling": "none", "activations": None,
                                    "transform": "none", "rotation_seed": 0})
    rotation = rotation_for(scheme, weight.shape[1])
    if rotation is None:
        return quantize_rtn(weight.float(), rtn).dequantize(torch.float32)
    return rotation.rows_inverse(quantize_rtn(rotation.rows(weight.float()), rtn).dequantize(torch.float32))


@dataclass(frozen=True)
class ScalingOptions:
    """`grid`: α values AWQ tries (0, 1/grid, …); `strength`: SmoothQuant's α; `search_tokens`: calibration
    tokens AWQ's block-output search runs on (whole mini-batches, at least one); `clip`: AWQ's range clipping;
    `bf16`: run the search's forwards (reference and trials alike) under bfloat16 autocast, as AWQ runs its
    search in half precision (None: where the block is float32 on a GPU)."""

    grid: int = 20
    strength: float = 0.5
    search_tokens: int = 65536
    clip: bool = True
    bf16: bool | None = None  # the search's block forwards under bfloat16 autocast; None: on a GPU


@torch.no_grad()
def scale_block(ctx, schemes: dict[str, Scheme], model_type: str, options: ScalingOptions = ScalingOptions(),
                folded: list | None = None) -> dict:
    """Scale every site of the block whose quantized readers ask for it (`schemes`: name in block → scheme);
    returns what was done per site (full producer name → method, α, AWQ's output error relative to α = 0).
    `folded` receives each (site, scales) folded."""
    sites = [site for site in block_sites(ctx.block, model_type)
             if any(schemes[r].scaling != "none" for r in site.readers if r in schemes)]
    if not sites:
        return {}
    inputs = _site_inputs(ctx, sites)
    share = current_ranks().world if ctx.inputs.shared_out else 1  # each rank searches on its share of the tokens
    batches = _search_batches(ctx, -(-options.search_tokens // share))
    with trial_autocast(ctx.block, options.bf16):
        reference = [block_output(ctx.block(hidden, **kwargs)) for hidden, kwargs in batches]
    done = {}
    for site in sites:
        if site.producer not in inputs:
            log.warning("%s: no calibration token reached %s; left unscaled", ctx.prefix, site.producer)
            continue
        mean_abs, max_abs = inputs[site.producer]
        if any(schemes[r].scaling == "awq" for r in site.readers if r in schemes):
            module, trial_inputs, targets = _objective(ctx, site, model_type, batches, reference, options)
            alpha, scales, error = _search(ctx, site, schemes, mean_abs, module, trial_inputs, targets, options)
            done[ctx.full_name(site.producer)] = {"method": "awq", "alpha": alpha, "output_error": round(error, 6)}
        else:
            readers = [ctx.block.get_submodule(r).weight for r in site.readers]
            scales = smoothquant_scales(max_abs, readers, options.strength)
            done[ctx.full_name(site.producer)] = {"method": "smoothquant", "alpha": options.strength}
        if not torch.all(scales == 1):
            fold_scales(ctx.block, site, scales)
            if folded is not None:
                folded.append((site, scales))
    if options.clip:
        clipped = [name for site in sites for name in site.readers if name in schemes and schemes[name].scaling == "awq"
                   and schemes[name].transform == "none" and name.rsplit(".", 1)[-1] not in NOT_CLIPPED]
        if clipped:
            clip_ranges(ctx, {name: schemes[name] for name in clipped})
    return done


@contextlib.contextmanager
def scaled_in_place(ctx, schemes: dict[str, Scheme], model_type: str, options: ScalingOptions = ScalingOptions()):
    """For the duration, the block scaled (and clipped) as `schemes` ask; yields, per linear the scaling
    touched, its (row, column) scales: its weight is now diag(1/rows)·W·diag(columns) (clipping aside; either
    None where not scaled). The block's tensors are restored afterwards."""
    saved = {key: value.clone() for key, value in ctx.block.state_dict().items()}
    folded: list = []
    try:
        scale_block(ctx, schemes, model_type, options, folded)
        rows: dict[str, torch.Tensor] = {}
        columns: dict[str, torch.Tensor] = {}
        for site, scales in folded:
            for name in site.readers:
                columns[name] = columns.get(name, 1) * scales.float()
            if not site.is_norm:
                out = ctx.block.get_submodule(site.producer).out_features
                row = rows.get(site.producer, torch.ones(out, device=scales.device))
                row[site.rows] = row[site.rows] * scales.float()
                rows[site.producer] = row
        yield {name: (rows.get(name), columns.get(name)) for name in {*rows, *columns}}
    finally:
        ctx.block.load_state_dict(saved)


def _search_batches(ctx, search_tokens: int) -> list[tuple[torch.Tensor, dict]]:
    batches, tokens = [], 0
    for hidden, kwargs in zip(ctx.inputs.hidden, ctx.inputs.kwargs):
        if batches and tokens + hidden.shape[0] * hidden.shape[1] > search_tokens:
            break
        batches.append((hidden, kwargs))
        tokens += hidden.shape[0] * hidden.shape[1]
    return batches


def _objective(ctx, site: Site, model_type: str, batches, reference, options: ScalingOptions):
    """What a site's trials are scored on: (module, its inputs, its reference outputs). The block on its
    inputs; for a site inside an MLP whose output joins the residual directly, the MLP alone on the inputs
    it receives (the block output's error is the MLP output's: the attention branch is the same in every
    trial), captured in one pass, so the trials skip the attention."""
    mlp = getattr(ctx.block, "mlp", None)
    whole_block = ctx.block, [((hidden,), kwargs) for hidden, kwargs in batches], reference
    if mlp is None or model_type in POST_MLP_NORM or not all(name.startswith("mlp.") for name in site.readers):
        return whole_block
    captured = []

    def keep(_module, args, kwargs, output):
        captured.append(((args, kwargs), block_output(output)))

    handle = mlp.register_forward_hook(keep, with_kwargs=True)
    try:
        with trial_autocast(ctx.block, options.bf16):
            for hidden, kwargs in batches:
                ctx.block(hidden, **kwargs)
    finally:
        handle.remove()
    if len(captured) != len(batches):  # an MLP that does not run once per block forward
        return whole_block
    return mlp, [call for call, _ in captured], [output for _, output in captured]


def _search(ctx, site: Site, schemes: dict, mean_abs: torch.Tensor, scored: nn.Module, inputs, reference,
            options: ScalingOptions):
    """AWQ's grid search over α, each trial scored by `scored`'s output error on `inputs` against `reference`
    (see _objective); returns (α, scales, that error relative to α = 0's)."""
    quantized = {name: ctx.block.get_submodule(name) for name in site.readers if name in schemes}
    originals = {name: module.weight.data for name, module in quantized.items()}
    errors, grid = [], options.grid
    for step in range(grid):
        scales = awq_scales(mean_abs, step / grid)
        with contextlib.ExitStack() as trials:
            for name, module in quantized.items():
                trials.enter_context(_as_scaled_and_quantized(module, originals[name], scales, schemes[name]))
            with trial_autocast(ctx.block, options.bf16):
                errors.append(_output_error(scored, inputs, reference))
    if ctx.inputs.shared_out:  # every rank's search tokens: the same α on every rank
        errors = sum_across_ranks(torch.tensor(errors, dtype=torch.float64)).tolist()
    best = min(range(grid), key=errors.__getitem__)
    return best / grid, awq_scales(mean_abs, best / grid), errors[best] / errors[0] if errors[0] > 0 else 1.0


@contextlib.contextmanager
def _as_scaled_and_quantized(linear: nn.Linear, weight: torch.Tensor, scales: torch.Tensor, scheme: Scheme):
    """For the duration, `linear` computes as it will once its site is scaled by `scales` and it is quantized
    by round-to-nearest: input x/s (then rotated and quantized online where the scheme says so), weight the
    grid values of W·s (of W·s·R under the hadamard transform)."""
    rotation = rotation_for(scheme, weight.shape[1])
    scaled = weight.float() * scales
    rtn = scheme.model_copy(update={"transform": "none", "rotation_seed": 0})
    if rotation is None:
        trial = fake_quantized(scaled, rtn)
    else:
        trial = fake_quantized(rotation.rows(scaled), rtn)
    before = input_rotation_of(linear), activation_format_of(linear)
    handle = linear.register_forward_pre_hook(lambda _m, args: (args[0] / scales.to(args[0].dtype), *args[1:]),
                                              prepend=True)
    linear.weight.data = trial.to(weight.dtype)
    rotate_inputs_of(linear, rotation)
    quantize_inputs_of(linear, scheme.activations)
    try:
        yield
    finally:
        handle.remove()
        rotate_inputs_of(linear, before[0])
        quantize_inputs_of(linear, before[1])
        linear.weight.data = weight


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean|x|^α per channel, divided by √(max · min) over the channels as AWQ does."""
    if alpha == 0:
        return torch.ones_like(mean_abs)
    scales = mean_abs.float().clamp(min=1e-4).pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def smoothquant_scales(max_abs: torch.Tensor, weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    """max|x|^α / max|W|^(1−α) per input channel, the weight maximum taken over every reader."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    scales = max_abs.float().clamp(min=1e-5).pow(strength) / weight_max.clamp(min=1e-5).pow(1 - strength)
    return scales.clamp(min=1e-5)


def _feed(ctx) -> None:
    for hidden, kwargs in zip(ctx.inputs.hidden, ctx.inputs.kwargs):
        ctx.block(hidden, **kwargs)


def _output_error(module: nn.Module, inputs, reference) -> float:
    """Σ‖module(*args, **kwargs) − reference‖² over `inputs` of (args, kwargs)."""
    total = 0.0
    for (args, kwargs), target in zip(inputs, reference):
        total += float((block_output(module(*args, **kwargs)).float() - target.float()).square().sum())
    return total


def _site_inputs(ctx, sites: list[Site]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site, the mean and the max of |x| per input channel over every calibration token that reaches it
    (a norm's output; a down or o projection's input)."""
    sums: dict[str, list] = {}

    def record(key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().abs()
        entry = sums.setdefault(key, [torch.zeros(x.shape[1], device=x.device), torch.zeros(x.shape[1], device=x.device), 0])
        entry[0] += x.sum(dim=0)
        torch.maximum(entry[1], x.amax(dim=0), out=entry[1])
        entry[2] += x.shape[0]

    handles = []
    for site in sites:
        if site.is_norm:
            module = ctx.block.get_submodule(site.producer)
            handles.append(module.register_forward_hook(lambda _m, _i, out, key=site.producer: record(key, block_output(out))))
        else:
            module = ctx.block.get_submodule(site.readers[0])
            handles.append(module.register_forward_pre_hook(lambda _m, args, key=site.producer: record(key, args[0])))
    try:
        _feed(ctx)
    finally:
        for handle in handles:
            handle.remove()
    if ctx.inputs.shared_out:  # every rank's share of the tokens, each site in the same order on every rank
        device = next(ctx.block.parameters()).device
        for site in sites:
            width = ctx.block.get_submodule(site.readers[0]).in_features
            entry = sums.setdefault(site.producer, [torch.zeros(width, device=device),
                                                    torch.zeros(width, device=device), 0])
            count = torch.tensor([float(entry[2])], device=entry[0].device)
            reduce_in_place([entry[0], count])
            reduce_in_place([entry[1]], "max")
            entry[2] = int(count.item())
    return {key: (total / max(1, count), peak) for key, (total, peak, count) in sums.items() if count}


def clip_ranges(ctx, schemes: dict[str, Scheme]) -> None:
    """AWQ's clipping: per layer and group, shrink the weight range by the factor in CLIP_RATIOS whose
    round-to-nearest error costs the least output error δ H δᵀ over all calibration tokens (H = Σ xᵀx, the
    group's diagonal block), and clamp the weights to it."""
    names = list(schemes)
    with collect_stats({name: ctx.linears[name] for name in names}, set(names), {}, stop_when_seen=False) as stats:
        _feed(ctx)
    if ctx.inputs.shared_out:
        all_reduce_stats(stats, {name: ctx.linears[name].in_features for name in names},
                         next(ctx.block.parameters()).device)
    for name in names:
        if stats[name].xtx is None:
            continue
        layer = ctx.linears[name]
        layer.weight.data = clipped_weight(layer.weight.data, schemes[name], stats[name].xtx).to(layer.weight.dtype)


def clipped_weight(weight: torch.Tensor, scheme: Scheme, xtx: torch.Tensor) -> torch.Tensor:
    """`weight` with each (row, group) clamped to the CLIP_RATIOS shrink of its range that quantizes with the
    least output error (see clip_ranges)."""
    rows, cols = weight.shape
    group = scheme.group_size or cols
    n_groups = -(-cols // group)
    width = n_groups * group  # a short last group is padded with zeros: no range or error changes
    w = torch.nn.functional.pad(weight.float(), (0, width - cols))
    h = torch.nn.functional.pad(xtx.float(), (0, width - cols, 0, width - cols))
    blocks = torch.stack([h[g * group:(g + 1) * group, g * group:(g + 1) * group] for g in range(n_groups)])
    grouped = w.view(rows, n_groups, group)
    low, high = grouped.amin(dim=2, keepdim=True), grouped.amax(dim=2, keepdim=True)
    best_error = torch.full((rows, n_groups), float("inf"), device=w.device)
    best_ratio = torch.ones(rows, n_groups, 1, device=w.device)
    for ratio in CLIP_RATIOS:
        clamped = torch.minimum(torch.maximum(grouped, low * ratio), high * ratio).view(rows, width)
        delta = (w - fake_quantized(clamped, scheme)).view(rows, n_groups, group)
        error = torch.einsum("rgk,gkl,rgl->rg", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better[..., None], torch.full_like(best_ratio, ratio), best_ratio)
    return torch.minimum(torch.maximum(grouped, low * best_ratio), high * best_ratio).view(rows, width)[:, :cols]
