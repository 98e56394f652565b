"""The interop formats a native checkpoint exports to, by name."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from quantbench.activations import input_rotation_of
from quantbench.export.compressed_tensors_format import (compressed_tensors_unsupported_reason,
                                                         export_compressed_tensors)
from quantbench.export.gptq_format import export_gptq, gptq_unsupported_reason
from quantbench.export.interop import refuse_inexpressible

NATIVE = "quantbench"
EXPORTERS = {"gptq": export_gptq, "compressed-tensors": export_compressed_tensors}
UNSUPPORTED = {"gptq": gptq_unsupported_reason, "compressed-tensors": compressed_tensors_unsupported_reason}


def check_expressible(target: str, model: nn.Module, quantized: dict) -> None:
    """Refuse, before any long work continues, the layers of an in-memory quantized model `target`
    cannot store."""
    if target == NATIVE:
        return
    problems = {}
    for name, weight in quantized.items():
        if input_rotation_of(model.get_submodule(name)) is not None:
            problems[name] = "rotates its input online (Hadamard)"
        elif weight.scheme.activations:
            problems[name] = f"quantizes its input to {weight.scheme.activations}"
        elif (reason := UNSUPPORTED[target](weight)) is not None:
            problems[name] = reason
    refuse_inexpressible(target, problems)


def export_checkpoint(target: str, source: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    return EXPORTERS[target](source, out_dir, force)
