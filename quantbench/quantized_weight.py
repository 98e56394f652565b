"""`QuantizedWeight`: what every quantizer returns and export consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantbench.column_groups import ColumnGroups, TensorSpec, layout_bits
from quantbench.formats import Format, GridParams, format_for
from quantbench.formats.packing import pack_bits, pack_bytes, packed_words, unpack_bits, unpack_bytes
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight


@dataclass
class QuantizedWeight(ColumnGroups):
    """Codes of a [out, in] weight with per-(row, group) scales and zeros.

    codes: uint8 [out, in]. Integer grids: scales float16 [out, n_groups]; zeros uint8 [out, n_groups], or
    None for symmetric schemes (zero is 2^(bits−1)). Block formats: element codes (sign-magnitude, or
    two's complement for MXINT8), scales uint8 [out, n_blocks] holding E8M0 exponents (MX) or E4M3 codes
    (NVFP4), no zeros, and for NVFP4 the float32 per-tensor `global_scale` [1]. Without `g_idx`, group g
    covers input columns [g·G, (g+1)·G) (the last group may be shorter when G does not divide `in`).
    With `g_idx` (int32 [in], as GPTQ's act_order produces), column c belongs to group g_idx[c].
    """

    scheme: Scheme
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    @classmethod
    def from_params(cls, scheme: Scheme, fmt: Format, codes: torch.Tensor, params: GridParams,
                    g_idx: torch.Tensor | None = None) -> "QuantizedWeight":
        """Build from float codes and per-group parameters shaped [out, n_groups], as `fmt` fitted them."""
        return cls(
            scheme=scheme,
            codes=codes.to(torch.uint8).contiguous(),
            scales=fmt.store_scales(params.scale).contiguous(),
            zeros=params.zero.to(torch.uint8).contiguous() if fmt.has_zero_points else None,
            g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
            global_scale=fmt.global_scale,
        )

    @property
    def format(self) -> Format:
        return format_for(self.scheme, self.global_scale)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The format's decode (`(code − zero) · scale` for integer grids) in float32, then cast to `dtype`."""
        fmt = self.format
        scale = fmt.load_scales(self.scales)
        zero = self.zeros.float() if self.zeros is not None else fmt.implied_zero(scale)
        if self.g_idx is not None:
            index = self.g_idx.long()
            return fmt.decode(self.codes, GridParams(scale=scale[:, index], zero=zero[:, index])).to(dtype)
        out_features, in_features = self.shape
        group, n_groups = self.group_size, self.n_groups
        codes = self.codes
        if n_groups * group != in_features:
            codes = torch.nn.functional.pad(codes, (0, n_groups * group - in_features))
        params = GridParams(scale=scale.unsqueeze(-1), zero=zero.unsqueeze(-1))
        weight = fmt.decode(codes.view(out_features, n_groups, group), params)
        return weight.view(out_features, n_groups * group)[:, :in_features].to(dtype)

    @staticmethod
    def layout(scheme: Scheme, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        """The tensors `pack` writes for a layer of this scheme and shape: name → shape and dtype."""
        out_features, in_features = shape
        n_groups = math.ceil(in_features / (scheme.group_size or in_features))
        if scheme.is_block_format:
            specs = {"qweight": TensorSpec((out_features, math.ceil(in_features * scheme.bits / 8)), torch.uint8),
                     "scales": TensorSpec((out_features, n_groups), torch.uint8)}
            if scheme.format == "nvfp4":
                specs["global_scale"] = TensorSpec((1,), torch.float32)
            return specs
        specs = {"qweight": TensorSpec((out_features, packed_words(in_features, scheme.bits)), torch.int32),
                 "scales": TensorSpec((out_features, n_groups), torch.float16)}
        if scheme.has_zero_points:
            specs["qzeros"] = TensorSpec((out_features, packed_words(n_groups, scheme.bits)), torch.int32)
        if scheme.act_order and scheme.group_size is not None and not scheme.static_groups:
            specs["g_idx"] = TensorSpec((in_features,), torch.int32)  # groups formed in act_order's column order
        return specs

    @property
    def storage_bits(self) -> int:
        """Bits this layer takes in a checkpoint: its packed tensors, padding included (see `layout`)."""
        return layout_bits(self.layout(self.scheme, self.shape))

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.codes.numel()

    def pack(self) -> dict[str, torch.Tensor]:
        """Tensors as stored in a checkpoint. Integer grids: bit-packed int32 `qweight` (and `qzeros`),
        float16 `scales`, int32 `g_idx` when columns are grouped out of order. Block formats, as
        compressed-tensors lays them out: `qweight` uint8 [out, in·bits/8] (FP4: two codes per byte,
        element 0 in the low nibble), `scales` uint8 [out, in/block], NVFP4's float32 `global_scale` [1]."""
        pack = pack_bytes if self.scheme.is_block_format else pack_bits
        tensors = {"qweight": pack(self.codes, self.scheme.bits), "scales": self.scales.contiguous()}
        if self.zeros is not None:
            tensors["qzeros"] = pack_bits(self.zeros, self.scheme.bits)
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx.contiguous()
        if self.global_scale is not None:
            tensors["global_scale"] = self.global_scale.float().contiguous()
        return tensors

    @classmethod
    def unpack(cls, scheme: Scheme, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> "QuantizedWeight":
        out_features, in_features = shape
        unpack = unpack_bytes if scheme.is_block_format else unpack_bits
        codes = unpack(tensors["qweight"], scheme.bits, in_features)
        scales = tensors["scales"]
        zeros = None
        if scheme.has_zero_points:
            zeros = unpack_bits(tensors["qzeros"], scheme.bits, scales.shape[1])
        if codes.shape[0] != out_features or scales.shape[0] != out_features:
            raise ValueError(f"packed tensors do not match shape {shape}")
        return cls(scheme=scheme, codes=codes, scales=scales, zeros=zeros, g_idx=tensors.get("g_idx"),
                   global_scale=tensors.get("global_scale"))

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """Split a weight quantized as stacked layers back into the layers (rows are independent)."""
        def parts(t):
            return [None] * len(sizes) if t is None else list(t.split(sizes))
        def copy(t):
            return None if t is None else t.clone()
        return [QuantizedWeight(self.scheme, c.contiguous(), s.contiguous(), None if z is None else z.contiguous(),
                                copy(self.g_idx), copy(self.global_scale))
                for c, s, z in zip(parts(self.codes), parts(self.scales), parts(self.zeros))]

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(self.scheme, move(self.codes), move(self.scales), move(self.zeros), move(self.g_idx),
                               move(self.global_scale))


def stored_kind(scheme: Scheme) -> type[QuantizedWeight] | type[TritPlaneWeight]:
    return TritPlaneWeight if scheme.format == "ternary" else QuantizedWeight


def packed_layout(scheme: Scheme, shape: tuple[int, int]) -> dict[str, TensorSpec]:
    """Name → shape and dtype of every tensor a layer of `scheme` and `shape` stores."""
    return stored_kind(scheme).layout(scheme, shape)


def storage_bits(scheme: Scheme, shape: tuple[int, int]) -> int:
    """The one definition of a layer's size, used by runs, allocation, inspect and preflight alike: the bits
    of the tensors its checkpoint holds, padding included."""
    return layout_bits(packed_layout(scheme, shape))


def unpack_weight(scheme: Scheme, shape: tuple[int, int],
                  tensors: dict[str, torch.Tensor]) -> QuantizedWeight | TritPlaneWeight:
    """A stored layer back as the object its scheme's solver produced."""
    return stored_kind(scheme).unpack(scheme, shape, tensors)
