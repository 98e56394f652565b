"""What the interop exporters share: reading a native checkpoint, refusing layers a target format cannot
express (naming every one), and writing a Hugging Face model directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint import PACKED_SUFFIXES, WEIGHTS_FILE, read_quantization_config
from quantbench.fsutil import atomic_directory
from quantbench.quantized_weight import QuantizedWeight, unpack_weight
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass
class NativeCheckpoint:
    directory: Path
    config: dict  # config.json, quantization_config included
    dense: dict[str, torch.Tensor]  # every tensor that is not a quantized layer's
    layers: dict[str, QuantizedWeight | TritPlaneWeight]

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    @property
    def rotated(self) -> list[str]:
        return list(self.qconfig.get("rotations", {}))


def read_native(directory: str | Path) -> NativeCheckpoint:
    directory = Path(directory)
    qconfig = read_quantization_config(directory)
    config = json.loads((directory / "config.json").read_text())
    tensors = load_file(str(directory / WEIGHTS_FILE))
    layers = {}
    for name, entry in qconfig["layers"].items():
        scheme = Scheme(**{k: v for k, v in entry.items() if k in Scheme.model_fields})
        packed = {s: tensors.pop(f"{name}.{s}") for s in PACKED_SUFFIXES if f"{name}.{s}" in tensors}
        layers[name] = unpack_weight(scheme, tuple(entry["shape"]), packed)
    return NativeCheckpoint(directory, config, tensors, layers)


def layer_problems(layers: dict, rotated, unsupported: Callable[[object], str | None]) -> dict[str, str]:
    """Why each layer a format cannot store is refused: an online rotation or activation quantization
    (no interop format runs those), else the format's own `unsupported(weight)` reason."""
    problems = {name: "rotates its input online (Hadamard)" for name in rotated}  # quantized or not
    for name, weight in layers.items():
        if name in problems:
            continue
        if weight.scheme.activations:
            problems[name] = f"quantizes its input to {weight.scheme.activations}"
        elif (reason := unsupported(weight)) is not None:
            problems[name] = reason
    return problems


def export_interop(source: str | Path | NativeCheckpoint, out_dir: str | Path, force: bool, target: str,
                  unsupported: Callable[[object], str | None],
                  layer_tensors: Callable[[object], dict[str, torch.Tensor]],
                  quantization_config: Callable[[NativeCheckpoint], dict]) -> Path:
    """Refuse what `target` cannot store, else write every layer as `layer_tensors` packs it beside the
    dense tensors, under `quantization_config(native)`."""
    native = source if isinstance(source, NativeCheckpoint) else read_native(source)
    refuse_inexpressible(target, layer_problems(native.layers, native.rotated, unsupported))
    tensors = dict(native.dense)
    for name, weight in native.layers.items():
        for suffix, tensor in layer_tensors(weight).items():
            tensors[f"{name}.{suffix}"] = tensor
    return write_hf_directory(native, out_dir, tensors, quantization_config(native), force)


def refuse_inexpressible(target: str, problems: dict[str, str]) -> None:
    """One error naming every layer `target` cannot store and why."""
    if not problems:
        return
    lines = [f"  {name}: {why}" for name, why in sorted(problems.items())]
    shown = lines[:20] + ([f"  … and {len(lines) - 20} more"] if len(lines) > 20 else [])
    raise QuantbenchError(f"the {target} format cannot express {len(problems)} layer(s) of this checkpoint:\n"
                          + "\n".join(shown)
                          + f"\nre-quantize those layers with schemes {target} stores, or export the native format")


def write_hf_directory(source: NativeCheckpoint, out_dir: str | Path, tensors: dict[str, torch.Tensor],
                       quantization_config: dict, force: bool) -> Path:
    """config.json with `quantization_config`, model.safetensors and the tokenizer files of the source."""
    out_dir = Path(out_dir)
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    config["quantization_config"] = quantization_config
    with atomic_directory(out_dir, force, what="export directory") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (source.directory / name).is_file():
                shutil.copy2(source.directory / name, tmp / name)
    return out_dir
