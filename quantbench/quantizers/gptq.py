"""GPTQ (Frantar et al., 2023): round one column at a time and push each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer objective ‖(W − Q)X‖².

The solver knows nothing about integers: it asks the format to `fit` a grid to a group of columns and to
`encode`/`decode` a column with it, so any grid format plugs in.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import astuple, dataclass, replace

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.errors import QuantbenchError
from quantbench.formats import GridParams, format_for
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers import gptq_cpu
from quantbench.quantizers.gptq_fused import fused_available, solve_block_fused
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)
BLOCK_SIZE = 128
DAMP_ESCALATIONS = 6  # each multiplies the dampening by 10


class GPTQSolver:
    def needs_stats(self, scheme: Scheme) -> bool:
        return True

    def needs_hessian(self, scheme: Scheme) -> bool:
        return True

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size

    def quantize(self, weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None) -> QuantizedWeight:
        if stats is None or stats.xtx is None:
            raise ValueError("GPTQ needs the layer's Hessian from calibration")
        prepare_factors([stats], scheme, weight.device)
        return gptq_quantize(weight, stats.hessian, scheme, self.block_size, stats.factors[_factor_key(scheme)])


@dataclass
class InverseFactor:
    """What GPTQ needs of a layer's Hessian H, computed once per dampening and column order: the inputs
    that never fired (`dead`), the act_order permutation (`order`, or None) and the upper Cholesky factor
    of (H + λI)⁻¹ in that order."""

    dead: torch.Tensor
    order: torch.Tensor | None
    upper: torch.Tensor


def _factor_key(scheme: Scheme) -> tuple:
    return (scheme.damp, scheme.act_order)


def prepare_factors(stats: list[LayerStats], scheme: Scheme, device: torch.device) -> None:
    """Compute the InverseFactor of every LayerStats in `stats` that lacks one for `scheme`'s dampening and
    order, and keep it on the stats (sensitivity candidates and layers sharing an input reuse it). Hessians
    of one size are factorised as one batch."""
    key = _factor_key(scheme)
    todo = list({id(s): s for s in stats if key not in s.factors}.values())
    for s, factor in zip(todo, inverse_factors([s.hessian for s in todo], scheme, device)):
        s.factors[key] = factor


def factor_hessians(solves: Iterable[tuple[Scheme, LayerStats | None]], device: torch.device) -> None:
    """Ahead of the GPTQ solves of these (scheme, statistics) pairs in the layers' own basis, their inverse-Hessian
    factors in batched calls, one per dampening and order (Hadamard schemes factor their rotated Hessian when
    they solve)."""
    wanted: dict[tuple, tuple[Scheme, list[LayerStats]]] = {}
    for scheme, stats in solves:
        if scheme.solver == "gptq" and scheme.transform == "none" and stats is not None:
            wanted.setdefault(_factor_key(scheme), (scheme, []))[1].append(stats)
    for scheme, layer_stats in wanted.values():
        prepare_factors(layer_stats, scheme, device)


def inverse_factors(hessians: list[torch.Tensor], scheme: Scheme, device: torch.device) -> list[InverseFactor]:
    """The InverseFactor of each Hessian; those of one shape share batched Cholesky calls."""
    prepared = []
    for hessian in hessians:
        H = hessian.to(device=device, dtype=torch.float32).clone()
        dead = torch.diag(H) == 0  # inputs that never fired: their weights cannot matter
        H[dead, dead] = 1
        order = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else None
        prepared.append((dead, order, H[order][:, order] if order is not None else H))
    uppers: list[torch.Tensor | None] = [None] * len(prepared)
    by_shape: dict[tuple, list[int]] = {}
    for i, (_, _, H) in enumerate(prepared):
        by_shape.setdefault(tuple(H.shape), []).append(i)
    for members in by_shape.values():
        for i, upper in zip(members, upper_cholesky_of_inverse_batched([prepared[i][2] for i in members],
                                                                       scheme.damp)):
            uppers[i] = upper
    return [InverseFactor(dead, order, upper) for (dead, order, _), upper in zip(prepared, uppers)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme,
                  block_size: int = BLOCK_SIZE, factor: InverseFactor | None = None) -> QuantizedWeight:
    """Quantize `weight` [rows, cols] given the layer Hessian [cols, cols] (or its InverseFactor for this
    scheme); vectorised over rows, on `weight`'s device, in float32. Only the column loop inside each block
    is sequential."""
    fmt = format_for(scheme).for_weight(weight)
    W = weight.detach().float().clone()
    factor = factor or inverse_factors([hessian], scheme, W.device)[0]
    rows, cols = W.shape
    group = scheme.group_size or cols
    n_groups = math.ceil(cols / group)
    W[:, factor.dead] = 0

    fitted_up_front = scheme.static_groups or scheme.group_size is None
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    if fitted_up_front:
        params = _fit_groups(fmt, W, group, n_groups)
        scales.copy_(params.scale)
        zeros.copy_(params.zero)

    order = factor.order
    if order is not None:
        W = W[:, order]
    original_column = order if order is not None else torch.arange(cols, device=W.device)
    if fitted_up_front:  # the group of each processed column is fixed by its original position
        column_group = (original_column // group).tolist()
    else:  # groups are formed along the processing order, fitted when reached
        column_group = [j // group for j in range(cols)]
    column_group_on_device = torch.tensor(column_group, device=W.device)

    Hinv = factor.upper
    fused = fused_available(W)
    codes = torch.zeros_like(W)
    params = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        fit_offsets = tuple(i for i in range(i2 - i1) if (i1 + i) % group == 0) if not fitted_up_front else ()
        block = _Block.of(W[:, i1:i2], Hinv[i1:i2, i1:i2], len(fit_offsets))
        if fitted_up_front:  # every column's grid is known: gather them per column
            index = column_group_on_device[i1:i2]
            block.col_scale, block.col_zero = scales[:, index], zeros[:, index]
        # a block whose grids are all fitted inside it (or up front) has fixed control flow: one fused
        # kernel (or a CUDA graph) solves it
        self_contained = fitted_up_front or (fit_offsets[:1] == (0,) and fit_offsets[-1] + group <= i2 - i1)
        if self_contained and (fused or _graphs_allowed(W)):
            if fused:
                solve_block_fused(fmt, block, fit_offsets, group)
            else:
                block = _replay(fmt, block, fit_offsets, group)
            if fit_offsets:  # a graph's buffers are reused: keep a copy of the grid in use
                params = GridParams(scale=block.fit_scale[:, -1:].clone(), zero=block.fit_zero[:, -1:].clone())
        else:
            def beyond(i: int, errors: torch.Tensor, i1=i1, i2=i2) -> torch.Tensor:
                # columns of a group past this block still await this block's updates: apply them here
                j = i1 + i
                return W[:, i2:j + group] - errors[:, :i] @ Hinv[i1:j, i2:j + group]

            params = _solve_columns(fmt, block, fit_offsets, group, params, beyond)
        codes[:, i1:i2] = block.codes
        if fit_offsets:
            g0 = (i1 + fit_offsets[0]) // group
            scales[:, g0:g0 + len(fit_offsets)] = block.fit_scale
            zeros[:, g0:g0 + len(fit_offsets)] = block.fit_zero
        W[:, i2:] -= block.errors @ Hinv[i1:i2, i2:]

    g_idx = None
    if order is not None:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
        if not fitted_up_front:
            g_idx = column_group_on_device[inverse]
    return QuantizedWeight.from_params(scheme, fmt, codes, GridParams(scale=scales, zero=zeros), g_idx)


@dataclass
class _Block:
    """The working set of one lazy block: weights, inverse-Hessian block, outputs, and grid parameters
    (per column when fitted up front; per group fitted inside the block otherwise)."""

    W1: torch.Tensor
    Hinv1: torch.Tensor
    codes: torch.Tensor
    errors: torch.Tensor
    fit_scale: torch.Tensor
    fit_zero: torch.Tensor
    col_scale: torch.Tensor | None = None
    col_zero: torch.Tensor | None = None

    def clone(self) -> "_Block":
        return _Block(*(None if t is None else t.clone() for t in astuple(self)))

    @classmethod
    def of(cls, W1: torch.Tensor, Hinv1: torch.Tensor, n_fits: int) -> "_Block":
        rows, width = W1.shape
        new = lambda *shape: torch.zeros(*shape, device=W1.device)  # noqa: E731
        return cls(W1.clone(), Hinv1, new(rows, width), new(rows, width), new(rows, n_fits), new(rows, n_fits))


def _solve_columns(fmt, b: _Block, fit_offsets: tuple[int, ...], group: int, params=None, beyond=None):
    """The sequential heart of GPTQ, in place on `b`: quantize each column, push its error right.
    Returns the grid in use at the end (a group may continue into the next block). On the CPU, integer grids
    run the columns between two fits in the C++ library (`gptq_cpu`), with the same floats."""
    fits = {offset: k for k, offset in enumerate(fit_offsets)}
    width = b.W1.shape[1]
    native = gptq_cpu.applies(fmt, b.W1)
    i = 0
    while i < width:
        if b.col_scale is not None:
            params = GridParams(scale=b.col_scale[:, i:i + 1], zero=b.col_zero[:, i:i + 1])
        elif i in fits:  # fit on the columns as every error pushed so far has left them
            span = b.W1[:, i:i + group]
            if i + group > width:
                span = torch.cat([b.W1[:, i:], beyond(i, b.errors)], dim=1)
            params = fmt.fit(span)
            k = fits[i]
            b.fit_scale[:, k:k + 1], b.fit_zero[:, k:k + 1] = params.scale, params.zero
        if native:
            end = min((offset for offset in fit_offsets if offset > i), default=width)
            params = gptq_cpu.solve_columns(fmt, b, params, i, end)
            i = end
            continue
        column = b.W1[:, i:i + 1]
        code = fmt.encode(column, params)
        b.codes[:, i:i + 1] = code
        error = (column - fmt.decode(code, params)) / b.Hinv1[i, i]
        b.W1[:, i:] -= error @ b.Hinv1[i:i + 1, i:]
        b.errors[:, i:i + 1] = error
        i += 1
    return params


_GRAPHS: OrderedDict = OrderedDict()
_MAX_GRAPHS = 16


def _graphs_allowed(W: torch.Tensor) -> bool:
    return W.is_cuda and os.environ.get("QUANTBENCH_CUDA_GRAPHS", "1") != "0"


def _replay(fmt, block: _Block, fit_offsets: tuple[int, ...], group: int) -> _Block:
    """Run `_solve_columns` for one block as a CUDA graph: the same kernels, without a launch per kernel
    (the column loop is launch-bound). One graph per shape and grid layout, captured on first use; a
    format's per-tensor state (NVFP4's global scale) is an input of the graph like the weights."""
    up_front = block.col_scale is not None
    key = (fmt, tuple(block.W1.shape), fit_offsets, group, up_front, block.W1.device)
    if key not in _GRAPHS:
        static = block.clone()
        if fmt.global_scale is not None:
            fmt = replace(fmt, global_scale=fmt.global_scale.clone())
        side = torch.cuda.Stream(block.W1.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as capture requires
            _solve_columns(fmt, block.clone(), fit_offsets, group)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _solve_columns(fmt, static, fit_offsets, group)
        _GRAPHS[key] = (graph, static, fmt.global_scale)
        if len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    graph, static, static_global_scale = _GRAPHS[key]
    if static_global_scale is not None:
        static_global_scale.copy_(fmt.global_scale)
    static.W1.copy_(block.W1)
    static.Hinv1.copy_(block.Hinv1)
    if up_front:
        static.col_scale.copy_(block.col_scale)
        static.col_zero.copy_(block.col_zero)
    graph.replay()
    return static


def layer_objective(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the layer output error GPTQ minimises (up to the factor 2/n in H)."""
    delta = (weight.float() - quantized.float()).to(hessian.device)
    return float(((delta @ hessian.float()) * delta).sum())


