"""The fast GPTQ paths give the results of the plain ones: the fused Triton column kernel (Triton's interpreter on
the CPU) the eager solve's codes, batched inverse-Hessian factors the per-layer ones, and the compensated
Hessian beyond float32 accuracy."""

import pytest
import torch
from test_gptq import random_hessian

from quantbench.calibration import compensated_sum
from quantbench.calibration.stats import LayerStats
from quantbench.formats import format_for
from quantbench.quantizers import gptq as gptq_module
from quantbench.quantizers.gptq import (_Block, _fit_groups, _lower_triangular_inverse, _solve_columns,
                                        _upper_cholesky_of_inverse, gptq_quantize, prepare_factors,
                                        upper_cholesky_of_inverse_batched, upper_cholesky_of_inverse_of)
from quantbench.quantizers.gptq_fused import solve_block_fused
from quantbench.scheme import Scheme

pytest.importorskip("triton")

FORMATS = ["int4-g16-gptq", "int3-g16-sym-gptq", "int2-g16-gptq", "int8-g16-sym-gptq", "mxfp4-gptq",
           "mxfp6e3m2-gptq", "mxfp8e4m3-gptq", "mxfp8e5m2-gptq", "mxint8-gptq", "nvfp4-gptq"]


def inverse_factor(cols: int, seed: int) -> torch.Tensor:
    return _upper_cholesky_of_inverse(random_hessian(cols, seed), 0.01)


