"""What `eval` and `generate` take as a model: a hub id, a model folder, a quantbench checkpoint or a run
directory (which stands for the checkpoint it holds)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantbench.errors import QuantbenchError


@dataclass
class LoadedTarget:
    model: nn.Module
    tokenizer: object
    checkpoint: Path | None  # the quantbench checkpoint's folder; None for a plain model


def load_target(target: str, device: torch.device, dtype: torch.dtype | None, kernels: bool = False) -> LoadedTarget:
    """A checkpoint is loaded onto `device` (`load_quantized`; with `kernels` its packed layers run through the
    packed-weight kernels); a plain model is loaded on the CPU in `dtype` (None: the device's default), to be
    moved by the caller."""
    from quantbench.export.checkpoint import is_quantbench_checkpoint, load_quantized, resolve_checkpoint_dir
    from quantbench.model_io import load_model, load_tokenizer, resolve_dtype

    path = resolve_checkpoint_dir(target)
    if is_quantbench_checkpoint(path):
        return LoadedTarget(load_quantized(path, device, dtype, kernels=kernels), load_tokenizer(str(path)), path)
    if (path / "result.json").is_file():
        raise QuantbenchError(f"{target} is a run directory without a checkpoint (its recipe had export.enabled: "
                              "false); rerun it with export enabled, or name the base model")
    if kernels:
        raise QuantbenchError(f"--kernels runs a quantbench checkpoint's packed layers; {target} is not one")
    model, tokenizer = load_model(target, dtype or resolve_dtype("auto", device))
    return LoadedTarget(model, tokenizer, None)
