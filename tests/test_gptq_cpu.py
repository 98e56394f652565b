"""GPTQ's column loop in the C++ library (`quantizers/gptq_cpu.py`) against the torch loop it replaces: the same
floats, bit for bit, for every way integer grids are fitted (in the block, past its end, up front, per channel),
and for the block formats of float elements (MXFP4/6/8, NVFP4; scales fitted per block or up front)."""

import pytest
import torch
from test_gptq import random_hessian

from quantbench.formats import format_for
from quantbench.formats.fp import E2M1, E2M3, E3M2, E4M3, E5M2
from quantbench.quantizers import gptq as gptq_module
from quantbench.quantizers import gptq_cpu
from quantbench.quantizers.gptq import _Block, _solve_columns, gptq_quantize
from quantbench.scheme import Scheme

pytestmark = pytest.mark.skipif(not gptq_cpu.applies(format_for(Scheme.parse("int4-g32-gptq")), torch.zeros(1)),
                                reason="quantbench's CPU library cannot be built here")


def solved(W, H, scheme, monkeypatch, library: bool):
    calls = []
    monkeypatch.setenv("QUANTBENCH_GPTQ_KERNEL", "1" if library else "0")
    monkeypatch.setattr(gptq_cpu, "solve_columns", lambda *a: calls.append(a[3:]) or solve_columns(*a))
    return gptq_quantize(W, H, scheme), calls


solve_columns = gptq_cpu.solve_columns


@pytest.mark.parametrize("name, runs", [("int4-g32-gptq-act", 4 + 1), ("int4-g48-sym-gptq", 3 + 2),
                                        ("int3-g32-gptq-act-static", 1 + 1), ("int8-pc-gptq", 1 + 1),
                                        ("int2-g128-gptq-act", 1 + 1), ("mxfp4-gptq", 4 + 1),
                                        ("nvfp4-gptq", 8 + 2), ("nvfp4-gptq-act-static", 1 + 1),
                                        ("mxfp6e2m3-gptq", 4 + 1), ("mxfp8e4m3-gptq-act-static", 1 + 1),
                                        ("mxfp8e5m2-gptq", 4 + 1)])
def test_the_library_solves_what_the_torch_loop_solves(monkeypatch, name, runs):
    """160 columns in blocks of 128 and 32: groups fitted inside the blocks (g32), one fitted on columns past its
    block (g48: 96–143, the second block's run to column 144 on its grid), grids fitted up front (static groups,
    per channel: one run a block), one group a block (g128). A run from each fit to the next."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 160, generator=g)
    W[3, 5] = 0.0
    H = random_hessian(160, 1)
    scheme = Scheme.parse(name)
    eager, none = solved(W, H, scheme, monkeypatch, library=False)
    native, spans = solved(W, H, scheme, monkeypatch, library=True)
    assert not none and len(spans) == runs
    assert torch.equal(native.codes, eager.codes)
    assert torch.equal(native.scales, eager.scales)
    assert (native.zeros is None and eager.zeros is None) or torch.equal(native.zeros, eager.zeros)
    assert (native.g_idx is None and eager.g_idx is None) or torch.equal(native.g_idx, eager.g_idx)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_block_leaves_the_same_weights_codes_and_errors(monkeypatch, symmetric):
    """One block, grids fitted at columns 0 and 24 (a run each), with weights far off the grid's range so that
    codes clamp at both ends."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(33, 48, generator=g) * torch.linspace(0.5, 4.0, 48)
    fmt = format_for(Scheme.parse("int3-g24-sym-gptq" if symmetric else "int3-g24-gptq"))
    upper = torch.linalg.cholesky(torch.linalg.inv(random_hessian(48, 2)), upper=True)
    block = _Block.of(W, upper, 2)
    results = {}
    for library in (False, True):
        monkeypatch.setenv("QUANTBENCH_GPTQ_KERNEL", "1" if library else "0")
        results[library] = block.clone()
        _solve_columns(fmt, results[library], (0, 24), 24)
    for name in ("W1", "codes", "errors", "fit_scale", "fit_zero"):
        assert torch.equal(getattr(results[True], name), getattr(results[False], name)), name
    codes = results[True].codes
    assert codes.min() == (1 if symmetric else 0) and codes.max() == 7


