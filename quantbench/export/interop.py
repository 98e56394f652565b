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
from quantbench.experts import FUSED_ON_DISK
from quantbench.column_groups import TensorSpec
from quantbench.export.checkpoint_reader import INDEX_FILE, Checkpoint, CheckpointLayer, read_checkpoint
from quantbench.fsutil import atomic_directory, save_tensors
from quantbench.quantized_weight import unpack_weight

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


@dataclass
class NativeCheckpoint:
    """A checked native checkpoint, opened without reading its weights (they are read shard by shard)."""

    checkpoint: Checkpoint
    layers: dict[str, CheckpointLayer]  # scheme and shape of every quantized layer
    dense: dict[str, TensorSpec]  # shape and dtype of every tensor that is not a quantized layer's

    @property
    def directory(self) -> Path:
        return self.checkpoint.directory

    @property
    def config(self) -> dict:  # config.json, quantization_config included
        return self.checkpoint.config

    @property
    def qconfig(self) -> dict:
        return self.config["quantization_config"]

    @property
    def rotated(self) -> list[str]:
        return list(self.qconfig.get("rotations", {}))


def open_native(directory: str | Path) -> NativeCheckpoint:
    checkpoint = read_checkpoint(directory)
    packed = {f"{name}.{suffix}" for name, layer in checkpoint.layers.items() for suffix in layer.layout}
    return NativeCheckpoint(checkpoint, checkpoint.layers,
                            {key: spec for key, spec in checkpoint.header.items() if key not in packed})


Unsupported = Callable[..., "str | None"]  # (scheme, shape, weight=None) → why the format cannot store it


def family_problem(model_type: str | None) -> str | None:
    """Why no interop format can hold a family's checkpoint (None where they can): the experts that
    quantbench writes one by one, where the family's checkpoints and transformers read them fused."""
    if model_type not in FUSED_ON_DISK:
        return None
    return (f"{model_type!r} checkpoints store each block's experts as fused tensors, which transformers reads "
            "by those names alone, and this format writes them one expert at a time")


def refuse_family(target: str, model_type: str | None) -> None:
    if (problem := family_problem(model_type)) is not None:
        raise QuantbenchError(f"the {target} format cannot hold this model: {problem}; keep the native format")


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
                   config_changes: Callable[[NativeCheckpoint], dict] | None = None,
                   device: str | torch.device = "cpu") -> Path:
    """Refuse what `target` cannot store, else write every layer as `layer_tensors` packs it beside the
    dense tensors, under `quantization_config(native)` (and `config_changes(native)` in config.json).

    Shard by shard: each native shard becomes the export's shard of the same name, so no more than one
    shard is in host memory; its quantized layers are converted on `device`. What only the values show (a
    GPTQ zero point of 0) is gathered over every shard and refused at the end, before the export is put in
    place."""
    native = source if isinstance(source, NativeCheckpoint) else open_native(source)
    refuse_family(target, native.config.get("model_type"))
    planned = {name: (layer.scheme, layer.shape) for name, layer in native.layers.items()}
    refuse_inexpressible(target, layer_problems(planned, native.rotated, unsupported))
    out_dir = Path(out_dir)
    original = original_naming(native.config.get("model_type"))
    renamed = NativeCheckpoint(native.checkpoint, {original(name): layer for name, layer in native.layers.items()},
                               {original(key): spec for key, spec in native.dense.items()})
    config = {k: v for k, v in native.config.items() if k != "quantization_config"}
    config.update(config_changes(renamed) if config_changes else {})
    config["quantization_config"] = quantization_config(renamed)
    with atomic_directory(out_dir, force, what="export directory") as tmp:
        problems, mapping = {}, {}
        for shard in native.checkpoint.shards:
            tensors = native.checkpoint.load_shard(shard)
            names = [name for name, layer in native.layers.items()
                     if all(f"{name}.{suffix}" in tensors for suffix in layer.layout)]
            converted = {}
            for name in names:
                layer = native.layers[name]
                packed = {s: tensors.pop(f"{name}.{s}").to(device) for s in layer.layout}
                weight = unpack_weight(layer.scheme, layer.shape, packed)
                if found := layer_problems({name: weight}, [], unsupported):
                    problems.update(found)
                    continue
                converted.update({f"{original(name)}.{suffix}": t.cpu().contiguous()
                                  for suffix, t in layer_tensors(weight).items()})
            converted.update({original(k): v.cpu().contiguous() for k, v in tensors.items()})
            save_tensors(converted, tmp / shard, {"format": "pt"})
            mapping.update(dict.fromkeys(converted, shard))
        refuse_inexpressible(target, problems)
        if len(native.checkpoint.shards) > 1:
            total = sum((tmp / shard).stat().st_size for shard in native.checkpoint.shards)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name in COPIED_FILES:
            if (native.directory / name).is_file():
                shutil.copy2(native.directory / name, tmp / name)
    return out_dir


def original_naming(model_type: str | None) -> Callable[[str], str]:
    """Names as the family's original checkpoints spell them. transformers renames some modules on load
    (Mixtral's `block_sparse_moe` becomes `mlp`) and undoes that when it saves; serving engines such as vLLM
    read the original names. The inverse of transformers' own renamings for `model_type`."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    # a PrefixChange reads a multimodal checkpoint's language model (Qwen3.5's `model.language_model.`): the
    # export holds the language model alone, under its config, so it keeps the names that model saves
    renamings = [transform.reverse_transform() for transform in get_checkpoint_conversion_mapping(model_type) or []
                 if isinstance(transform, WeightRenaming) and not isinstance(transform, PrefixChange)]

    def original(name: str) -> str:
        for renaming in renamings:
            name = renaming.rename_source_key(name)[0]
        return name
    return original


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
