"""Fused packed modules: layers that read one input (q/k/v, gate/up, an expert's w1/w3) stacked along their
outputs into one packed weight, so that a decoder layer makes one weight-matmul launch per input instead
of one per layer (four per Llama layer: qkv, o, gate-up, down).

Each member keeps its place in the model as a `PackedSlice`. The first member called with an input runs
the fused matmul; the others, called with the same tensor, take their slice of that output. A member called
with another tensor runs the matmul again, so the result never depends on the call order.

Where asked (`gated`), a gated MLP known to compute down(silu(gate(x)) · up(x)) goes further: its gate and up
become one `GatedPackedLinear` whose outputs interleave theirs, and the MLP a `GatedMLP`, down(gate_up(x)). On the
GPU the CUDA kernels store silu(gate)·up themselves, so the activation is no kernel of its own. Off by default: an
8B decode measured +1.4% for int4 and −6.4% for ternary (docs/performance.md, "The gated MLP's activation in
the matmul").
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from quantbench.export.kernels.layout import KernelWeight
from quantbench.export.kernels.mlp_order import GATED_MLPS
from quantbench.export.kernels.modules import GatedPackedLinear, PackedLinear

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class FusedPackedLinear(nn.Module):
    """The stacked packed weight of several layers that read one input, as one PackedLinear."""

    def __init__(self, members: list[PackedLinear]):
        super().__init__()
        first = members[0]
        self.sizes = [m.out_features for m in members]
        stacked = dataclasses.replace(
            first.kernel_weight, shape=(sum(self.sizes), first.in_features),
            qweight=torch.cat([m.kernel_weight.row_major().qweight for m in members], dim=-1),
            scales=torch.cat([m.scales for m in members], dim=-1),
            zeros=torch.cat([m.zeros for m in members], dim=-1) if first.zeros is not None else None)
        bias = None
        if any(m.bias is not None for m in members):
            bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=first.dtype,
                                                                            device=m.qweight.device)
                              for m in members])
        self.packed = PackedLinear(stacked, bias, first.backend, first.dtype)
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._served: set[int] = set()

    def output_of(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """Member `member`'s output for input `x`; one fused matmul per distinct input, kept until every
        member has taken its slice."""
        if x is not self._input:
            self._input, self._outputs, self._served = x, self.packed(x).split(self.sizes, dim=-1), set()
        output = self._outputs[member]
        self._served.add(member)
        if len(self._served) == len(self.sizes):  # every member served: drop the input and the outputs
            self._input, self._outputs = None, ()
        return output


class PackedSlice(nn.Module):
    """One member of a FusedPackedLinear, in the place of its PackedLinear."""

    def __init__(self, fused: FusedPackedLinear, member: int, original: PackedLinear):
        super().__init__()
        self.fused, self.member, self.dtype = fused, member, original.dtype
        self.in_features, self.out_features = original.in_features, original.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The member's dequantized rows, decoded on demand."""
        start = sum(self.fused.sizes[:self.member])
        return self.fused.packed.weight[start:start + self.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output_of(self.member, x)

    def extra_repr(self) -> str:
        return f"member {self.member} of a fused {self.fused.packed.kind} weight, out_features={self.out_features}"


def fusable(members: list[nn.Module]) -> bool:
    """Whether packed layers can share one fused weight: one kind, width, group, input order, dtype and
    per-tensor scale (NVFP4's), and no online input transform (a rotation or activation quantization
    hooked on a member)."""
    if not all(isinstance(m, PackedLinear) and not m._forward_pre_hooks for m in members):
        return False
    first = members[0]
    return all(m.kind == first.kind and m.bits == first.bits and m.group == first.group
               and m.in_features == first.in_features and m.dtype == first.dtype and m.backend == first.backend
               and m.scales.dtype == first.scales.dtype and (m.zeros is None) == (first.zeros is None)
               and m.global_scale == first.global_scale
               and _same(m.perm, first.perm) for m in members)


class GatedMLP(nn.Module):
    """A gated MLP as down_proj(gate_up(x)), gate_up a GatedPackedLinear (silu(gate)·up), in the MLP's place.
    `gate_proj` and `up_proj` are views of gate_up's rows (GatedHalf), for code that reads their weights."""

    def __init__(self, gate_up: GatedPackedLinear, down_proj: nn.Module):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down_proj

    @property
    def gate_proj(self) -> GatedHalf:
        return GatedHalf(self.gate_up, 0)

    @property
    def up_proj(self) -> GatedHalf:
        return GatedHalf(self.gate_up, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up(x))


class GatedHalf(nn.Module):
    """Gate (`half` 0) or up (1) of a GatedPackedLinear: its rows of the interleaved weight, and its own outputs
    when called (the whole matmul, then every other column)."""

    def __init__(self, gate_up: GatedPackedLinear, half: int):
        super().__init__()
        self._layer, self.half = (gate_up,), half  # a tuple: not registered, the GatedMLP holds the layer
        self.in_features, self.out_features = gate_up.in_features, gate_up.out_features // 2

    @property
    def weight(self) -> torch.Tensor:
        return self._layer[0].weight[self.half::2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PackedLinear.forward(self._layer[0], x)[..., self.half::2]


def gate_up_interleaved(gate: PackedLinear, up: PackedLinear) -> KernelWeight:
    """One weight of gate's and up's rows interleaved, gate j at output 2j and up j at 2j + 1 (words, scales and
    zero points column by column), so that every block of a kernel's outputs holds whole pairs."""
    first, second = gate.kernel_weight.row_major(), up.kernel_weight.row_major()

    def interleaved(name: str) -> torch.Tensor | None:
        a, b = getattr(first, name), getattr(second, name)
        return None if a is None else torch.stack([a, b], dim=-1).flatten(-2)

    return dataclasses.replace(first, shape=(2 * gate.out_features, gate.in_features),
                               **{name: interleaved(name) for name in ("qweight", "scales", "zeros")})


def fuse_gated_mlps(model: nn.Module) -> list[str]:
    """Replace every gated MLP (GATED_MLPS) with a SiLU activation, fusable packed gate and up without bias and no
    hooks by a GatedMLP; returns their gate and up's names (e.g. `model.layers.0.mlp.gate_proj+up_proj`)."""
    fused = []
    for parent_name, parent in list(model.named_modules()):
        for name, mlp in list(parent.named_children()):
            gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
            if not (type(mlp).__name__ in GATED_MLPS and _is_silu(getattr(mlp, "act_fn", None))
                    and hasattr(mlp, "down_proj") and fusable([gate, up]) and gate.bias is None and up.bias is None
                    and not (mlp._forward_pre_hooks or mlp._forward_hooks)):
                continue
            gate_up = GatedPackedLinear(gate_up_interleaved(gate, up), None, gate.backend, gate.dtype)
            setattr(parent, name, GatedMLP(gate_up, mlp.down_proj))
            fused.append(f"{parent_name}.{name}.gate_proj+up_proj".lstrip("."))
    return fused


def _is_silu(act: nn.Module | None) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fuse_packed_siblings(model: nn.Module, gated: bool = False) -> list[str]:
    """Replace every group of fusable packed siblings that read one input (SHARED_INPUTS) by slices of one
    fused weight, with `gated` a gated MLP's gate and up by a GatedMLP first (fuse_gated_mlps); returns the fused
    groups' names (e.g. `model.layers.0.self_attn.q_proj+k_proj+v_proj`, `model.layers.0.mlp.gate_proj+up_proj`)."""
    fused_groups = fuse_gated_mlps(model) if gated else []
    for parent_name, parent in list(model.named_modules()):
        for names in SHARED_INPUTS:
            members = [getattr(parent, name, None) for name in names]
            if not fusable(members):
                continue
            fused = FusedPackedLinear(members)
            for index, (name, member) in enumerate(zip(names, members)):
                setattr(parent, name, PackedSlice(fused, index, member))
            fused_groups.append(f"{parent_name}.{'+'.join(names)}")
    place = {name: index for index, (name, _) in enumerate(model.named_modules())}
    return sorted(fused_groups, key=lambda group: place[group.rpartition(".")[0]])  # in the model's order


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