@pytest.mark.parametrize("name", ["mxfp4-gptq", "mxfp6e3m2-gptq", "mxfp8e5m2-gptq", "nvfp4-gptq"])
def test_a_block_of_float_elements_leaves_the_same_weights_codes_and_errors(monkeypatch, name):
    """Weights spread over ten decades within each block: the largest saturate at the element's largest value
    (an MX scale leaves up to twice it), the smallest round to subnormal codes and to zero, of either sign."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(37, 64, generator=g) * 10.0 ** (10 * torch.rand(37, 64, generator=g) - 8)
    W[4, :20] = 0.0
    scheme = Scheme.parse(name)
    fmt = format_for(scheme).for_weight(W)
    upper = torch.linalg.cholesky(torch.linalg.inv(random_hessian(64, 4)), upper=True)
    fits = tuple(range(0, 64, fmt.block_size))
    block = _Block.of(W, upper, len(fits))
    results = {}
    for library in (False, True):
        monkeypatch.setenv("QUANTBENCH_GPTQ_KERNEL", "1" if library else "0")
        results[library] = block.clone()
        _solve_columns(fmt, results[library], fits, fmt.block_size)
    for field in ("W1", "codes", "errors", "fit_scale"):
        assert torch.equal(getattr(results[True], field), getattr(results[False], field)), field
    codes = results[True].codes.long()
    magnitudes = codes & (fmt.element.sign_bit - 1)
    assert (magnitudes == fmt.element.max_magnitude_code).any() and (codes == 0).any()
    assert ((magnitudes > 0) & (magnitudes < 1 << fmt.element.mantissa_bits)).any()  # subnormal codes
    assert (codes >= fmt.element.sign_bit).any() and ((codes > 0) & (codes < fmt.element.sign_bit)).any()


@pytest.mark.parametrize("element", [E2M1, E2M3, E3M2, E4M3, E5M2], ids=lambda e: e.name)
def test_the_library_encodes_every_element_as_the_format_does(element):
    """With Hinv = I no error moves, so the library's codes are its element encoding alone: on every value of
    the format, every midpoint between two (ties go to the even code), values past the largest, and 20,000
    values spread over the format's range, of both signs, against FloatElement.encode."""
    from quantbench.export.kernels import cpu_packed  # noqa: F401  (the library's ops)

    table = element.table[:element.sign_bit]
    finite = table[torch.isfinite(table)].double().unique()
    midpoints = (finite[1:] + finite[:-1]) / 2
    beyond = finite[-1] * torch.tensor([1.0001, 1.5, 2.0, 1e6], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    spread = 2.0 ** (torch.rand(20000, generator=g, dtype=torch.float64) * (finite[-1].log2() + 20) - 20)
    values = torch.cat([finite, midpoints, beyond, spread]).float()
    values = torch.cat([values, -values[values != 0]])  # no −0: a column's update, w − (−0), would make it +0
    values = torch.cat([values, values[:(-values.numel()) % 64]]).view(-1, 64)
    rows = values.shape[0]
    W, codes, errors = values.clone(), torch.zeros_like(values), torch.zeros_like(values)
    torch.ops.quantbench_cpu.gptq_element_columns(W, torch.eye(64), codes, errors, torch.ones(rows, 1),
                                                  element.table, 0, 64, element.mantissa_bits, element.min_exponent,
                                                  element.max_value, element.bits, element.nan_code or 0)
    expected = element.encode(values)
    assert torch.equal(codes, expected.float())
    assert torch.equal(errors, values - element.decode(expected))
    assert torch.equal(element.decode(expected[:, :finite.numel()].reshape(-1)[:finite.numel()]), finite.float())


def test_both_column_loops_refuse_what_they_cannot_solve():
    """One check serves both loops: a column range past the width, a scale of the wrong rows, a float64
    matrix, an inverse Hessian of the wrong width; the integer loop also wants a zero point per scale."""
    from quantbench.export.kernels import cpu_packed  # noqa: F401  (the library's ops)

    ops = torch.ops.quantbench_cpu

    def solve(loop, W=None, hinv=None, scale=None, end=8, zero=None):
        W = torch.zeros(3, 8) if W is None else W
        args = (W, torch.eye(8) if hinv is None else hinv, torch.zeros(3, 8), torch.zeros(3, 8),
                torch.ones(3, 1) if scale is None else scale)
        if loop == "int":
            return ops.gptq_int_columns(*args, torch.zeros(3, 1) if zero is None else zero, 0, end, 0, 15)
        return ops.gptq_element_columns(*args, E2M1.table, 0, end, E2M1.mantissa_bits, E2M1.min_exponent,
                                        E2M1.max_value, E2M1.bits, 0)

    for loop in ("int", "element"):
        solve(loop)  # well formed
        name = f"gptq_{loop}_columns"
        for bad in (dict(end=9), dict(scale=torch.ones(2, 1)), dict(hinv=torch.eye(7))):
            with pytest.raises(RuntimeError, match=f"{name}: W, codes, errors"):
                solve(loop, **bad)
        with pytest.raises(RuntimeError, match=f"{name}: contiguous float32 matrices"):
            solve(loop, W=torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="gptq_int_columns: a float32 zero point for each scale"):
        solve("int", zero=torch.zeros(3, 2))


def test_other_formats_and_devices_keep_the_torch_loop():
    assert gptq_cpu.applies(format_for(Scheme.parse("mxfp4-gptq")), torch.zeros(1))
    assert not gptq_cpu.applies(format_for(Scheme.parse("mxint8-gptq")), torch.zeros(1))
    assert not gptq_cpu.applies(format_for(Scheme.parse("int4-g32-gptq")), torch.zeros(1, dtype=torch.float64))
    assert not gptq_cpu.applies(format_for(Scheme.parse("int4-g32-gptq")), torch.zeros(1, device="meta"))


def test_gptq_quantize_takes_the_library_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(gptq_module.gptq_cpu, "solve_columns", lambda *a: calls.append(1) or solve_columns(*a))
    gptq_quantize(torch.randn(8, 64), random_hessian(64, 0), Scheme.parse("int4-g32-gptq"))
    assert calls
