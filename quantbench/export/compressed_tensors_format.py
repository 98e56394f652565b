"""The compressed-tensors checkpoint format (vLLM, llm-compressor), written to its layout without
needing the package; the tests read it back with the package.

Per quantized linear `<name>` (N outputs, K inputs):
  pack-quantized (int, 1–8 bits)  weight_packed int32 [N, ⌈K·b/32⌉]: each row one little-endian bit stream
                                  of the codes q + 2^(b−1) (our unsigned codes as they are);
                                  weight_scale [N, G] float16; asymmetric: weight_zero_point int32
                                  [⌈N·b/32⌉, G] (zero points packed along the outputs);
                                  weight_shape int64 [2]. Act-order layers need static groups
                                  (actorder "weight"): compressed-tensors no longer stores a g_idx
  mxfp4-pack-quantized            weight_packed uint8 [N, K/2] (E2M1, element 0 in the low nibble),
                                  weight_scale uint8 [N, K/32] (E8M0)
  nvfp4-pack-quantized            weight_packed as MXFP4, weight_scale float8_e4m3fn [N, K/16],
                                  weight_global_scale float32 [1] (block scale = weight_scale / global)
Layers sharing their quantization arguments form one `config_groups` entry targeting them by name; with
several formats the config's format is `mixed-precision` and every group names its own.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantbench.export.interop import NativeCheckpoint, export_interop
from quantbench.export.packing import pack_bits
from quantbench.quantized_weight import QuantizedWeight

FORMATS = {"int": "pack-quantized", "mxfp4": "mxfp4-pack-quantized", "nvfp4": "nvfp4-pack-quantized"}
COMPRESSED_TENSORS_VERSION = "0.20.0"  # the version whose layout this writes


def compressed_tensors_unsupported_reason(weight) -> str | None:
    scheme = weight.scheme
    if scheme.format not in FORMATS:
        return f"{scheme.name}: compressed-tensors export covers int, mxfp4 and nvfp4"
    if getattr(weight, "g_idx", None) is not None:
        return (f"{scheme.name}: its act_order groups are out of input order (g_idx), which compressed-tensors "
                "no longer stores (actorder 'group' was removed); quantize with static groups (-act-static)")
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
        tensors = {"weight_packed": packed["qweight"], "weight_scale": weight.scales.contiguous(),
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


def compressed_tensors_config(layers: dict[str, QuantizedWeight]) -> dict:
    groups: dict[tuple, list[str]] = {}
    for name, weight in sorted(layers.items()):
        args = weight_args(weight)
        key = (FORMATS[weight.scheme.format], tuple(sorted(args.items(), key=lambda kv: kv[0])))
        groups.setdefault(key, []).append(name)
    formats = {fmt for fmt, _ in groups}
    config_groups = {}
    for index, ((fmt, args), names) in enumerate(groups.items()):
        config_groups[f"group_{index}"] = {"targets": names, "weights": dict(args), "input_activations": None,
                                           "output_activations": None, "format": fmt}
    return {"quant_method": "compressed-tensors", "version": COMPRESSED_TENSORS_VERSION,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": [],
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


def export_compressed_tensors(source: str | Path | NativeCheckpoint, out_dir: str | Path,
                              force: bool = False) -> Path:
    """Write a native checkpoint in the compressed-tensors format; refuses (naming them) layers it cannot store."""
    return export_interop(source, out_dir, force, "compressed-tensors", compressed_tensors_unsupported_reason,
                         compressed_tensors_tensors, lambda native: compressed_tensors_config(native.layers))
