import itertools

import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.formats.packing import pack_trits, unpack_trits
from quantbench.quantizers.ptqtp import _best_planes, _best_ternarisation, ptqtp_quantize
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight


def row_errors(weight, q, d=None):
    d = torch.ones(weight.shape[1]) if d is None else d
    return (d * (weight - q.dequantize()).square()).sum(dim=1)


def test_parse_names_and_validation():
    assert Scheme.parse("ternary2-ptqtp") == Scheme(format="ternary", planes=2, group_size=None, solver="ptqtp")
    for name in ["ternary1-ptqtp", "ternary2-g128-ptqtp", "ternary2-g64-ptqtp-aw", "ternary2-ptqtp-a:int8"]:
        assert Scheme.parse(name).name == name
    assert Scheme(format="ternary").name == "ternary2-ptqtp"  # per row by default, fitted by PTQTP
    with pytest.raises(QuantbenchError, match="ternary format is fitted by the ptqtp solver"):
        Scheme.parse("int4-g128-ptqtp")
    with pytest.raises(QuantbenchError):
        Scheme.parse("ternary3-ptqtp")
    with pytest.raises(ValueError, match="activation_aware is a ptqtp option"):
        Scheme(bits=4, activation_aware=True)


@pytest.mark.parametrize("name", ["ternary1-ptqtp", "ternary2-ptqtp", "ternary2-g32-ptqtp", "ternary2-g48-ptqtp"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_never_increases(name, seed):
    torch.manual_seed(seed)
    weight = torch.randn(40, 200) * torch.rand(40, 1) + torch.randn(40, 200).pow(3) * 0.1  # heavy tails
    d = torch.rand(200) * 3 if seed == 2 else None
    scheme = Scheme.parse(name)
    q, history = ptqtp_quantize(weight, scheme, d)
    assert all(later <= earlier for earlier, later in zip(history, history[1:])), history
    assert history[-1] == pytest.approx(float(row_errors(weight, q, d).double().sum()), rel=1e-5)
    assert set(q.planes.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("group", [None, 32])
def test_two_planes_are_never_worse_than_one_in_any_row(group):
    torch.manual_seed(3)
    weight = torch.randn(64, 128) * torch.rand(64, 1)
    one, _ = ptqtp_quantize(weight, Scheme(format="ternary", planes=1, group_size=group))
    two, _ = ptqtp_quantize(weight, Scheme(format="ternary", planes=2, group_size=group))
    assert (row_errors(weight, two) <= row_errors(weight, one)).all()
    assert row_errors(weight, two).sum() < 0.5 * row_errors(weight, one).sum()


def test_first_plane_is_the_optimal_ternarisation():
    """Brute force over every ternary vector of a short row (3^7 of them) with its least-squares scale."""
    torch.manual_seed(4)
    w = torch.randn(6, 7)
    d = torch.rand(6, 7) + 0.1
    every = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=7)))  # [2187, 7]
    for row in range(6):
        dot = (d[row] * every * w[row]).sum(1)
        norm = (d[row] * every * every).sum(1).clamp(min=1e-30)
        best = ((d[row] * w[row].square()).sum() - dot.square() / norm).min()
        plane = _best_ternarisation(w[row:row + 1], d[row:row + 1])[0]
        ours = (d[row] * w[row].square()).sum() - (d[row] * plane * w[row]).sum().square() / (d[row] * plane.square()).sum()
        assert ours == pytest.approx(float(best), abs=1e-5)


def test_element_choice_is_the_best_of_the_nine_pairs():
    torch.manual_seed(5)
    w = torch.randn(12, 50)
    scales = torch.randn(2, 12)  # any scales, negative and unordered included
    scales[:, 0] = torch.tensor([0.5, 0.5])  # a row with repeated levels
    scales[1, 1] = 0.0  # and one whose second plane is worthless
    planes = _best_planes(w, scales)
    ours = (w - (scales[:, :, None] * planes).sum(0)).square()
    pairs = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=2)))  # [9, 2]
    levels = scales.T @ pairs.T  # [12, 9]
    brute = (w[:, :, None] - levels[:, None, :]).square().min(dim=-1).values
    assert torch.allclose(ours, brute, rtol=1e-6, atol=1e-7)


def test_degenerate_rows_stay_finite():
    weight = torch.zeros(4, 64)
    weight[1] = 0.3  # constant row: the two planes can coincide
    weight[2, 5] = -2.0  # a single non-zero
    q, history = ptqtp_quantize(weight, Scheme(format="ternary"))
    assert torch.isfinite(q.scales.float()).all() and all(torch.isfinite(torch.tensor(history)))
    assert torch.allclose(q.dequantize(), weight, atol=1e-3)  # all of these are exactly representable


