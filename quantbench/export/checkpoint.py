"""The native quantbench checkpoint: a Hugging Face model directory whose quantized linears are stored
as bit-packed codes.

  config.json        the model config plus `quantization_config`:
                     {"quant_method": "quantbench", "version": 2, "layers": {name: {scheme fields…, "shape"}},
                      "tied": {dropped_key: kept_key},
                      "rotations": {name: {"kind", "size", "seed"}}: linears whose stored weight is W·R and
                      that rotate their input x ↦ x·R online (quantizers/fwht.py RandomHadamard),
                      "model_rotation": {"kind", "size", "seed"} or null: the residual-stream rotation
                      already folded into the stored weights (rotation.py)}
  model.safetensors  every parameter not quantized, as it was; for each quantized linear `<name>.qweight`
                     (int32, codes bit-packed along the input dimension, see formats/packing.py),
                     `<name>.scales` (float16 [out, groups]) and, for asymmetric schemes, `<name>.qzeros`
                     (int32, zero points packed like the codes) and, when GPTQ's act_order grouped the
                     columns out of order, `<name>.g_idx` (int32 [in]: the group of each input column).
                     Block formats (MX, NVFP4) store `qweight` as uint8 [out, in·bits/8], `scales` as
                     uint8 [out, in/block] (E8M0 exponents or E4M3 codes) and, for NVFP4,
                     `<name>.global_scale` (float32 [1]); see QuantizedWeight.pack
  tokenizer files    when a tokenizer is given
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from quantbench.activations import input_rotation_of, quantize_inputs_of, rotate_inputs_of
from quantbench.errors import QuantbenchError
from quantbench.export.kernels.layout import kernel_unsupported_reason, to_kernel_layout
from quantbench.export.kernels.modules import PackedLinear
from quantbench.export.checkpoint_reader import (FORMAT_VERSION, QUANT_METHOD, RUN_CHECKPOINT_DIR,  # noqa: F401
                                                 WEIGHTS_FILE, CheckpointLayer, checkpoint_layers, damaged,
                                                 is_quantbench_checkpoint, read_checkpoint,
                                                 read_quantization_config, resolve_checkpoint_dir)
from quantbench.fsutil import atomic_directory, save_tensors
from quantbench.quantized_weight import QuantizedWeight, unpack_weight
from quantbench.quantizers.fwht import RandomHadamard
from quantbench.rotation import MODEL_ROTATION_ATTR



def save_quantized(model: nn.Module, tokenizer, quantized: dict[str, QuantizedWeight], out_dir: str | Path,
                   force: bool = False) -> Path:
    """Write `model` with its `quantized` layers packed. Refuses an existing `out_dir` unless `force`."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force, what="checkpoint directory") as tmp:
        write_checkpoint(model, tokenizer, quantized, tmp)
    return out_dir


def write_checkpoint(model: nn.Module, tokenizer, quantized: dict[str, QuantizedWeight], directory: Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if key.removesuffix(".weight") in quantized and key.endswith(".weight"):
            continue
        identity = (value.data_ptr(), value.dtype, tuple(value.shape))
        if identity in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            tied[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = value.detach().cpu().contiguous()
    layers = {}
    for name, qweight in quantized.items():
        for suffix, tensor in qweight.pack().items():
            tensors[f"{name}.{suffix}"] = tensor.cpu().contiguous()
        layers[name] = {"scheme": qweight.scheme.name, **qweight.scheme.model_dump(), "shape": list(qweight.shape)}
    save_tensors(tensors, directory / WEIGHTS_FILE, {"format": "pt"})
    rotations = {name: rotation.descriptor for name, module in model.named_modules()
                 if (rotation := input_rotation_of(module)) is not None}

    config = copy.deepcopy(model.config)
    config.dtype = next(model.parameters()).dtype  # what the weights really are, whatever the config said
    config.quantization_config = {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "layers": layers,
                                  "tied": tied, "rotations": rotations,
                                  "model_rotation": getattr(model, MODEL_ROTATION_ATTR, None),
                                  "base_model": getattr(model, "name_or_path", None) or None}
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, kernels: bool = False) -> nn.Module:
    """Rebuild the model of a quantbench checkpoint, its quantized linears holding the dequantized weights.

    The weights equal those of the in-memory quantized model that was saved, and layers that rotated or
    quantized their inputs online do so again, so logits match exactly.

    `kernels=True` instead swaps every layer a packed-weight kernel can run (export/kernels) for a
    `PackedLinear` that keeps only the packed tensors; the others keep their dequantized weights.
    `model.quantbench_kernel_skips` names each layer left dense and why.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    checkpoint = read_checkpoint(directory)
    qconfig = checkpoint.qconfig
    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _skip_weight_init():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = checkpoint.load_tensors()
    schemes, skipped = {}, {}
    for name, layer in checkpoint.layers.items():
        scheme = schemes[name] = layer.scheme
        packed = {s: tensors.pop(f"{name}.{s}") for s in layer.layout}
        weight = unpack_weight(scheme, layer.shape, packed)
        reason = kernel_unsupported_reason(weight) if kernels else "kernels off"
        if reason is None:
            linear = model.get_submodule(name)
            _set_module(model, name, PackedLinear(to_kernel_layout(weight), linear.bias, dtype=dtype))
        else:
            skipped[name] = reason
            tensors[f"{name}.weight"] = weight.dequantize(dtype)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise damaged(directory, f"{WEIGHTS_FILE} does not fit config.json: {_first_line(exc)}") from None
    missing = set(result.missing_keys) - set(qconfig.get("tied", {}))
    if missing or result.unexpected_keys:
        raise damaged(directory, f"{WEIGHTS_FILE} does not fit config.json (missing {sorted(missing)[:3]}, "
                      f"unexpected {sorted(result.unexpected_keys)[:3]})")
    for dropped, kept in qconfig.get("tied", {}).items():
        if model.get_parameter(dropped) is not model.get_parameter(kept):
            _set_parameter(model, dropped, model.get_parameter(kept))
    for name, descriptor in qconfig.get("rotations", {}).items():
        rotate_inputs_of(model.get_submodule(name), _rotation_from(descriptor, directory))
    for name, scheme in schemes.items():
        quantize_inputs_of(model.get_submodule(name), scheme.activations)
    if qconfig.get("model_rotation"):
        setattr(model, MODEL_ROTATION_ATTR, qconfig["model_rotation"])
    if kernels:
        model.quantbench_kernel_skips = skipped
    return model.to(device).eval()


def _rotation_from(descriptor: dict, directory: Path) -> RandomHadamard:
    rotation = RandomHadamard(int(descriptor["size"]), int(descriptor["seed"]))
    if rotation.kind != descriptor["kind"]:
        raise QuantbenchError(f"{directory}: a rotation of size {rotation.n} was saved as {descriptor['kind']!r}, "
                              f"but this quantbench builds {rotation.kind!r}; use the version that wrote it")
    return rotation


def _skip_weight_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise normally (slower, same result)
        return contextlib.nullcontext()
    return no_init_weights()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _set_parameter(model: nn.Module, key: str, param: nn.Parameter) -> None:
    module_name, _, attr = key.rpartition(".")
    setattr(model.get_submodule(module_name), attr, param)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
