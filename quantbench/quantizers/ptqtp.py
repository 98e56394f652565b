"""PTQTP: post-training quantization to trit planes, W ≈ Σ_p diag(α_p)·T_p with T_p ∈ {−1, 0, +1}.

Every (row, group) of the weight is fitted on its own, all of them at once (vectorised):

1. Progressive start: T1 is the optimal ternarisation of w — the k largest |w_j| get sign(w_j), the rest 0,
   with k maximising (Σ_top-k d_j|w_j|)² / Σ_top-k d_j, which is exact because the best set for any
   scale is a threshold set; T2 is the same on the residual w − α1·T1.
2. Alternate until the objective stops improving (relative gain below `tol`) or `max_iters`:
   (a) scales for fixed planes: the weighted 2×2 least squares in closed form, ridge-regularised so a zero
       or repeated plane stays solvable; (b) planes for fixed scales: each element takes the best of the
       9 (t1, t2) pairs, exactly (nearest of the 9 levels α1·t1 + α2·t2).
   Scales are rounded to float16, as stored, before they are scored, and a row keeps its previous planes
   or scales whenever a step would raise its error, so the objective never increases.

Objective per row: Σ_j d_j (w_j − Σ_p α_p t_pj)² with d_j = 1, or with `activation_aware` d_j = mean(x_j²),
the mean squared input of column j over the calibration tokens (∝ H_jj: the diagonal of GPTQ's layer
objective tr(ΔHΔᵀ), cross terms dropped). The weighting moves the scales towards columns that carry large inputs; the per-element choice
in (b) is unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight

MAX_ITERS = 50
TOLERANCE = 1e-5
_RIDGE = 1e-6
_PAIRS = torch.tensor([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)], dtype=torch.float32)  # the 9 (t1, t2)


class PTQTPSolver:
    def needs_stats(self, scheme: Scheme) -> bool:
        return scheme.activation_aware

    def needs_hessian(self, scheme: Scheme) -> bool:
        return False  # the per-channel mean square is enough

    def quantize(self, weight: torch.Tensor, scheme: Scheme, stats: LayerStats | None = None) -> TritPlaneWeight:
        column_weights = None
        if scheme.activation_aware:
            if stats is None or stats.square_sum is None:
                raise ValueError("activation-aware PTQTP needs calibration statistics of the layer's input")
            column_weights = stats.mean_square.to(weight.device)
        return ptqtp_quantize(weight, scheme, column_weights)[0]


@dataclass
class Fit:
    """Planes [P, R, G] (float, values in {−1, 0, 1}), float16-valued scales [P, R] and per-row error [R]."""

    planes: torch.Tensor
    scales: torch.Tensor
    error: torch.Tensor


def ptqtp_quantize(weight: torch.Tensor, scheme: Scheme, column_weights: torch.Tensor | None = None,
                   max_iters: int = MAX_ITERS, tol: float = TOLERANCE) -> tuple[TritPlaneWeight, list[float]]:
    """Fit `scheme.planes` trit planes to `weight` [out, in]; returns them and the objective after the
    start and after each iteration (non-increasing)."""
    out_features, in_features = weight.shape
    group = scheme.group_size or in_features
    n_groups = -(-in_features // group)
    pad = n_groups * group - in_features
    w = torch.nn.functional.pad(weight.detach().float(), (0, pad)).view(-1, group)
    d = torch.ones(in_features, device=w.device) if column_weights is None else column_weights.float().to(w.device)
    d = torch.nn.functional.pad(d, (0, pad)).view(1, n_groups, group).expand(out_features, -1, -1).reshape(-1, group)

    fit = _progressive_start(w, d, scheme.planes)
    history = [float(fit.error.double().sum())]
    for _ in range(max_iters):
        fit = _improve(w, d, fit)
        history.append(float(fit.error.double().sum()))
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    planes = fit.planes.to(torch.int8).view(scheme.planes, out_features, n_groups * group)[:, :, :in_features]
    scales = fit.scales.view(scheme.planes, out_features, n_groups).half()
    return TritPlaneWeight(scheme, planes.contiguous(), scales.contiguous()), history


def _progressive_start(w: torch.Tensor, d: torch.Tensor, n_planes: int) -> Fit:
    """Each plane the best ternarisation of what the planes before it left; then the joint scales, kept
    per row only where they beat the progressive ones (so a second plane never makes a row worse)."""
    planes, scales, residual = [], [], w
    for _ in range(n_planes):
        plane = _best_ternarisation(residual, d)
        scale = _solve_scales(residual, d, plane[None])[0]
        planes.append(plane)
        scales.append(scale)
        residual = residual - scale[:, None] * plane
    planes, progressive = torch.stack(planes), torch.stack(scales)
    error = _error(w, d, planes, progressive)
    joint = _solve_scales(w, d, planes)
    joint_error = _error(w, d, planes, joint)
    better = joint_error <= error
    return Fit(planes, torch.where(better[None], joint, progressive), torch.where(better, joint_error, error))


def _best_ternarisation(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sign(w) on the k largest |w| per row, k maximising (Σ d|w|)² / Σ d over the top k."""
    magnitude, order = w.abs().sort(dim=1, descending=True)
    weights = d.gather(1, order)
    gain = (weights * magnitude).cumsum(dim=1).square() / weights.cumsum(dim=1).clamp(min=1e-30)
    k = gain.argmax(dim=1, keepdim=True)
    chosen_sorted = torch.arange(w.shape[1], device=w.device)[None, :] <= k
    chosen = torch.zeros_like(chosen_sorted).scatter_(1, order, chosen_sorted)
    return torch.where(chosen, torch.sign(w), torch.zeros_like(w))


