import logging

import pytest
import torch
from helpers import tiny_gemma3_text, tiny_gpt_neox, tiny_llama, tiny_opt, tiny_phi3

from quantbench import load_quantized, save_quantized
from quantbench.errors import QuantbenchError
from quantbench.formats import format_for
from quantbench.model_io import block_linears, decoder_blocks, model_linears
from quantbench.pipeline import capture_block_inputs, feed_block, quantize_model
from quantbench.calibration.stats import input_sharing
from quantbench.quantizers import gptq as gptq_module
from quantbench.quantizers.gptq import gptq_quantize, layer_objective
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme

CPU = torch.device("cpu")


def random_hessian(cols: int, seed: int, n: int = 512) -> torch.Tensor:
    """A positive-definite H = (2/n)·XᵀX from correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5
    scales = torch.rand(cols, generator=g) * 3 + 0.1
    X = (torch.randn(n, cols, generator=g) @ mixing + 0.3 * torch.randn(n, cols, generator=g)) * scales
    return 2 * X.T @ X / n


def rtn_twin(scheme: Scheme) -> Scheme:
    return Scheme(bits=scheme.bits, group_size=scheme.group_size, symmetric=scheme.symmetric)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("variant", ["g32", "pc", "g32-act", "g32-act-static", "pc-act", "g64-sym-act"])
def test_gptq_objective_never_worse_than_rtn(seed, bits, variant):
    torch.manual_seed(seed)
    cols = 128 + 32 * (seed % 3)
    W = torch.randn(48, cols) * (torch.rand(48, 1) + 0.5)
    H = random_hessian(cols, seed)
    scheme = Scheme.parse(f"int{bits}-{variant.replace('-act', '').replace('-static', '')}-gptq"
                          + ("-act" if "act" in variant else "") + ("-static" if "static" in variant else ""))
    gptq = layer_objective(W, gptq_quantize(W, H, scheme).dequantize(), H)
    rtn = layer_objective(W, quantize_rtn(W, rtn_twin(scheme)).dequantize(), H)
    assert gptq <= rtn * (1 + 1e-6), (gptq, rtn)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Textbook GPTQ in float64: one column at a time, the inverse Hessian updated by Gaussian elimination
    after each column (no Cholesky, no lazy blocks). Returns the dequantized weight."""
    fmt = format_for(scheme)
    W, H = W.double().clone(), H.double().clone()
    cols = W.shape[1]
    H += scheme.damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if scheme.act_order else torch.arange(cols)
    W, H = W[:, order], H[order][:, order]
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    group = scheme.group_size or cols
    params = None
    for j in range(cols):
        if j % group == 0:
            params = fmt.fit(W[:, j:j + group].float())
        q = fmt.round(W[:, j:j + 1].float(), params).double()
        Q[:, j:j + 1] = q
        err = (W[:, j:j + 1] - q) / Hinv[j, j]
        W[:, j:] -= err @ Hinv[j:j + 1, j:]
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q[:, torch.argsort(order)].float()


@pytest.mark.parametrize("name", ["int4-g32-gptq", "int3-g32-gptq-act", "int2-pc-gptq", "int4-g64-sym-gptq-act"])
def test_matches_the_textbook_algorithm(name):
    torch.manual_seed(0)
    W = torch.randn(32, 192)
    H = random_hessian(192, seed=3)
    scheme = Scheme.parse(name)
    ours = gptq_quantize(W, H, scheme).dequantize()
    reference = reference_gptq(W, H, scheme)
    same = (ours == reference).float().mean().item()
    assert same > 0.995  # float32 vs float64 may flip a rounding tie here and there
    assert layer_objective(W, ours, H) == pytest.approx(layer_objective(W, reference, H), rel=2e-3)


def test_block_size_does_not_change_the_result():
    torch.manual_seed(1)
    W = torch.randn(40, 200)  # 200 is not a multiple of the block sizes: ragged last blocks too
    H = random_hessian(200, seed=1)
    scheme = Scheme.parse("int3-g32-gptq-act")
    results = [gptq_quantize(W, H, scheme, block_size=b) for b in (128, 32, 7)]
    for other in results[1:]:
        assert (other.codes == results[0].codes).float().mean() > 0.999
        assert torch.equal(other.g_idx, results[0].g_idx)


def test_diagonal_hessian_reduces_to_rtn():
    torch.manual_seed(2)
    W = torch.randn(16, 96)
    H = torch.diag(torch.rand(96) + 0.5)  # no correlations: no error is worth pushing elsewhere
    for name in ("int4-g32-gptq", "int3-pc-gptq", "int4-g32-gptq-act-static"):
        scheme = Scheme.parse(name)
        assert torch.equal(gptq_quantize(W, H, scheme).codes, quantize_rtn(W, rtn_twin(scheme)).codes)


def test_dead_inputs():
    torch.manual_seed(3)
    W = torch.randn(8, 64)
    H = random_hessian(64, seed=3)
    dead = torch.tensor([0, 5, 63])
    H[dead, :] = 0
    H[:, dead] = 0
    q = gptq_quantize(W, H, Scheme.parse("int4-g32-gptq-act")).dequantize()
    assert torch.isfinite(q).all()
    assert (q[:, dead] == 0).all()


