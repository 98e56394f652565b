"""SignRound / AutoRound (Cheng et al.): learn how each weight rounds, block by block.

Per layer, a rounding offset V ∈ [−½, ½] per weight (in units of its group's scale) and, per group, factors
in [0, 1] on the low and high ends of the range the grid is fitted to. The weights become
decode(encode(W + V·scale)) on the grid fitted to [lo·f_lo, hi·f_hi]; a straight-through estimator lets the
gradient past the rounding. All AutoRound layers of a decoder block are learned together, minimising the
mean squared error between the block's output and its full-precision output on the same inputs, one
calibration mini-batch per step, by signed gradient descent (each parameter moves by lr·sign(∂loss), lr
decaying linearly to 0). The offsets and factors of the step with the least loss are kept. On a GPU the
steps' forwards and backwards run under bfloat16 autocast, as the reference implementation's do; the
targets stay the float32 block's outputs.

Under the hadamard transform (`hadamard+…-autoround`) the rounding is learned on W·R, the basis the layer
is quantized in, and the block computes with the fake-quantized weight rotated back (Q·Rᵀ, what the layer
computes once its input is rotated online).

Any grid format works through its fit/encode/decode: integer grids learn offsets and range factors; on
MX and NVFP4 grids, whose block scales are powers of two or E4M3 values, the range factors get no
gradient and only the offsets learn.

Under torchrun (`across_ranks`) each rank holds its share of the calibration inputs: every step each rank
takes one of its own mini-batches, the gradients and the loss are summed across the ranks, so every rank
takes the same signed step (a mini-batch of all ranks' batches) and keeps the same best state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from quantbench.calibration.stats import LayerStats
from quantbench.distributed import current as current_ranks
from quantbench.distributed import reduce_in_place
from quantbench.formats import GridParams, format_for
from quantbench.model_io import block_output, trial_autocast
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.hadamard import layer_rotation, rotate_weight
from quantbench.scheme import Scheme


@dataclass(frozen=True)
class AutoRoundOptions:
    steps: int = 200
    lr: float = 5e-3
    seed: int = 0
    bf16: bool | None = None  # the steps under bfloat16 autocast; None: on a GPU (model_io.trial_autocast)


@dataclass
class LearnedRounding:
    """What AutoRound learned for one layer: offsets [out, in] and range factors [out, n_groups] (each)."""

    offsets: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor


class AutoRoundSolver:
    """Applies what `learn_rounding` learned for a layer (passed as its statistics); without it, rounds to
    nearest (zero offsets, full ranges)."""

    def needs_stats(self, scheme: Scheme) -> bool:
        return False

    def needs_hessian(self, scheme: Scheme) -> bool:
        return False

    def quantize(self, weight: torch.Tensor, scheme: Scheme,
                 stats: LearnedRounding | LayerStats | None = None) -> QuantizedWeight:
        grid = _Grid(weight, scheme)
        learned = stats if isinstance(stats, LearnedRounding) else grid.start()
        with torch.no_grad():
            codes, params = grid.codes(learned)
        return QuantizedWeight.from_params(scheme, grid.fmt, codes, params)


class _Grid:
    """One layer's weight in groups, and the fake quantization AutoRound differentiates."""

    def __init__(self, weight: torch.Tensor, scheme: Scheme) -> None:
        self.weight = weight.detach().float()
        self.fmt = format_for(scheme).for_weight(self.weight)
        rows, cols = self.weight.shape
        self.group = scheme.group_size or cols
        self.n_groups = -(-cols // self.group)
        padded = torch.zeros(rows, self.n_groups * self.group, device=weight.device)
        padded[:, :cols] = self.weight  # zero padding changes no range: every grid contains 0
        self.groups = padded.view(rows, self.n_groups, self.group)
        self.low = self.groups.amin(dim=2).clamp(max=0)
        self.high = self.groups.amax(dim=2).clamp(min=0)

    def start(self) -> LearnedRounding:
        return LearnedRounding(torch.zeros_like(self.groups), torch.ones_like(self.low), torch.ones_like(self.high))

    def params(self, learned: LearnedRounding) -> GridParams:
        """The grid fitted to each group's range shrunk by the learned factors, [rows, n_groups]."""
        ends = torch.stack([self.low * learned.low, self.high * learned.high], dim=-1)
        rows = ends.shape[0]
        fitted = self.fmt.fit(ends.view(rows * self.n_groups, 2))
        return GridParams(scale=fitted.scale.view(rows, self.n_groups), zero=fitted.zero.view(rows, self.n_groups))

    def codes(self, learned: LearnedRounding) -> tuple[torch.Tensor, GridParams]:
        params = self.params(learned)
        shifted = self.groups + learned.offsets * params.scale[..., None]
        flat = GridParams(scale=params.scale.reshape(-1, 1), zero=params.zero.reshape(-1, 1))
        rows, cols = self.weight.shape
        codes = self.fmt.encode(shifted.reshape(-1, self.group), flat).view(rows, -1)[:, :cols]
        return codes, params

    def fake_quantized(self, learned: LearnedRounding) -> torch.Tensor:
        """decode(encode(W + V·scale)) with the straight-through estimator: forward the grid values, backward
        as if rounding were the identity (gradients reach V, and the factors through the scale)."""
        params = self.params(learned)
        scale, zero = params.scale[..., None], params.zero[..., None]
        shifted = self.groups + learned.offsets * scale
        flat = GridParams(scale=scale.detach().reshape(-1, 1), zero=zero.reshape(-1, 1))
        codes = self.fmt.encode(shifted.detach().reshape(-1, self.group), flat)
        grid_values = self.fmt.decode(codes, GridParams(scale=scale.reshape(-1, 1), zero=zero.reshape(-1, 1)))
        grid_values = grid_values.view_as(shifted)
        # value of grid_values; gradient of shifted (through V and the scale) plus grid_values' own (the scale)
        through = grid_values + (shifted - shifted.detach())
        rows, cols = self.weight.shape
        return through.reshape(rows, -1)[:, :cols]


def learn_rounding(block: nn.Module, linears: dict[str, nn.Linear], schemes: dict[str, Scheme],
                   batches: list[tuple[torch.Tensor, dict]], options: AutoRoundOptions = AutoRoundOptions(),
                   losses: list[float] | None = None, stack: bool = True,
                   across_ranks: bool = False) -> dict[str, LearnedRounding]:
    """Learn the named layers' rounding together (see the module docstring); `batches` are the block's
    calibration inputs (hidden states and keyword arguments). `losses` receives each step's loss. With
    `stack`, layers of one scheme and shape (q and o, gate and up, the experts) share one fake quantizer
    over their stacked rows, which is the same arithmetic row by row in fewer kernel launches.
    `across_ranks`: `batches` are this rank's share, and each step's gradients and loss are summed over the
    ranks (see the module docstring)."""
    world = current_ranks().world if across_ranks else 1
    with torch.no_grad():
        targets = [block_output(block(hidden, **kwargs)).detach() for hidden, kwargs in batches]
    stacks = _stacks(linears, schemes) if stack else [[name] for name in schemes]
    rotations = [layer_rotation(linears[names[0]], schemes[names[0]]) for names in stacks]
    grids = []
    for names, rotation in zip(stacks, rotations):
        weight = torch.cat([linears[name].weight for name in names])
        grids.append(_Grid(rotate_weight(weight, rotation) if rotation else weight, schemes[names[0]]))
    learned = [grid.start() for grid in grids]
    offsets = [state.offsets for state in learned]
    factors = [t for state in learned for t in (state.low, state.high)]
    for tensor in offsets + factors:
        tensor.requires_grad_(True)
    best = [_copy(state) for state in learned]
    kept = [t for state in best for t in (state.offsets, state.low, state.high)]
    current = [t for state in learned for t in (state.offsets, state.low, state.high)]
    best_loss = torch.full((), float("inf"), device=batches[0][0].device)
    step_losses = []
    prefix = {name: _prefix(block, linears[name]) for name in schemes}
    order = torch.Generator().manual_seed(options.seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(options.steps):
                index = int(torch.randint(len(batches), (1,), generator=order))
                hidden, kwargs = batches[index]
                weights = {}
                for names, grid, state, rotation in zip(stacks, grids, learned, rotations):
                    rows = grid.fake_quantized(state)
                    rows = (rotation.rows_inverse(rows) if rotation else rows).split(
                        [linears[name].out_features for name in names])
                    weights.update({f"{prefix[name]}weight": part.to(linears[name].weight.dtype)
                                    for name, part in zip(names, rows)})
                with trial_autocast(block, options.bf16):
                    output = block_output(functional_call(block, weights, (hidden,), kwargs))
                loss = (output.float() - targets[index].float()).square().mean()
                for tensor in current:
                    tensor.grad = None
                loss.backward()
                with torch.no_grad():  # keep the best state on the device: no wait for the loss's value
                    step_loss = loss.detach()
                    if world > 1:  # the mean over the ranks' batches, and their summed gradients
                        step_loss = step_loss.clone()
                        reduce_in_place([step_loss, *(t.grad for t in current if t.grad is not None)])
                        step_loss /= world
                    better = step_loss < best_loss
                    best_loss = torch.where(better, step_loss, best_loss)
                    for keep, now in zip(kept, current):
                        keep.copy_(torch.where(better, now, keep))
                    step_losses.append(step_loss)
                _signed_step(offsets, options.lr * (1 - step / options.steps), -0.5, 0.5)
                _signed_step(factors, options.lr * (1 - step / options.steps), 0.0, 1.0)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if losses is not None:
        losses.extend(torch.stack(step_losses).tolist())
    learned_by_name = {}
    for names, state in zip(stacks, best):
        sizes = [linears[name].out_features for name in names]
        for name, offsets_, low, high in zip(names, state.offsets.split(sizes), state.low.split(sizes),
                                             state.high.split(sizes)):
            learned_by_name[name] = LearnedRounding(offsets_, low, high)
    return learned_by_name


def _stacks(linears: dict[str, nn.Linear], schemes: dict[str, Scheme]) -> list[list[str]]:
    """Layers grouped by scheme and shape; a format with a per-tensor scale (NVFP4) keeps each layer alone."""
    stacks: dict[tuple, list[str]] = {}
    for name, scheme in schemes.items():
        alone = format_for(scheme).for_weight(linears[name].weight).global_scale is not None
        key = (name,) if alone else (scheme, tuple(linears[name].weight.shape), linears[name].weight.dtype)
        stacks.setdefault(key, []).append(name)
    return list(stacks.values())


@torch.no_grad()
def _signed_step(tensors: list[torch.Tensor], lr: float, low: float, high: float) -> None:
    """t ← clamp(t − lr·sign(∂loss/∂t), low, high) for every tensor with a gradient (MX and NVFP4 range
    factors have none), as a few fused multi-tensor ops."""
    moving = [t for t in tensors if t.grad is not None]
    if not moving:
        return
    torch._foreach_add_(moving, torch._foreach_sign([t.grad for t in moving]), alpha=-lr)
    torch._foreach_clamp_min_(moving, low)
    torch._foreach_clamp_max_(moving, high)


def _copy(state: LearnedRounding) -> LearnedRounding:
    return LearnedRounding(state.offsets.detach().clone(), state.low.detach().clone(), state.high.detach().clone())



def _prefix(block: nn.Module, linear: nn.Linear) -> str:
    return next(f"{name}." for name, module in block.named_modules() if module is linear)
