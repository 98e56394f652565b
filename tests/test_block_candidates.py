"""AWQ-scaled and AutoRound schemes as allocation candidates: measured with their whole block, cached in the
layer's own basis, and applied as the pipeline would quantize them."""

import pytest
import torch
from helpers import tiny_llama, with_scaled_norms

from quantbench.allocation.sensitivity import CandidateCache, allocated_weights, apply_allocation, sensitivity_table
from quantbench.errors import QuantbenchError
from quantbench.model_io import decoder_blocks
from quantbench.pipeline import capture_block_inputs, quantize_model
from quantbench.quantizers.autoround import AutoRoundOptions
from quantbench.recipe import parse_recipe
from quantbench.scaling import ScalingOptions
from quantbench.scheme import Scheme

CPU = torch.device("cpu")
IDS = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))
QUICK = AutoRoundOptions(steps=20)


def outlier_llama():
    return with_scaled_norms(tiny_llama(kv_heads=4), outliers=(3, 17, 40), factor=10)  # kv_heads 4: a v→o site


def first_block_output(model):
    inputs = capture_block_inputs(model, IDS, CPU, batch_size=4)
    with torch.no_grad():
        return torch.cat([decoder_blocks(model)[0](h, **k)[0] for h, k in zip(inputs.hidden, inputs.kwargs)])


def table_of(model, names, cache, **options):
    candidates = [Scheme.parse(name) for name in names]
    return sensitivity_table(model, IDS, lambda _layer: candidates, CPU, batch_size=4, progress=False, cache=cache,
                             **options)


@pytest.mark.parametrize("name,options", [("awq+int3-g32-rtn", {"scaling": ScalingOptions()}),
                                          ("awq+int3-g32-gptq", {"scaling": ScalingOptions()}),
                                          ("awq+hadamard+int3-g32-gptq", {"scaling": ScalingOptions()}),
                                          ("int3-g32-autoround", {"autoround": QUICK}),
                                          ("hadamard+int3-g32-autoround", {"autoround": QUICK})])
def test_the_cached_candidates_compute_block_0_as_the_pipeline_quantizes_it(name, options):
    """Block 0 sees the same full-precision inputs in both, so the candidate's cached weights, in the layer's own
    basis, must give the output of the block the pipeline scaled and quantized (GPTQ: every layer's statistics
    from one pass of the scaled block, unquantized, as the candidates measure them)."""
    model, cache = outlier_llama(), CandidateCache()
    table_of(model, [name], cache, **options)
    block0 = {layer: name for layer, scheme in cache.weights if layer.startswith("model.layers.0.")}
    with allocated_weights(model, block0, cache):
        measured = first_block_output(model)
    quantize_model(model, IDS, lambda _layer: Scheme.parse(name), CPU, batch_size=4, progress=False,
                   true_sequential=False, **options)
    expected = first_block_output(model)
    assert ((measured - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_awq_candidates_cost_less_than_plain_rounding_on_outlier_channels():
    model, cache = outlier_llama(), CandidateCache()
    table = table_of(model, ["int3-g32-rtn", "awq+int3-g32-rtn"], cache)
    names = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    readers = [layer for layer in table.layers if layer.endswith(names)]
    plain = sum(table.errors[(layer, "int3-g32-rtn")].output_error for layer in readers)
    scaled = sum(table.errors[(layer, "awq+int3-g32-rtn")].output_error for layer in readers)
    assert scaled < 0.7 * plain  # the norms' outlier channels are what AWQ scales down
    assert any(torch.any(basis.columns != 1) for basis in cache.scaled.values() if basis.columns is not None)
    assert any(basis.rows is not None for basis in cache.scaled.values())  # v_proj, o_proj's producer


def test_a_saved_cache_keeps_the_scaled_bases(tmp_path):
    model, cache = outlier_llama(), CandidateCache()
    table_of(model, ["awq+int4-g32-rtn"], cache)
    cache.save(tmp_path / "cache.safetensors")
    loaded = CandidateCache.load(tmp_path / "cache.safetensors")
    for layer, scheme in cache.weights:
        assert torch.equal(loaded.effective_weight(layer, scheme, torch.float32),
                           cache.effective_weight(layer, scheme, torch.float32))


def test_scaled_candidates_are_quantized_again_never_applied_from_the_cache():
    model, cache = outlier_llama(), CandidateCache()
    table_of(model, ["awq+int4-g32-rtn"], cache)
    with pytest.raises(QuantbenchError, match="requantize"):
        apply_allocation(model, {layer: "awq+int4-g32-rtn" for layer, _ in cache.weights}, cache)
    base = {"name": "r", "model": {"name": "m"}}
    with pytest.raises(QuantbenchError, match="requantize"):
        parse_recipe({**base, "allocation": {"candidates": ["awq+int4-g128-rtn", "int3-g128-rtn"], "budget": 3.5,
                                             "requantize": False}})
    recipe = parse_recipe({**base, "allocation": {"candidates": ["awq+int4-g128-rtn", "int3-g128-autoround"],
                                                  "budget": 3.5}})
    assert [c.name for c in recipe.allocation.candidates] == ["awq+int4-g128-rtn", "int3-g128-autoround"]


def test_the_time_estimate_counts_what_block_candidates_cost():
    from quantbench.preflight import _flops

    def work(candidates):
        recipe = parse_recipe({"name": "r", "model": {"name": "m"},
                               "allocation": {"candidates": candidates, "budget": 4.0}})
        return _flops(recipe, {}, 10**6, {"layer": (Scheme.parse("int4-g128-rtn"), (512, 512))})

    plain = work(["int4-g128-rtn", "int3-g128-rtn"])
    assert work(["int4-g128-rtn", "int3-g128-autoround"]) > 2 * plain
    assert work(["awq+int4-g128-rtn", "int3-g128-rtn"]) > 2 * plain


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "phi3", "gemma2"])
def test_block_candidates_on_every_family_layout(family):
    """Experts (routed tokens only), Phi-3's fused gate_up and Gemma 2's normalised MLP output."""
    import math

    from helpers import FAMILY_BUILDERS

    model, cache = FAMILY_BUILDERS[family]().float().eval(), CandidateCache()
    names = ["awq+int4-g32-gptq", "int3-g32-autoround", "int4-g32-rtn"]
    table = sensitivity_table(model, IDS[:4, :32], lambda _layer: [Scheme.parse(n) for n in names], CPU,
                              batch_size=2, progress=False, cache=cache, autoround=AutoRoundOptions(steps=3))
    assert len(table.errors) == len(names) * len(table.layers)
    assert all(math.isfinite(e.output_error) and e.output_error >= 0 for e in table.errors.values())
    assert {scheme for _, scheme in cache.scaled} == {"awq+int4-g32-gptq"}
