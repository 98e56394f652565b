"""Mixture-of-experts blocks seen as plain linears.

transformers stores a block's experts as two 3-D tensors (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I])
behind one module. `split_experts` replaces that module by an `ExpertList` holding each expert's projections
as nn.Linear layers named as the checkpoints name them (`experts.3.gate_proj`), as views of the fused tensors
(no copy); GPT-OSS's, stored transposed with gate and up interleaved and with biases, are copied out, and
its experts keep its clamped gating (`ClampedSwiGLU`). The block driver, the solvers, the hooks and the
exporters then treat every expert like any other linear, and the names written are those vLLM and
transformers read.

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
    """One expert: down(act(gate(x)) · up(x)), or down(gating(gate(x), up(x))) for a family's own gating."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn, names: tuple[str, str, str],
                 gating=None):
        super().__init__()
        self.names = names
        for name, linear in zip(names, (gate, up, down)):
            self.add_module(name, linear)
        self.act_fn = act_fn
        self.gating = gating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        if self.gating is not None:
            return down(self.gating(gate(x), up(x)))
        return down(self.act_fn(gate(x)) * up(x))


@dataclass(frozen=True)
class ClampedSwiGLU:
    """GPT-OSS's gating: (clamp(up, ±limit) + 1) · g · σ(α g), g = min(gate, limit), as its experts compute it."""

    alpha: float
    limit: float

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


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
                    setattr(parent, child_name, _expert_list(child, names, f"{parent_name}.{child_name}",
                                                             model.config.model_type))
                    split += 1
    return split


USUAL_LAYOUT = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
                "has_post_expert_norm": False}  # transformers' flags: gate_up_proj [E, 2I, H], gate rows first
GPT_OSS_LAYOUT = {**USUAL_LAYOUT, "is_transposed": True, "has_bias": True, "is_concatenated": False}


def _expert_list(fused: nn.Module, names: tuple[str, str, str], where: str, model_type: str) -> ExpertList:
    from transformers.integrations.moe import _default_apply_gate

    gpt_oss = model_type == "gpt_oss"
    layout = GPT_OSS_LAYOUT if gpt_oss else USUAL_LAYOUT
    odd = [key for key, usual in layout.items() if getattr(fused, key, USUAL_LAYOUT[key]) != usual]
    if not gpt_oss and getattr(type(fused), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        odd.append("its own gating function")
    if odd:
        raise QuantbenchError(f"{where}: experts stored with {', '.join(odd)} cannot be split into per-expert "
                              "linears yet")
    if gpt_oss:  # [E, H, 2I] with gate and up columns interleaved, and [E, I, H]: each expert's copied out
        gate_up, down = fused.gate_up_proj.data.transpose(1, 2), fused.down_proj.data.transpose(1, 2)
        gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
        gate_bias, up_bias = fused.gate_up_proj_bias.data[:, 0::2], fused.gate_up_proj_bias.data[:, 1::2]
        down_bias, gating = fused.down_proj_bias.data, ClampedSwiGLU(fused.alpha, fused.limit)
    else:  # views of the fused tensors
        width = fused.gate_up_proj.shape[1] // 2
        gate, up, down = fused.gate_up_proj.data[:, :width], fused.gate_up_proj.data[:, width:], fused.down_proj.data
        gate_bias = up_bias = down_bias = gating = None

    def linear(weights: torch.Tensor, biases: torch.Tensor | None, e: int) -> nn.Linear:
        weight = weights[e].contiguous()  # a view where the fused tensor is laid out as the linear's weight
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if biases is not None:
            layer.bias = nn.Parameter(biases[e].contiguous(), requires_grad=False)
        return layer

    return ExpertList(Expert(linear(gate, gate_bias, e), linear(up, up_bias, e), linear(down, down_bias, e),
                             getattr(fused, "act_fn", None), names, gating) for e in range(gate.shape[0]))


FUSED_ON_DISK = {  # families whose checkpoints keep the fused tensors: a per-expert tensor → (fused name, part)
    "gpt_oss": {"gate_proj.weight": ("gate_up_proj", "even columns"),
                "up_proj.weight": ("gate_up_proj", "odd columns"), "down_proj.weight": ("down_proj", "transposed"),
                "gate_proj.bias": ("gate_up_proj_bias", "even"), "up_proj.bias": ("gate_up_proj_bias", "odd"),
                "down_proj.bias": ("down_proj_bias", "whole")},
    "granitemoe": {"gate_proj.weight": ("gate_up_proj", "first rows"), "up_proj.weight": ("gate_up_proj", "last rows"),
                   "down_proj.weight": ("down_proj", "whole")},  # stored as input_linear and output_linear
}


def fused_source(model_type: str, name: str) -> tuple[str, int, str] | None:
    """Where a checkpoint that keeps its family's experts fused stores the per-expert tensor `name`
    (`….experts.3.gate_proj.weight`): the fused tensor's name, the expert's index, and which part of its slice."""
    prefix, _, rest = name.partition(".experts.")
    index, _, leaf = rest.partition(".")
    part = FUSED_ON_DISK.get(model_type, {}).get(leaf)
    if not rest or not index.isdigit() or part is None:
        return None
    return f"{prefix}.experts.{part[0]}", int(index), part[1]


def fused_part(expert_slice: torch.Tensor, part: str) -> torch.Tensor:
    """One expert's tensor from its slice of the fused one ([2I, H] gate rows first, [H, 2I] with gate and up
    columns interleaved, [I, H], or their biases), laid out as the per-expert linear holds it."""
    if part in ("first rows", "last rows"):
        half = expert_slice.shape[0] // 2
        return expert_slice[:half] if part == "first rows" else expert_slice[half:]
    if part in ("even columns", "odd columns"):
        return expert_slice[:, part.startswith("odd")::2].T.contiguous()
    if part == "transposed":
        return expert_slice.T.contiguous()
    return expert_slice[part == "odd"::2].contiguous() if part in ("even", "odd") else expert_slice


def router_name(mlp: nn.Module) -> str | None:
    """The submodule of an MLP whose weight [experts, hidden] routes the MLP's input: a router module holding
    its weight (`gate`, GPT-OSS's `router`) or the linear inside one (Hunyuan's `gate.wg`); None where the MLP
    routes nothing."""
    for name in ("gate", "router"):
        router = getattr(mlp, name, None)
        if isinstance(getattr(router, "weight", None), torch.Tensor) and not isinstance(router, nn.Linear):
            return name
    if isinstance(getattr(getattr(mlp, "gate", None), "wg", None), nn.Linear):
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
