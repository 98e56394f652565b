"""`LayerStats` and the forward hooks that fill it while a block runs on calibration data."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LayerStats:
    """What calibration measured at the input of one linear layer.

    xtx: Σ xᵀx over all calibration tokens (float32, [in, in]), or None when no solver asked for it.
    n_samples: number of input rows (tokens) seen. act_absmax: per-input-channel max |x|.
    """

    n_samples: int = 0
    act_absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    wants_hessian: bool = field(default=False, repr=False)

    @property
    def hessian(self) -> torch.Tensor:
        """The GPTQ layer Hessian H = (2/n)·Σ xᵀx."""
        if self.xtx is None:
            raise ValueError("this layer's Hessian was not collected")
        return self.xtx * (2.0 / max(1, self.n_samples))

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        absmax = x.abs().amax(dim=0)
        self.act_absmax = absmax if self.act_absmax is None else torch.maximum(self.act_absmax, absmax)
        if self.wants_hessian:
            if self.xtx is None:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.xtx.addmm_(x.T, x)
        self.n_samples += x.shape[0]


@contextmanager
def collect_stats(linears: dict[str, nn.Linear], hessian_for: set[str]):
    """Attach input hooks to `linears`; yields name → LayerStats, filled by every forward inside."""
    stats = {name: LayerStats(wants_hessian=name in hessian_for) for name in linears}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
        for name, module in linears.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
