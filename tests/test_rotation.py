"""The QuaRot-style model rotation: function-preserving, composable with quantization, saved and loaded."""

import json

import pytest
import torch
from helpers import FAMILY_BUILDERS, MOE_BUILDERS, tiny_gemma2, tiny_gemma3_text, tiny_llama, tiny_opt, with_scaled_norms

from quantbench import load_quantized, save_quantized
from quantbench.activations import input_rotation_of
from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint import read_quantization_config
from quantbench.pipeline import quantize_model
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.recipe import QuantizeSection, parse_recipe
from quantbench.rotation import rotate_model

IDS = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(5))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval()  # q/k/v carry biases


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, lambda: tiny_llama(tie=False, hidden=96)])
def test_rotated_model_computes_the_same_function(build):
    model = with_scaled_norms(build())
    reference = logits(model)
    descriptor = rotate_model(model, seed=3)
    hidden = model.config.hidden_size
    assert descriptor == {**RandomHadamard(hidden, 3).descriptor, "online_down_proj": True}
    assert (logits(model) - reference).abs().max() < 1e-4 * reference.abs().max()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    for block in model.model.layers:
        assert torch.equal(block.input_layernorm.weight, torch.ones(hidden))
        assert input_rotation_of(block.mlp.down_proj) == RandomHadamard(model.config.intermediate_size, 3)
        assert input_rotation_of(block.self_attn.q_proj) is None


@pytest.mark.parametrize("family", ["phi3", "smollm3", "granite", "ernie4_5", "seed_oss", "helium", "arcee",
                                    "qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "glm4_moe", "ernie4_5_moe",
                                    "hunyuan_v1_moe", "dots1", "exaone_moe", "solar_open", "gpt_oss"])
def test_rotated_families_built_like_llama_compute_the_same_function(family):
    """Phi's fused qkv and gate/up projections read the rotated stream; every expert's projections, the
    router's weight, the shared expert and its gate too; every down projection gets its online Hadamard."""
    model = with_scaled_norms(FAMILY_BUILDERS[family]())
    reference = logits(model)
    rotate_model(model, seed=3)
    assert (logits(model) - reference).abs().max() < 1e-4 * reference.abs().max()
    downs = [module for name, module in model.named_modules() if name.endswith(("down_proj", "w2"))]
    assert len(downs) >= 2 and all(input_rotation_of(down) is not None for down in downs)
    assert all(torch.equal(block.post_attention_layernorm.weight, torch.ones(64)) for block in model.model.layers)


def test_rotation_really_changes_the_weights_and_can_skip_the_online_hadamard():
    model = tiny_llama()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    reference = logits(model)
    rotate_model(model, online_down_proj=False)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, before, atol=1e-3)
    assert input_rotation_of(model.model.layers[0].mlp.down_proj) is None
    assert (logits(model) - reference).abs().max() < 1e-4 * reference.abs().max()


def test_unsupported_families_and_a_second_rotation_are_refused():
    reasons = {tiny_opt: "not laid out like Llama", tiny_gemma2: "norms after attention",
               tiny_gemma3_text: "norms after attention", MOE_BUILDERS["deepseek_v3"]: "latent attention",
               MOE_BUILDERS["deepseek_v2"]: "latent attention", FAMILY_BUILDERS["gemma"]: "1 \\+ w",
               FAMILY_BUILDERS["olmo2"]: "norms after attention", FAMILY_BUILDERS["glm4"]: "norms after attention",
               FAMILY_BUILDERS["cohere2"]: "subtracts the mean", FAMILY_BUILDERS["starcoder2"]: "subtracts the mean",
               FAMILY_BUILDERS["exaone4"]: "norms after attention", FAMILY_BUILDERS["apertus"]: "named otherwise",
               MOE_BUILDERS["phimoe"]: "subtracts the mean", MOE_BUILDERS["flex_olmo"]: "norms after attention",
               MOE_BUILDERS["afmoe"]: "norms after attention", MOE_BUILDERS["glm4_moe_lite"]: "latent attention",
               FAMILY_BUILDERS["falcon"]: "subtracts the mean", FAMILY_BUILDERS["phi"]: "subtracts the mean",
               MOE_BUILDERS["qwen3_next"]: "Gated DeltaNet", MOE_BUILDERS["granitemoe"]: "block_sparse_moe"}
    for build, reason in reasons.items():
        with pytest.raises(QuantbenchError, match=f"supports the Llama family.*{reason}"):
            rotate_model(build())
    model = tiny_llama()
    rotate_model(model)
    with pytest.raises(QuantbenchError, match="already rotated"):
        rotate_model(model)


