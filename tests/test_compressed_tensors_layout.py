"""Our packed block formats, read back with the compressed-tensors package's own helpers (a dev
dependency): the bytes, the scale encodings and the dequantized values must agree exactly. The package
is imported by the tests, not at collection (4 s on a 2-core CPU, which every pytest-xdist worker would pay)."""

import torch

from quantbench.formats.fp import E2M1, E2M3
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme

ROWS, COLS = 48, 256


def weight(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(ROWS, COLS) * torch.rand(ROWS, 1) * 0.1


def test_mxfp4_bytes_and_e8m0_scales():
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    q = quantize_rtn(weight(0), Scheme.parse("mxfp4-rtn"))
    packed = q.pack()
    elements = E2M1.decode(q.codes)
    assert torch.equal(packed["qweight"], pack_fp4_to_uint8(elements))
    theirs = unpack_fp4_from_uint8(packed["qweight"], ROWS, COLS, dtype=torch.float32)
    scales = decompress_mx_scale(packed["scales"]).float().repeat_interleave(32, dim=1)
    assert torch.equal(theirs * scales, q.dequantize())


def test_nvfp4_bytes_e4m3_scales_and_global_scale():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

    q = quantize_rtn(weight(1), Scheme.parse("nvfp4-rtn"))
    packed = q.pack()
    assert torch.equal(packed["qweight"], pack_fp4_to_uint8(E2M1.decode(q.codes)))
    elements = unpack_fp4_from_uint8(packed["qweight"], ROWS, COLS, dtype=torch.float32)
    # compressed-tensors: weight_scale is float8_e4m3fn, and the block scale is weight_scale / global_scale
    block_scale = packed["scales"].view(torch.float8_e4m3fn).float() / packed["global_scale"]
    assert torch.equal(elements * block_scale.repeat_interleave(16, dim=1), q.dequantize())


def test_mxfp6_e2m3_bytes():
    from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8, unpack_fp6_from_uint8

    q = quantize_rtn(weight(2), Scheme.parse("mxfp6e2m3-rtn"))
    packed = q.pack()
    elements = E2M3.decode(q.codes)
    assert torch.equal(packed["qweight"], pack_fp6_to_uint8(elements))  # 4 codes in 3 bytes, little-endian
    assert torch.equal(unpack_fp6_from_uint8(packed["qweight"], ROWS, COLS, dtype=torch.float32), elements)