def _fit_groups(fmt, W: torch.Tensor, group: int, n_groups: int) -> GridParams:
    rows, cols = W.shape
    padded = torch.zeros(rows, n_groups * group, device=W.device)
    padded[:, :cols] = W  # zero padding changes no range: every grid contains 0
    params = fmt.fit(padded.view(rows * n_groups, group))
    return GridParams(scale=params.scale.view(rows, n_groups), zero=params.zero.view(rows, n_groups))


def upper_cholesky_of_inverse_batched(hessians: list[torch.Tensor], damp: float) -> list[torch.Tensor]:
    """`_upper_cholesky_of_inverse` of equally shaped Hessians as batched calls; any that fails at `damp`
    goes through the escalating single path."""
    if len(hessians) == 1:
        return [_upper_cholesky_of_inverse(hessians[0], damp)]
    H = torch.stack(hessians)
    H.diagonal(dim1=-2, dim2=-1).add_(damp * H.diagonal(dim1=-2, dim2=-1).mean(dim=-1, keepdim=True))
    upper, info = upper_cholesky_of_inverse_of(H)
    return [upper[i] if info[i] == 0 else _upper_cholesky_of_inverse(h, damp) for i, h in enumerate(hessians)]


def upper_cholesky_of_inverse_of(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹) for symmetric positive definite H [..., n, n], and the
    factorisation's info (0 where it succeeded; a factor that overflows counts as failed).

    H = V·Vᵀ with V upper triangular (the Cholesky factor of H with rows and columns reversed, reversed back),
    so H⁻¹ = V⁻ᵀ·V⁻¹ and U = V⁻¹: one factorisation (n³/3 FLOP) and one triangular inverse (≈ 2n³/3, in
    matmuls), where inverting H and factorising the inverse takes two factorisations and an inverse."""
    lower, info = torch.linalg.cholesky_ex(H.flip(-2, -1))
    upper = _lower_triangular_inverse(lower).flip(-2, -1)
    return upper, torch.where(torch.isfinite(upper).flatten(-2).all(-1), info, -1)


def _lower_triangular_inverse(L: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """L⁻¹ for lower triangular L [..., n, n]: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹·B·A⁻¹, C⁻¹]], recursively;
    blocks of `leaf` columns or fewer by a triangular solve against the identity."""
    n = L.shape[-1]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    k = n // 2
    inverse_a = _lower_triangular_inverse(L[..., :k, :k], leaf)
    inverse_c = _lower_triangular_inverse(L[..., k:, k:], leaf)
    out = torch.zeros_like(L)
    out[..., :k, :k] = inverse_a
    out[..., k:, k:] = inverse_c
    out[..., k:, :k] = -inverse_c @ (L[..., k:, :k] @ inverse_a)
    return out


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), raising λ tenfold while it fails."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(DAMP_ESCALATIONS + 1):
        damped = H.clone()
        damped.diagonal().add_(damp * mean_diag)
        upper, info = upper_cholesky_of_inverse_of(damped)
        if info == 0:
            return upper
        if attempt < DAMP_ESCALATIONS:
            log.warning("GPTQ: Hessian not positive definite with damp %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise QuantbenchError(f"GPTQ: Hessian not positive definite even with damp {damp:g}; "
                          "use more calibration samples or a larger damp in the scheme")
