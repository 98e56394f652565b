"""act_order folded out of a gated MLP's down projection.

A packed act_order layer reads x in its stored order (`perm`: stored input k is original input perm[k]), so its
kernel gathers x first: in every block's prologue on CUDA cores, or in a kernel of its own before the
tensor-core products. For the down projection of a gated MLP, down(act(gate(x)) · up(x)), that gather can go:
act and the product work channel by channel, so gate and up may as well write their outputs in down's stored
order. `fold_down_orders` permutes the outputs of gate and up (the columns of their words, scales, zero
points and biases) by down's perm and drops the perm from down. The model computes the same products as before
(on the CPU in the same order: the same logits bit for bit; on a GPU down now runs the kernel built without a
gather, tuned apart); down's kernel reads x as it lies, and at 14,336 inputs that was a Llama layer's widest
gather (docs/performance.md, "act_order folded into gate and up").

Only MLPs known to compute down(act(gate(x)) · up(x)) are folded (`GATED_MLPS`, and quantbench's own experts),
and only where none of the three layers has a hook (an online rotation or activation quantization of an input
is not channel by channel). Afterwards gate's and up's `.weight` rows come in down's stored order, and down's
`.weight` columns too.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from quantbench.experts import Expert
from quantbench.export.kernels.modules import PackedLinear

# transformers' MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (mixtral: w2(act(w1) * w3))
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen2MoeMLP", "Qwen3MoeMLP",
                        "MixtralBlockSparseTop2MLP", "GemmaMLP", "Gemma2MLP", "GraniteMLP", "OlmoMLP", "Olmo2MLP"})
PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))  # gate, up, down


def fold_down_orders(model: nn.Module) -> list[str]:
    """Fold each gated MLP's packed act_order down projection into its gate and up outputs (see the module's
    docstring); returns the folded down projections' names."""
    folded = []
    for parent_name, parent in list(model.named_modules()):
        if not (type(parent).__name__ in GATED_MLPS or isinstance(parent, Expert)) or _hooked(parent):
            continue
        for names in PROJECTIONS:
            gate, up, down = (getattr(parent, name, None) for name in names)
            if not (isinstance(down, PackedLinear) and down.perm is not None
                    and all(_reorderable(layer) for layer in (gate, up)) and not _hooked(down)):
                continue
            order = down.perm.long()
            setattr(parent, names[0], outputs_in_order(gate, order))
            setattr(parent, names[1], outputs_in_order(up, order))
            setattr(parent, names[2], PackedLinear(dataclasses.replace(down.kernel_weight.row_major(), perm=None),
                                                   down.bias, down.backend, down.dtype))
            folded.append(f"{parent_name}.{names[2]}")
    return folded


def outputs_in_order(layer: PackedLinear | nn.Linear, order: torch.Tensor) -> PackedLinear | nn.Linear:
    """A copy of `layer` whose output j is the layer's output order[j]."""
    order = order.to(layer.qweight.device if isinstance(layer, PackedLinear) else layer.weight.device)
    bias = None if layer.bias is None else layer.bias.detach()[order]
    if isinstance(layer, PackedLinear):
        weight = layer.kernel_weight.row_major()
        columns = {name: getattr(weight, name).index_select(-1, order)
                   for name in ("qweight", "scales", "zeros") if getattr(weight, name) is not None}
        return PackedLinear(dataclasses.replace(weight, **columns), bias, layer.backend, layer.dtype)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    dense.weight = nn.Parameter(layer.weight.detach()[order], requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias, requires_grad=False)
    return dense


def _reorderable(layer: nn.Module | None) -> bool:
    return (isinstance(layer, PackedLinear) or type(layer) is nn.Linear) and not _hooked(layer)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks)

