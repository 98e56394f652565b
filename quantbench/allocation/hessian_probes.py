"""Second-order sensitivity from Hessian-vector products: Hutchinson's trace estimate (HAWQ-V2) and power
iteration for the top eigenvalue (HAWQ-V1), on any `hvp` callable; `LossHessian` supplies the products of
a causal LM's loss Hessian with respect to chosen weights, by double backpropagation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

Hvp = Callable[[list[torch.Tensor]], list[torch.Tensor]]
HvpMany = Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor]]]  # H v for each of several probes


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson's estimate of tr(H) with its standard error, from `probes` Rademacher probes."""

    trace: float
    stderr: float
    probes: int

    @property
    def relative_stderr(self) -> float:
        return self.stderr / abs(self.trace) if self.trace else math.inf


@dataclass(frozen=True)
class Eigenvalue:
    """The eigenvalue of largest magnitude found by power iteration, and whether it converged."""

    value: float
    iterations: int
    converged: bool


def rademacher_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, tensor.shape, generator=generator, device=generator.device)
    return (signs * 2 - 1).to(device=tensor.device, dtype=tensor.dtype)


def hutchinson_traces(hvp: Hvp, shapes: Sequence[torch.Tensor], rel_stderr: float = 0.05, min_probes: int = 8,
                      max_probes: int = 256, seed: int = 0, products: HvpMany | None = None) -> list[TraceEstimate]:
    """tr(H_ll) of every diagonal block of H, from one Hessian-vector product per probe.

    Each probe v is Rademacher over all blocks at once; v_lᵀ (H v)_l is an unbiased estimate of tr(H_ll)
    (the cross terms v_lᵀ H_lk v_k have mean zero). Probes come in rounds (`_round_size`): `min_probes`
    first, then as many as the block farthest from its error bar needs; probing stops after the round where
    every block's standard error is at most `rel_stderr` of its estimate, or at `max_probes`. With `products`
    (several probes' products in one call, as `LossHessian.products`) a round is one call; the estimates are
    those of one `hvp` call a probe.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples: list[list[float]] = [[] for _ in shapes]
    taken = 0
    while taken < max_probes:
        count = _round_size(samples, taken, rel_stderr, min_probes, max_probes)
        probes = [[rademacher_like(t, generator) for t in shapes] for _ in range(count)]
        for vs, hvs in zip(probes, products(probes) if products is not None else map(hvp, probes)):
            for block, (v, hv) in enumerate(zip(vs, hvs)):
                samples[block].append(float((v.double() * hv.double()).sum()))
        taken += count
        if taken >= min_probes and all(_summary(s).relative_stderr <= rel_stderr for s in samples):
            break
    return [_summary(s) for s in samples]


def _round_size(samples: list[list[float]], taken: int, rel_stderr: float, min_probes: int, max_probes: int) -> int:
    """The next round's probes: up to `min_probes` at first; then what the block farthest from its error bar
    needs by the 1/√n law, at least one and at most `min_probes` (a round's products are held at once)."""
    if taken < min_probes:
        return min(min_probes, max_probes) - taken
    ratio = max(_summary(s).relative_stderr for s in samples) / rel_stderr
    needed = math.ceil(taken * ratio ** 2) - taken if ratio < max_probes else min_probes  # also inf and nan
    return max(1, min(needed, min_probes, max_probes - taken))


def _summary(samples: list[float]) -> TraceEstimate:
    values = torch.tensor(samples, dtype=torch.float64)
    stderr = float(values.std() / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    return TraceEstimate(float(values.mean()), stderr, len(samples))


def power_iteration(hvp: Hvp, like: torch.Tensor, max_iters: int = 100, tol: float = 1e-3,
                    seed: int = 0) -> Eigenvalue:
    """The eigenvalue of largest magnitude of the symmetric operator `hvp` on tensors shaped like `like`:
    v ← Hv/‖Hv‖ until the Rayleigh quotient changes by at most `tol` (relative) between iterations."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    v = (v / v.norm()).to(device=like.device, dtype=like.dtype)
    value = 0.0
    for iteration in range(1, max_iters + 1):
        hv = hvp([v])[0]
        previous, value = value, float((v.double() * hv.double()).sum())
        norm = hv.norm()
        if norm == 0:
            return Eigenvalue(0.0, iteration, True)
        v = hv / norm
        if iteration > 1 and abs(value - previous) <= tol * abs(value):
            return Eigenvalue(value, iteration, True)
    return Eigenvalue(value, max_iters, False)


class LossHessian:
    """Products with the Hessian of a causal LM's mean next-token loss on `input_ids`, with respect to the
    weights of `layers` (in that order). Batches run one at a time and their products are averaged, so
    memory is that of one batch's double backward. The model runs in float32 with eager attention
    (fused attention kernels have no double backward)."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, layers: Sequence[nn.Linear], batch_size: int = 4):
        self.model, self.layers = model, list(layers)
        self.batches = list(input_ids.split(batch_size))
        self.tokens = sum(batch[:, 1:].numel() for batch in self.batches)

    @property
    def weights(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self.layers]

    def __call__(self, vs: list[torch.Tensor], only: Sequence[int] | None = None) -> list[torch.Tensor]:
        """H v for block vectors `vs` (one per layer in `only`, default all layers)."""
        return self.products([vs], only)[0]

    def products(self, probes: list[list[torch.Tensor]], only: Sequence[int] | None = None) -> list[list[torch.Tensor]]:
        """H v for each of several probes: a batch's forward and gradient serve all of them (its graph is kept
        until the last probe's second backward), so a probe costs one backward of the gradient. The same floats
        as one call a probe."""
        chosen = [self.weights[i] for i in (only if only is not None else range(len(self.layers)))]
        device = chosen[0].device
        results = [[torch.zeros_like(w) for w in chosen] for _ in probes]
        with _second_order_ready(self.model, chosen):
            for batch in self.batches:
                batch = batch.to(device)
                logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                   reduction="sum") / self.tokens
                grads = torch.autograd.grad(loss, chosen, create_graph=True)
                for k, (vs, products) in enumerate(zip(probes, results)):
                    dot = sum((g * v).sum() for g, v in zip(grads, vs))
                    last = k + 1 == len(probes)
                    for product, hv in zip(products, torch.autograd.grad(dot, chosen, retain_graph=not last)):
                        product.add_(hv)
        return results

    def for_layer(self, index: int) -> Hvp:
        return lambda vs: self(vs, only=[index])


@contextmanager
def _second_order_ready(model: nn.Module, weights: list[torch.Tensor]):
    """Gradients on for `weights` only, eager attention; everything restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    attention = getattr(model.config, "_attn_implementation", None)
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    if attention not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if attention not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attention)