def test_activation_aware_objective_puts_error_where_inputs_are_small():
    torch.manual_seed(6)
    weight = torch.randn(32, 128)
    d = torch.ones(128)
    d[:16] = 100.0  # sixteen columns carry most of the input energy
    plain, _ = ptqtp_quantize(weight, Scheme(format="ternary"))
    aware, _ = ptqtp_quantize(weight, Scheme(format="ternary", activation_aware=True), d)
    assert row_errors(weight, aware, d).sum() < row_errors(weight, plain, d).sum()
    same, _ = ptqtp_quantize(weight, Scheme(format="ternary", activation_aware=True), torch.full((128,), 7.0))
    assert torch.equal(same.planes, plain.planes)  # a constant weighting changes nothing


def test_beats_int3_rtn_per_row_at_similar_bits():
    torch.manual_seed(7)
    weight = torch.randn(64, 512) * 0.02
    q, _ = ptqtp_quantize(weight, Scheme.parse("ternary2-g128-ptqtp"))
    int3 = quantize_rtn(weight, Scheme.parse("int3-g128-rtn"))
    assert q.bits_per_weight == 2 * (8 * 103 / 512 + 16 / 128)  # a row of 512 trits takes 103 bytes
    assert row_errors(weight, q).sum() < row_errors(weight, int3).sum()


def test_trits_pack_five_per_byte_in_base_3():
    assert pack_trits(torch.tensor([[1, 0, -1, 1, 1, -1]])).tolist() == [[2 + 1 * 3 + 0 * 9 + 2 * 27 + 2 * 81, 0 + 1 * 3 + 9 + 27 + 81]]
    torch.manual_seed(8)
    for n in (1, 5, 7, 100, 576):
        trits = torch.randint(-1, 2, (2, 3, n), dtype=torch.int8)
        packed = pack_trits(trits)
        assert packed.dtype == torch.uint8 and packed.shape == (2, 3, -(-n // 5)) and int(packed.max()) <= 242
        assert torch.equal(unpack_trits(packed, n), trits)
    with pytest.raises(ValueError):
        pack_trits(torch.tensor([[2]]))
    every_byte = [[(b // 3**i) % 3 - 1 for i in range(5)] for b in range(243)]  # digit i of b, minus 1
    assert unpack_trits(torch.arange(243, dtype=torch.uint8)[:, None], 5).tolist() == every_byte
    assert pack_trits(torch.tensor(every_byte, dtype=torch.int8)).flatten().tolist() == list(range(243))


@pytest.mark.parametrize("group", [None, 32, 48])
def test_multiplication_free_forward_equals_the_dequantized_matmul(group):
    torch.manual_seed(9)
    weight = torch.randn(24, 80)
    q, _ = ptqtp_quantize(weight, Scheme(format="ternary", group_size=group))
    x = torch.randn(2, 5, 80)
    assert torch.allclose(q.multiplication_free_linear(x), x @ q.dequantize().T, rtol=1e-4, atol=1e-4)


def test_storage_round_trip_and_bits():
    torch.manual_seed(10)
    q, _ = ptqtp_quantize(torch.randn(8, 100), Scheme(format="ternary"))
    tensors = q.pack()
    assert tensors["qweight"].shape == (2, 8, 20) and tensors["scales"].shape == (2, 8, 1)
    assert q.bits_per_weight == 2 * (1.6 + 16 / 100)
    back = TritPlaneWeight.unpack(q.scheme, q.shape, tensors)
    assert torch.equal(back.planes, q.planes) and torch.equal(back.dequantize(), q.dequantize())
    parts = q.split_rows([3, 5])
    assert torch.equal(torch.cat([p.dequantize() for p in parts]), q.dequantize())


def test_activation_aware_fit_reads_per_channel_statistics_only(monkeypatch):
    from helpers import tiny_llama

    from quantbench.calibration.stats import LayerStats
    from quantbench.pipeline import quantize_model
    from quantbench.quantizers.ptqtp import PTQTPSolver

    x = torch.randn(3, 7, 16)
    stats = LayerStats()
    stats.update(x)
    flat = x.reshape(-1, 16)
    assert stats.xtx is None and torch.allclose(stats.mean_square, torch.diagonal(flat.T @ flat) / 21)

    seen = []
    original = PTQTPSolver.quantize
    monkeypatch.setattr(PTQTPSolver, "quantize", lambda self, w, scheme, stats=None: seen.append(stats) or original(self, w, scheme, stats))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    scheme = Scheme.parse("ternary2-ptqtp-aw")
    quantize_model(tiny_llama(), ids, lambda _name: scheme, torch.device("cpu"), progress=False)
    assert len(seen) == 2 * 4  # q/k/v, o, gate/up and down of two blocks, shared inputs solved together
    assert all(s.xtx is None and s.square_sum is not None and s.n_samples == 32 for s in seen)