@pytest.mark.parametrize("up_front", [False, True], ids=["fitted-in-block", "fitted-up-front"])
@pytest.mark.parametrize("name", FORMATS)
def test_fused_block_gives_the_eager_codes(name, up_front):
    """One lazy block, every format: a partial row tile (19 rows), a block narrower than 128 columns, grids
    fitted inside the block at each group start or gathered per column from an up-front fit."""
    scheme = Scheme.parse(name)
    g = torch.Generator().manual_seed(len(name))
    width = 32 if not up_front else 24
    W = torch.randn(19, width, generator=g) * torch.rand(19, 1, generator=g) * 4
    W[3, 5] = 0.0
    fmt = format_for(scheme).for_weight(W)
    group = scheme.group_size or fmt.block_size
    fit_offsets = () if up_front else tuple(range(0, width, group))
    block = _Block.of(W, inverse_factor(width, 1), len(fit_offsets))
    if up_front:
        params = _fit_groups(fmt, W, group, -(-width // group))
        column_group = torch.arange(width) // group
        block.col_scale, block.col_zero = params.scale[:, column_group], params.zero[:, column_group]
    eager, fused = block.clone(), block.clone()
    _solve_columns(fmt, eager, fit_offsets, group)
    solve_block_fused(fmt, fused, fit_offsets, group)
    assert torch.equal(fused.codes, eager.codes)
    assert torch.equal(fused.errors, eager.errors)
    assert torch.equal(fused.fit_scale, eager.fit_scale) and torch.equal(fused.fit_zero, eager.fit_zero)
    assert not torch.equal(eager.errors, torch.zeros_like(eager.errors))


@pytest.mark.parametrize("name", ["int8-g16-gptq", "int4-g16-gptq"])
def test_fused_fit_steps_the_scale_up_where_the_nearest_float16_leaves_the_range_off_the_grid(name):
    """Scales round to the nearest float16; an asymmetric group whose range end then falls over half a step
    off the grid takes the next float16 up. Rows chosen so that this happens: kernel and eager agree."""
    scheme = Scheme.parse(name)
    g = torch.Generator().manual_seed(7)
    candidates = torch.randn(4000, 16, generator=g)
    lo, hi = candidates.amin(1).clamp(max=0), candidates.amax(1).clamp(min=0)
    max_code = 2 ** scheme.bits - 1
    nearest = ((hi - lo) / max_code).half().float()
    zero = torch.round(-lo / nearest).clamp(0, max_code)
    short = (lo < -(zero + 0.5) * nearest) | (hi > (max_code - zero + 0.5) * nearest)
    W = torch.cat([candidates[short][:8], candidates[~short][:11]])
    assert short.sum() >= 8
    fmt = format_for(scheme).for_weight(W)
    params = fmt.fit(W)
    assert (params.scale[:8, 0] > nearest[short][:8]).all() and (params.scale[8:, 0] == nearest[~short][:11]).all()
    assert ((W - fmt.decode(fmt.encode(W, params), params)).abs() <= params.scale / 2 * (1 + 1e-6)).all()
    block = _Block.of(W, inverse_factor(16, 2), 1)
    eager, fused = block.clone(), block.clone()
    _solve_columns(fmt, eager, (0,), 16)
    solve_block_fused(fmt, fused, (0,), 16)
    assert torch.equal(fused.fit_scale, eager.fit_scale) and torch.equal(fused.fit_zero, eager.fit_zero)
    assert torch.equal(fused.codes, eager.codes)
    assert (eager.fit_scale[:8, 0] == params.scale[:8, 0]).all()  # the first column's fit is the plain fit


@pytest.mark.parametrize("name", ["int4-g32-gptq-act", "int3-g32-gptq-act-static", "nvfp4-gptq-act-static", "mxfp4-gptq"])
def test_gptq_with_the_fused_kernel_equals_eager(monkeypatch, name):
    """Whole solves with act_order, static groups and a last block the kernel cannot take (160 = 128 + 32
    columns with block size 128: the fused kernel solves the first block, the eager loop the rest)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(18, 160, generator=g)
    H = random_hessian(160, 2)
    scheme = Scheme.parse(name)
    eager = gptq_quantize(W, H, scheme)
    calls = []
    monkeypatch.setattr(gptq_module, "fused_available", lambda _w: True)
    monkeypatch.setattr(gptq_module, "solve_block_fused", lambda *a: calls.append(1) or solve_block_fused(*a))
    fused = gptq_quantize(W, H, scheme)
    assert calls
    assert torch.equal(fused.codes, eager.codes)
    assert torch.equal(fused.scales, eager.scales)
    assert (fused.zeros is None and eager.zeros is None) or torch.equal(fused.zeros, eager.zeros)
    assert (fused.g_idx is None and eager.g_idx is None) or torch.equal(fused.g_idx, eager.g_idx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["int4-g128-gptq-act", "int3-g32-gptq-act-static", "int8-pc-sym-gptq", "mxfp4-gptq",
                                  "nvfp4-gptq-act-static"])
def test_the_compiled_fused_kernel_gives_the_eager_codes_on_cuda(monkeypatch, name):
    """The fused solve compiled for the GPU, not through the interpreter, against the eager loop on the same
    device (no CUDA graphs): whole solves of 300 rows (a partial row tile) and 320 columns (two blocks and a
    partial one)."""
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(300, 320, generator=g) * torch.rand(300, 1, generator=g)).cuda()
    H = random_hessian(320, 3).cuda()
    scheme = Scheme.parse(name)
    monkeypatch.setenv("QUANTBENCH_CUDA_GRAPHS", "0")
    monkeypatch.setenv("QUANTBENCH_GPTQ_KERNEL", "0")
    eager = gptq_quantize(W, H, scheme)
    monkeypatch.setenv("QUANTBENCH_GPTQ_KERNEL", "1")
    calls = []
    monkeypatch.setattr(gptq_module, "solve_block_fused", lambda *a: calls.append(1) or solve_block_fused(*a))
    fused = gptq_quantize(W, H, scheme)
    assert len(calls) >= 2
    assert torch.equal(fused.codes, eager.codes) and torch.equal(fused.scales, eager.scales)
    assert (fused.zeros is None and eager.zeros is None) or torch.equal(fused.zeros, eager.zeros)
    assert (fused.g_idx is None and eager.g_idx is None) or torch.equal(fused.g_idx, eager.g_idx)


def test_batched_inverse_factors_equal_per_layer_ones(caplog):
    hessians = [random_hessian(48, seed) for seed in range(3)]
    singular = torch.zeros(48, 48)
    singular[:, 0] = singular[0, :] = 1.0  # indefinite even after the first dampening: must escalate
    singular.diagonal().add_(1e-3)
    batched = upper_cholesky_of_inverse_batched([*hessians, singular], 0.01)
    for H, upper in zip([*hessians, singular], batched):
        single = _upper_cholesky_of_inverse(H, 0.01)
        assert torch.allclose(upper, single, rtol=1e-5, atol=1e-6 * single.abs().max())
    assert "not positive definite" in caplog.text


def test_factors_are_shared_by_candidates_and_renewed_by_new_data():
    x = torch.randn(300, 40)
    stats = LayerStats(wants_hessian=True)
    stats.update(x)
    scheme = Scheme.parse("int4-g32-gptq")
    prepare_factors([stats, stats], scheme, torch.device("cpu"))
    factor = stats.factors[(scheme.damp, scheme.act_order)]
    prepare_factors([stats], Scheme.parse("int3-g32-gptq"), torch.device("cpu"))  # same damp and order
    assert stats.factors[(scheme.damp, scheme.act_order)] is factor and len(stats.factors) == 1
    assert torch.allclose(factor.upper, _upper_cholesky_of_inverse(stats.hessian, scheme.damp))
    stats.update(x)
    assert not stats.factors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_upper_cholesky_of_inverse_against_float64(seed):
    """U (one reversed factorisation and a triangular inverse) is the upper Cholesky factor of H⁻¹ computed in
    float64 (relative error measured 3.1–3.2e-7 in float32), batched or not; a matrix that is not positive
    definite reports failure."""
    H = torch.stack([random_hessian(96, seed + k) for k in range(2)])
    H.diagonal(dim1=-2, dim2=-1).add_(0.01 * H.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
    upper, info = upper_cholesky_of_inverse_of(H)
    reference = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True)
    assert info.tolist() == [0, 0] and torch.equal(upper, upper.triu())
    assert float((upper.double() - reference).norm() / reference.norm()) < 3e-6
    single, _ = upper_cholesky_of_inverse_of(H[1])
    assert torch.allclose(single, upper[1], rtol=1e-5, atol=1e-7)
    indefinite = H[0].clone()
    indefinite[5, 5] = -1.0
    assert upper_cholesky_of_inverse_of(indefinite)[1] != 0


def test_triangular_inverse_by_halves():
    """The recursive triangular inverse, five levels deep with odd splits, batched: L⁻¹·L = I in float64."""
    lower = torch.linalg.cholesky(torch.stack([random_hessian(300, seed) for seed in (0, 1)]).double())
    inverse = _lower_triangular_inverse(lower, leaf=16)
    assert torch.equal(inverse, inverse.tril())
    assert torch.allclose(inverse @ lower, torch.eye(300, dtype=torch.float64).expand(2, 300, 300), atol=1e-12)


def _relative_error(H: torch.Tensor, x: torch.Tensor) -> float:
    reference = x.double().T @ x.double()
    return float((H.double() - reference).norm() / reference.norm())


def _outlier_activations(tokens: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, width, generator=g) * torch.rand(width, generator=g) * 4).bfloat16()


def test_chunked_compensated_sum_reaches_float32_accuracy(monkeypatch):
    """Off the Triton path, 4,096 chunks of one bfloat16 stream: Kahan-summed chunk products against float64 are
    ≥ 5× closer than the plain float32 running sum of the same products (measured 18–43× over six seeds)."""
    monkeypatch.setattr(compensated_sum, "COMPENSATED_CHUNK", 32)
    x = _outlier_activations(131072, 24, seed=0)
    total, carry = torch.zeros(24, 24), torch.zeros(24, 24)
    compensated_sum.compensated_gram_(total, carry, x)
    plain = torch.zeros(24, 24)
    for chunk in x.split(32):
        plain += compensated_sum.float32_products(chunk)
    assert _relative_error(total, x) < 2e-7
    assert _relative_error(plain, x) > 5 * _relative_error(total, x)


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_compensated_gram_rounds_the_exact_sum(seed):
    """The tiled Triton kernel (interpreted) on integer activations times powers of two: every product and every
    128-token tensor-core sum is exact in float32, only the long sum rounds. Over 20,000 tokens in two updates,
    with a partial tile, the kernel gives the float64 sum rounded to float32, element for element (all of six
    seeds), where the plain float32 running sum of the same short sums errs ≥ 5× more (measured 7–11×); the
    mirrored tiles equal the computed ones and the carry holds what float32 dropped."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(-127, 128, (20000, 150), generator=g).float()
         * 2.0 ** torch.randint(0, 5, (150,), generator=g).float()).bfloat16()
    total, carry = torch.zeros(150, 150), torch.zeros(150, 150)
    compensated_sum._triton_gram(total, carry, x[:12345])
    compensated_sum._triton_gram(total, carry, x[12345:])
    exact = x.double().T @ x.double()
    assert torch.equal(total, exact.float())
    plain = torch.zeros(150, 150)
    for chunk in x.split(compensated_sum.GRAM_STEP * compensated_sum.STEPS_PER_SUM):
        plain += compensated_sum.float32_products(chunk)
    assert _relative_error(plain, x) > 5 * _relative_error(total, x)
    tile = compensated_sum.GRAM_TILE
    assert torch.equal(total[:tile, tile:], total[tile:, :tile].T)
    assert torch.equal(carry[:tile, tile:], carry[tile:, :tile].T) and carry.abs().max() > 0
