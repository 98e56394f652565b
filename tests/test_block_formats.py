"""MX and NVFP4 block formats: scale selection on hand-made blocks, nearest-value rounding, storage,
packing, and both solvers."""

import math

import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.formats.packing import pack_bytes, unpack_bytes
from quantbench.formats import BLOCK_FORMATS, format_for
from quantbench.formats.fp import E4M3
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.gptq import gptq_quantize, layer_objective
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme

MX = [name for name in BLOCK_FORMATS if name.startswith("mx")]


def block(*values, size=32):
    row = torch.zeros(size)
    row[: len(values)] = torch.tensor(values)
    return row.unsqueeze(0)


@pytest.mark.parametrize("name,amax,exponent", [
    ("mxfp4", 6.0, 0),     # floor(log2 6) = 2 = emax: scale 1, 6 is exactly the largest element
    ("mxfp4", 4.0, 0),     # a power of two: floor(log2 4) = 2
    ("mxfp4", 8.0, 1),     # 8 / 2 = 4
    ("mxfp4", 0.75, -3),   # floor(log2 0.75) = -1
    ("mxfp8e4m3", 448.0, 0),
    ("mxfp8e4m3", 1.0, -8),
    ("mxfp8e5m2", 1.0, -15),
    ("mxfp6e3m2", 16.0, 0),
    ("mxint8", 1.0, 0),
    ("mxint8", 1.5, 0),
    ("mxint8", 2.0, 1),
])
def test_mx_shared_scale_follows_the_spec(name, amax, exponent):
    fmt = BLOCK_FORMATS[name]
    params = fmt.fit(block(amax, -amax / 3, 0.1))
    assert params.scale.item() == 2.0**exponent
    assert fmt.store_scales(params.scale).item() == exponent + 127  # E8M0: biased exponent
    assert fmt.load_scales(fmt.store_scales(params.scale)).item() == 2.0**exponent
    assert fmt.round(block(amax), params)[0, 0].item() == amax  # the block max is exact here


def test_mx_block_max_above_the_element_max_saturates_as_the_spec_prescribes():
    fmt = BLOCK_FORMATS["mxfp4"]
    params = fmt.fit(block(7.0))  # floor(log2 7) = 2: scale 1, and 7 clips to 6
    assert params.scale.item() == 1.0
    assert fmt.round(block(7.0), params)[0, 0].item() == 6.0


def test_mx_all_zero_block_and_scale_clamping():
    fmt = BLOCK_FORMATS["mxfp8e4m3"]
    zero = fmt.fit(torch.zeros(1, 32))
    assert fmt.store_scales(zero.scale).item() == 0  # smallest E8M0 scale, 2^-127
    assert (fmt.round(torch.zeros(1, 32), zero) == 0).all()
    tiny = fmt.fit(block(2.0**-126))  # −126 − 8 is below E8M0's range: clamped to −127
    assert fmt.store_scales(tiny.scale).item() == 0
    assert fmt.load_scales(torch.tensor([254], dtype=torch.uint8)).item() == 2.0**127
    huge = BLOCK_FORMATS["mxint8"].fit(block(3e38))
    assert BLOCK_FORMATS["mxint8"].store_scales(huge.scale).item() == 127 + 127


def test_nvfp4_two_level_scales():
    fmt = BLOCK_FORMATS["nvfp4"]
    weight = torch.zeros(2, 32)
    weight[0, 0] = 2688.0  # the tensor max: g = 448·6 / 2688 = 1
    weight[1, :4] = torch.tensor([12.0, -3.0, 0.7, 0.4])  # block amax 12 → s8 = 2
    fmt = fmt.for_weight(weight)
    assert fmt.global_scale.item() == 1.0
    params = fmt.fit(weight.view(4, 16))
    assert params.scale.view(2, 2).tolist() == [[448.0, 0.0], [2.0, 0.0]]
    rounded = fmt.round(weight.view(4, 16), params).view(2, 32)
    assert rounded[1, :4].tolist() == [12.0, -3.0, 1.0, 0.0]  # 0.35 → 0.5 and 0.2 → 0 on the E2M1 grid
    assert (rounded[:, 16:] == 0).all()  # all-zero blocks: s8 = 0 decodes to zeros
    assert E4M3.decode(fmt.store_scales(params.scale)).view(2, 2).tolist() == [[448.0, 0.0], [2.0, 0.0]]


