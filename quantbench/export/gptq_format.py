"""The GPTQ checkpoint format (AutoGPTQ/GPTQModel `checkpoint_format: gptq`, "v1"), which transformers,
vLLM and GPTQModel read.

Per quantized linear `<name>` (N outputs, K inputs, b bits, G groups):
  qweight  int32 [K·b/32, N]  codes packed along the inputs: column n is one little-endian bit stream,
                              input k at stream bits [k·b, (k+1)·b) (for b = 4: eight inputs per word,
                              input 8j+i in bits 4i…4i+3 of word j; for b = 3 codes straddle words)
  qzeros   int32 [G, N·b/32]  zero points minus one ("v1"), packed the same way along the outputs
  scales   float16 [G, N]
  g_idx    int32 [K]          the group of each input (k // group_size without act_order)
w[n, k] = (q[n, k] − (stored_zero[g, n] + 1)) · scales[g, n] with g = g_idx[k]. Symmetric layers store
2^(b−1) − 1. `quantization_config` carries bits, group_size (−1: per channel), desc_act and sym of the
most common scheme; every layer that differs gets a `dynamic` override (GPTQModel's per-module regex
rules, `+:` to override, `-:` to leave a layer unquantized).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint import WEIGHTS_FILE
from quantbench.export.interop import NativeCheckpoint, export_interop
from quantbench.formats.packing import pack_bits, packed_words, unpack_bits
from quantbench.quantized_weight import QuantizedWeight
from quantbench.scheme import Scheme

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def gptq_unsupported_reason(scheme, shape: tuple[int, int], weight=None) -> str | None:
    out_features, in_features = shape
    if scheme.format != "int":
        return f"{scheme.name}: GPTQ stores integer grids only"
    if scheme.bits not in GPTQ_BITS:
        return f"{scheme.name}: GPTQ stores {'/'.join(map(str, GPTQ_BITS))} bits"
    if (in_features * scheme.bits) % 32 or (out_features * scheme.bits) % 32:
        return f"shape {out_features}×{in_features} does not pack into whole int32 words at {scheme.bits} bits"
    if scheme.group_size and in_features % scheme.group_size:
        return f"group size {scheme.group_size} does not divide {in_features} inputs"
    if weight is not None and weight.zeros is not None and int(weight.zeros.min()) == 0:
        return "a zero point of 0, which GPTQ's zero − 1 convention cannot store"
    return None


def gptq_tensors(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    bits = weight.scheme.bits
    out_features, in_features = weight.shape
    zeros = (weight.zeros.to(torch.int32) if weight.zeros is not None
             else torch.full_like(weight.scales, 1 << (bits - 1), dtype=torch.int32))
    g_idx = (weight.g_idx if weight.g_idx is not None
             else torch.arange(in_features, dtype=torch.int32) // weight.group_size)
    return {"qweight": pack_bits(weight.codes, bits).T.contiguous(),
            "qzeros": pack_bits((zeros - 1).T.contiguous(), bits),
            "scales": weight.scales.T.contiguous().half(),
            "g_idx": g_idx.to(torch.int32).contiguous()}


def weight_from_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool, desc_act: bool,
                     shape: tuple[int, int]) -> QuantizedWeight:
    """A GPTQ layer back as a QuantizedWeight (g_idx kept only when it is not the trivial k // group)."""
    out_features, in_features = shape
    codes = unpack_bits(tensors["qweight"].T.contiguous(), bits, in_features)
    n_groups = tensors["scales"].shape[0]
    stored = unpack_bits(tensors["qzeros"], bits, out_features).T.contiguous()
    zeros = (stored.to(torch.int32) + 1)
    group = group_size if group_size > 0 else in_features
    g_idx = tensors["g_idx"].to(torch.int32)
    if torch.equal(g_idx, torch.arange(in_features, dtype=torch.int32) // group):
        g_idx = None
    scheme = Scheme(format="int", bits=bits, group_size=None if group_size <= 0 else group_size, symmetric=sym,
                    solver="gptq", act_order=desc_act)
    if sym:
        if not bool((zeros == 1 << (bits - 1)).all()):
            raise QuantbenchError("a symmetric GPTQ layer stores zero points other than 2^(bits−1) − 1")
        zeros = None
    elif int(zeros.max()) >= 1 << bits:
        raise QuantbenchError(f"a GPTQ layer stores a zero point of {int(zeros.max())}, beyond {bits} bits")
    if n_groups != -(-in_features // group):
        raise QuantbenchError(f"GPTQ scales have {n_groups} groups, expected {-(-in_features // group)}")
    return QuantizedWeight(scheme, codes, tensors["scales"].T.contiguous(),
                           None if zeros is None else zeros.to(torch.uint8), g_idx)


def _settings(scheme: Scheme) -> dict:
    return {"bits": scheme.bits, "group_size": scheme.group_size or -1, "desc_act": scheme.act_order,
            "sym": scheme.symmetric}


def _module_pattern(name: str) -> str:
    return f"^{re.escape(name)}$"


def gptq_quantization_config(layers: dict[str, Scheme], unquantized_in_blocks: list[str]) -> dict:
    counts = Counter(tuple(_settings(s).items()) for s in layers.values())
    default = dict(counts.most_common(1)[0][0])
    dynamic = {}
    for name, scheme in sorted(layers.items()):
        settings = _settings(scheme)
        override = {k: v for k, v in settings.items() if v != default[k]}
        if override:
            dynamic[f"+:{_module_pattern(name)}"] = override
    for name in sorted(unquantized_in_blocks):
        dynamic[f"-:{_module_pattern(name)}"] = {}
    return {"quant_method": "gptq", "checkpoint_format": "gptq", **default, "dynamic": dynamic or None,
            "lm_head": "lm_head" in layers, "true_sequential": True, "static_groups": False, "pack_dtype": "int32",
            "meta": {"quantizer": ["quantbench"]}}


def export_gptq(source: str | Path | NativeCheckpoint, out_dir: str | Path, force: bool = False,
                device: str | torch.device = "cpu") -> Path:
    """Write a native checkpoint in the GPTQ format; refuses (naming them) layers GPTQ cannot store."""
    return export_interop(source, out_dir, force, "GPTQ", gptq_unsupported_reason, gptq_tensors, _gptq_config,
                          device=device)


def _gptq_config(native: NativeCheckpoint) -> dict:
    blocks = _block_prefixes(native.layers)
    unquantized = [key.removesuffix(".weight") for key, value in native.dense.items()
                   if key.endswith(".weight") and len(value.shape) == 2 and _in_blocks(key, blocks)]
    return gptq_quantization_config({n: w.scheme for n, w in native.layers.items()}, unquantized)


def _block_prefixes(layers) -> set[str]:
    """`model.layers.3.` for `model.layers.3.mlp.up_proj`: the decoder blocks GPTQ loaders walk."""
    prefixes = set()
    for name in layers:
        match = re.match(r"^(.*\.\d+\.)", name)
        if match:
            prefixes.add(re.sub(r"\d+\.$", "", match.group(1)))
    return prefixes


def _in_blocks(key: str, prefixes: set[str]) -> bool:
    return any(re.match(re.escape(p) + r"\d+\.", key) for p in prefixes)


def read_gptq(directory: str | Path) -> tuple[dict, dict[str, QuantizedWeight], dict[str, torch.Tensor]]:
    """(config, quantized layers, other tensors) of a GPTQ checkpoint directory, ours or another tool's."""
    import json

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "gptq":
        raise QuantbenchError(f"{directory} is not a GPTQ checkpoint (quant_method {qconfig.get('quant_method')!r})")
    if qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise QuantbenchError(f"{directory}: checkpoint_format {qconfig['checkpoint_format']!r} is not read; "
                              "quantbench reads GPTQ v1 ('gptq')")
    tensors = load_file(str(directory / WEIGHTS_FILE))
    names = sorted({k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")})
    layers = {}
    for name in names:
        settings = {k: qconfig[k] for k in ("bits", "group_size", "desc_act", "sym")}
        for pattern, override in (qconfig.get("dynamic") or {}).items():
            if pattern.startswith("-:"):
                continue
            if re.match(pattern.removeprefix("+:"), name):
                settings.update({k: v for k, v in override.items() if k in settings})
        packed = {s: tensors.pop(f"{name}.{s}") for s in GPTQ_SUFFIXES}
        in_features = packed["g_idx"].numel()
        out_features = packed["scales"].shape[1]
        if packed["qweight"].shape[0] != packed_words(in_features, settings["bits"]):
            raise QuantbenchError(f"{name}: qweight rows do not match {in_features} inputs at {settings['bits']} bits")
        layers[name] = weight_from_gptq(packed, settings["bits"], settings["group_size"], settings["sym"],
                                        settings["desc_act"], (out_features, in_features))
    return config, layers, tensors
