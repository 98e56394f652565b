"""The compressed-tensors checkpoint format (vLLM, llm-compressor), written to its layout without
needing the package; the tests read it back with the package.

Per quantized linear `<name>` (N outputs, K inputs):
  pack-quantized (int, 1–8 bits)  weight_packed int32 [N, ⌈K·b/32⌉]: each row one little-endian bit stream
                                  of the codes q + 2^(b−1) (our unsigned codes as they are);
                                  weight_scale [N, G] float32 (our float16 scales, exactly: the
                                  library dequantizes in the scale's dtype, so a float16 or bf16
                                  scale would round every weight once more before the model's dtype);
                                  asymmetric: weight_zero_point int32
                                  [⌈N·b/32⌉, G] (zero points packed along the outputs);
                                  weight_shape int64 [2]. Act-order layers need static groups
                                  (actorder "weight"): compressed-tensors no longer stores a g_idx
  mxfp4-pack-quantized            weight_packed uint8 [N, K/2] (E2M1, element 0 in the low nibble),
                                  weight_scale uint8 [N, K/32] (E8M0)
  nvfp4-pack-quantized            weight_packed as MXFP4, weight_scale float8_e4m3fn [N, K/16],
                                  weight_global_scale float32 [1] (block scale = weight_scale / global)
Layers sharing their quantization arguments form one `config_groups` entry targeting them by name; with
several formats the config's format is `mixed-precision` and every group names its own.

Two limits of compressed-tensors 0.20.1 as transformers 5 loads it (docs/export.md has the details):
  * asymmetric pack-quantized fails to load compressed (the default): PackedQuantizationCompressor.compress
    (compressors/pack_quantized/base.py) leaves weight_zero_point unpacked in its meta-device branch, so the
    model skeleton expects [N, G] where the file holds [⌈N·b/32⌉, G]. `CompressedTensorsConfig(
    run_compressed=False)` loads it. The exporter says so when it writes such layers.
  * a checkpoint with several config groups loads compressed, but not with run_compressed=False / dequantize:
    transformers' CompressedTensorsDequantize.convert (integrations/compressed_tensors.py, transformers 5.24)
    decompresses every dense layer with `get_dense_scheme`, the first group, giving wrong weights or failing.
  * MXFP4/NVFP4 in a float32 model: unpack_fp4_from_uint8 (compressors/nvfp4/helpers.py) decodes to bfloat16
    and the weight is used without a cast, so the first float32 forward fails. The exporter records
    `dtype: bfloat16` in config.json for such models, the dtype in which they load and run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quantbench.export.interop import NativeCheckpoint, export_interop
from quantbench.formats.packing import pack_bits
from quantbench.quantized_weight import QuantizedWeight

log = logging.getLogger(__name__)
FORMATS = {"int": "pack-quantized", "mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
COMPRESSED_TENSORS_VERSION = "0.20.0"  # the version whose layout this writes


def compressed_tensors_unsupported_reason(scheme, shape: tuple[int, int], weight=None) -> str | None:
    if scheme.format not in FORMATS:
        return f"{scheme.name}: compressed-tensors export covers int, mxfp4 and nvfp4"
    if scheme.act_order and scheme.group_size and not scheme.static_groups:
        return (f"{scheme.name}: act_order without static groups orders the groups out of input order (g_idx), "
                "which compressed-tensors no longer stores; quantize with static groups (-act-static)")
    if scheme.group_size and shape[1] % scheme.group_size:
        return f"group size {scheme.group_size} does not divide {shape[1]} inputs (compressed-tensors needs whole groups)"
    return None


def weight_args(weight: QuantizedWeight) -> dict:
    scheme = weight.scheme
    if scheme.format == "int":
        return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
                "strategy": "group" if scheme.group_size else "channel", "group_size": scheme.group_size,
                "actorder": "weight" if scheme.act_order else None, "dynamic": False}
    if scheme.format == "mxfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32,
                "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
            "dynamic": False, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}


def compressed_tensors_tensors(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    packed = weight.pack()
    if weight.scheme.format == "int":
        bits = weight.scheme.bits
        tensors = {"weight_packed": packed["qweight"], "weight_scale": weight.scales.float().contiguous(),
                   "weight_shape": torch.tensor(weight.shape, dtype=torch.int64)}
        if weight.zeros is not None:
            signed = weight.zeros.to(torch.int32)  # zero − 2^(b−1), stored with the same offset: unchanged
            tensors["weight_zero_point"] = pack_bits(signed.T.contiguous(), bits).T.contiguous()
        return tensors
    tensors = {"weight_packed": packed["qweight"]}
    if weight.scheme.format == "mxfp4":
        tensors["weight_scale"] = packed["scales"]
    else:
        tensors["weight_scale"] = packed["scales"].view(torch.float8_e4m3fn)
        tensors["weight_global_scale"] = packed["global_scale"].float().reshape(1)
    return tensors


def weight_key(weight: QuantizedWeight) -> tuple:
    """What puts layers in one config group: their format and quantization arguments."""
    return FORMATS[weight.scheme.format], tuple(sorted(weight_args(weight).items(), key=lambda kv: kv[0]))


def compressed_tensors_config(layers: dict[str, QuantizedWeight]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for name, weight in sorted(layers.items()):
        groups.setdefault(weight_key(weight), []).append(name)
    formats = {fmt for fmt, _ in groups}
    config_groups = {}
    for index, ((fmt, args), names) in enumerate(groups.items()):
        config_groups[f"group_{index}"] = {"targets": names, "weights": dict(args), "input_activations": None,
                                           "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "version": COMPRESSED_TENSORS_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": [],
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


def loadable_config(native: NativeCheckpoint) -> dict:
    """config.json changes that let transformers load the export: FP4 layers decode to bfloat16 upstream,
    so a float32 model with any is recorded as bfloat16 (see the module docstring)."""
    fp4 = [name for name, w in native.layers.items() if w.scheme.format in ("mxfp4", "nvfp4")]
    asymmetric = [name for name, w in native.layers.items() if w.scheme.format == "int" and not w.scheme.symmetric]
    if len({weight_key(w) for w in native.layers.values()}) > 1:
        log.warning("several quantization schemes: transformers loads this export compressed (the default); its "
                    "dequantize=True path applies the first scheme to every layer (see docs/export.md)")
    if asymmetric:
        log.warning("%d asymmetric layer(s): transformers loads them with CompressedTensorsConfig(run_compressed="
                    "False); its default compressed load fails in compressed-tensors 0.20.1 (see docs/export.md)",
                    len(asymmetric))
    if fp4 and native.config.get("dtype", native.config.get("torch_dtype")) == "float32":
        log.warning("float32 model with %d FP4 layer(s): config.json records dtype bfloat16, the dtype in which "
                    "compressed-tensors 0.20.1 runs FP4 weights (see docs/export.md)", len(fp4))
        return {"dtype": "bfloat16"}
    return {}


def export_compressed_tensors(source: str | Path | NativeCheckpoint, out_dir: str | Path,
                              force: bool = False, device: str | torch.device = "cpu") -> Path:
    """Write a native checkpoint in the compressed-tensors format; refuses (naming them) layers it cannot store."""
    return export_interop(source, out_dir, force, "compressed-tensors", compressed_tensors_unsupported_reason,
                          compressed_tensors_tensors, lambda native: compressed_tensors_config(native.layers),
                          loadable_config, device)