def _improve(w: torch.Tensor, d: torch.Tensor, fit: Fit) -> Fit:
    """(b) then (a), each kept per row only where it does not raise the error."""
    planes = _best_planes(w, fit.scales)
    error = _error(w, d, planes, fit.scales)
    better = error <= fit.error
    planes = torch.where(better[None, :, None], planes, fit.planes)
    error = torch.where(better, error, fit.error)

    scales = _solve_scales(w, d, planes)
    new_error = _error(w, d, planes, scales)
    better = new_error <= error
    return Fit(planes, torch.where(better[None], scales, fit.scales), torch.where(better, new_error, error))


def _best_planes(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """For every element the (t1[, t2]) whose level Σ α_p t_p is nearest to it: exact, per row."""
    n_planes = scales.shape[0]
    pairs = _PAIRS.to(w.device) if n_planes == 2 else torch.tensor([[-1.0], [0.0], [1.0]], device=w.device)
    levels = scales.T @ pairs.T  # [R, 9] (or [R, 3])
    sorted_levels, order = levels.sort(dim=1)
    midpoints = (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2
    nearest = order.gather(1, torch.searchsorted(midpoints.contiguous(), w.contiguous()))
    return pairs[nearest].permute(2, 0, 1)  # [P, R, G]


def _solve_scales(w: torch.Tensor, d: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """argmin over α of Σ d (w − Σ α_p t_p)², per row, in closed form (1×1 or 2×2 normal equations with a
    small ridge), rounded to float16."""
    if planes.shape[0] == 1:
        return _storable(_weighted_dot(d, w, planes[0]) / _weighted_dot(d, planes[0], planes[0]).clamp(min=1e-30))[None]
    t1, t2 = planes
    a11, a12, a22 = _weighted_dot(d, t1, t1), _weighted_dot(d, t1, t2), _weighted_dot(d, t2, t2)
    b1, b2 = _weighted_dot(d, w, t1), _weighted_dot(d, w, t2)
    ridge = _RIDGE * (a11 + a22) + 1e-30
    a11, a22 = a11 + ridge, a22 + ridge
    det = a11 * a22 - a12 * a12
    return _storable(torch.stack([(b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det]))


def _weighted_dot(d: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (d * x * y).sum(dim=1)


def _error(w: torch.Tensor, d: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    approx = (scales[:, :, None] * planes).sum(dim=0)
    return (d * (w - approx).square()).sum(dim=1)


def _storable(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value a scale will be stored as (finite)."""
    limit = torch.finfo(torch.float16).max
    return scale.clamp(-limit, limit).half().float()
