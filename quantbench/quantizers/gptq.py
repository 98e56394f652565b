"""GPTQ (Frantar et al., 2023): round one column at a time and push each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer objective ‖(W − Q)X‖².

The solver knows nothing about integers: it asks the format to `fit` a grid to a group of columns and to
`encode`/`decode` a column with it, so any grid format plugs in.
"""

from __future__ import annotations

import logging
import math

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.errors import QuantbenchError
from quantbench.formats import GridParams, format_for
from quantbench.quantized_weight import QuantizedWeight
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)
BLOCK_SIZE = 128
DAMP_ESCALATIONS = 6  # each multiplies the dampening by 10


class GPTQSolver:
    needs_hessian = True

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size

    def quantize(self, weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None) -> QuantizedWeight:
        if stats is None or stats.xtx is None:
            raise ValueError("GPTQ needs the layer's Hessian from calibration")
        return gptq_quantize(weight, stats.hessian, scheme, self.block_size)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme,
                  block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """Quantize `weight` [rows, cols] given the layer Hessian [cols, cols]; vectorised over rows, on
    `weight`'s device, in float32. Only the column loop inside each block is sequential."""
    fmt = format_for(scheme)
    W = weight.detach().float().clone()
    H = hessian.to(device=W.device, dtype=torch.float32).clone()
    rows, cols = W.shape
    group = scheme.group_size or cols
    n_groups = math.ceil(cols / group)

    dead = torch.diag(H) == 0  # inputs that never fired: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    fitted_up_front = scheme.static_groups or scheme.group_size is None
    scales = torch.zeros(rows, n_groups, device=W.device)
    zeros = torch.zeros(rows, n_groups, device=W.device)
    if fitted_up_front:
        params = _fit_groups(fmt, W, group, n_groups)
        scales.copy_(params.scale)
        zeros.copy_(params.zero)

    order = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else None
    if order is not None:
        W, H = W[:, order], H[order][:, order]
    original_column = order if order is not None else torch.arange(cols, device=W.device)
    if fitted_up_front:  # the group of each processed column is fixed by its original position
        column_group = (original_column // group).tolist()
    else:  # groups are formed along the processing order, fitted when reached
        column_group = [j // group for j in range(cols)]

    Hinv = _upper_cholesky_of_inverse(H, scheme.damp)
    codes = torch.zeros_like(W)
    params = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        errors = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = column_group[j]
            if fitted_up_front:
                params = GridParams(scale=scales[:, g:g + 1], zero=zeros[:, g:g + 1])
            elif j % group == 0:  # fit on the columns as every error pushed so far has left them
                span = W1[:, i:i + group]
                if j + group > i2:  # past this block the updates are still pending: apply them here
                    beyond = W[:, i2:j + group] - errors[:, :i] @ Hinv[i1:j, i2:j + group]
                    span = torch.cat([W1[:, i:], beyond], dim=1)
                params = fmt.fit(span)
                scales[:, g:g + 1], zeros[:, g:g + 1] = params.scale, params.zero
            column = W1[:, i:i + 1]
            code = fmt.encode(column, params)
            codes[:, j:j + 1] = code
            error = (column - fmt.decode(code, params)) / Hinv1[i, i]
            W1[:, i:] -= error @ Hinv1[i:i + 1, i:]
            errors[:, i:i + 1] = error
        W[:, i2:] -= errors @ Hinv[i1:i2, i2:]

    g_idx = None
    if order is not None:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
        if not fitted_up_front:
            g_idx = torch.tensor(column_group, device=W.device)[inverse]
    return QuantizedWeight.from_params(scheme, codes, GridParams(scale=scales, zero=zeros), g_idx)


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


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), raising λ tenfold while it fails."""
    mean_diag = torch.diag(H).mean()
    for attempt in range(DAMP_ESCALATIONS + 1):
        damped = H.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        if attempt < DAMP_ESCALATIONS:
            log.warning("GPTQ: Hessian not positive definite with damp %.3g; retrying with %.3g", damp, damp * 10)
            damp *= 10
    raise QuantbenchError(f"GPTQ: Hessian not positive definite even with damp {damp:g}; "
                          "use more calibration samples or a larger damp in the scheme")
