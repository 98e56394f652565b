"""Number formats: how values map to codes and back.

Every format offers the same interface, which RTN, GPTQ and export rely on: `fit` per-row parameters to
a group of columns, `encode`/`decode` with them, `store_scales`/`load_scales` for the checkpoint, and
`for_weight` to set per-tensor state (only NVFP4 has any: its `global_scale`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Union

import torch

from quantbench.formats.integer import GridParams, IntFormat
from quantbench.formats.mx import BLOCK_FORMATS, MXFormat, NVFP4Format

if TYPE_CHECKING:
    from quantbench.scheme import Scheme

Format = Union[IntFormat, MXFormat, NVFP4Format]


def format_for(scheme: "Scheme", global_scale: torch.Tensor | None = None) -> Format:
    """The weight format of `scheme`; NVFP4 takes its stored per-tensor scale (or gets one from
    `for_weight`)."""
    if scheme.format == "int":
        return IntFormat(bits=scheme.bits, symmetric=scheme.symmetric)
    fmt = BLOCK_FORMATS[scheme.format]
    return fmt if global_scale is None else replace(fmt, global_scale=global_scale.float())


__all__ = ["BLOCK_FORMATS", "Format", "GridParams", "IntFormat", "MXFormat", "NVFP4Format", "format_for"]
