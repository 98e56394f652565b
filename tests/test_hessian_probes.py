"""Hutchinson's trace and power iteration against exact answers: explicit matrices and a tiny model's
explicit loss Hessian."""

import pytest
import torch
from torch import nn

from helpers import tiny_llama
from quantbench.allocation.hessian_probes import LossHessian, hutchinson_traces, power_iteration


def spd_matrix(n: int, seed: int, top: float = 10.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.linspace(0.1, 1.0, n, dtype=torch.float64)
    values[-1] = top
    return (q * values) @ q.T


def matrix_hvp(*matrices):
    return lambda vs: [(m @ v.reshape(-1)).reshape(v.shape) for m, v in zip(matrices, vs)]


def test_hutchinson_matches_exact_traces_within_its_error_bar():
    a, b = spd_matrix(48, 0), spd_matrix(30, 1, top=3.0)
    estimates = hutchinson_traces(matrix_hvp(a, b), [torch.zeros(6, 8, dtype=torch.float64),
                                                      torch.zeros(30, dtype=torch.float64)],
                                  rel_stderr=0.01, max_probes=2000)
    for estimate, exact in zip(estimates, (a.trace(), b.trace())):
        assert estimate.relative_stderr <= 0.01
        assert abs(estimate.trace - float(exact)) <= 4 * estimate.stderr


def test_hutchinson_stops_at_the_relative_error_or_the_probe_limit():
    a = spd_matrix(64, 2)
    quick = hutchinson_traces(matrix_hvp(a), [torch.zeros(64, dtype=torch.float64)], rel_stderr=0.2, min_probes=4)
    capped = hutchinson_traces(matrix_hvp(a), [torch.zeros(64, dtype=torch.float64)], rel_stderr=1e-6, max_probes=12)
    assert quick[0].probes < 12 and quick[0].relative_stderr <= 0.2
    assert capped[0].probes == 12 and capped[0].relative_stderr > 1e-6


def test_batched_products_give_the_estimates_of_one_product_a_probe():
    """The first `min_probes` probes in one call, then rounds of what the farthest block needs by the 1/√n law
    (at most `min_probes`) until the error bar or the limit is reached."""
    a, b = spd_matrix(20, 4), spd_matrix(12, 5)
    hvp = matrix_hvp(a, b)
    sizes = []

    def products(probes):
        sizes.append(len(probes))
        return [hvp(vs) for vs in probes]

    shapes = [torch.zeros(4, 5, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)]
    # 0.19: after 4 probes the worst block is at 0.199, so 4·(0.199/0.19)² = 4.4 probes do: one more
    for rel_stderr, max_probes, expected in ((1e-6, 7, [4, 3]), (0.5, 50, [4]), (1e-6, 3, [3]), (0.19, 50, [4, 1])):
        sizes.clear()
        one_each = hutchinson_traces(hvp, shapes, rel_stderr=rel_stderr, min_probes=4, max_probes=max_probes)
        batched = hutchinson_traces(hvp, shapes, rel_stderr=rel_stderr, min_probes=4, max_probes=max_probes,
                                    products=products)
        assert batched == one_each and sizes == expected
    sizes.clear()
    batched = hutchinson_traces(hvp, shapes, rel_stderr=0.15, min_probes=4, max_probes=60, products=products)
    assert sizes[0] == 4 and max(sizes) == 4 and {2, 3} & set(sizes) and sum(sizes) == batched[0].probes
    assert all(estimate.relative_stderr <= 0.15 for estimate in batched)


def test_power_iteration_finds_the_top_eigenvalue():
    a = spd_matrix(40, 3, top=5.0)
    found = power_iteration(matrix_hvp(a), torch.zeros(40, dtype=torch.float64), max_iters=500, tol=1e-10)
    assert found.converged
    assert found.value == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-6)


@pytest.fixture(scope="module")
def loss_hessian():
    model = tiny_llama(hidden=16, layers=2).float()
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    layers = [model.model.layers[1].mlp.down_proj, model.model.layers[0].self_attn.o_proj]
    return LossHessian(model, ids, layers, batch_size=2)


@pytest.fixture(scope="module")
def explicit_blocks(loss_hessian) -> list[torch.Tensor]:
    """Each layer's diagonal block of the loss Hessian, whole: the mean next-token loss over all sequences at
    once, differentiated twice by torch.func (independent of LossHessian's batches and products)."""
    model, ids = loss_hessian.model, torch.cat(loss_hessian.batches)
    names = {id(p): name for name, p in model.named_parameters()}
    blocks = []
    model.set_attn_implementation("eager")
    try:
        for weight in loss_hessian.weights:
            def loss(value, name=names[id(weight)]):
                logits = torch.func.functional_call(model, {name: value}, (ids,), {"use_cache": False}).logits
                return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            with torch.no_grad():
                block = torch.func.jacrev(torch.func.jacrev(loss))(weight.detach())
            blocks.append(block.reshape(weight.numel(), weight.numel()).double())
    finally:
        model.set_attn_implementation("sdpa")
    return blocks


def test_loss_hessian_products_are_the_exact_block_and_hutchinson_matches_its_trace(loss_hessian, explicit_blocks):
    exact = explicit_blocks[0]
    assert torch.allclose(exact, exact.T, rtol=0, atol=1e-5 * float(exact.abs().max()))
    weight = loss_hessian.weights[0]
    probes = torch.randn(3, *weight.shape, generator=torch.Generator().manual_seed(1))
    for v in probes:
        product = loss_hessian([v], only=[0])[0].reshape(-1).double()
        expected = exact @ v.reshape(-1).double()
        assert torch.allclose(product, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    estimate, = hutchinson_traces(lambda vs: loss_hessian(vs, only=[0]), [weight], rel_stderr=0.02, max_probes=400)
    assert abs(estimate.trace - float(exact.trace())) <= 4 * estimate.stderr


def test_joint_probes_estimate_every_block_at_once(loss_hessian, explicit_blocks):
    exact = [float(block.trace()) for block in explicit_blocks]
    estimates = hutchinson_traces(loss_hessian, loss_hessian.weights, rel_stderr=1e-3, max_probes=300,
                                  products=loss_hessian.products)
    for estimate, value in zip(estimates, exact):
        assert abs(estimate.trace - value) <= 4 * estimate.stderr


def test_power_iteration_on_the_loss_hessian_matches_eigvalsh(loss_hessian, explicit_blocks):
    exact = torch.linalg.eigvalsh(explicit_blocks[0])
    largest = float(exact[exact.abs().argmax()])
    found = power_iteration(loss_hessian.for_layer(0), loss_hessian.weights[0], max_iters=400, tol=1e-7)
    assert found.value == pytest.approx(largest, rel=1e-3)


def test_loss_hessian_products_of_several_probes_are_those_of_one_call_each(loss_hessian):
    g = torch.Generator().manual_seed(2)
    probes = [[torch.randn(w.shape, generator=g) for w in loss_hessian.weights] for _ in range(3)]
    together = loss_hessian.products(probes)
    for vs, products in zip(probes, together):
        assert all(torch.equal(a, b) for a, b in zip(products, loss_hessian(vs)))
    only = loss_hessian.products([vs[1:] for vs in probes[:2]], only=[1])
    assert [len(p) for p in only] == [1, 1] and torch.equal(only[1][0], loss_hessian(probes[1][1:], only=[1])[0])


def test_loss_hessian_restores_gradients_and_attention(loss_hessian):
    model = loss_hessian.model
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    loss_hessian([torch.ones_like(w) for w in loss_hessian.weights])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert model.config._attn_implementation == "sdpa"