def test_rotation_rescues_per_token_activation_quantization_from_outlier_channels():
    """Huge norm scales on three channels give every q/k/v/gate/up input outlier channels: int4 per-token
    activations then lose the other channels. In the rotated basis the outliers are spread out."""
    errors = {}
    for rotated in (False, True):
        model = with_scaled_norms(tiny_llama(), outliers=(5, 17, 40))
        reference = logits(model)
        if rotated:
            rotate_model(model)
        quantize_model(model, IDS, QuantizeSection(default="int8-pc-sym-rtn-a:int4").scheme_for,
                       torch.device("cpu"), progress=False)
        errors[rotated] = (logits(model) - reference).square().mean().item()
    assert errors[True] < 0.5 * errors[False]  # measured: 0.26×


def test_rotated_and_quantized_model_round_trips_through_a_checkpoint(tmp_path, tokenizer):
    model = with_scaled_norms(tiny_llama())
    rotate_model(model, seed=2)
    quantized = quantize_model(model, IDS, QuantizeSection(default="int4-g32-gptq-a:int4").scheme_for,
                               torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    qconfig = read_quantization_config(tmp_path / "ckpt")
    assert qconfig["model_rotation"]["seed"] == 2
    assert set(qconfig["rotations"]) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))


def test_a_hadamard_scheme_on_the_rotated_down_proj_keeps_the_one_rotation():
    model = tiny_llama()
    rotate_model(model)
    online = input_rotation_of(model.model.layers[0].mlp.down_proj)
    reference = logits(model)
    quantize_model(model, IDS, QuantizeSection(default="hadamard+int8-pc-sym-gptq").scheme_for,
                   torch.device("cpu"), progress=False)
    assert input_rotation_of(model.model.layers[0].mlp.down_proj) is online
    assert input_rotation_of(model.model.layers[0].self_attn.q_proj) == RandomHadamard(64, 0)
    assert (logits(model) - reference).abs().max() < 0.05 * reference.abs().max()


def test_recipe_transforms():
    base = {"name": "r", "model": {"name": "m"}}
    recipe = parse_recipe({**base, "transforms": ["rotate"]})
    assert recipe.transforms[0].name == "rotate" and recipe.transforms[0].seed == 0
    recipe = parse_recipe({**base, "transforms": [{"name": "rotate", "seed": 4, "online_down_proj": False}]})
    assert recipe.transforms[0].seed == 4 and not recipe.transforms[0].online_down_proj
    with pytest.raises(QuantbenchError, match="rotate the model once"):
        parse_recipe({**base, "transforms": ["rotate", "rotate"]})
    with pytest.raises(QuantbenchError, match="transforms.0.name"):
        parse_recipe({**base, "transforms": ["spin"]})


def test_a_rotated_and_quantized_moe_round_trips_through_a_checkpoint(tmp_path, tokenizer):
    model = with_scaled_norms(MOE_BUILDERS["qwen3_moe"](vocab_size=len(tokenizer)))
    rotate_model(model, seed=2)
    quantized = quantize_model(model, IDS, QuantizeSection(default="int4-g32-gptq").scheme_for, torch.device("cpu"),
                               progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    rotations = read_quantization_config(tmp_path / "ckpt")["rotations"]
    assert set(rotations) == {f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(2) for e in range(8)}
    assert torch.equal(logits(load_quantized(tmp_path / "ckpt")), logits(model))
