"""The interop formats a native checkpoint exports to, by name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantbench.activations import input_rotation_of
from quantbench.export.compressed_tensors_format import (compressed_tensors_unsupported_reason,
                                                         export_compressed_tensors)
from quantbench.export.gptq_format import export_gptq, gptq_unsupported_reason
from quantbench.export.interop import layer_problems, refuse_family, refuse_inexpressible

NATIVE = "quantbench"
EXPORTERS = {"gptq": export_gptq, "compressed-tensors": export_compressed_tensors}
UNSUPPORTED = {"gptq": gptq_unsupported_reason, "compressed-tensors": compressed_tensors_unsupported_reason}


def check_expressible(target: str, model: nn.Module, quantized: dict) -> None:
    """Refuse the layers of an in-memory quantized model `target` cannot store."""
    if target == NATIVE:
        return
    refuse_family(target, model.config.model_type)
    rotated = [name for name, module in model.named_modules() if input_rotation_of(module) is not None]
    refuse_inexpressible(target, layer_problems(quantized, rotated, UNSUPPORTED[target]))


def planned_problems(target: str, layers: dict[str, tuple], rotated) -> dict[str, str]:
    """Before any work: why `target` could not store the planned (scheme, shape) of each layer."""
    return {} if target == NATIVE else layer_problems(layers, rotated, UNSUPPORTED[target])


def export_checkpoint(target: str, source: str | Path, out_dir: str | Path, force: bool = False,
                      device: str | torch.device = "cpu") -> Path:
    """Convert a native checkpoint to `target`, shard by shard on `device`."""
    return EXPORTERS[target](source, out_dir, force, device)