def test_damp_escalates_with_a_warning_and_fails_clearly(caplog):
    torch.manual_seed(4)
    W = torch.randn(8, 32)
    basis, _ = torch.linalg.qr(torch.randn(32, 32))
    eigenvalues = torch.linspace(1, 2, 32)
    eigenvalues[0] = -0.05  # indefinite; 1% dampening (≈ +0.015) is not enough, 10% is
    H = basis @ torch.diag(eigenvalues) @ basis.T
    with caplog.at_level(logging.WARNING):
        q = gptq_quantize(W, H, Scheme.parse("int4-g32-gptq"))
    assert "retrying with" in caplog.text
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(QuantbenchError, match="not positive definite even with damp"):
        gptq_quantize(W, -torch.eye(32) * 100, Scheme.parse("int4-g32-gptq"))


def test_act_order_with_groups_keeps_g_idx():
    torch.manual_seed(5)
    W = torch.randn(16, 128)
    H = random_hessian(128, seed=5)
    q = gptq_quantize(W, H, Scheme.parse("int4-g32-gptq-act"))
    assert q.g_idx is not None and q.g_idx.shape == (128,)
    assert torch.bincount(q.g_idx.long()).tolist() == [32, 32, 32, 32]
    assert not torch.equal(q.g_idx.long(), torch.arange(128) // 32)  # really out of order
    static = gptq_quantize(W, H, Scheme.parse("int4-g32-gptq-act-static"))
    assert static.g_idx is None  # static groups keep the natural grouping


@pytest.mark.parametrize("build, expected", [
    (tiny_llama, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    (tiny_opt, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
    (tiny_gpt_neox, [["attention.query_key_value"], ["attention.dense"], ["mlp.dense_h_to_4h"], ["mlp.dense_4h_to_h"]]),
    (tiny_phi3, [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]),
    (tiny_gemma3_text, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
])
def test_layers_reading_one_input_are_grouped_in_forward_order(build, expected):
    model = build()
    inputs = capture_block_inputs(model, torch.randint(0, 320, (2, 16)), CPU, batch_size=2)
    block = decoder_blocks(model)[0]
    groups = input_sharing(block, block_linears(block), lambda: feed_block(block, inputs, batches=1))
    assert [sorted(g) for g in groups] == [sorted(g) for g in expected]


def record_hessians(monkeypatch):
    seen = {}
    original = gptq_module.GPTQSolver.quantize

    def recording(self, weight, scheme, stats):
        seen.setdefault(weight.shape, []).append((stats, stats.hessian.clone()))
        return original(self, weight, scheme, stats)

    monkeypatch.setattr(gptq_module.GPTQSolver, "quantize", recording)
    return seen


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_calibrates_on_quantized_earlier_layers(monkeypatch, true_sequential):
    seen = record_hessians(monkeypatch)
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    original_block = decoder_blocks(tiny_llama(layers=1))[0]  # same seed: the unquantized weights
    quantize_model(model, ids, lambda n: Scheme.parse("int3-g32-gptq"), CPU, batch_size=2, progress=False,
                   true_sequential=true_sequential)
    assert len(seen[(128, 64)]) == 1  # q, k, v (64 + 32 + 32 rows) solved once, stacked, with one Hessian
    assert len(seen[(320, 64)]) == 1  # gate and up (160 + 160 rows) likewise
    o_proj_hessian = seen[(64, 64)][0][1]

    def hessian_of_o_proj(block):
        rows = []
        handle = block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0].reshape(-1, 64)))
        feed_block(block, capture_block_inputs(model, ids, CPU, batch_size=2))
        handle.remove()
        x = torch.cat(rows)
        return 2 * x.T @ x / x.shape[0]

    quantized_qkv = hessian_of_o_proj(decoder_blocks(model)[0])  # q/k/v now hold quantized weights
    float_qkv = hessian_of_o_proj(original_block)
    expected, other = (quantized_qkv, float_qkv) if true_sequential else (float_qkv, quantized_qkv)
    assert torch.allclose(o_proj_hessian, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(o_proj_hessian, other, rtol=1e-4, atol=1e-6)


def test_stacked_solve_equals_separate_solves():
    torch.manual_seed(6)
    H = random_hessian(64, seed=6)
    parts = [torch.randn(r, 64) for r in (64, 32, 32)]
    scheme = Scheme.parse("int3-g32-gptq-act")
    stacked = gptq_quantize(torch.cat(parts), H, scheme).split_rows([64, 32, 32])
    for part, together in zip(parts, stacked):
        alone = gptq_quantize(part, H, scheme)
        assert (alone.codes == together.codes).float().mean() > 0.999
        assert torch.equal(alone.g_idx, together.g_idx)


def test_gptq_pipeline_beats_rtn_on_the_model_output():
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = tiny_llama()(input_ids=ids).logits
    errors = {}
    for name in ("int3-g32-rtn", "int3-g32-gptq", "int3-g32-gptq-act"):
        model = tiny_llama()
        quantize_model(model, ids, lambda n, s=Scheme.parse(name): s, CPU, progress=False)
        with torch.no_grad():
            errors[name] = (model(input_ids=ids).logits - reference).pow(2).mean().item()
    assert errors["int3-g32-gptq"] < 0.8 * errors["int3-g32-rtn"], errors
    assert errors["int3-g32-gptq-act"] < 0.8 * errors["int3-g32-rtn"], errors


def test_act_order_groups_round_trip_through_export(tmp_path, tokenizer):
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    model = tiny_llama()
    quantized = quantize_model(model, ids, lambda n: Scheme.parse("int4-g32-gptq-act"), CPU, progress=False)
    assert all(q.g_idx is not None for q in quantized.values())
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, layer in model_linears(loaded).items():
        assert torch.equal(layer.weight, quantized[name].dequantize())
