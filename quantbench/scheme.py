"""`Scheme`: what one linear layer becomes (format, bits, grouping, solver and its options)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantbench.errors import QuantbenchError

SCALE_BITS = 16  # scales are stored as float16
DEFAULT_DAMP = 0.01

_NAME_RE = re.compile(
    r"^(?P<format>int)(?P<bits>\d+)-(?:g(?P<group>\d+)|(?P<pc>pc))(?P<sym>-sym)?-(?P<solver>[a-z]+)"
    r"(?P<act>-act)?(?P<static>-static)?(?:-damp(?P<damp>[0-9.e-]+))?$"
)


class Scheme(BaseModel):
    """A quantization scheme for one layer. Frozen and hashable.

    `group_size=None` means one scale (and zero) per output channel. `act_order`, `static_groups` and
    `damp` are GPTQ options: process columns by descending Hessian diagonal; fit every group's grid
    before solving instead of when the group is reached; dampening as a fraction of mean(diag H).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["int"] = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, gt=0)
    symmetric: bool = False
    solver: Literal["rtn", "gptq"] = "rtn"
    transform: Literal["none"] = "none"
    act_order: bool = False
    static_groups: bool = False
    damp: float = Field(DEFAULT_DAMP, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Scheme":
        if self.group_size is not None and self.group_size % 8:
            raise ValueError(f"group_size {self.group_size} is not a multiple of 8; use 32, 64, 128 or null (per channel)")
        if self.solver != "gptq" and (self.act_order or self.static_groups or self.damp != DEFAULT_DAMP):
            raise ValueError("act_order, static_groups and damp are GPTQ options; set solver: gptq or drop them")
        if self.static_groups and self.group_size is None:
            raise ValueError("static_groups needs a group_size; per-channel grids are always fitted up front")
        return self

    @property
    def name(self) -> str:
        grouping = f"g{self.group_size}" if self.group_size else "pc"
        name = f"{self.format}{self.bits}-{grouping}{'-sym' if self.symmetric else ''}-{self.solver}"
        name += "-act" if self.act_order else ""
        name += "-static" if self.static_groups else ""
        name += f"-damp{self.damp:g}" if self.damp != DEFAULT_DAMP else ""
        return name

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
        """Build a scheme from its canonical name, e.g. `int4-g128-rtn`, `int8-pc-sym-rtn`, `int3-g128-gptq-act`."""
        match = _NAME_RE.match(name.strip())
        if not match:
            raise QuantbenchError(
                f"scheme name {name!r} is not understood; write it like 'int4-g128-rtn', 'int8-pc-sym-rtn' "
                "or 'int3-g128-gptq-act'"
            )
        fields = dict(format=match["format"], bits=int(match["bits"]), symmetric=bool(match["sym"]),
                      solver=match["solver"], group_size=int(match["group"]) if match["group"] else None)
        if match["act"]:
            fields["act_order"] = True
        if match["static"]:
            fields["static_groups"] = True
        if match["damp"]:
            fields["damp"] = float(match["damp"])
        try:
            return cls(**fields)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise QuantbenchError(f"scheme {name!r}: {reason}") from None
