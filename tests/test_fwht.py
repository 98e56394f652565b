"""Walsh–Hadamard transforms against explicit matrices, for every construction in use."""

import pytest
import torch

from quantbench.quantizers.fwht import hadamard_matrix, hadamard_plan, hadamard_transform, paley_matrix

# the hidden and MLP sizes of common models, and the small orders their Paley factors need
MODEL_SIZES = [576, 1536, 2048, 4096, 5632, 11008, 14336]


@pytest.mark.parametrize("m", [4, 8, 12, 20, 24, 28, 36, 44, 60, 68, 72, 76, 84])
def test_paley_matrices_are_hadamard(m):
    h = paley_matrix(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n, kind", [(1, "sylvester"), (64, "sylvester"), (4096, "sylvester"), (12, "paley12"),
                                     (576, "paley36"), (1536, "paley12"), (5632, "paley44"), (14336, "paley28"),
                                     (11008, "blockdiag43x256"), (6, "blockdiag3x2")])
def test_plans_name_their_construction(n, kind):
    plan = hadamard_plan(n)
    assert plan.kind == kind and plan.blocks * plan.small * plan.power == n


@pytest.mark.parametrize("n", [2, 8, 12, 24, 40, 96, 192, 576, 1536, 2048, 6, 11008 // 43 * 3])
def test_fast_transform_equals_the_explicit_matrix(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)  # orthonormal
    x = torch.randn(5, 3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ h.T, atol=1e-10)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ h, atol=1e-10)
    assert torch.allclose(hadamard_transform(hadamard_transform(x), transpose=True), x, atol=1e-10)


def explicit_hadamard(n: int) -> torch.Tensor:
    """Built without the transform: blockdiag(H_m ⊗ H_2 ⊗ … ⊗ H_2) / √(m 2^k), H_m from Paley."""
    plan = hadamard_plan(n)
    h = paley_matrix(plan.small) if plan.small > 1 else torch.ones(1, 1, dtype=torch.float64)
    for _ in range(plan.power.bit_length() - 1):
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    return torch.block_diag(*[h] * plan.blocks) / (plan.small * plan.power) ** 0.5


@pytest.mark.parametrize("n", [2, 12, 256, 512, 576, 1536, 2048, 4096, 6, 43 * 256])
def test_fast_transform_equals_an_independently_built_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x), x @ explicit_hadamard(n).T, atol=1e-10)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_are_rotations(n):
    x = torch.randn(4, n, dtype=torch.float64)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(hadamard_transform(y, transpose=True), x, atol=1e-10)
    spike = torch.zeros(n, dtype=torch.float64)
    spike[7] = 1.0
    spread = hadamard_transform(spike).abs()  # incoherence: one outlier spreads evenly over a whole block
    block = n // hadamard_plan(n).blocks
    assert torch.allclose(spread[spread > 0], torch.full((block,), block ** -0.5, dtype=torch.float64))


def test_float32_and_cuda_agree_with_float64():
    x = torch.randn(8, 576, dtype=torch.float64)
    assert torch.allclose(hadamard_transform(x.float()).double(), hadamard_transform(x), atol=1e-5)
    if torch.cuda.is_available():
        assert torch.allclose(hadamard_transform(x.cuda()).cpu(), hadamard_transform(x), atol=1e-10)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_rotation_keeps_a_linear_layer_and_rotates_its_hessian(n):
    from quantbench.quantizers.fwht import RandomHadamard

    rotation = RandomHadamard(n, seed=3)
    assert torch.equal(rotation.signs(), RandomHadamard(n, seed=3).signs())
    assert not torch.equal(rotation.signs(), RandomHadamard(n, seed=4).signs())
    r = rotation.rows(torch.eye(n, dtype=torch.float64))  # the matrix R itself
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    w, x = torch.randn(7, n, dtype=torch.float64), torch.randn(20, n, dtype=torch.float64)
    assert torch.allclose(rotation.rows(x) @ rotation.rows(w).T, x @ w.T, atol=1e-9)
    assert torch.allclose(rotation.rows_inverse(rotation.rows(x)), x, atol=1e-10)
    h = x.T @ x
    assert torch.allclose(rotation.hessian(h), rotation.rows(x).T @ rotation.rows(x), atol=1e-8)
