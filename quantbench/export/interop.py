"""What the interop exporters share: reading a native checkpoint, refusing layers a target format cannot
express (naming every one), and writing a Hugging Face model directory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint_reader import WEIGHTS_FILE, read_checkpoint
from quantbench.fsutil import atomic_directory, save_tensors
from quantbench.quantized_weight import QuantizedWeight, unpack_weight
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
    checkpoint = read_checkpoint(directory)
    tensors = checkpoint.load_tensors()
    layers = {name: unpack_weight(layer.scheme, layer.shape, {s: tensors.pop(f"{name}.{s}") for s in layer.layout})
              for name, layer in checkpoint.layers.items()}
    return NativeCheckpoint(checkpoint.directory, checkpoint.config, tensors, layers)


Unsupported = Callable[..., "str | None"]  # (scheme, shape, weight=None) → why the format cannot store it


def layer_problems(layers: dict, rotated, unsupported: Unsupported) -> dict[str, str]:
    """Why each layer a format cannot store is refused: an online rotation or activation quantization
    (no interop format runs those), else the format's own reason. `layers` maps a name to a stored weight,
    or to a (scheme, shape) pair when only the plan is known (preflight); the reasons that depend on the
    values (a GPTQ zero point of 0) are found only with a weight."""
    problems = {name: "rotates its input online (Hadamard)" for name in rotated}  # quantized or not
    for name, layer in layers.items():
        if name in problems:
            continue
        scheme, shape, weight = (layer[0], tuple(layer[1]), None) if isinstance(layer, tuple) else (
            layer.scheme, layer.shape, layer)
        if scheme.activations:
            problems[name] = f"quantizes its input to {scheme.activations}"
        elif (reason := unsupported(scheme, shape, weight)) is not None:
            problems[name] = reason
    return problems


def export_interop(source: str | Path | NativeCheckpoint, out_dir: str | Path, force: bool, target: str,
                   unsupported: Unsupported,
                   layer_tensors: Callable[[object], dict[str, torch.Tensor]],
                   quantization_config: Callable[[NativeCheckpoint], dict],
                   config_changes: Callable[[NativeCheckpoint], dict] | None = None) -> Path:
    """Refuse what `target` cannot store, else write every layer as `layer_tensors` packs it beside the
    dense tensors, under `quantization_config(native)` (and `config_changes(native)` in config.json)."""
    native = source if isinstance(source, NativeCheckpoint) else read_native(source)
    refuse_inexpressible(target, layer_problems(native.layers, native.rotated, unsupported))
    tensors = dict(native.dense)
    for name, weight in native.layers.items():
        for suffix, tensor in layer_tensors(weight).items():
            tensors[f"{name}.{suffix}"] = tensor
    changes = config_changes(native) if config_changes else {}
    return write_hf_directory(native, out_dir, tensors, quantization_config(native), force, changes)


def refuse_inexpressible(target: str, problems: dict[str, str]) -> None:
    """One error for every layer `target` cannot store, grouped by reason with counts and examples."""
    if not problems:
        return
    raise QuantbenchError(f"the {target} format cannot express {len(problems)} layer(s):\n"
                          + "\n".join(grouped_reasons(problems))
                          + f"\nquantize those layers with schemes {target} stores, or keep the native format")


def grouped_reasons(problems: dict[str, str], examples: int = 2) -> list[str]:
    """`  reason: N layers (a, b, …)`, most frequent reason first."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in sorted(problems.items()):
        by_reason.setdefault(reason, []).append(name)
    lines = []
    for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        shown = ", ".join(names[:examples]) + (", …" if len(names) > examples else "")
        lines.append(f"  {reason}: {len(names)} layer{'s' if len(names) > 1 else ''} ({shown})")
    return lines


def write_hf_directory(source: NativeCheckpoint, out_dir: str | Path, tensors: dict[str, torch.Tensor],
                       quantization_config: dict, force: bool, config_changes: dict | None = None) -> Path:
    """config.json with `quantization_config`, model.safetensors and the tokenizer files of the source."""
    out_dir = Path(out_dir)
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}
    config.update(config_changes or {})
    config["quantization_config"] = quantization_config
    with atomic_directory(out_dir, force, what="export directory") as tmp:
        save_tensors({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (source.directory / name).is_file():
                shutil.copy2(source.directory / name, tmp / name)
    return out_dir
