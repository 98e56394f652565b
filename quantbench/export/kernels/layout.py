"""The layout the matmul kernels read: a quantized [N, K] weight (N outputs, K inputs) packed along K into
int32 words with the output dimension contiguous, so a program that owns a tile of outputs loads whole
cache lines.

  qweight  int32 [K / per_word, N]   per_word = 32 / bits codes of one output column per word: word
                                     [j, n] holds inputs k = j·per_word + i at bits [i·bits, (i+1)·bits)
                                     (GPTQ's `qweight` layout for 2, 4 and 8 bits)
  scales   [G, N]                    int grids: float16 scales per group of `group` consecutive inputs;
           [2, G, N]                 ternary: float16 α of each plane;
           uint8 [K / 32, N]         mxfp4: E8M0 exponents of each block of 32 inputs;
           uint8 [K / 16, N]         nvfp4: E4M3 codes of each block of 16 inputs (with `global_scale`)
  zeros    uint8 [G, N] or None      int grids: asymmetric zero points
  perm     int32 [K] or None         act_order: stored input k is original input perm[k] (inputs sorted by
                                     group); kernels read x[perm[k]] and then see contiguous groups

On the CPU, where quantbench's C++ kernel runs a layer, `PackedLinear` keeps qweight in tiles of CPU_TILE
outputs instead: int32 [⌈N / 64⌉, K / per_word, 64], tile t holding outputs [64t, 64t + 64) of every word row
(the last tile padded with zero words), so that each of the kernel's tasks reads one run of memory
(`KernelWeight.in_cpu_tiles`; `KernelWeight.row_major` undoes it).

`ternary3` (two planes in base 3, `to_base3_layout`): qweight uint8 [2, n_groups · ⌈G/5⌉, N], each byte five
trits of one plane and output (digits t + 1, input k = 5·row + j of its group weighs 3^j; a group's last
byte padded with zeros), scales as ternary: 1.6 bits per plane and weight instead of the 4-bit pair codes.

Codes by kind: `int` unsigned codes, w = (q − z)·s (symmetric: z = 2^(bits−1)); `ternary` 4-bit codes
holding two trits t1 = (q & 3) − 1 and t2 = (q >> 2) − 1, w = α1·t1 + α2·t2; `mxfp4` E2M1 codes
[sign | e1 e0 | m], w = e2m1(q)·2^(E − 127); `nvfp4` the same E2M1 codes, w = e2m1(q)·(e4m3(s) / g), g the
float32 per-tensor `global_scale`.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, fields

import torch

from quantbench.formats.packing import TRITS_PER_BYTE, pack_bits
from quantbench.quantized_weight import QuantizedWeight
from quantbench.trit_planes import TritPlaneWeight

KERNEL_INT_BITS = (2, 4, 8)  # widths that fill an int32 word exactly
KIND_CODES = {"int": 0, "ternary": 1, "mxfp4": 2, "nvfp4": 3}  # the kernels' compile-time KIND
MX_BLOCK = 32
NV_BLOCK = 16
CPU_TILE = 64  # outputs a tile of words holds in the CPU kernel's layout (packed_cpu.cpp's kTile)


@dataclass
class KernelWeight:
    kind: str  # "int" | "ternary" | "ternary3" | "mxfp4" | "nvfp4"
    bits: int
    shape: tuple[int, int]  # (N, K) as the nn.Linear weight
    group: int  # inputs per scale (per-channel: K)
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    global_scale: float = 1.0  # nvfp4: the per-tensor g that every block scale is divided by

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def n_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def tiled(self) -> bool:
        """Whether qweight is in the CPU kernel's tiles rather than rows of the whole output width (base-3
        ternary's planes are 3-D too, and never tiled)."""
        return self.kind != "ternary3" and self.qweight.dim() == 3

    def word_rows(self, start: int, stop: int) -> torch.Tensor:
        """int32 [stop − start, N]: word rows [start, stop) of qweight in rows of the whole output width."""
        if not self.tiled:
            return self.qweight[start:stop]
        return self.qweight[:, start:stop].transpose(0, 1).reshape(stop - start, -1)[:, :self.shape[0]]

    def row_major(self) -> KernelWeight:
        """This weight with qweight in rows of the whole output width (itself if it is)."""
        if not self.tiled:
            return self
        return dataclasses.replace(self, qweight=self.word_rows(0, self.qweight.shape[1]).contiguous())

    def in_cpu_tiles(self) -> KernelWeight:
        """This weight with qweight in the CPU kernel's tiles (itself if it is)."""
        return self if self.tiled else dataclasses.replace(self, qweight=to_cpu_tiles(self.qweight))


def with_inputs_gathered(x: torch.Tensor, weight: KernelWeight) -> tuple[torch.Tensor, KernelWeight]:
    """x [M, K] in the stored input order and the weight without its permutation (act_order gathered once)."""
    if weight.perm is None:
        return x, weight
    return x.index_select(1, weight.perm), dataclasses.replace(weight, perm=None)  # int32 indices: one kernel


