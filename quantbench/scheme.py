"""`Scheme`: what one linear layer becomes (format, bits, grouping, solver, transform)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantbench.errors import QuantbenchError

SCALE_BITS = 16  # scales are stored as float16

_NAME_RE = re.compile(
    r"^(?P<format>int)(?P<bits>\d+)-(?:g(?P<group>\d+)|(?P<pc>pc))(?P<sym>-sym)?-(?P<solver>[a-z]+)$"
)


class Scheme(BaseModel):
    """A quantization scheme for one layer. Frozen and hashable.

    `group_size=None` means one scale (and zero) per output channel.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, gt=0)
    symmetric: bool = False
    solver: Literal["rtn"] = "rtn"
    transform: Literal["none"] = "none"

    @model_validator(mode="after")
    def _group_size_is_even(self) -> "Scheme":
        if self.group_size is not None and self.group_size % 8:
            raise ValueError(f"group_size {self.group_size} is not a multiple of 8; use 32, 64, 128 or null (per channel)")
        return self

    @property
    def name(self) -> str:
        grouping = f"g{self.group_size}" if self.group_size else "pc"
        sym = "-sym" if self.symmetric else ""
        return f"{self.format}{self.bits}-{grouping}{sym}-{self.solver}"

    def __str__(self) -> str:
        return self.name

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight, scales and zeros included, for a layer whose input dim the group divides.

        Per-channel schemes depend on the layer width; this property counts a 4096-wide row.
        `QuantizedWeight.bits_per_weight` is exact for a given layer.
        """
        group = self.group_size or 4096
        return self.bits + self.overhead_bits_per_group / group

    @property
    def overhead_bits_per_group(self) -> int:
        return SCALE_BITS + (0 if self.symmetric else self.bits)

    @classmethod
    def parse(cls, name: str) -> "Scheme":
        """Build a scheme from its canonical name, e.g. `int4-g128-rtn`, `int8-pc-sym-rtn`."""
        match = _NAME_RE.match(name.strip())
        if not match:
            raise QuantbenchError(
                f"scheme name {name!r} is not understood; write it like 'int4-g128-rtn' or 'int8-pc-sym-rtn'"
            )
        group = int(match["group"]) if match["group"] else None
        return cls(format=match["format"], bits=int(match["bits"]), group_size=group,
                   symmetric=bool(match["sym"]), solver=match["solver"])
