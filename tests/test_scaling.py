"""AWQ and SmoothQuant: function-preserving folds, searches that beat plain rounding, recipes and checkpoints."""

import copy

import pytest
import torch
from helpers import FAMILY_BUILDERS, tiny_llama, tiny_opt, with_scaled_norms

from quantbench import load_quantized, save_quantized
from quantbench.errors import QuantbenchError
from quantbench.model_io import decoder_blocks
from quantbench.pipeline import drive_blocks, quantize_linear, quantize_model
from quantbench.rotation import rotate_model
from quantbench.recipe import parse_recipe
from quantbench.scaling import (CLIP_RATIOS, SCALABLE_TYPES, ScalingOptions, block_sites, clipped_weight,
                                fake_quantized, fold_scales, scale_block)
from quantbench.scheme import Scheme

IDS = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))
TEST_IDS = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(2))


def logits(model, ids=TEST_IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_outlier_channels(model):
    return with_scaled_norms(model, outliers=(3, 17, 40), factor=10)


def relative_change(got, reference):
    return ((got - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("family", [f for f in FAMILY_BUILDERS if f in SCALABLE_TYPES or f == "qwen2_sliding_window"])
def test_folding_any_scales_keeps_the_function(family):
    model = FAMILY_BUILDERS[family]().float().eval()
    reference = logits(model)
    generator = torch.Generator().manual_seed(3)
    for block in decoder_blocks(model):
        for site in block_sites(block, model.config.model_type):
            width = block.get_submodule(site.readers[0]).weight.shape[1]
            fold_scales(block, site, 0.25 + 4 * torch.rand(width, generator=generator))
    assert relative_change(logits(model), reference) < 1e-5


def test_sites_cover_every_reader_and_v_to_o_only_without_grouped_queries():
    def producers(model):
        return [(s.producer, len(s.readers)) for s in block_sites(decoder_blocks(model)[0], model.config.model_type)]

    assert producers(tiny_llama()) == [("input_layernorm", 3), ("post_attention_layernorm", 2), ("mlp.up_proj", 1)]
    assert producers(tiny_llama(kv_heads=4)) == [("input_layernorm", 3), ("self_attn.v_proj", 1),
                                                 ("post_attention_layernorm", 2), ("mlp.up_proj", 1)]
    moe = producers(FAMILY_BUILDERS["qwen3_moe"]())
    assert moe[1] == ("post_attention_layernorm", 2 * 8 + 1)  # every expert's gate and up, and the router
    assert len(moe) == 2 + 8  # each expert's up before its down


class ScaleOnly:
    """A stage that scales and quantizes nothing."""

    def __init__(self, scheme, options):
        self.scheme, self.options, self.done = scheme, options, {}

    def begin(self, model, device):
        self.model_type = model.config.model_type

    def run_block(self, ctx):
        self.done.update(scale_block(ctx, dict.fromkeys(ctx.linears, self.scheme), self.model_type, self.options))


@pytest.mark.parametrize("name", ["awq+int3-g32-rtn", "smoothquant+int8-pc-sym-rtn-a:int8"])
def test_the_searched_scales_keep_the_function_before_quantization(name):
    model = with_outlier_channels(tiny_llama(kv_heads=4))
    reference, before = logits(model), copy.deepcopy(model.state_dict())
    stage = ScaleOnly(Scheme.parse(name), ScalingOptions(clip=False))
    drive_blocks(model, IDS, torch.device("cpu"), [stage], progress=False)
    assert len(stage.done) == 2 * 4  # two blocks of four sites
    assert any(record["alpha"] > 0 for record in stage.done.values())
    changed = [key for key, value in model.state_dict().items() if not torch.equal(value, before[key])]
    assert any("norm" in key for key in changed) and any("q_proj" in key for key in changed)
    assert relative_change(logits(model), reference) < 1e-5


def quantized_error(name, model, **options):
    model, scaled = copy.deepcopy(model), {}
    reference = logits(model)
    quantize_model(model, IDS, lambda _layer: Scheme.parse(name), torch.device("cpu"), progress=False,
                   scaling=ScalingOptions(**options), scaled=scaled)
    return (logits(model) - reference).square().mean().item(), scaled


@pytest.mark.parametrize("bits,bf16", [(3, False), (4, False), (3, True)])  # bf16: the GPU's search, forced on
def test_awq_beats_round_to_nearest_on_outlier_channels(bits, bf16):
    model = with_outlier_channels(tiny_llama(hidden=128))
    plain, _ = quantized_error(f"int{bits}-g32-rtn", model)
    awq, scaled = quantized_error(f"awq+int{bits}-g32-rtn", model, bf16=bf16)
    assert awq < 0.6 * plain  # measured: 0.37× at 3 bits, 0.39× at 4
    assert all(record["method"] == "awq" and record["output_error"] <= 1 for record in scaled.values())


def test_mlp_sites_score_the_mlp_alone_with_the_blocks_result(monkeypatch):
    """Inside the MLP the block output's error is the MLP output's, so the search runs the MLP alone: the same
    α and the same error ratios as scoring the whole block (forced here by treating llama like Gemma 2)."""
    model = with_outlier_channels(tiny_llama(hidden=128))
    _, shortcut = quantized_error("awq+int3-g32-rtn", model, clip=False)
    monkeypatch.setattr("quantbench.scaling.POST_MLP_NORM", ("llama",))
    _, whole = quantized_error("awq+int3-g32-rtn", model, clip=False)
    assert shortcut.keys() == whole.keys()
    for site, record in whole.items():
        assert shortcut[site]["alpha"] == record["alpha"]
        assert shortcut[site]["output_error"] == pytest.approx(record["output_error"], rel=1e-3, abs=1e-6)


def test_smoothquant_helps_per_token_int8_activations_on_outlier_channels():
    model = with_outlier_channels(tiny_llama(hidden=128))
    plain, _ = quantized_error("int8-pc-sym-rtn-a:int8", model)
    smooth, scaled = quantized_error("smoothquant+int8-pc-sym-rtn-a:int8", model)
    assert smooth < 0.75 * plain  # measured: 0.54×
    assert {record["method"] for record in scaled.values()} == {"smoothquant"}


@pytest.mark.parametrize("name", ["int3-g32-rtn", "mxfp4-rtn", "int4-pc-rtn", "int3-g48-rtn"])  # g48: a short group
def test_clipping_never_costs_output_error(name):
    """Ratio 1 (no clipping) is on the grid, so the chosen clip's error is at most the unclipped one's, in
    the measure AWQ minimises: each group's own output error δ_g H_gg δ_gᵀ (cross-group terms left out)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=generator)
    weight[:, 5] *= 6  # a heavy column gives the ranges something to clip
    x = torch.randn(500, 64, generator=generator)
    xtx, scheme = x.T @ x, Scheme.parse(name)

    group = scheme.group_size or 64
    within = torch.block_diag(*[xtx[g:g + group, g:g + group] for g in range(0, 64, group)])

    def error(w):
        delta = weight - fake_quantized(w, scheme)
        return ((delta @ within) * delta).sum().item()

    clipped = clipped_weight(weight, scheme, xtx)
    assert error(clipped) <= error(weight) * (1 + 1e-6)
    assert not torch.equal(clipped, weight)
    ratios = clipped.abs().amax(dim=1) / weight.abs().amax(dim=1)
    assert ratios.min() >= min(CLIP_RATIOS) - 1e-6


def test_an_awq_checkpoint_loads_with_identical_logits(tmp_path, tokenizer):
    model = with_outlier_channels(tiny_llama(kv_heads=4))
    quantized = quantize_model(model, IDS, lambda _layer: Scheme.parse("awq+int4-g32-gptq"), torch.device("cpu"),
                               progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)


def test_scheme_names_and_refusals():
    for name in ["awq+int4-g128-rtn", "awq+mxfp4-gptq", "awq+int3-g128-gptq-act-static",
                 "smoothquant+int8-pc-sym-rtn-a:int8", "awq+hadamard-s2+int4-g128-gptq"]:
        assert Scheme.parse(name).name == name
    for name, says in [("smoothquant+int4-g128-rtn", "activations"), ("awq+ternary2-ptqtp", "ternary")]:
        with pytest.raises(QuantbenchError, match=says):
            Scheme.parse(name)


def test_recipes_refuse_scaling_where_it_has_no_site():
    base = {"name": "r", "model": {"name": "m"}}
    with pytest.raises(QuantbenchError, match="LM head"):
        parse_recipe({**base, "quantize": {"lm_head": "awq+int8-pc-rtn"}})
    recipe = parse_recipe({**base, "quantize": {"default": "awq+int4-g128-rtn", "scaling": {"grid": 10}}})
    assert recipe.quantize.scaling.options() == ScalingOptions(grid=10)
    with pytest.raises(QuantbenchError, match="opt"):
        quantize_model(tiny_opt(), IDS, lambda _layer: Scheme.parse("awq+int4-g32-rtn"), torch.device("cpu"),
                       progress=False)


@pytest.mark.parametrize("family, reason", [("phimoe", "LayerNorms"), ("flex_olmo", "norms come after"),
                                            ("afmoe", "not handled yet"), ("glm4_moe_lite", "latent attention"),
                                            ("cohere", "in parallel"), ("arcee", "no gate"),
                                            ("bloom", "LayerNorms"), ("granitemoe", "block_sparse_moe")])
def test_families_without_sites_are_refused_with_the_reason(family, reason):
    with pytest.raises(QuantbenchError, match=f"scaling support .*, not '{family}': .*{reason}"):
        quantize_model(FAMILY_BUILDERS[family](), IDS, lambda _layer: Scheme.parse("awq+int4-g32-rtn"),
                       torch.device("cpu"), progress=False)


def test_the_search_quantizes_a_hadamard_layer_as_the_pipeline_does():
    """Under the hadamard transform the layer computes with Q(W·R) on inputs x·R: in its own basis that is
    Q(W·R)·Rᵀ, which is what AWQ's search must score."""
    linear = torch.nn.Linear(64, 24, bias=False)
    reference = copy.deepcopy(linear)
    scheme = Scheme.parse("hadamard-s1+int3-g32-rtn")
    quantize_linear(linear, scheme)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(linear(x), x @ fake_quantized(reference.weight.data, scheme).T,
                                   rtol=0, atol=1e-5)


def test_awq_leaves_the_model_rotations_online_down_proj_alone_and_keeps_the_function():
    model = with_outlier_channels(tiny_llama(kv_heads=4))
    rotate_model(model)
    sites = block_sites(decoder_blocks(model)[0], "llama")
    assert [s.producer for s in sites] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm"]
    reference = logits(model)
    stage = ScaleOnly(Scheme.parse("awq+hadamard+int3-g32-rtn"), ScalingOptions(clip=False))
    drive_blocks(model, IDS, torch.device("cpu"), [stage], progress=False)
    assert len(stage.done) == 2 * 3
    assert relative_change(logits(model), reference) < 1e-5


@pytest.mark.parametrize("name", ["int3-g32-rtn", "hadamard-s1+int4-g32-rtn-a:int8", "mxfp4-rtn-a:mxfp4"])
def test_a_search_trial_computes_as_the_scaled_and_quantized_layer_will(name):
    """What AWQ scores for one α is what the pipeline builds for it: the producer folded (input x/s), the
    weight W·s quantized, rotated and input-quantized as the scheme says."""
    from quantbench.activations import activation_format_of, input_rotation_of
    from quantbench.scaling import _as_scaled_and_quantized

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 24, bias=False)
    weight = linear.weight.data
    scales = 0.5 + torch.rand(64, generator=generator)
    x = torch.randn(10, 64, generator=generator)
    built = copy.deepcopy(linear)
    built.weight.data = built.weight.data * scales
    quantize_linear(built, Scheme.parse(name))
    with torch.no_grad():
        with _as_scaled_and_quantized(linear, weight, scales, Scheme.parse(name)):
            torch.testing.assert_close(linear(x), built(x / scales), rtol=0, atol=1e-5)
    assert linear.weight.data_ptr() == weight.data_ptr() and not linear._forward_pre_hooks
    assert input_rotation_of(linear) is None and activation_format_of(linear) is None
