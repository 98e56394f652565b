"""Reading a native checkpoint without trusting it: config.json, its quantization_config and the
safetensors header are checked against each other (and against the model the config describes) before a
byte of weights is read. Anything that does not fit is one line naming the checkpoint, the part and the
problem."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import ValidationError

from quantbench.column_groups import TensorSpec
from quantbench.errors import QuantbenchError
from quantbench.quantized_weight import packed_layout
from quantbench.scheme import Scheme

QUANT_METHOD = "quantbench"
FORMAT_VERSION = 2  # 2: online input rotations; version 1 checkpoints (none) still load
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint: {"metadata", "weight_map": {key: shard}}
RUN_CHECKPOINT_DIR = "checkpoint"  # where a run directory keeps its exported checkpoint
PACKED_SUFFIXES = ("qweight", "scales", "qzeros", "g_idx", "global_scale")
SAFETENSORS_DTYPES = {"I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                      "F64": torch.float64, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}


@dataclass
class CheckpointLayer:
    name: str
    scheme: Scheme
    shape: tuple[int, int]
    layout: dict[str, TensorSpec]

    @property
    def stored_bytes(self) -> int:
        return sum(spec.nbytes for spec in self.layout.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / (self.shape[0] * self.shape[1])


@dataclass
class Checkpoint:
    """A checked native checkpoint: its config, quantized layers and the stored tensors' specs."""

    directory: Path
    config: dict
    layers: dict[str, CheckpointLayer]
    header: dict[str, TensorSpec] = field(repr=False)

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    @property
    def shards(self) -> list[str]:
        """The safetensors files holding the weights, in order (one for an unsharded checkpoint)."""
        return weight_files(self.directory)

    def load_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for shard in self.shards:
            tensors.update(self.load_shard(shard))
        return tensors

    def iter_tensors(self, device: str | torch.device = "cpu"):
        """(key, tensor) for every stored tensor, shard by shard, each read from the memory-mapped file
        straight onto `device` when its turn comes."""
        from safetensors import SafetensorError, safe_open

        for shard in self.shards:
            try:
                with safe_open(str(self.directory / shard), framework="pt", device=str(device)) as handle:
                    for key in handle.keys():
                        yield key, handle.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise damaged(self.directory, f"{shard} cannot be read ({exc})") from None

    def load_shard(self, shard: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.directory / shard), device=str(device))
        except (SafetensorError, OSError) as exc:
            raise damaged(self.directory, f"{shard} cannot be read ({exc})") from None


def damaged(directory: Path, problem: str) -> QuantbenchError:
    return QuantbenchError(f"checkpoint {directory} is damaged: {problem}; write it again (quantbench run, or "
                           "save_quantized)")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run directory stands for the checkpoint it holds; any other path stands for itself."""
    path = Path(path)
    return path / RUN_CHECKPOINT_DIR if (path / RUN_CHECKPOINT_DIR).is_dir() else path


def is_quantbench_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a native checkpoint; a config.json that cannot be read is an error."""
    if not (Path(directory) / "config.json").is_file():
        return False
    qconfig = _read_config(Path(directory)).get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD


def read_quantization_config(directory: str | Path) -> dict:
    return read_checkpoint(directory).qconfig


def checkpoint_layers(directory: str | Path) -> list[CheckpointLayer]:
    """Per-layer scheme, shape and stored bytes, from the checked headers (no weights loaded)."""
    return list(read_checkpoint(directory).layers.values())