def kernel_unsupported_reason(weight: QuantizedWeight | TritPlaneWeight) -> str | None:
    """Why no kernel runs this weight (None when one does)."""
    scheme = weight.scheme
    out_features, in_features = weight.shape
    if scheme.format == "ternary":
        if scheme.planes != 2:
            return f"the ternary kernel runs two planes, not {scheme.planes}"
    elif scheme.format in ("mxfp4", "nvfp4"):
        pass
    elif scheme.format != "int":
        return f"no kernel for {scheme.format}"
    elif scheme.bits not in KERNEL_INT_BITS:
        return f"the int kernels pack {'/'.join(map(str, KERNEL_INT_BITS))} bits per word, not {scheme.bits}"
    group = weight.group_size
    bits = 4 if scheme.format in ("ternary", "mxfp4", "nvfp4") else scheme.bits
    if group < in_features and (group & (group - 1) or group < 32 // bits):
        return f"group size {group} is not a power of two ≥ {32 // bits} (the codes in a word)"
    if in_features % 32:
        return f"{in_features} inputs are not a multiple of 32"
    if isinstance(weight, QuantizedWeight) and weight.g_idx is not None and _act_order_perm(weight) is None:
        return "its g_idx does not give every group its full size"
    return None


def to_kernel_layout(weight: QuantizedWeight | TritPlaneWeight) -> KernelWeight:
    """Repack a stored weight for the kernels: packed tensors in, packed tensors out."""
    reason = kernel_unsupported_reason(weight)
    if reason is not None:
        raise ValueError(f"no kernel for {weight.scheme.name}: {reason}")
    out_features, in_features = weight.shape
    group = weight.group_size if weight.group_size < in_features else in_features
    if isinstance(weight, TritPlaneWeight):
        pairs = (weight.planes[0] + 1).to(torch.uint8) | ((weight.planes[1] + 1).to(torch.uint8) << 2)
        return KernelWeight("ternary", 4, (out_features, in_features), group, _pack_columns(pairs, 4),
                            weight.scales.transpose(1, 2).contiguous())
    if weight.scheme.format == "mxfp4":
        return KernelWeight("mxfp4", 4, (out_features, in_features), MX_BLOCK, _pack_columns(weight.codes, 4),
                            weight.scales.T.contiguous())
    if weight.scheme.format == "nvfp4":
        return KernelWeight("nvfp4", 4, (out_features, in_features), NV_BLOCK, _pack_columns(weight.codes, 4),
                            weight.scales.T.contiguous(), global_scale=float(weight.global_scale))
    bits = weight.scheme.bits
    codes, perm = weight.codes, None
    if weight.g_idx is not None:
        perm = _act_order_perm(weight)
        codes = codes[:, perm]
        perm = perm.to(torch.int32)
    zeros = weight.zeros.T.contiguous() if weight.zeros is not None else None
    return KernelWeight("int", bits, (out_features, in_features), group, _pack_columns(codes, bits),
                        weight.scales.T.contiguous(), zeros, perm)


def to_base3_layout(weight: TritPlaneWeight) -> KernelWeight:
    """A two-plane ternary weight in the base-3 kernel layout (`ternary3`, see the module docstring)."""
    reason = kernel_unsupported_reason(weight)
    if reason is not None or not isinstance(weight, TritPlaneWeight):
        raise ValueError(f"no base-3 kernel for {weight.scheme.name}: {reason or 'not a ternary weight'}")
    out_features, in_features = weight.shape
    group = min(weight.group_size, in_features)
    n_groups = math.ceil(in_features / group)
    per_group = math.ceil(group / TRITS_PER_BYTE) * TRITS_PER_BYTE
    digits = torch.ones(2, out_features, n_groups * group, dtype=torch.int32, device=weight.planes.device)
    digits[:, :, :in_features] = weight.planes.to(torch.int32) + 1
    padded = torch.ones(2, out_features, n_groups, per_group, dtype=torch.int32, device=digits.device)
    padded[..., :group] = digits.view(2, out_features, n_groups, group)
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int32, device=digits.device)
    codes = (padded.view(2, out_features, -1, TRITS_PER_BYTE) * powers).sum(-1).to(torch.uint8)
    return KernelWeight("ternary3", 8, (out_features, in_features), group, codes.transpose(1, 2).contiguous(),
                        weight.scales.transpose(1, 2).contiguous())


def to_cpu_tiles(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K / per_word, N] → [⌈N / CPU_TILE⌉, K / per_word, CPU_TILE], the last tile padded with zeros."""
    rows, n_out = qweight.shape
    tiles = -(-n_out // CPU_TILE)
    if n_out % CPU_TILE:
        qweight = torch.nn.functional.pad(qweight, (0, tiles * CPU_TILE - n_out))
    return qweight.reshape(rows, tiles, CPU_TILE).transpose(0, 1).contiguous()


def _pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_bits(codes, bits).T.contiguous()


def _act_order_perm(weight: QuantizedWeight) -> torch.Tensor | None:
    """The stable sort of the inputs by group, if it leaves group g on inputs [g·G, (g+1)·G)."""
    g_idx = weight.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // weight.group_size
    return perm if torch.equal(g_idx[perm], expected) else None
