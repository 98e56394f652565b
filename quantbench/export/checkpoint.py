"""The native quantbench checkpoint: a Hugging Face model directory whose quantized linears are stored
as bit-packed codes.

  config.json        the model config plus `quantization_config`:
                     {"quant_method": "quantbench", "version": 2, "layers": {name: {scheme fields…, "shape"}},
                      "tied": {dropped_key: kept_key},
                      "rotations": {name: {"kind", "size", "seed"}}: linears whose stored weight is W·R and
                      that rotate their input x ↦ x·R online (quantizers/fwht.py RandomHadamard),
                      "model_rotation": {"kind", "size", "seed"} or null: the residual-stream rotation
                      already folded into the stored weights (rotation.py)}
  model.safetensors  (or shards `model-0000i-of-0000n.safetensors` listed in model.safetensors.index.json, one
                     per decoder block and one for the rest, when a run streams; see CheckpointWriter)
                     every parameter not quantized, as it was; for each quantized linear `<name>.qweight`
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
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from quantbench.activations import input_rotation_of, quantize_inputs_of, rotate_inputs_of
from quantbench.errors import QuantbenchError
from quantbench.export.kernels.dense_cpu import use_dense_rows
from quantbench.export.kernels.decode_attention import use_decode_attention
from quantbench.export.kernels.layout import kernel_unsupported_reason, to_kernel_layout
from quantbench.export.kernels.fused import fuse_packed_siblings
from quantbench.export.kernels.mlp_order import fold_down_orders
from quantbench.export.kernels.modules import PackedLinear
from quantbench.export.checkpoint_reader import (FORMAT_VERSION, INDEX_FILE, QUANT_METHOD,  # noqa: F401
                                                 RUN_CHECKPOINT_DIR, WEIGHTS_FILE, Checkpoint, CheckpointLayer,
                                                 checkpoint_layers, damaged,
                                                 is_quantbench_checkpoint, read_checkpoint,
                                                 read_quantization_config, resolve_checkpoint_dir)
from quantbench.fsutil import atomic_directory, atomic_write_path, save_tensors
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
    """The whole in-memory model as one part: a single model.safetensors, as before sharding existed."""
    writer = CheckpointWriter(directory)
    writer.write_part("model", model_tensors(model.state_dict(), quantized), quantized, layer_rotations(model))
    writer.finish(model, tokenizer, ["model"])


def model_tensors(state: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """What a checkpoint stores for `state`: every tensor but the quantized linears' weights."""
    return {key: value.detach() for key, value in state.items()
            if not (key.endswith(".weight") and key.removesuffix(".weight") in quantized)}


def layer_rotations(modules: nn.Module, prefix: str = "") -> dict[str, dict]:
    """The online input rotations of `modules`' linears, by full name (`prefix` + name within)."""
    return {prefix + name: rotation.descriptor for name, module in modules.named_modules()
            if (rotation := input_rotation_of(module)) is not None}


class CheckpointWriter:
    """Writes a native checkpoint part by part, so that no more than one part is ever in memory.

    `write_part` packs one part (a decoder block, the tensors outside the blocks, or a whole small model)
    straight to `<directory>/parts/<part>.safetensors`, through a staging name, with its layers' schemes and
    rotations in the file's metadata: a part on disk is complete, and a resumed run keeps it. `finish`
    renames the parts, in model order, into `model.safetensors` (one part) or the Hugging Face shards
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, and writes config.json with the
    quantization_config gathered from the parts' metadata. Tied tensors (lm_head = embed_tokens) are stored
    once, under the first name, as long as they are written in one part.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.parts_dir = self.directory / "parts"
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def path(self, part: str) -> Path:
        return self.parts_dir / f"{part}.safetensors"

    def write_part(self, part: str, tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedWeight],
                   rotations: dict[str, dict]) -> None:
        stored, tied, seen = {}, {}, {}
        for key, value in tensors.items():
            identity = (value.data_ptr(), value.dtype, tuple(value.shape))
            if identity in seen:
                tied[key] = seen[identity]
                continue
            seen[identity] = key
            stored[key] = value.cpu().contiguous()
        layers = {}
        for name, qweight in quantized.items():
            for suffix, tensor in qweight.pack().items():
                stored[f"{name}.{suffix}"] = tensor.cpu().contiguous()
            layers[name] = {"scheme": qweight.scheme.name, **qweight.scheme.model_dump(), "shape": list(qweight.shape)}
        metadata = {"format": "pt", "quantbench": json.dumps({"layers": layers, "tied": tied, "rotations": rotations})}
        with atomic_write_path(self.path(part)) as tmp:
            save_tensors(stored, tmp, metadata)

    def part_record(self, part: str) -> dict:
        from safetensors import safe_open

        with safe_open(str(self.path(part)), framework="pt") as handle:
            return json.loads(handle.metadata()["quantbench"])

    def finish(self, model: nn.Module, tokenizer, parts: list[str]) -> dict[str, dict]:
        """Put the parts in place as the checkpoint's weights and write its config; returns the layers."""
        records = {part: self.part_record(part) for part in parts}
        layers = {name: entry for record in records.values() for name, entry in record["layers"].items()}
        if len(parts) == 1:
            self.path(parts[0]).rename(self.directory / WEIGHTS_FILE)
        else:
            mapping, total = {}, 0
            for number, part in enumerate(parts, 1):
                shard = f"model-{number:05d}-of-{len(parts):05d}.safetensors"
                total += self.path(part).stat().st_size
                with safe_open_keys(self.path(part)) as keys:
                    mapping.update(dict.fromkeys(keys, shard))
                self.path(part).rename(self.directory / shard)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        shutil.rmtree(self.parts_dir)
        config = copy.deepcopy(model.config)
        config.dtype = _stored_dtype(model)  # what the weights really are, whatever the config said
        config.quantization_config = {
            "quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "layers": layers,
            "tied": {k: v for record in records.values() for k, v in record["tied"].items()},
            "rotations": {k: v for record in records.values() for k, v in record["rotations"].items()},
            "model_rotation": getattr(model, MODEL_ROTATION_ATTR, None),
            "base_model": getattr(model, "name_or_path", None) or None}
        config.save_pretrained(self.directory)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(self.directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.directory)
        return layers


