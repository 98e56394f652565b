"""`RunResult` pieces: sizes of the quantized model, the environment, peak memory."""

from __future__ import annotations

import platform
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from quantbench.activations import input_rotation_of
from quantbench.quantized_weight import QuantizedWeight

PACKAGES = ("quantbench", "torch", "transformers", "datasets", "safetensors", "pydantic", "lm_eval", "pulp")


@dataclass(frozen=True)
class LayerSize:
    scheme: str
    numel: int
    storage_bits: int


def quantization_summary(model: nn.Module, quantized: dict[str, QuantizedWeight], linears: dict[str, nn.Linear]) -> dict:
    sizes = {name: LayerSize(q.scheme.name, q.numel, q.storage_bits) for name, q in quantized.items()}
    return summarize_layers(model, sizes, linears)


def summarize_layers(model: nn.Module, sizes: dict[str, LayerSize], linears: dict[str, nn.Linear],
                     rotations: dict[str, str] | None = None) -> dict:
    """Schemes used, average bits/weight and bytes: quantized layers packed, everything else as stored;
    `rotations` (layer → kind) where the model's own modules do not tell them.

    `model_bytes` puts every unquantized parameter at 16 bits, so models stored in fp32 and bf16 compare
    on one footing: `fp16` is the whole model in half precision, `quantized` the same with packed layers.
    """
    quantized_bits = sum(size.storage_bits for size in sizes.values())
    quantized_params = sum(size.numel for size in sizes.values())
    linear_params = sum(layer.weight.numel() for layer in linears.values())
    unique = distinct_parameters(model)
    replaced = [model.get_parameter(f"{name}.weight") for name in sizes]
    other_bytes = sum(p.numel() * p.element_size() for p in unique) - sum(
        p.numel() * p.element_size() for p in replaced)
    other_params = sum(p.numel() for p in unique) - sum(p.numel() for p in replaced)
    return {
        "schemes": dict(Counter(size.scheme for size in sizes.values())),
        "layers": {name: size.scheme for name, size in sizes.items()},
        "layer_bits": {name: size.storage_bits / size.numel for name, size in sizes.items()},
        "rotations": rotations if rotations is not None else {
            name: rotation.kind for name, module in model.named_modules()
            if (rotation := input_rotation_of(module)) is not None},
        "quantized_layers": len(sizes),
        "full_precision_linears": len(linears) - sum(1 for n in linears if n in sizes),
        "avg_bits_per_weight": quantized_bits / quantized_params if quantized_params else None,
        "block_linear_params": linear_params,
        "quantized_params": quantized_params,
        "weight_bytes": {
            "quantized_layers": quantized_bits // 8,
            "quantized_layers_fp16": quantized_params * 2,
            "other_params": other_bytes,
            "total": quantized_bits // 8 + other_bytes,
        },
        "model_bytes": {"fp16": (quantized_params + other_params) * 2,
                        "quantized": quantized_bits // 8 + other_params * 2},
        "compression_vs_fp16": (quantized_params * 16 / quantized_bits) if quantized_bits else None,
    }


def distinct_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each parameter once, however many modules share it (a tied embedding and lm_head)."""
    return list({p.data_ptr() or id(p): p for p in model.parameters()}.values())  # meta tensors have no data


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in distinct_parameters(model))


def environment(device: torch.device) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = version(package.replace("_", "-"))
        except PackageNotFoundError:
            versions[package] = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "git_revision": git_revision(),
    }


def git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
