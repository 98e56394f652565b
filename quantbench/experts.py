"""Mixture-of-experts blocks seen as plain linears.

transformers stores a block's experts as two 3-D tensors (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
behind one module. `split_experts` replaces that module by an `ExpertList` holding each expert's projections
as nn.Linear layers named as the checkpoints name them (`experts.3.gate_proj`), as views of the fused tensors
(no copy). The block driver, the solvers, the hooks and the exporters then treat every expert like any other
linear, and the names written are those vLLM and transformers read.

Calibration runs in two modes. Routed (the default, and always for propagation): each expert sees the tokens
the router sends it. All-tokens (`all_tokens_routed`): every token goes through every expert, for statistics
only — the block's output still weights each expert by the router's real choice, so it is unchanged."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantbench.errors import QuantbenchError

PROJECTION_NAMES = dict.fromkeys(("mixtral", "phimoe"), ("w1", "w3", "w2"))  # gate, up, down in their checkpoints
DEFAULT_PROJECTION_NAMES = ("gate_proj", "up_proj", "down_proj")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "wg")  # linears that route: kept in 16 bits


@dataclass(frozen=True)
class StarvedExperts:
    """What to do with an expert that the router sent fewer than `min_tokens` calibration tokens in a block:
    `all_tokens` calibrates it on every token of the batch (all-expert statistics), `rtn` rounds it to the
    nearest grid point; either way result.json lists it."""

    min_tokens: int = 128
    action: str = "all_tokens"


class Expert(nn.Module):
    """One expert: down(act(gate(x)) · up(x))."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn, names: tuple[str, str, str]):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class ExpertList(nn.ModuleList):
    """Drop-in for transformers' fused experts module: forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) → [T, H], the eager loop of transformers over per-expert modules."""

    route_all_tokens = False

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if self.route_all_tokens:
            for index, expert in enumerate(self):
                weight = (top_k_weights * (top_k_index == index)).sum(dim=-1, keepdim=True)
                # a view per expert: input hooks must not take two experts for one shared input
                out += (expert(hidden_states.view_as(hidden_states)) * weight).to(out.dtype)
            return out
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit[:, 0].tolist():
            if index == len(self):
                continue
            position, token = torch.where(mask[index])
            routed = self[index](hidden_states[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    params = module._parameters
    return (isinstance(params.get("gate_up_proj"), torch.Tensor) and params["gate_up_proj"].dim() == 3
            and isinstance(params.get("down_proj"), torch.Tensor))


def split_experts(model: nn.Module, blocks: nn.ModuleList) -> int:
    """Replace every fused experts module inside `blocks` by an ExpertList; returns how many were split."""
    names = PROJECTION_NAMES.get(model.config.model_type, DEFAULT_PROJECTION_NAMES)
    split = 0
    for block in blocks:
        for parent_name, parent in list(block.named_modules()):
            for child_name, child in list(parent.named_children()):
                if is_fused_experts(child):
                    setattr(parent, child_name, _expert_list(child, names, f"{parent_name}.{child_name}"))
                    split += 1
    return split


def _expert_list(fused: nn.Module, names: tuple[str, str, str], where: str) -> ExpertList:
    from transformers.integrations.moe import _default_apply_gate

    layout = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
              "has_post_expert_norm": False}
    odd = [key for key, usual in layout.items() if getattr(fused, key, usual) != usual]
    if getattr(type(fused), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        odd.append("its own gating function")
    if odd:
        raise QuantbenchError(f"{where}: experts stored with {', '.join(odd)} cannot be split into per-expert "
                              "linears yet")
    gate_up, down = fused.gate_up_proj, fused.down_proj
    experts, width = gate_up.shape[0], gate_up.shape[1] // 2

    def linear(weight: torch.Tensor) -> nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer

    return ExpertList(Expert(linear(gate_up.data[e, :width]), linear(gate_up.data[e, width:]),
                             linear(down.data[e]), fused.act_fn, names) for e in range(experts))


def router_name(mlp: nn.Module) -> str | None:
    """The submodule of an MLP whose weight [experts, hidden] routes the MLP's input: a router module holding
    its weight (`gate`) or the linear inside one (Hunyuan's `gate.wg`); None where the MLP routes nothing."""
    gate = getattr(mlp, "gate", None)
    if isinstance(getattr(gate, "weight", None), torch.Tensor) and not isinstance(gate, nn.Linear):
        return "gate"
    if isinstance(getattr(gate, "wg", None), nn.Linear):
        return "gate.wg"
    return None


def expert_lists(block: nn.Module) -> list[ExpertList]:
    return [module for module in block.modules() if isinstance(module, ExpertList)]


@contextmanager
def all_tokens_routed(block: nn.Module):
    """Inside, every expert of `block` computes on every token (statistics only; the output is unchanged)."""
    lists = expert_lists(block)
    for experts in lists:
        experts.route_all_tokens = True
    try:
        yield
    finally:
        for experts in lists:
            experts.route_all_tokens = False


def expert_pattern(name: str) -> str | None:
    """`mlp.experts.*.gate_proj` for `mlp.experts.7.gate_proj`; None for a layer outside the experts."""
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and parts[i - 1] == "experts":
            return ".".join([*parts[:i], "*", *parts[i + 1:]])
    return None


def merge_parallel_experts(groups: list[list[str]]) -> list[list[str]]:
    """Input groups with the experts' groups of one projection merged into one stage (experts do not feed
    each other, so their statistics can be gathered in one pass): [[q, k, v], [o], [every gate/up], [every
    down]] instead of two stages per expert."""
    stages: list[list[str]] = []
    stage_of: dict[str, list[str]] = {}
    for group in groups:
        key = expert_pattern(group[0])
        if key is None:
            stages.append(list(group))
        elif key in stage_of:
            stage_of[key].extend(group)
        else:
            stage_of[key] = list(group)
            stages.append(stage_of[key])
    return stages
