"""Incoherence processing for any solver: quantize W·R instead of W, R a randomised Hadamard rotation.

A linear y = x Wᵀ computes the same as (x R)(W R)ᵀ for an orthogonal R. Rotating spreads every input
channel's energy over all channels, so a few outlier columns no longer set the range of whole groups:
the rotated weight is quantized, and the layer rotates its input online (activations.py), where
activation quantization then also sees the rotated, outlier-free input. The solver sees the layer's
statistics in the rotated basis: the Hessian becomes Rᵀ H R and the per-channel energies its diagonal.
"""

from __future__ import annotations

import torch

from quantbench.calibration.stats import LayerStats
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.scheme import Scheme


def rotation_for(scheme: Scheme, in_features: int) -> RandomHadamard | None:
    """The input rotation a scheme asks for on a layer of this width, or None."""
    return RandomHadamard(in_features, scheme.rotation_seed) if scheme.transform == "hadamard" else None


def layer_rotation(linear: torch.nn.Module, scheme: Scheme) -> RandomHadamard | None:
    """The rotation `linear` is quantized in under `scheme`: none where the layer already rotates its input
    online (the model rotation's down_proj), whose weight and statistics are then in the rotated basis."""
    from quantbench.activations import input_rotation_of  # activations imports the quantizers package

    return None if input_rotation_of(linear) is not None else rotation_for(scheme, linear.in_features)


def rotate_weight(weight: torch.Tensor, rotation: RandomHadamard) -> torch.Tensor:
    """W R in float32 (the solvers work in float32; a half-precision copy would round W R once more)."""
    return rotation.rows(weight.float())


def rotate_stats(stats: LayerStats, rotation: RandomHadamard) -> LayerStats:
    """The statistics the layer would have measured on rotated inputs x R: Rᵀ (Σ xᵀx) R and its diagonal.

    Per-channel maxima do not survive a rotation and are dropped; the full Σ xᵀx must have been collected.
    """
    if stats.xtx is None:
        raise ValueError("a rotated layer's statistics need its full Σ xᵀx (collect it with wants_hessian)")
    xtx = rotation.hessian(stats.xtx)
    return LayerStats(n_samples=stats.n_samples, xtx=xtx, square_sum=xtx.diagonal().clone())