def test_nvfp4_global_scale_is_recorded_and_restores_the_block_scales():
    torch.manual_seed(3)
    weight = torch.randn(32, 64) * 0.02
    q = quantize_rtn(weight, Scheme(format="nvfp4"))
    assert q.global_scale.item() == pytest.approx(448 * 6 / weight.abs().max().item(), rel=1e-6)
    restored = QuantizedWeight.unpack(q.scheme, q.shape, q.pack())
    assert torch.equal(restored.dequantize(), q.dequantize())
    assert q.scales.dtype == torch.uint8 and q.scales.shape == (32, 4)


@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_rtn_picks_the_nearest_value_of_each_blocks_grid(name):
    torch.manual_seed(0)
    weight = torch.randn(24, 96) * torch.rand(24, 1) * 4
    q = quantize_rtn(weight, Scheme(format=name))
    fmt = q.format
    scale = fmt.load_scales(q.scales).repeat_interleave(q.group_size, dim=1)
    grid = fmt.element.table.double()
    grid = grid[torch.isfinite(grid)]
    distance = (weight.double().unsqueeze(-1) - scale.double().unsqueeze(-1) * grid).abs()
    nearest = distance.min(dim=-1).values
    error = (weight.double() - q.dequantize().double()).abs()
    # MX scales are powers of two, so everything is exact; NVFP4's s8 / g carries float32 rounding
    tolerance = 0.0 if name.startswith("mx") else 1e-6 * float(scale.max())
    assert torch.allclose(error, nearest, rtol=0, atol=tolerance)


def test_error_shrinks_with_element_precision():
    torch.manual_seed(1)
    weight = torch.randn(64, 256)
    error = {name: (weight - quantize_rtn(weight, Scheme(format=name)).dequantize()).norm().item()
             for name in BLOCK_FORMATS}
    assert error["mxint8"] < error["mxfp6e2m3"] < error["mxfp6e3m2"] < error["mxfp4"]
    assert error["mxfp8e4m3"] < error["mxfp8e5m2"]
    assert error["nvfp4"] < error["mxfp4"]  # smaller blocks and a finer scale


@pytest.mark.parametrize("name,bpw", [("mxfp4", 4.25), ("mxfp6e2m3", 6.25), ("mxfp8e4m3", 8.25), ("mxint8", 8.25)])
def test_bits_per_weight_count_the_scales(name, bpw):
    scheme = Scheme(format=name)
    q = quantize_rtn(torch.randn(8, 128), scheme)
    assert scheme.bits_per_weight == q.bits_per_weight == bpw


def test_nvfp4_bits_per_weight():
    q = quantize_rtn(torch.randn(8, 128), Scheme(format="nvfp4"))
    assert Scheme(format="nvfp4").bits_per_weight == 4.5
    assert q.bits_per_weight == 4.5 + 32 / (8 * 128)  # plus the float32 tensor scale


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("n", [32, 36, 37, 96])
def test_pack_bytes_round_trips(bits, n):
    torch.manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, n), dtype=torch.uint8)
    packed = pack_bytes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(n * bits / 8))
    assert torch.equal(unpack_bytes(packed, bits, n), codes)


def test_fp4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[0x1, 0x2, 0x3, 0xF, 0x8, 0x0]], dtype=torch.uint8)
    assert pack_bytes(codes, 4).tolist() == [[0x21, 0xF3, 0x08]]


