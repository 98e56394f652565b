import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.formats import IntFormat, format_for
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme


def scale_per_column(q, in_features):
    return q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :in_features]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, None])
def test_rtn_error_is_at_most_half_a_step(bits, symmetric, group_size):
    torch.manual_seed(bits)
    weight = torch.randn(48, 192) * torch.rand(48, 1) * 3
    q = quantize_rtn(weight, Scheme(bits=bits, symmetric=symmetric, group_size=group_size))
    error = (weight - q.dequantize()).abs()
    step = scale_per_column(q, 192)
    # the float16 grid covers every group's range (nearest scale, or the next one up where it must): the
    # nearest point is ≤ half a step away
    assert (error <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_codes_stay_in_range_and_use_the_grid(bits):
    torch.manual_seed(0)
    weight = torch.randn(16, 256)
    asym = quantize_rtn(weight, Scheme(bits=bits, group_size=64))
    assert asym.codes.dtype == torch.uint8
    assert asym.codes.min() == 0 and asym.codes.max() == 2**bits - 1  # min and max of a group map to the ends
    assert asym.zeros.max() <= 2**bits - 1
    sym = quantize_rtn(weight, Scheme(bits=bits, group_size=64, symmetric=True))
    assert sym.zeros is None
    assert sym.codes.min() >= 1 and sym.codes.max() <= 2**bits - 1  # restricted range: ±(2^(b−1) − 1)
    assert int(sym.codes.max()) == 2**bits - 1 or int(sym.codes.min()) == 1  # absmax hits an end


def test_symmetric_grid_is_symmetric_and_exact_on_grid_values():
    scale = 0.25
    levels = torch.arange(-7, 8, dtype=torch.float32) * scale  # int4 symmetric: −7..7
    weight = levels.repeat(4, 1)
    q = quantize_rtn(weight, Scheme(bits=4, group_size=None, symmetric=True))
    assert torch.equal(q.dequantize(), weight)
    assert torch.allclose(q.scales.float(), torch.full((4, 1), scale))


def test_asymmetric_zero_point_is_an_integer_and_zero_is_exact():
    torch.manual_seed(1)
    weight = torch.rand(8, 64) + 0.5  # all positive: the range is widened to include 0
    weight[:, 3] = 0.0
    q = quantize_rtn(weight, Scheme(bits=4, group_size=32))
    assert (q.zeros == 0).all()
    assert (q.dequantize()[:, 3] == 0).all()


def test_group_size_that_does_not_divide_in_features():
    torch.manual_seed(2)
    weight = torch.randn(8, 100)
    q = quantize_rtn(weight, Scheme(bits=4, group_size=32))
    assert q.scales.shape == (8, 4) and q.n_groups == 4
    tail = quantize_rtn(weight[:, 96:], Scheme(bits=4, group_size=None))  # the short last group alone
    assert torch.equal(q.dequantize()[:, 96:], tail.dequantize())
    # 100 four-bit codes fill 12.5 words → 13; 4 float16 scales; 4 four-bit zeros in one word
    assert q.storage_bits == 8 * (13 * 32 + 4 * 16 + 32)


def test_all_zero_groups_and_fp16_scale():
    weight = torch.zeros(4, 64)
    weight[0, :32] = torch.linspace(-1e-3, 1e-3, 32)
    for symmetric in (False, True):
        q = quantize_rtn(weight, Scheme(bits=4, group_size=32, symmetric=symmetric))
        assert torch.isfinite(q.dequantize()).all()
        assert (q.dequantize()[1:] == 0).all()
        assert q.scales.dtype == torch.float16


def test_error_shrinks_as_bits_grow():
    torch.manual_seed(3)
    weight = torch.randn(64, 512)
    errors = [(weight - quantize_rtn(weight, Scheme(bits=b, group_size=128)).dequantize()).norm() for b in range(2, 9)]
    assert all(a > 1.7 * b for a, b in zip(errors, errors[1:]))  # each bit roughly halves the error


def test_bits_per_weight_counts_scales_and_zeros():
    assert Scheme(bits=4, group_size=128).bits_per_weight == pytest.approx(4 + 20 / 128)
    assert Scheme(bits=4, group_size=128, symmetric=True).bits_per_weight == pytest.approx(4 + 16 / 128)
    q = quantize_rtn(torch.randn(10, 256), Scheme(bits=3, group_size=64))
    assert q.bits_per_weight == pytest.approx((24 * 32 + 4 * 16 + 32) / 256)  # 768 code bits, zeros in a word


@pytest.mark.parametrize("name", ["int4-g128-rtn", "int3-g32-rtn", "int8-pc-sym-rtn", "int2-g64-gptq-act",
                                  "int4-g32-gptq-act-static", "mxfp4-rtn", "mxfp6e3m2-rtn", "nvfp4-rtn",
                                  "ternary2-g32-ptqtp", "ternary1-ptqtp"])
@pytest.mark.parametrize("shape", [(12, 576), (5, 160)])  # 128 and 5 do not divide 576; 128 does not divide 160
def test_storage_is_what_the_checkpoint_stores(name, shape):
    """One definition of a layer's size: the packed tensors, padding included; `layout` predicts them."""
    from quantbench.calibration.stats import LayerStats
    from quantbench.quantized_weight import packed_layout
    from quantbench.quantizers import needs_stats, solver_for

    scheme = Scheme.parse(name)
    torch.manual_seed(0)
    weight = torch.randn(shape)
    stats = None
    if needs_stats(scheme):
        stats = LayerStats(wants_hessian=True)
        stats.update(torch.randn(64, shape[1]))
    q = solver_for(scheme).quantize(weight, scheme, stats)
    packed = q.pack()
    layout = packed_layout(scheme, shape)
    assert {k: (tuple(t.shape), t.dtype) for k, t in packed.items()} == {
        k: (spec.shape, spec.dtype) for k, spec in layout.items()}
    assert q.storage_bits == 8 * sum(t.numel() * t.element_size() for t in packed.values())


def test_format_fit_round_is_nearest_grid_point():
    fmt = IntFormat(bits=3, symmetric=False)
    torch.manual_seed(4)
    w = torch.randn(5, 40)
    params = fmt.fit(w)
    grid = (torch.arange(8).float() - params.zero) * params.scale  # [5, 8] every level of each row
    nearest = grid.gather(1, (w.unsqueeze(-1) - grid.unsqueeze(1)).abs().argmin(-1))
    assert torch.allclose(fmt.round(w, params), nearest)


@pytest.mark.parametrize("name", ["int4-g128-rtn", "int8-pc-sym-rtn", "int3-g64-rtn", "int2-g32-sym-rtn"])
def test_scheme_names_round_trip(name):
    assert Scheme.parse(name).name == name


def test_bad_scheme_names_and_values():
    with pytest.raises(QuantbenchError, match="int4-g128-rtn"):
        Scheme.parse("int4_g128")
    with pytest.raises(ValueError, match="multiple of 8"):
        Scheme(group_size=100)
    with pytest.raises(ValueError):
        Scheme(bits=9)


@pytest.mark.parametrize("name", ["int4-g128-gptq", "int3-g128-sym-gptq", "int8-pc-sym-rtn", "mxfp4-gptq",
                                  "mxfp8e4m3-gptq", "mxint8-rtn", "nvfp4-gptq"])
def test_fit_encode_decode_never_read_values_on_the_host(name):
    """GPTQ's column solve captures fit/encode/decode in a CUDA graph, where a branch on a tensor's value
    (`if t.any()`) fails; meta tensors have no values, so such a branch raises here on any CPU."""
    weight = torch.empty(8, 64, device="meta")
    fmt = format_for(Scheme.parse(name)).for_weight(weight)
    params = fmt.fit(weight)
    decoded = fmt.decode(fmt.encode(weight, params), params)
    assert decoded.shape == weight.shape and decoded.device.type == "meta"


def test_fitted_scales_pass_gradients_without_differentiating_nextafter(monkeypatch):
    """AutoRound differentiates through `fit`. Some torch versions have no derivative for nextafter (the step to
    the next float16 where a rounded scale leaves a range end off the grid): the fit must not need one."""
    nextafter = torch.nextafter

    class NoDerivative(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, towards):
            return nextafter(value, towards)

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError("the derivative for 'nextafter' is not implemented")

    monkeypatch.setattr(torch, "nextafter", NoDerivative.apply)
    ends = torch.stack([-torch.rand(500, generator=torch.Generator().manual_seed(0)),
                        torch.rand(500, generator=torch.Generator().manual_seed(1))], dim=1).requires_grad_(True)
    fmt = IntFormat(bits=3, symmetric=False)
    fmt.fit(ends).scale.sum().backward()
    assert torch.allclose(ends.grad.abs(), torch.full_like(ends, 1 / 7))  # d scale / d range = 1 / max_code
