"""`Scheme`: what one linear layer becomes (format, bits, grouping, solver and its options)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantbench.errors import QuantbenchError
from quantbench.formats.mx import BLOCK_FORMATS

SCALE_BITS_FP16 = 16  # integer grids and trit planes store float16 scales
DEFAULT_DAMP = 0.01
FORMAT_ALIASES = {"mxfp8": "mxfp8e4m3", "mxfp6": "mxfp6e2m3"}
TRIT_BITS = 8 / 5  # five trits per byte
WeightFormat = Literal["int", "ternary", "mxfp4", "mxfp6e2m3", "mxfp6e3m2", "mxfp8e4m3", "mxfp8e5m2", "mxint8", "nvfp4"]
ActivationFormat = Literal["mxfp4", "mxfp6e2m3", "mxfp6e3m2", "mxfp8e4m3", "mxfp8e5m2", "mxint8", "nvfp4",
                           "int8", "int4"]

_BLOCK_NAMES = "|".join(sorted([*BLOCK_FORMATS, *FORMAT_ALIASES], key=len, reverse=True))
_NAME_RE = re.compile(
    r"^(?:(?P<scaling>awq|smoothquant)\+)?(?:(?P<transform>hadamard)(?:-s(?P<rotation_seed>\d+))?\+)?"
    rf"(?:(?P<block>{_BLOCK_NAMES})|(?P<format>int)(?P<bits>\d+)-(?:g(?P<group>\d+)|(?P<pc>pc))(?P<sym>-sym)?"
    r"|ternary(?P<planes>\d)(?:-g(?P<ternary_group>\d+)|-pc)?)"
    r"-(?P<solver>[a-z]+)(?P<act>-act)?(?P<static>-static)?(?P<aware>-aw)?(?:-damp(?P<damp>[0-9.e-]+))?"
    r"(?:-a:(?P<activations>[a-z0-9]+))?$"
)


class Scheme(BaseModel):
    """A quantization scheme for one layer. Frozen and hashable.

    `format` is an integer grid (`int`, with `bits`, `group_size` and `symmetric`) or a block format
    (MX or NVFP4), whose element width and block size are fixed: `bits` and `group_size` follow from it.
    `group_size=None` means one scale (and zero) per output channel. `act_order`, `static_groups` and
    `damp` are GPTQ options: process columns by descending Hessian diagonal; fit every group's grid
    before solving instead of when the group is reached; dampening as a fraction of mean(diag H).
    `activations` quantizes the layer's input on the fly (simulated): an MX/NVFP4 format in blocks along
    the hidden dimension of each token, or `int8`/`int4` symmetric per token.
    `ternary` is PTQTP's sum of `planes` ternary planes, each with a float16 scale per row (or per group);
    `activation_aware` weights its objective by the layer's input energy per column (diag H).
    `transform: hadamard` quantizes W·R instead of W, R a randomised Hadamard rotation (seeded by
    `rotation_seed`) that the layer applies to its input online (see quantizers/hadamard.py); the name
    gets a `hadamard+` prefix (`hadamard-s<seed>+` for a seed other than 0).
    `scaling` scales the layer's input channels by 1/s and its weight columns by s before it is quantized,
    s folded into the operation that produces the input (scaling.py), so nothing runs online: `awq`
    searches s for the least block output error and clips each group's range, `smoothquant` moves
    activation outliers into the weights. The name gets an `awq+` or `smoothquant+` prefix.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: WeightFormat = "int"
    bits: int = Field(4, ge=2, le=8)
    group_size: int | None = Field(128, gt=0)
    symmetric: bool = False
    solver: Literal["rtn", "gptq", "ptqtp", "autoround"] = "rtn"
    transform: Literal["none", "hadamard"] = "none"
    scaling: Literal["none", "awq", "smoothquant"] = "none"
    rotation_seed: int = Field(0, ge=0)
    act_order: bool = False
    static_groups: bool = False
    damp: float = Field(DEFAULT_DAMP, gt=0, le=1)
    activations: ActivationFormat | None = None
    planes: Literal[1, 2] = 2
    activation_aware: bool = False

    @model_validator(mode="before")
    @classmethod
    def _implied_fields(cls, data: Any) -> Any:
        """Aliases resolved; block formats fix bits, block size and sign; ternary defaults to PTQTP per row."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key in ("format", "activations"):
            if isinstance(data.get(key), str):
                data[key] = FORMAT_ALIASES.get(data[key], data[key])
        if data.get("format") == "ternary":
            data.setdefault("group_size", None)
            data.setdefault("solver", "ptqtp")
            data.setdefault("symmetric", True)
        fmt = BLOCK_FORMATS.get(data["format"]) if isinstance(data.get("format"), str) else None
        if fmt is None:
            return data
        implied = {"bits": fmt.bits, "group_size": fmt.block_size, "symmetric": True}
        for key, value in implied.items():
            if data.setdefault(key, value) != value:
                raise ValueError(f"{fmt.name} fixes {key} to {value}; drop {key} (got {data[key]!r})")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Scheme":
        if self.group_size is not None and self.group_size % 8:
            raise ValueError(f"group_size {self.group_size} is not a multiple of 8; use 32, 64, 128 or null (per channel)")
        if self.solver != "gptq" and (self.act_order or self.static_groups or self.damp != DEFAULT_DAMP):
            raise ValueError("act_order, static_groups and damp are GPTQ options; set solver: gptq or drop them")
        if self.static_groups and self.group_size is None:
            raise ValueError("static_groups needs a group_size; per-channel grids are always fitted up front")
        if (self.format == "ternary") != (self.solver == "ptqtp"):
            raise ValueError("the ternary format is fitted by the ptqtp solver and ptqtp fits only ternary planes "
                             "(write e.g. ternary2-ptqtp or ternary2-g128-ptqtp)")
        if self.format != "ternary" and self.planes != 2:
            raise ValueError("planes is a ternary option; set format: ternary or drop it")
        if self.activation_aware and self.solver != "ptqtp":
            raise ValueError("activation_aware is a ptqtp option (GPTQ is activation-aware by construction)")
        if self.transform == "none" and self.rotation_seed:
            raise ValueError("rotation_seed seeds the hadamard transform; set transform: hadamard or drop it")
        if self.scaling != "none" and self.format == "ternary":
            raise ValueError(f"{self.scaling} scaling searches with the format's round-to-nearest grid; the "
                             "ternary planes have none (use it with int, MX or NVFP4 formats)")
        if self.scaling == "smoothquant" and self.activations is None:
            raise ValueError("smoothquant moves activation outliers into the weights, which helps only when the "
                             "activations are quantized: add activations (e.g. smoothquant+int8-pc-sym-rtn-a:int8)")
        if self.is_block_format and self.act_order and not self.static_groups:
            raise ValueError(f"{self.format} blocks are contiguous columns: act_order needs static_groups "
                             f"(write {self.format}-gptq-act-static)")
        return self

    @property
    def family(self) -> str:
        """The kind of kernel that serves it: `int` (integer grids), `mx` (OCP MX), `nvfp4`, `ternary`."""
        if self.format.startswith("mx"):
            return "mx"
        return self.format

    @property
    def is_block_format(self) -> bool:
        return self.format in BLOCK_FORMATS

    @property
    def learns_from_block(self) -> bool:
        """Whether it acts on its whole block with the whole calibration set at once: a scaling transform
        (AWQ, SmoothQuant) or AutoRound's learned rounding."""
        return self.scaling != "none" or self.solver == "autoround"

    @property
    def name(self) -> str:
        if self.is_block_format:
            name = f"{self.format}-{self.solver}"
        elif self.format == "ternary":
            name = f"ternary{self.planes}{f'-g{self.group_size}' if self.group_size else ''}-{self.solver}"
        else:
            grouping = f"g{self.group_size}" if self.group_size else "pc"
            name = f"{self.format}{self.bits}-{grouping}{'-sym' if self.symmetric else ''}-{self.solver}"
        name += "-act" if self.act_order else ""
        name += "-static" if self.static_groups else ""
        name += "-aw" if self.activation_aware else ""
        name += f"-damp{self.damp:g}" if self.damp != DEFAULT_DAMP else ""
        name += f"-a:{self.activations}" if self.activations else ""
        if self.transform == "hadamard":
            name = f"hadamard{f'-s{self.rotation_seed}' if self.rotation_seed else ''}+{name}"
        if self.scaling != "none":
            name = f"{self.scaling}+{name}"
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
        if self.format == "ternary":
            return self.planes * (TRIT_BITS + SCALE_BITS_FP16 / group)
        return self.bits + self.overhead_bits_per_group / group

    @property
    def scale_bits(self) -> int:
        return BLOCK_FORMATS[self.format].scale_bits if self.is_block_format else SCALE_BITS_FP16

    @property
    def has_zero_points(self) -> bool:
        return not self.is_block_format and not self.symmetric

    @property
    def overhead_bits_per_group(self) -> int:
        return self.scale_bits + (self.bits if self.has_zero_points else 0)

    @classmethod
    def parse(cls, name: str) -> "Scheme":
        """Build a scheme from its canonical name, e.g. `int4-g128-rtn`, `int8-pc-sym-rtn`, `int3-g128-gptq-act`,
        `mxfp4-rtn`, `nvfp4-gptq`, `mxfp8e4m3-rtn-a:mxfp8e4m3` (weights and activations), `hadamard+int3-g128-gptq`,
        `awq+int4-g128-gptq`, `smoothquant+int8-pc-sym-rtn-a:int8`."""
        match = _NAME_RE.match(name.strip())
        if not match:
            raise QuantbenchError(
                f"scheme name {name!r} is not understood; write it like 'int4-g128-rtn', 'int8-pc-sym-rtn', "
                "'int3-g128-gptq-act', 'mxfp4-rtn', 'mxfp8e4m3-rtn-a:mxfp8e4m3', 'ternary2-g128-ptqtp' or "
                "'hadamard+int3-g128-gptq', 'awq+int4-g128-rtn' (block formats: "
                f"{', '.join(BLOCK_FORMATS)})"
            )
        if match["block"]:
            fields = dict(format=match["block"], solver=match["solver"])
        elif match["planes"]:
            fields = dict(format="ternary", planes=int(match["planes"]), solver=match["solver"],
                          group_size=int(match["ternary_group"]) if match["ternary_group"] else None)
        else:
            fields = dict(format=match["format"], bits=int(match["bits"]), symmetric=bool(match["sym"]),
                          solver=match["solver"], group_size=int(match["group"]) if match["group"] else None)
        if match["activations"]:
            fields["activations"] = match["activations"]
        if match["act"]:
            fields["act_order"] = True
        if match["static"]:
            fields["static_groups"] = True
        if match["aware"]:
            fields["activation_aware"] = True
        if match["damp"]:
            fields["damp"] = float(match["damp"])
        if match["scaling"]:
            fields["scaling"] = match["scaling"]
        if match["transform"]:
            fields["transform"] = match["transform"]
            fields["rotation_seed"] = int(match["rotation_seed"] or 0)
        try:
            return cls(**fields)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise QuantbenchError(f"scheme {name!r}: {reason}") from None
