import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (LLAMA_SHAPED_BUILDERS, MOE_BUILDERS, OLDER_BUILDERS, tiny_gemma2, tiny_gemma3_text, tiny_gpt_neox,
                     tiny_llama, tiny_opt, tiny_phi3)

from quantbench import load_quantized, save_quantized
from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint import checkpoint_layers
from quantbench.model_io import model_linears
from quantbench.pipeline import quantize_linear, quantize_model, untie_lm_head
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme

ROOT = Path(__file__).resolve().parent.parent

IDS = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(5))


def quantize(model, **section):
    scheme_for = QuantizeSection(**section).scheme_for
    return quantize_model(model, IDS, scheme_for, torch.device("cpu"), progress=False)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("section", [
    {"default": "int4-g32-rtn"},
    {"default": "int3-g32-sym-rtn", "overrides": [{"pattern": "mlp", "scheme": "int5-pc-rtn"}]},
    {"default": "int2-g64-rtn", "ignore": ["down_proj"]},  # 64 does not divide the MLP width of 160
    {"default": "mxfp4-rtn", "overrides": [{"pattern": "mlp", "scheme": "nvfp4-gptq"}]},
    {"default": "mxfp6e3m2-gptq-act-static", "overrides": [{"pattern": "o_proj", "scheme": "mxint8-rtn"}]},
    {"default": "mxfp8e4m3-rtn-a:mxfp8e4m3", "overrides": [{"pattern": "mlp", "scheme": "int4-g32-gptq-a:int8"}]},
    {"default": "ternary2-g32-ptqtp", "overrides": [{"pattern": "mlp", "scheme": "ternary1-ptqtp-aw-a:int8"}]},
])
def test_export_then_load_gives_identical_logits(tmp_path, tokenizer, section):
    model = tiny_llama()
    quantized = quantize(model, **section)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survives
    layers = {layer.name: layer for layer in checkpoint_layers(tmp_path / "ckpt")}
    assert layers.keys() == quantized.keys()
    for name, layer in layers.items():
        assert layer.scheme == quantized[name].scheme
        assert layer.stored_bytes * 8 >= quantized[name].storage_bits  # word padding only adds


@pytest.mark.parametrize("build", [tiny_gpt_neox, tiny_opt, tiny_gemma2, tiny_gemma3_text, tiny_phi3,
                                   *LLAMA_SHAPED_BUILDERS.values(), *MOE_BUILDERS.values(), *OLDER_BUILDERS.values()])
def test_every_family_exports_and_loads_with_identical_logits(tmp_path, tokenizer, build):
    model = build(vocab_size=len(tokenizer))
    quantized = quantize(model, default="int4-g32-gptq", overrides=[{"pattern": "mlp", "scheme": "mxfp4-rtn"}])
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.config.model_type == model.config.model_type
    assert torch.equal(logits(loaded), logits(model))


