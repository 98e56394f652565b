"""The per-layer Hadamard transform: quantize W·R, rotate the input online, export and load it."""

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from quantbench import load_quantized, save_quantized
from quantbench.activations import input_rotation_of, quantize_activations
from quantbench.calibration.stats import LayerStats
from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint import read_quantization_config
from quantbench.pipeline import quantize_linear, quantize_model
from quantbench.quantizers import needs_hessian
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.quantizers.hadamard import rotate_stats
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme

IDS = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantize(model, **section):
    return quantize_model(model, IDS, QuantizeSection(**section).scheme_for, torch.device("cpu"), progress=False)


@pytest.mark.parametrize("name", ["hadamard+int3-g128-gptq", "hadamard-s7+mxfp4-rtn", "hadamard+ternary2-ptqtp",
                                  "hadamard+int4-pc-rtn-a:int4", "hadamard+int4-g64-gptq-act-damp0.1"])
def test_scheme_names_round_trip(name):
    scheme = Scheme.parse(name)
    assert scheme.transform == "hadamard" and scheme.name == name
    assert Scheme.parse(name.partition("+")[2]).transform == "none"


def test_seed_without_transform_is_refused():
    with pytest.raises(ValueError, match="rotation_seed seeds the hadamard transform"):
        Scheme(rotation_seed=3)


def test_solvers_that_read_statistics_need_the_full_hessian_under_a_transform():
    assert needs_hessian(Scheme.parse("hadamard+ternary2-ptqtp-aw"))  # diag(Rᵀ H R) needs all of H
    assert not needs_hessian(Scheme.parse("ternary2-ptqtp-aw"))
    assert not needs_hessian(Scheme.parse("hadamard+int4-g128-rtn"))


def test_rotated_statistics_equal_those_measured_on_rotated_inputs():
    torch.manual_seed(0)
    x = torch.randn(500, 96) * torch.linspace(0.1, 5, 96)
    rotation = RandomHadamard(96, seed=2)
    measured, rotated_inputs = LayerStats(wants_hessian=True), LayerStats(wants_hessian=True)
    measured.update(x)
    rotated_inputs.update(rotation.rows(x))
    derived = rotate_stats(measured, rotation)
    assert torch.allclose(derived.xtx, rotated_inputs.xtx, rtol=1e-4, atol=1e-2)
    assert torch.allclose(derived.mean_square, rotated_inputs.mean_square, rtol=1e-4)
    assert derived.n_samples == 500
    with pytest.raises(ValueError, match="full Σ xᵀx"):
        rotate_stats(LayerStats(n_samples=1, square_sum=torch.ones(96)), rotation)


def test_rotated_layer_computes_its_rotated_quantized_weight_on_rotated_input():
    torch.manual_seed(1)
    linear = nn.Linear(96, 24)
    original = linear.weight.detach().clone()
    x = torch.randn(5, 96)
    quantized = quantize_linear(linear, Scheme.parse("hadamard+int4-pc-rtn-a:int8"))
    rotation = RandomHadamard(96, seed=0)
    assert input_rotation_of(linear) == rotation
    expected = nn.functional.linear(quantize_activations(rotation.rows(x), "int8"), quantized.dequantize(), linear.bias)
    assert torch.allclose(linear(x), expected, atol=1e-6)
    # the stored weight is Q(W R): rotating it back gives W up to int4 rounding (relative RMS ≈ 0.12)
    assert (rotation.rows_inverse(quantized.dequantize()) - original).norm() < 0.2 * original.norm()


def test_rotation_removes_outlier_columns_from_the_quantization_error():
    """A few heavy input columns set every row's per-channel range; after rotation they are spread out."""
    torch.manual_seed(2)
    weight = torch.randn(64, 512) * 0.02
    weight[:, [3, 100, 400]] *= 40
    x = torch.randn(256, 512)
    errors = {}
    for name in ("int3-pc-rtn", "hadamard+int3-pc-rtn"):
        linear = nn.Linear(512, 64, bias=False)
        linear.weight.data = weight.clone()
        quantize_linear(linear, Scheme.parse(name))
        errors[name] = (linear(x) - x @ weight.T).square().mean().item()
    assert errors["hadamard+int3-pc-rtn"] < 0.5 * errors["int3-pc-rtn"]  # measured: 0.35×


def test_rotated_gptq_lowers_its_objective_in_the_original_basis():
    """GPTQ on (W R, Rᵀ H R) minimises the same layer loss tr(ΔW H ΔWᵀ) as in the original basis."""
    torch.manual_seed(3)
    x = torch.randn(1024, 128) @ torch.randn(128, 128) * 0.3
    weight = torch.randn(32, 128) * 0.05
    stats = LayerStats(wants_hessian=True)
    stats.update(x)
    losses = {}
    for name in ("hadamard+int3-g64-rtn", "hadamard+int3-g64-gptq"):
        linear = nn.Linear(128, 32, bias=False)
        linear.weight.data = weight.clone()
        quantize_linear(linear, Scheme.parse(name), stats)
        losses[name] = (linear(x) - x @ weight.T).square().sum().item()
    assert losses["hadamard+int3-g64-gptq"] < 0.8 * losses["hadamard+int3-g64-rtn"]


@pytest.mark.parametrize("section", [
    {"default": "hadamard+int4-g32-gptq"},
    {"default": "hadamard+mxfp4-rtn-a:mxfp4", "overrides": [{"pattern": "mlp", "scheme": "int8-pc-sym-rtn"}]},
    {"default": "hadamard-s5+ternary2-g32-ptqtp-aw", "overrides": [{"pattern": "down_proj", "scheme": "hadamard+int4-pc-rtn-a:int4"}]},
])
def test_rotated_export_then_load_gives_identical_logits(tmp_path, tokenizer, section):
    model = tiny_llama()
    reference = logits(model)
    quantized = quantize(model, **section)
    assert (logits(model) - reference).abs().max() < 0.5 * reference.abs().max()
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    qconfig = read_quantization_config(tmp_path / "ckpt")
    rotated = {name for name, q in quantized.items() if q.scheme.transform == "hadamard"}
    assert set(qconfig["rotations"]) == rotated and qconfig["version"] == 2
    for name in rotated:
        seed = quantized[name].scheme.rotation_seed
        assert qconfig["rotations"][name] == RandomHadamard(quantized[name].shape[1], seed).descriptor
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))


def test_a_rotation_this_version_cannot_rebuild_is_refused(tmp_path, tokenizer):
    import json

    model = tiny_llama()
    save_quantized(model, tokenizer, quantize(model, default="hadamard+int4-g32-rtn"), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    name = next(iter(config["quantization_config"]["rotations"]))
    config["quantization_config"]["rotations"][name]["kind"] = "paley12"
    config_path.write_text(json.dumps(config))
    with pytest.raises(QuantbenchError, match="saved as 'paley12'"):
        load_quantized(tmp_path / "ckpt")


def test_layers_sharing_an_input_rotate_it_once(monkeypatch):
    import quantbench.activations as activations
    from quantbench.quantizers import fwht

    model = tiny_llama()
    quantize(model, default="hadamard+int4-g32-rtn")
    cached = logits(model)
    calls = []
    original = fwht.RandomHadamard.rows
    monkeypatch.setattr(fwht.RandomHadamard, "rows", lambda self, x: calls.append(self.n) or original(self, x))
    activations._LastTransformed.forget()
    assert torch.equal(logits(model), cached)
    assert calls == [64, 64, 64, 160] * 2  # per block: q/k/v once, o, gate/up once, down
