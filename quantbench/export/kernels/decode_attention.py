"""Attention for a decode step with grouped key/value heads, without copying the cache.

transformers' `sdpa` attention gives each query head its own copy of its key/value head (`repeat_kv`) whenever it
runs under torch.compile with a mask, as a compiled decode step with a static cache does: every step then writes
and reads the whole cache of every layer once more (8B Llama, 265 positions: 4.3 MB a layer). Here a single query
token's heads are grouped by their key/value head instead, query [B, KV, n_rep, D] against key and value [B, KV,
L, D], so the one scaled_dot_product_attention call reads the cache as it lies, compiled or not. On the GPU (Triton
installed) float16 and bfloat16 calls with a boolean mask go to `split_attention.py` instead, which splits the cache
over the multiprocessors (`QUANTBENCH_DECODE_ATTENTION=sdpa` keeps them on scaled_dot_product_attention). Anything else
(a prompt, no grouped heads, per-head masks, softcap, dropout) goes to transformers' `sdpa` as before.

Registered with transformers under `ATTENTION` (and `sdpa`'s masks); `use_decode_attention(model)` switches a
model that uses `sdpa`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ATTENTION = "quantbench_sdpa"
KERNEL_ENV = "QUANTBENCH_DECODE_ATTENTION"  # "split" (default): the split-cache Triton kernel on the GPU; "sdpa"


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, Q, D], key and value [B, KV, L, D] → ([B, Q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_length, dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    per_head_mask = attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1)
    if (q_length != 1 or groups == 1 or dropout or per_head_mask or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.is_cuda and os.environ.get(KERNEL_ENV, "split") == "split":
        from quantbench.export.kernels import split_attention  # imports Triton

        if split_attention.applies(query, key, value, attention_mask):
            scale = dim ** -0.5 if scaling is None else scaling
            return split_attention.split_decode_attention(query, key, value, attention_mask, scale), None
    grouped = query.reshape(batch, heads // groups, groups, dim)  # head h = kv · groups + r reads kv head kv
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Makes `ATTENTION` a transformers attention implementation, with `sdpa`'s masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_decode_attention(model: nn.Module) -> bool:
    """Switches a transformers model that uses `sdpa` to `ATTENTION`; True where it did."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(ATTENTION)
    return True