@contextlib.contextmanager
def safe_open_keys(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        yield list(handle.keys())


def _stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (a streamed model's may sit on the meta device)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def load_quantized(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, kernels: bool = False, fuse: bool = True,
                   fold_orders: bool = True, gated_mlps: bool = False) -> nn.Module:
    """Rebuild the model of a quantbench checkpoint, its quantized linears holding the dequantized weights.

    The weights equal those of the in-memory quantized model that was saved, and layers that rotated or
    quantized their inputs online do so again, so logits match exactly.

    `kernels=True` instead swaps every layer a packed-weight kernel can run (export/kernels) for a
    `PackedLinear` that keeps only the packed tensors; the others keep their dequantized weights.
    `model.quantbench_kernel_skips` names each layer left dense and why. With `fuse`, packed layers that
    read one input (q/k/v, gate/up) and agree in format share one fused weight (export/kernels/fused.py);
    `model.quantbench_fused` names the groups; with `gated_mlps` as well, a SiLU gated MLP's gate and up become
    one layer whose CUDA kernels store silu(gate)·up (fused.GatedMLP; off by default: docs/performance.md, "The
    gated MLP's activation in the matmul"). With `fold_orders`, a gated MLP's act_order down projection reads
    its input as gate and up now write it, in its stored order, with no gather (export/kernels/mlp_order.py;
    `model.quantbench_folded_orders` names them). The dense linears left (the lm_head, layers no kernel runs) take
    quantbench's CPU library for a decode step's few rows (export/kernels/dense_cpu.py;
    `model.quantbench_dense_rows` names them). A model on transformers' `sdpa` attention switches to
    quantbench's, which attends a decode step's grouped query heads without copies of the cache
    (export/kernels/decode_attention.py; `model.quantbench_decode_attention` says whether it switched). On CUDA
    the CUDA kernels' libraries the packed layers need are built side by side while the model loads
    (cuda_build.LibraryBuilds; `model.quantbench_library_failures` names those that failed to build).

    The model is built on the meta device and each stored tensor is read from the memory-mapped files
    straight onto `device`, where its layer is unpacked: host memory holds one tensor in flight, never
    the dense model, so a packed checkpoint loads onto a GPU whatever the size of its dense original.
    """
    from accelerate.utils import set_module_tensor_to_device

    from quantbench.block_weights import stored_tensors

    directory, device = Path(directory), torch.device(device)
    checkpoint = read_checkpoint(directory)
    qconfig = checkpoint.qconfig
    model = checkpoint_skeleton(directory, dtype)
    dtype = model.dtype
    check_room(directory, checkpoint, model, device, kernels)
    expected = {name for name, _ in stored_tensors(model, remove_duplicate=False)}
    loaded, unexpected, skipped = set(), [], {}
    builds = _library_builds(device) if kernels else None
    try:
        for key, item in stored_items(checkpoint, device):
            if isinstance(item, torch.Tensor):
                if key not in expected:
                    unexpected.append(key)
                    continue
                try:
                    set_module_tensor_to_device(model, key, device, value=item)
                except ValueError as exc:  # a tensor of the wrong shape
                    raise damaged(directory, f"{key} in {WEIGHTS_FILE} does not fit config.json: "
                                             f"{_first_line(exc)}") from None
                loaded.add(key)
                continue
            reason = kernel_unsupported_reason(item) if kernels else "kernels off"
            if reason is None:
                layout = to_kernel_layout(item)
                if builds:
                    builds.add(layout)
                _set_module(model, key, PackedLinear(layout, model.get_submodule(key).bias, dtype=dtype))
            else:
                skipped[key] = reason
                set_module_tensor_to_device(model, f"{key}.weight", device, value=item.dequantize(dtype))
            loaded.add(f"{key}.weight")
    except BaseException:  # the builds stop with the load
        if builds:
            builds.cancel()
        raise
    missing = expected - loaded - set(qconfig.get("tied", {}))
    if missing or unexpected:
        raise damaged(directory, f"{WEIGHTS_FILE} does not fit config.json (missing {sorted(missing)[:3]}, "
                      f"unexpected {sorted(unexpected)[:3]})")
    tie_as_stored(model, qconfig)
    restore_online_transforms(model, qconfig, {name: layer.scheme for name, layer in checkpoint.layers.items()},
                              directory)
    if kernels:
        model.quantbench_kernel_skips = skipped
        model.quantbench_folded_orders = fold_down_orders(model) if fold_orders else []
        model.quantbench_fused = fuse_packed_siblings(model, gated=gated_mlps) if fuse else []
        model.quantbench_dense_rows = use_dense_rows(model)
        model.quantbench_decode_attention = use_decode_attention(model)
        model.quantbench_library_failures = builds.wait() if builds else {}
    return model.to(device).eval()


def _library_builds(device: torch.device):
    """On CUDA, the CUDA kernels' libraries the packed layers will need, built while the model loads."""
    if device.type != "cuda":
        return None
    from quantbench.export.kernels.cuda_build import LibraryBuilds, device_arch

    return LibraryBuilds(device_arch(device))


def checkpoint_skeleton(directory: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model a checkpoint's config describes, on the meta device, in `dtype` (default: the stored one)."""
    from transformers import AutoConfig

    from quantbench.block_weights import skeleton_model

    config = AutoConfig.from_pretrained(directory)
    del config.quantization_config
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    return skeleton_model(config, getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def check_room(directory: Path, checkpoint: Checkpoint, model: nn.Module, device: torch.device,
               kernels: bool) -> None:
    """Refuse, before reading a weight, a load that cannot fit `device`: what it would hold there (dequantized,
    or with `kernels` at least the packed layers' stored bytes) against the memory free now."""
    from quantbench import memory
    from quantbench.preflight import _size

    tied = checkpoint.qconfig.get("tied", {})
    need = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        layer = checkpoint.layers.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if name not in tied:
            need += layer.stored_bytes if kernels and layer is not None else param.numel() * param.element_size()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantbenchError(f"checkpoint {directory}: loading onto {device}, but there is no CUDA device here")
    free = memory.free_bytes(device)
    if free is not None and need > free:
        how = "with its packed layers packed" if kernels else "dequantized"
        hint = "" if kernels else "; load it with kernels=True (quantbench eval --kernels) to keep them packed"
        raise QuantbenchError(f"checkpoint {directory}: loaded {how} it takes {'at least ' if kernels else ''}"
                              f"{_size(need)} on {device}, and {_size(free)} is free{hint}")


def tie_as_stored(model: nn.Module, qconfig: dict) -> None:
    """Every parameter the checkpoint stored once for two names (lm_head = embed_tokens), one object again."""
    for dropped, kept in qconfig.get("tied", {}).items():
        if model.get_parameter(dropped) is not model.get_parameter(kept):
            _set_parameter(model, dropped, model.get_parameter(kept))


def stored_items(checkpoint: Checkpoint, device: torch.device):
    """What a checkpoint holds, read tensor by tensor onto `device`: (layer name, its weight unpacked) for each
    quantized layer once all its packed tensors are read, and (key, tensor) for every other tensor."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in checkpoint.iter_tensors(device):
        name, _, suffix = key.rpartition(".")
        layer = checkpoint.layers.get(name)
        if layer is None or suffix not in layer.layout:
            yield key, tensor
            continue
        packed = pending.setdefault(name, {})
        packed[suffix] = tensor
        if len(packed) == len(layer.layout):
            del pending[name]
            yield name, unpack_weight(layer.scheme, layer.shape, packed)


def restore_online_transforms(model: nn.Module, qconfig: dict, schemes: dict, directory: Path) -> None:
    """What the quantized layers do to their inputs online (Hadamard rotations, activation quantization),
    and the model rotation's record, as the checkpoint's quantization_config says."""
    for name, descriptor in qconfig.get("rotations", {}).items():
        rotate_inputs_of(model.get_submodule(name), _rotation_from(descriptor, directory))
    for name, scheme in schemes.items():
        quantize_inputs_of(model.get_submodule(name), scheme.activations)
    if qconfig.get("model_rotation"):
        setattr(model, MODEL_ROTATION_ATTR, qconfig["model_rotation"])


def _rotation_from(descriptor: dict, directory: Path) -> RandomHadamard:
    rotation = RandomHadamard(int(descriptor["size"]), int(descriptor["seed"]))
    if rotation.kind != descriptor["kind"]:
        raise QuantbenchError(f"{directory}: a rotation of size {rotation.n} was saved as {descriptor['kind']!r}, "
                              f"but this quantbench builds {rotation.kind!r}; use the version that wrote it")
    return rotation


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _set_parameter(model: nn.Module, key: str, param: nn.Parameter) -> None:
    module_name, _, attr = key.rpartition(".")
    setattr(model.get_submodule(module_name), attr, param)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