def test_packed_weights_are_what_is_stored(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    name = "model.layers.1.mlp.up_proj"
    assert f"{name}.weight" not in tensors
    assert tensors[f"{name}.qweight"].dtype == torch.int32
    assert tensors[f"{name}.qweight"].shape == (160, 64 * 4 // 32)
    assert tensors[f"{name}.scales"].dtype == torch.float16
    assert "lm_head.weight" not in tensors  # tied to the embedding, stored once


def test_quantized_lm_head_is_untied_and_round_trips(tmp_path, tokenizer):
    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    quantized["lm_head"] = quantize_linear(untie_lm_head(model), QuantizeSection(default="int8-g32-rtn").default)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_existing_checkpoint_is_refused_without_force(tmp_path, tokenizer):
    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    out = tmp_path / "ckpt"
    save_quantized(model, tokenizer, quantized, out)
    marker = out / "config.json"
    before = marker.read_text()
    with pytest.raises(QuantbenchError, match="already exists; pass --force"):
        save_quantized(model, tokenizer, quantized, out)
    assert marker.read_text() == before
    save_quantized(model, tokenizer, quantized, out, force=True)
    assert load_quantized(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_failed_export_leaves_the_earlier_checkpoint_intact(tmp_path, tokenizer):
    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    out = tmp_path / "ckpt"
    save_quantized(model, tokenizer, quantized, out)
    before = (out / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, BrokenTokenizer(), quantized, out, force=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_loading_a_plain_model_directory_is_a_clear_error(tmp_path, model_dir):
    with pytest.raises(QuantbenchError, match="not a quantbench checkpoint"):
        load_quantized(model_dir)
    with pytest.raises(QuantbenchError, match="no config.json"):
        load_quantized(tmp_path)


def test_checkpoint_records_the_real_weight_dtype(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llama().config, dtype=torch.bfloat16).eval()
    model.config.dtype = torch.float32  # a config that misstates the weights' dtype
    quantized = quantize(model, default="int4-g32-rtn")
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


def test_block_formats_are_stored_in_the_compressed_tensors_layout(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model = tiny_llama()
    quantized = quantize(model, default="mxfp4-rtn", overrides=[{"pattern": "mlp", "scheme": "nvfp4-rtn"}])
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    mx, nv = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"  # [64, 64] and [160, 64]
    assert tensors[f"{mx}.qweight"].dtype == torch.uint8 and tensors[f"{mx}.qweight"].shape == (64, 32)
    assert tensors[f"{mx}.scales"].dtype == torch.uint8 and tensors[f"{mx}.scales"].shape == (64, 2)
    assert tensors[f"{nv}.qweight"].shape == (160, 32) and tensors[f"{nv}.scales"].shape == (160, 4)
    assert tensors[f"{nv}.global_scale"].dtype == torch.float32 and tensors[f"{nv}.global_scale"].shape == (1,)
    layers = {layer.name: layer for layer in checkpoint_layers(tmp_path / "ckpt")}
    assert layers[mx].bits_per_weight == 4.25
    assert layers[nv].bits_per_weight == 4.5 + 32 / (160 * 64)


LOAD_PEAKS = """
import gc, json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from quantbench import load_quantized
from quantbench.memory import read_peaks, reset_peaks

def resident_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

peaks = {{}}
load_quantized({checkpoint!r}, kernels=True)  # what loading imports is not weights
for kernels in (False, True):
    gc.collect()
    before = resident_mb()
    reset_peaks(torch.device("cpu"))
    model = load_quantized({checkpoint!r}, kernels=kernels)
    peaks[str(kernels)] = read_peaks(torch.device("cpu"))["host_rss_mb"] - before
    del model
print(json.dumps(peaks))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS per span needs Linux")
def test_loading_holds_the_model_once_and_packed_layers_never_dense(tmp_path, tokenizer):
    """The model is built on the meta device and filled tensor by tensor from the memory-mapped files, so
    host memory holds the loaded model (dense: its dequantized weights once; kernels: the packed ones) and
    one layer in flight. Measured for a 165 MB model: dense 190–191 MB; packed 57 MB. Built on the CPU,
    dequantized into a state dict and then copied in, the dense load took 355 MB (the packed one 61–63 MB)."""
    model = tiny_llama(layers=8, hidden=768)
    dense_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    quantized = {name: quantize_linear(linear, Scheme.parse("int4-g128-rtn"))
                 for name, linear in model_linears(model).items()}
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    del model
    code = LOAD_PEAKS.format(root=str(ROOT), checkpoint=str(tmp_path / "ckpt"))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    assert dense_mb > 150
    assert peaks["False"] < 1.4 * dense_mb, peaks
    assert peaks["True"] < 0.5 * dense_mb, peaks  # no layer is ever dense


def test_a_layer_whose_tensors_lie_in_two_shards_loads(tmp_path, tokenizer):
    """Every layer's packed tensors are gathered whatever shard each lies in (here: the scales in a shard of
    their own, read after the codes)."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    whole_file = {kernels: logits(load_quantized(tmp_path / "ckpt", kernels=kernels)) for kernels in (False, True)}
    whole = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(whole))
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith(".scales")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith(".scales")}}
    whole.unlink()
    for shard, part in shards.items():
        save_file(part, str(tmp_path / "ckpt" / shard), metadata={"format": "pt"})
    weight_map = {key: shard for shard, part in shards.items() for key in part}
    index = json.dumps({"metadata": {}, "weight_map": weight_map})
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(index)
    assert torch.equal(whole_file[False], logits(model))
    for kernels in (False, True):
        assert torch.equal(logits(load_quantized(tmp_path / "ckpt", kernels=kernels)), whole_file[kernels])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_checkpoint_loads_straight_onto_the_gpu_as_it_loads_on_the_cpu(tmp_path, tokenizer):
    """Read onto the GPU and unpacked there, every tensor equals the CPU load's moved over, packed layers
    included, and the dense model computes the same logits."""
    model = tiny_llama(hidden=128)
    save_quantized(model, tokenizer, quantize(model, default="int4-g32-gptq-act"), tmp_path / "ckpt")
    gpu = torch.device("cuda")
    for kernels in (False, True):
        on_gpu = load_quantized(tmp_path / "ckpt", gpu, kernels=kernels)
        moved = load_quantized(tmp_path / "ckpt", kernels=kernels).to(gpu)
        tensors = dict(on_gpu.named_buffers()) | dict(on_gpu.named_parameters())
        assert tensors.keys() == (dict(moved.named_buffers()) | dict(moved.named_parameters())).keys()
        assert all(t.device.type == "cuda" for t in tensors.values())
        for name, tensor in (dict(moved.named_buffers()) | dict(moved.named_parameters())).items():
            assert torch.equal(tensors[name], tensor), name
        if not kernels:
            with torch.no_grad():
                assert torch.equal(on_gpu(input_ids=IDS.to(gpu)).logits, moved(input_ids=IDS.to(gpu)).logits)


def test_a_load_that_cannot_fit_is_refused_before_a_weight_is_read(tmp_path, tokenizer, monkeypatch):
    """Dequantized, the tiny model takes its float32 parameters; packed, its packed layers' stored bytes and
    the rest. With room for the packed model only, the dense load is refused in one line and the packed one
    loads."""
    import quantbench.memory

    model = tiny_llama()
    quantized = quantize(model, default="int4-g32-rtn")
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    dense = sum(p.numel() * 4 for p in model.parameters())
    packed = dense - sum(quantized[name].shape[0] * quantized[name].shape[1] * 4 for name in quantized) + sum(
        layer.stored_bytes for layer in checkpoint_layers(tmp_path / "ckpt"))
    monkeypatch.setattr(quantbench.memory, "available_host_bytes", lambda: (dense + packed) // 2)
    with pytest.raises(QuantbenchError, match="loaded dequantized it takes .* is free; load it with kernels=True"):
        load_quantized(tmp_path / "ckpt")
    assert not load_quantized(tmp_path / "ckpt", kernels=True).quantbench_kernel_skips  # every layer packed
    monkeypatch.setattr(quantbench.memory, "available_host_bytes", lambda: packed - 1)
    with pytest.raises(QuantbenchError, match="with its packed layers packed it takes at least"):
        load_quantized(tmp_path / "ckpt", kernels=True)
    if not torch.cuda.is_available():
        with pytest.raises(QuantbenchError, match="no CUDA device here"):
            load_quantized(tmp_path / "ckpt", "cuda")