def read_checkpoint(directory: str | Path, check_model: bool = True) -> Checkpoint:
    """Check a native checkpoint's config, quantization_config and tensor header against each other and,
    with `check_model`, every quantized layer against the model its config builds (on the meta device)."""
    directory = Path(directory)
    config = _read_config(directory)
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        raise QuantbenchError(f"{directory} is not a quantbench checkpoint (config.json has no quantbench "
                              "quantization_config); load plain models with transformers")
    if qconfig.get("version") not in READABLE_VERSIONS:
        raise QuantbenchError(f"{directory}: checkpoint format version {qconfig.get('version')} is not supported "
                              f"(this quantbench reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
                              "upgrade quantbench")
    entries = qconfig.get("layers")
    if not isinstance(entries, dict):
        raise damaged(directory, "config.json's quantization_config has no `layers` mapping")
    layers = {name: _layer(directory, name, entry) for name, entry in entries.items()}
    header = _read_header(directory)
    for layer in layers.values():
        _check_tensors(directory, layer, header)
    stray = sorted(key for key in header if key.endswith(".qweight") and key.removesuffix(".qweight") not in layers)
    if stray:
        raise damaged(directory, f"{WEIGHTS_FILE} holds packed tensors of layers config.json does not list "
                      f"({', '.join(stray[:3])})")
    if check_model:
        _check_model_shapes(directory, config, layers)
    return Checkpoint(directory, config, layers, header)


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise QuantbenchError(f"{directory} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(directory, f"config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise damaged(directory, "config.json is not a JSON object")
    return config


def _layer(directory: Path, name: str, entry) -> CheckpointLayer:
    where = f"config.json layer {name}"
    if not isinstance(entry, dict):
        raise damaged(directory, f"{where} is not a mapping")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise damaged(directory, f"{where}: shape {shape!r} is not [out_features, in_features]")
    try:
        scheme = Scheme(**{k: v for k, v in entry.items() if k in Scheme.model_fields})
    except (ValidationError, TypeError) as exc:
        reason = exc.errors()[0] if isinstance(exc, ValidationError) else None
        detail = (f"{'.'.join(map(str, reason['loc'])) or 'scheme'}: {reason['msg'].removeprefix('Value error, ')}"
                  if reason else str(exc))
        raise damaged(directory, f"{where}: {detail}") from None
    return CheckpointLayer(name, scheme, tuple(shape), packed_layout(scheme, tuple(shape)))


def weight_map(directory: Path) -> dict[str, str] | None:
    """A sharded checkpoint's index: tensor name → shard file; None for a single model.safetensors."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        mapping = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise damaged(Path(directory), f"{INDEX_FILE} is not a safetensors index ({exc})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and "/" not in v for v in mapping.values()):
        raise damaged(Path(directory), f"{INDEX_FILE}'s weight_map does not map tensor names to shard files")
    return mapping


def weight_files(directory: Path) -> list[str]:
    mapping = weight_map(directory)
    return [WEIGHTS_FILE] if mapping is None else sorted(set(mapping.values()))


def _read_header(directory: Path) -> dict[str, TensorSpec]:
    from safetensors import SafetensorError, safe_open

    mapping = weight_map(directory)
    header = {}
    for shard in weight_files(directory):
        path = directory / shard
        if not path.is_file():
            raise damaged(directory, f"{shard} is missing")
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    if mapping is not None and mapping.get(key) != shard:
                        raise damaged(directory, f"{shard} holds {key}, which {INDEX_FILE} places elsewhere")
                    tensor = handle.get_slice(key)
                    dtype = SAFETENSORS_DTYPES.get(tensor.get_dtype())
                    header[key] = TensorSpec(tuple(tensor.get_shape()), dtype)
        except (SafetensorError, OSError) as exc:
            raise damaged(directory, f"{shard} cannot be read ({exc}); it may be truncated") from None
    if mapping is not None and (lost := sorted(set(mapping) - set(header))):
        raise damaged(directory, f"{INDEX_FILE} lists {len(lost)} tensor(s) no shard holds ({', '.join(lost[:3])})")
    return header


def _check_tensors(directory: Path, layer: CheckpointLayer, header: dict[str, TensorSpec]) -> None:
    for suffix, expected in layer.layout.items():
        found = header.get(f"{layer.name}.{suffix}")
        if found is None:
            raise damaged(directory, f"{layer.name}.{suffix} is missing from {WEIGHTS_FILE}")
        if found != expected:
            raise damaged(directory, f"{layer.name}.{suffix} is {_describe(found)} in {WEIGHTS_FILE}, but "
                          f"{layer.scheme.name} on a {layer.shape[0]}×{layer.shape[1]} layer stores "
                          f"{_describe(expected)}")
    extra = [f"{layer.name}.{suffix}" for suffix in PACKED_SUFFIXES
             if f"{layer.name}.{suffix}" in header and suffix not in layer.layout]
    if extra:
        raise damaged(directory, f"{', '.join(extra)} in {WEIGHTS_FILE} do not belong to {layer.scheme.name}")


def _describe(spec: TensorSpec) -> str:
    dtype = str(spec.dtype).removeprefix("torch.") if spec.dtype is not None else "an unknown dtype"
    return f"{dtype} {list(spec.shape)}"


def _check_model_shapes(directory: Path, config: dict, layers: dict[str, CheckpointLayer]) -> None:
    """Every quantized layer is a Linear of the model config.json describes, with the recorded shape."""
    from quantbench.model_io import meta_model

    try:
        model = meta_model({k: v for k, v in config.items() if k != "quantization_config"})
    except QuantbenchError as exc:
        raise damaged(directory, f"config.json does not describe a model this quantbench builds ({exc})") from None
    for layer in layers.values():
        try:
            module = model.get_submodule(layer.name)
        except AttributeError:
            raise damaged(directory, f"config.json lists layer {layer.name}, which its model does not have") from None
        shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if shape != layer.shape:
            raise damaged(directory, f"layer {layer.name} is recorded as {layer.shape[0]}×{layer.shape[1]}, but "
                          f"the model has {shape[0]}×{shape[1]}")
