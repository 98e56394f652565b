"""GPTQ and compressed-tensors exports: the documented layouts by hand, round trips through our GPTQ
reader, and compressed-tensors' own decompressors."""

import json

import pytest
import torch
from helpers import (LLAMA_SHAPED_BUILDERS, MOE_BUILDERS, OLDER_BUILDERS, invoke, tiny_gemma2, tiny_gemma3_text,
                     tiny_llama, tiny_phi3)

from quantbench import load_quantized, save_quantized
from quantbench.errors import QuantbenchError
from quantbench.experts import FUSED_ON_DISK
from quantbench.export.compressed_tensors_format import export_compressed_tensors
from quantbench.export.gptq_format import export_gptq, gptq_tensors, read_gptq
from quantbench.pipeline import quantize_model
from quantbench.quantized_weight import QuantizedWeight
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))


def native_checkpoint(path, tokenizer, default, overrides=()):
    model = tiny_llama()
    section = QuantizeSection(default=default, overrides=list(overrides))
    quantized = quantize_model(model, IDS, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, path)
    return quantized


def signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def hand_packed(codes: list[list[int]], bits: int) -> torch.Tensor:
    """The documented GPTQ packing, one column at a time: input k at bits [k·b, (k+1)·b) of the column's
    little-endian stream, 32 bits per word."""
    columns = []
    for column in codes:
        stream = sum(code << (bits * k) for k, code in enumerate(column))
        columns.append([signed32((stream >> (32 * j)) & 0xFFFFFFFF) for j in range(len(column) * bits // 32)])
    return torch.tensor(columns, dtype=torch.int32).T


@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_gptq_tensors_match_a_hand_packed_layer(bits):
    out_features, in_features, group = 32, 64, 16
    codes = [[(7 * n + 3 * k) % (1 << bits) for k in range(in_features)] for n in range(out_features)]
    zeros = [[1 + (n + g) % ((1 << bits) - 1) for g in range(in_features // group)] for n in range(out_features)]
    scales = torch.rand(out_features, in_features // group).half()
    weight = QuantizedWeight(Scheme.parse(f"int{bits}-g{group}-rtn"), torch.tensor(codes, dtype=torch.uint8),
                             scales, torch.tensor(zeros, dtype=torch.uint8))
    tensors = gptq_tensors(weight)
    assert torch.equal(tensors["qweight"], hand_packed(codes, bits))
    zero_rows = [[zeros[n][g] - 1 for n in range(out_features)] for g in range(in_features // group)]
    assert torch.equal(tensors["qzeros"], hand_packed(zero_rows, bits).T)
    assert torch.equal(tensors["scales"], scales.T)
    assert torch.equal(tensors["g_idx"], torch.arange(in_features, dtype=torch.int32) // group)
    if bits == 4:  # eight inputs per word, input 8j+i in bits 4i…4i+3
        assert int(tensors["qweight"][0, 1]) & 0xF == codes[1][0] and (int(tensors["qweight"][0, 1]) >> 4) & 0xF == codes[1][1]


def test_gptq_export_round_trips_through_our_reader(tmp_path, tokenizer):
    quantized = native_checkpoint(tmp_path / "native", tokenizer, "int4-g32-gptq-act",
                                  [{"pattern": "mlp", "scheme": "int8-pc-rtn"},
                                   {"pattern": "layers.1.self_attn.v_proj", "scheme": "int3-g32-sym-rtn"}])
    export_gptq(tmp_path / "native", tmp_path / "gptq")
    config, layers, rest = read_gptq(tmp_path / "gptq")
    qconfig = config["quantization_config"]
    assert (qconfig["bits"], qconfig["group_size"], qconfig["desc_act"], qconfig["sym"]) == (4, 32, True, False)
    assert qconfig["dynamic"]["+:^model\\.layers\\.1\\.self_attn\\.v_proj$"] == {"bits": 3, "desc_act": False,
                                                                                 "sym": True}
    assert layers.keys() == quantized.keys()
    for name, original in quantized.items():
        back = layers[name]
        assert back.scheme.bits == original.scheme.bits and back.scheme.group_size == original.scheme.group_size
        assert torch.equal(back.codes, original.codes) and torch.equal(back.scales, original.scales)
        assert (back.zeros is None) == (original.zeros is None)
        assert back.zeros is None or torch.equal(back.zeros, original.zeros)
        assert (back.g_idx is None) == (original.g_idx is None)
        assert back.g_idx is None or torch.equal(back.g_idx, original.g_idx)
        assert torch.equal(back.dequantize(), original.dequantize())
    assert any(w.g_idx is not None for w in layers.values())  # act_order survived
    assert (tmp_path / "gptq" / "tokenizer.json").is_file() or (tmp_path / "gptq" / "tokenizer_config.json").is_file()
    model = load_quantized(tmp_path / "native")
    state = {**rest, **{f"{n}.weight": w.dequantize() for n, w in layers.items()}}
    rebuilt = tiny_llama()
    rebuilt.load_state_dict(state, strict=False)
    rebuilt.tie_weights()
    with torch.no_grad():
        assert torch.equal(rebuilt(IDS).logits, model(IDS).logits)


def test_gptq_refuses_layers_it_cannot_store_and_names_them(tmp_path, tokenizer):
    native_checkpoint(tmp_path / "native", tokenizer, "int4-g32-rtn",
                      [{"pattern": "layers.0.mlp.up_proj", "scheme": "mxfp4-rtn"},
                       {"pattern": "layers.1.self_attn.q_proj", "scheme": "hadamard+int4-g32-rtn"}])
    with pytest.raises(QuantbenchError) as error:
        export_gptq(tmp_path / "native", tmp_path / "gptq")
    message = str(error.value)
    assert "2 layer(s)" in message
    assert "mxfp4-rtn: GPTQ stores integer grids only: 1 layer (model.layers.0.mlp.up_proj)" in message
    assert "rotates its input online (Hadamard): 1 layer (model.layers.1.self_attn.q_proj)" in message
    assert not (tmp_path / "gptq").exists()


def test_compressed_tensors_export_loads_with_the_library(tmp_path, tokenizer):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    quantized = native_checkpoint(tmp_path / "native", tokenizer, "int4-g32-gptq-act-static",
                                  [{"pattern": "mlp.gate_proj", "scheme": "int8-pc-sym-rtn"},
                                   {"pattern": "mlp.up_proj", "scheme": "mxfp4-rtn"},
                                   {"pattern": "mlp.down_proj", "scheme": "nvfp4-rtn"}])
    export_compressed_tensors(tmp_path / "native", tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "mixed-precision"
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    seen = set()
    for scheme in parsed.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        for name in scheme.targets:
            state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
            theirs = compressor.decompress(state, scheme)["weight"]
            assert torch.equal(theirs, quantized[name].dequantize(theirs.dtype))  # their dtype: one rounding
            seen.add(name)
    assert seen == set(quantized)
    assert {s.format for s in parsed.config_groups.values()} == {"pack-quantized", "mxfp4-pack-quantized",
                                                                  "nvfp4-pack-quantized"}


def test_compressed_tensors_refuses_ternary_and_g_idx_layers(tmp_path, tokenizer):
    native_checkpoint(tmp_path / "native", tokenizer, "int4-g32-gptq-act",
                      [{"pattern": "mlp.down_proj", "scheme": "ternary2-ptqtp"}])
    with pytest.raises(QuantbenchError) as error:
        export_compressed_tensors(tmp_path / "native", tmp_path / "ct")
    message = str(error.value)
    assert "14 layer(s)" in message and len(message.splitlines()) == 4  # a line per reason, not per layer
    assert "ternary2-ptqtp: compressed-tensors export covers int, mxfp4 and nvfp4: 2 layers" in message
    assert "act_order without static groups" in message and ": 12 layers (model.layers.0.mlp.gate_proj" in message


def test_export_command(tmp_path, tokenizer):
    native_checkpoint(tmp_path / "native", tokenizer, "int4-g32-rtn")
    result = invoke("export", str(tmp_path / "native"), "--to", "gptq", "--out", str(tmp_path / "gptq"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    again = invoke("export", str(tmp_path / "native"), "--to", "gptq", "--out", str(tmp_path / "gptq"))
    assert again.exit_code != 0
    wrong = invoke("export", str(tmp_path / "native"), "--to", "awq", "--out", str(tmp_path / "awq"))
    assert wrong.exit_code == 2 and "gptq" in wrong.output


def exported(tmp_path, tokenizer, dtype, default, overrides=(), build=tiny_llama):
    model = build().to(dtype)
    section = QuantizeSection(default=default, overrides=list(overrides))
    quantized = quantize_model(model, IDS, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "native")
    export_compressed_tensors(tmp_path / "native", tmp_path / "ct")
    return quantized


def load_dtype_of(quantized, dtype):
    """FP4 layers in a float32 model: the export records bfloat16 (compressed-tensors decodes FP4 to it)."""
    return torch.bfloat16 if any(q.scheme.format in ("mxfp4", "nvfp4") for q in quantized.values()) else dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int4-g32-sym-rtn", "int4-g32-rtn", "int8-pc-sym-rtn", "int4-pc-rtn",
                                    "int4-g32-gptq-act-static", "mxfp4-rtn", "nvfp4-rtn", "awq+int4-g32-rtn"])
def test_compressed_tensors_export_loads_in_transformers_with_our_weights(tmp_path, tokenizer, scheme, dtype):
    """transformers' own compressed-tensors integration loads the export. Decompressed on load, every
    quantized weight and the logits equal ours exactly. Kept compressed (the default; upstream cannot for
    asymmetric grids), the logits agree to the dtype's rounding."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantized = exported(tmp_path, tokenizer, dtype, scheme)
    load_dtype = load_dtype_of(quantized, dtype)
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["dtype"] == str(load_dtype).removeprefix("torch.")
    ours = load_quantized(tmp_path / "native", dtype=load_dtype)
    decompressed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(run_compressed=False))
    for name in quantized:
        assert torch.equal(decompressed.get_submodule(name).weight, ours.get_submodule(name).weight), name
    with torch.no_grad():
        expected = ours(IDS).logits
        assert torch.equal(decompressed(IDS).logits, expected)
        if Scheme.parse(scheme).symmetric:
            compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
            torch.testing.assert_close(compressed(IDS).logits, expected, rtol=0,
                                       atol=8 * torch.finfo(load_dtype).eps * expected.abs().max().item())


@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gemma3_text, tiny_phi3, *LLAMA_SHAPED_BUILDERS.values(),
                                   *OLDER_BUILDERS.values()])
def test_compressed_tensors_export_of_other_families_loads_in_transformers(tmp_path, tokenizer, build):
    """Fused projections (Phi's qkv_proj, gate_up_proj) and Gemma's layers keep their names: decompressed by
    transformers, the logits equal ours."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    exported(tmp_path, tokenizer, torch.float32, "int4-g32-sym-rtn", build=build)
    ours = load_quantized(tmp_path / "native")
    decompressed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        assert torch.equal(decompressed(IDS).logits, ours(IDS).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_compressed_tensors_export_loads_compressed(tmp_path, tokenizer, dtype):
    """Several formats in one export: transformers loads it compressed with our logits (up to the dtype's
    rounding). Its decompress-on-load path applies one config group to every layer, so it is not used."""
    from transformers import AutoModelForCausalLM

    quantized = exported(tmp_path, tokenizer, dtype, "int4-g32-sym-rtn",
                         [{"pattern": "o_proj", "scheme": "int8-pc-sym-rtn"},
                          {"pattern": "gate_proj", "scheme": "mxfp4-rtn"},
                          {"pattern": "up_proj", "scheme": "nvfp4-rtn"}])
    load_dtype = load_dtype_of(quantized, dtype)
    ours = load_quantized(tmp_path / "native", dtype=load_dtype)
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with torch.no_grad():
        expected = ours(IDS).logits
        torch.testing.assert_close(compressed(IDS).logits, expected, rtol=0,
                                   atol=8 * torch.finfo(load_dtype).eps * expected.abs().max().item())


@pytest.mark.parametrize("target", ["gptq", "compressed-tensors"])
def test_exports_refuse_group_sizes_that_do_not_divide_the_inputs(tmp_path, tokenizer, target):
    from quantbench.export.targets import export_checkpoint

    model = tiny_llama(hidden=96)  # 96 inputs: g64 leaves a partial group
    section = QuantizeSection(default="int4-g64-sym-rtn")
    quantized = quantize_model(model, IDS, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "native")
    with pytest.raises(QuantbenchError, match="group size 64 does not divide 96 inputs"):
        export_checkpoint(target, tmp_path / "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()


INTEROP_MOE = {family: build for family, build in MOE_BUILDERS.items() if family not in FUSED_ON_DISK}


@pytest.mark.parametrize("build", INTEROP_MOE.values(), ids=INTEROP_MOE.keys())
def test_compressed_tensors_export_of_a_moe_loads_in_transformers(tmp_path, tokenizer, build):
    """Experts are exported under the per-expert names of the original checkpoints; transformers fuses them
    back into its 3-D tensors on load. Every expert weight equals ours exactly; the logits agree to float32
    rounding (transformers computes gate and up as one matmul)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantbench.experts import ExpertList

    exported(tmp_path, tokenizer, torch.float32, "int4-g32-sym-rtn", build=build)
    ours = load_quantized(tmp_path / "native")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(run_compressed=False))
    checked = 0
    for name, experts in ours.named_modules():
        if isinstance(experts, ExpertList):
            fused = theirs.get_submodule(name)
            gate, up, down = (torch.stack([getattr(e, n).weight for e in experts]) for n in experts[0].names)
            assert torch.equal(fused.gate_up_proj, torch.cat([gate, up], dim=1))
            assert torch.equal(fused.down_proj, down)
            checked += 1
    assert checked >= 2
    with torch.no_grad():
        expected = ours(IDS).logits
        torch.testing.assert_close(theirs(IDS).logits, expected, rtol=0,
                                   atol=64 * torch.finfo(torch.float32).eps * expected.abs().max().item())


@pytest.mark.parametrize("build", INTEROP_MOE.values(), ids=INTEROP_MOE.keys())
def test_moe_exports_use_the_names_of_the_original_checkpoints(tmp_path, tokenizer, build):
    """vLLM reads a checkpoint by its original names (Mixtral's `block_sparse_moe`, which transformers calls
    `mlp`): both exports hold tensors of exactly the modules that transformers' own save_pretrained writes."""
    from safetensors import safe_open

    def modules(directory):
        with safe_open(directory / "model.safetensors", "pt") as f:
            return {key.rsplit(".", 1)[0] for key in f.keys()}

    build().save_pretrained(tmp_path / "hf")
    exported(tmp_path, tokenizer, torch.float32, "int4-g32-sym-rtn", build=build)
    export_gptq(tmp_path / "native", tmp_path / "gptq")
    assert modules(tmp_path / "ct") == modules(tmp_path / "hf")
    assert modules(tmp_path / "gptq") == modules(tmp_path / "hf")


@pytest.mark.parametrize("family", FUSED_ON_DISK)
def test_fused_expert_checkpoints_are_refused_by_the_interop_formats_before_they_write(tmp_path, tokenizer,
                                                                                      text_file, family):
    """GPT-OSS and Granite MoE checkpoints store each block's experts fused, and transformers reads them by
    those names alone: experts written one by one would load as random ones. Both formats refuse them from the
    native checkpoint (nothing written), from the model in memory, and from a recipe before any weight is
    read."""
    from helpers import make_recipe

    from quantbench.export.targets import check_expressible

    model = MOE_BUILDERS[family]()
    quantized = quantize_model(model, IDS, QuantizeSection(default="int4-g32-sym-rtn").scheme_for,
                               torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "native")
    fused = f"'{family}' checkpoints store each block's experts as fused tensors"
    for target, export in (("compressed-tensors", export_compressed_tensors), ("gptq", export_gptq)):
        with pytest.raises(QuantbenchError, match=f"(?i)the {target} format cannot hold this model: {fused}"):
            export(tmp_path / "native", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        with pytest.raises(QuantbenchError, match=fused):
            check_expressible(target, model, quantized)
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    recipe = make_recipe(tmp_path, tmp_path / family, text_file, export={"format": "gptq"})
    refused = invoke("validate", recipe)
    assert refused.exit_code == 2 and f"export.format gptq cannot hold this model: {fused}" in refused.output


def test_gptq_export_of_a_moe_names_every_expert_as_its_checkpoint_does(tmp_path, tokenizer):
    model = MOE_BUILDERS["qwen3_moe"]()
    quantized = quantize_model(model, IDS, QuantizeSection(default="int4-g32-gptq").scheme_for, torch.device("cpu"),
                               progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "native")
    export_gptq(tmp_path / "native", tmp_path / "gptq")
    _config, layers, _rest = read_gptq(tmp_path / "gptq")
    assert layers.keys() == quantized.keys()
    assert {f"model.layers.1.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")} \
        <= layers.keys()
    for name, original in quantized.items():
        assert torch.equal(layers[name].codes, original.codes) and torch.equal(layers[name].scales, original.scales)
