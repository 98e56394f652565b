"""`LayerStats` and the forward hooks that fill it while a block runs on calibration data."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.calibration.compensated_sum import compensated_gram_


@dataclass
class LayerStats:
    """What calibration measured at the input of one linear layer.

    xtx: Σ xᵀx over all calibration tokens (float32, [in, in]), or None when no solver asked for it.
    n_samples: number of input rows (tokens) seen. act_absmax: per-input-channel max |x|.
    square_sum: per-input-channel Σ x² (float32, [in]): the diagonal of Σ xᵀx at the cost of one pass.
    Layers that read the same input tensor (q/k/v, gate/up) share one LayerStats object.
    """

    n_samples: int = 0
    act_absmax: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    square_sum: torch.Tensor | None = None
    wants_hessian: bool = field(default=False, repr=False)
    accumulation: str = field(default="compensated", repr=False)  # see HESSIAN_MODES
    factors: dict = field(default_factory=dict, repr=False, compare=False)  # GPTQ's, by (damp, act_order)
    _carry: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def hessian(self) -> torch.Tensor:
        """The GPTQ layer Hessian H = (2/n)·Σ xᵀx."""
        if self.xtx is None:
            raise ValueError("this layer's Hessian was not collected")
        return self.xtx * (2.0 / max(1, self.n_samples))

    @property
    def mean_square(self) -> torch.Tensor:
        """Per input channel, the mean of x² over the calibration tokens."""
        if self.square_sum is None:
            raise ValueError("no calibration inputs were seen for this layer")
        return self.square_sum / max(1, self.n_samples)

    def update(self, x: torch.Tensor) -> None:
        self.factors.clear()
        x = x.detach().reshape(-1, x.shape[-1])
        absmax = x.abs().amax(dim=0).float()
        self.act_absmax = absmax if self.act_absmax is None else torch.maximum(self.act_absmax, absmax)
        square_sum = x.float().square().sum(dim=0)
        self.square_sum = square_sum if self.square_sum is None else self.square_sum + square_sum
        if self.wants_hessian:
            if self.xtx is None:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            on_tensor_cores = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            if on_tensor_cores and self.accumulation == "tensor_cores":
                self.xtx.add_(torch.mm(x.T, x, out_dtype=torch.float32))  # exact products, float32 output
            elif on_tensor_cores and self.accumulation == "compensated":
                self._add_compensated(x)
            else:  # the upper triangle, then mirrored: half the products of one addmm_, and exactly symmetric
                add_upper_gram_(self.xtx, x.float(), 0, x.shape[1])
                mirror_upper_(self.xtx)
        self.n_samples += x.shape[0]

    def _add_compensated(self, x: torch.Tensor) -> None:
        """Σ xᵀx of half-precision x on tensor cores to float32 accuracy (`_carry` keeps what float32 dropped)."""
        if self._carry is None:
            self._carry = torch.zeros_like(self.xtx)
        compensated_gram_(self.xtx, self._carry, x)


GRAM_LEAF = 256  # widths up to this are one matmul; wider ranges split in two (0.6-0.85 of one addmm_'s time)


def add_upper_gram_(total: torch.Tensor, x: torch.Tensor, start: int, stop: int) -> None:
    """total += xᵀx on and above the diagonal of the square [start, stop): halves are split recursively, the
    off-diagonal block one matmul, so that the sum costs about half a full `addmm_` (the values below the
    diagonal outside the leaves are not touched; `mirror_upper_` completes the matrix)."""
    if stop - start <= GRAM_LEAF:
        total[start:stop, start:stop].addmm_(x[:, start:stop].T, x[:, start:stop])
        return
    middle = start + (stop - start) // 2
    add_upper_gram_(total, x, start, middle)
    total[start:middle, middle:stop].addmm_(x[:, start:middle].T, x[:, middle:stop])
    add_upper_gram_(total, x, middle, stop)


def mirror_upper_(total: torch.Tensor) -> None:
    """Copy a square matrix's upper triangle below its diagonal, a panel of rows at a time."""
    width = total.shape[0]
    for start in range(0, width, GRAM_LEAF):
        stop = min(start + GRAM_LEAF, width)
        diagonal = total[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        total[stop:, start:stop].copy_(total[start:stop, stop:].T)


HESSIAN_MODES = {
    "compensated": "bf16/fp16 CUDA activations: tensor-core sums of 128 products, Kahan-summed (below float32 error)",
    "fp32": "every activation converted to float32 and multiplied without tensor cores",
    "tensor_cores": "bf16/fp16 CUDA activations: one tensor-core matmul per calibration batch (fastest, least exact)",
}


class StopForward(Exception):
    """Raised by a hook once everything wanted from a forward pass has been seen."""


@contextmanager
def collect_stats(linears: dict[str, nn.Linear], hessian_for: set[str], shared: dict[str, str] | None = None,
                  stop_when_seen: bool = False, timed: Callable[[str], object] | None = None,
                  accumulation: str = "compensated"):
    """Attach input hooks to `linears`; yields name → LayerStats, filled by every forward inside.

    shared: follower → leader for layers reading the leader's input tensor; only the leader is hooked and
    both names map to one LayerStats. stop_when_seen: raise StopForward once every hooked layer has seen
    its input in the current pass (the rest of the block need not run). timed(label) gives a context
    manager that times the accumulation. accumulation: how Σ xᵀx is summed (HESSIAN_MODES).
    """
    shared = shared or {}
    leaders = [name for name in linears if name not in shared]
    stats = {name: LayerStats(accumulation=accumulation) for name in leaders}
    for follower, leader in shared.items():
        stats[follower] = stats[leader]
    for name in hessian_for:
        stats[name].wants_hessian = True
    seen: set[str] = set()
    clock = timed or (lambda _label: nullcontext())

    def hook(name: str):
        def accumulate(_module, args):
            with clock("hessian"):
                stats[name].update(args[0])
            if stop_when_seen:
                seen.add(name)
                if len(seen) == len(leaders):
                    seen.clear()
                    raise StopForward
        return accumulate

    handles = [linears[name].register_forward_pre_hook(hook(name)) for name in leaders]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def input_sharing(block: nn.Module, linears: dict[str, nn.Linear], run_once: Callable[[], None]) -> list[list[str]]:
    """Group `linears` by the input tensor they read during one forward (`run_once`), in forward order:
    for a Llama block [[q, k, v], [o], [gate, up], [down]]."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the tensors keeps their ids unique
    handles = [module.register_forward_pre_hook(lambda _m, args, n=name: calls.append((n, args[0])))
               for name, module in linears.items()]
    try:
        run_once()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, tensor in calls:
        members = groups.setdefault(id(tensor), [])
        if name not in members:
            members.append(name)
    return list(groups.values())