@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_packed_layout_matches_compressed_tensors(name):
    scheme = Scheme(format=name)
    q = quantize_rtn(torch.randn(16, 128), scheme)
    tensors = q.pack()
    assert tensors["qweight"].dtype == torch.uint8
    assert tensors["qweight"].shape == (16, 128 * scheme.bits // 8)
    assert tensors["scales"].dtype == torch.uint8 and tensors["scales"].shape == (16, 128 // scheme.group_size)
    assert ("global_scale" in tensors) == (name == "nvfp4")
    assert "qzeros" not in tensors
    restored = QuantizedWeight.unpack(scheme, q.shape, tensors)
    assert torch.equal(restored.codes, q.codes) and torch.equal(restored.dequantize(), q.dequantize())


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6e2m3", "mxfp8e4m3", "mxint8", "nvfp4"])
@pytest.mark.parametrize("options", [{}, {"act_order": True, "static_groups": True}])
def test_gptq_with_block_formats_beats_rtn_on_the_layer_objective(name, options):
    torch.manual_seed(2)
    weight = torch.randn(48, 128)
    mix = torch.randn(128, 128) / 8 + torch.eye(128)
    inputs = torch.randn(1024, 128) @ mix * torch.rand(128) * 2
    hessian = inputs.T @ inputs / len(inputs)
    rtn = quantize_rtn(weight, Scheme(format=name))
    gptq = gptq_quantize(weight, hessian, Scheme(format=name, solver="gptq", **options))
    assert layer_objective(weight, gptq.dequantize(), hessian) < layer_objective(weight, rtn.dequantize(), hessian)
    assert gptq.g_idx is None  # blocks stay contiguous
    restored = QuantizedWeight.unpack(gptq.scheme, gptq.shape, gptq.pack())
    assert torch.equal(restored.dequantize(), gptq.dequantize())


def test_block_schemes_parse_name_and_validate():
    assert Scheme.parse("mxfp4-rtn") == Scheme(format="mxfp4", bits=4, group_size=32, symmetric=True)
    assert Scheme.parse("mxfp8-gptq").format == "mxfp8e4m3"  # alias
    assert Scheme.parse("nvfp4-rtn").group_size == 16
    for name in ["mxfp6e3m2-gptq-act-static-damp0.1", "mxint8-rtn-a:mxint8", "int8-pc-sym-rtn-a:int8",
                 "mxfp4-rtn-a:nvfp4", "int4-g128-gptq-act-a:int4"]:
        assert Scheme.parse(name).name == name
    assert Scheme.parse("mxfp4-rtn-a:mxfp8").activations == "mxfp8e4m3"
    with pytest.raises(ValueError, match="mxfp4 fixes bits to 4"):
        Scheme(format="mxfp4", bits=8)
    with pytest.raises(QuantbenchError, match="act_order needs static_groups"):
        Scheme.parse("mxfp4-gptq-act")
    with pytest.raises(QuantbenchError, match="not understood"):
        Scheme.parse("mxfp5-rtn")
    assert format_for(Scheme.parse("mxfp6e2m3-rtn")).element.name == "e2m3"


def test_recipes_take_block_schemes_as_names_or_mappings():
    from quantbench.recipe import QuantizeSection, parse_recipe

    section = QuantizeSection(default={"format": "nvfp4", "solver": "gptq", "activations": "nvfp4"},
                              overrides=[{"pattern": "mlp", "scheme": "mxfp8-rtn-a:int8"}])
    assert section.default.name == "nvfp4-gptq-a:nvfp4"
    assert section.scheme_for("model.layers.0.mlp.up_proj").name == "mxfp8e4m3-rtn-a:int8"
    with pytest.raises(QuantbenchError, match=r"quantize.default: mxfp4 fixes group_size to 32"):
        parse_recipe({"name": "x", "model": {"name": "m"}, "quantize": {"default": {"format": "mxfp4", "group_size": 64}}})
    with pytest.raises(QuantbenchError, match=r"quantize.default.activations"):
        parse_recipe({"name": "x", "model": {"name": "m"}, "quantize": {"default": {"format": "mxfp4", "activations": "fp3"}}})
