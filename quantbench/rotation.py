"""QuaRot-style rotation of a Llama-family model, and of the families built like it (Phi-3/4 with fused
projections, Qwen2/3-MoE and Mixtral with experts): the same function, computed in a basis without outliers.

1. Every RMSNorm's scale is folded into what reads its output (q/k/v; gate/up, each expert's and the shared
   expert's, the router's weight and the shared expert's gate; lm_head), so each norm only divides by the
   RMS, which commutes with any orthogonal matrix.
2. The residual stream is rotated by Q, a randomised Hadamard matrix: embeddings E ← E·Q, the
   layers that read the stream W ← W·Q, the layers that write it (o_proj, down_proj) W ← Qᵀ·W and
   their biases b ← b·Q, lm_head W ← W·Q. A tied lm_head is untied first (the norm fold makes it differ).
3. Every down_proj additionally gets an online Hadamard R on its input: W ← W·R, and x ↦ x·R before the
   layer (activations.py), so the MLP's activations are incoherent too.

All products are taken in float64 and stored back in the model's dtype; in float32 the rotated model's
logits match the original to rounding. With activation quantization on every linear this turns into a
W4A4-style configuration whose activations have no outlier channels.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.activations import rotate_inputs_of
from quantbench.errors import QuantbenchError
from quantbench.experts import router_name
from quantbench.model_io import ATTENTION_READERS, MLP_READERS, MLP_WRITERS, decoder_blocks
from quantbench.pipeline import untie_lm_head
from quantbench.quantizers.fwht import RandomHadamard

MODEL_ROTATION_ATTR = "quantbench_model_rotation"  # the descriptor of a rotated model's residual rotation
ROTATABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "ernie4_5", "seed_oss", "helium",
                   "arcee", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "glm4_moe", "ernie4_5_moe",
                   "hunyuan_v1_moe", "dots1", "exaone_moe", "solar_open", "gpt_oss")
LAYER_NORM = "its LayerNorm subtracts the mean, which a rotated residual stream does not keep"
POST_NORMS = "its norms after attention and after the MLP sit between those layers and the residual stream, so " \
             "the rotation would need an online transform there"
REFUSED_BECAUSE = {
    "gemma": "Gemma's norms scale by 1 + w, which the rotation does not fold yet",
    **dict.fromkeys(("olmo2", "olmo3", "glm4", "exaone4", "flex_olmo", "afmoe"), POST_NORMS),
    **dict.fromkeys(("cohere", "cohere2", "stablelm", "starcoder2", "phimoe", "phi", "gptj", "falcon", "bloom"),
                    LAYER_NORM),
    "apertus": "its norms are named otherwise than Llama's, which the rotation does not map yet",
    "granitemoe": "its experts sit under `block_sparse_moe`, which the rotation does not map yet",
    **dict.fromkeys(("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"),
                    "its linear-attention (Gated DeltaNet) projections are not mapped by the rotation yet, and its "
                    "norms scale by 1 + w"),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3"), POST_NORMS),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3", "glm4_moe_lite"),
                    "DeepSeek's latent attention normalises its compressed q and kv inside the attention"),
}


def _layers(module: nn.Module, leaves: tuple[str, ...]) -> list[nn.Linear]:
    return [layer for name, layer in module.named_modules()
            if isinstance(layer, nn.Linear) and name.rsplit(".", 1)[-1] in leaves]


def _mlp_layers(block: nn.Module, leaves: tuple[str, ...]) -> list[nn.Linear]:
    return _layers(block.mlp, leaves)


def _attention_readers(block: nn.Module) -> list[nn.Linear]:
    return _layers(block.self_attn, ATTENTION_READERS)


def _mlp_readers(block: nn.Module) -> list[nn.Module]:
    """Every MLP input projection — fused gate/up, each expert's, the shared expert's and its gate — and the
    router (a weight [experts, hidden] read as a linear)."""
    router = router_name(block.mlp)
    return [*_mlp_layers(block, MLP_READERS), *([block.mlp.get_submodule(router)] if router else [])]


def _writers(block: nn.Module) -> list[nn.Linear]:
    return [block.self_attn.o_proj, *_mlp_layers(block, MLP_WRITERS)]


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down_proj: bool = True) -> dict:
    """Rotate `model` in place (see the module docstring); returns the residual rotation's descriptor."""
    if model.config.model_type not in ROTATABLE_TYPES:
        why = REFUSED_BECAUSE.get(model.config.model_type, "its blocks are not laid out like Llama's")
        raise QuantbenchError(f"the model rotation supports the Llama family and the families built like it "
                              f"({', '.join(ROTATABLE_TYPES)}), not {model.config.model_type!r}: {why}")
    if getattr(model, MODEL_ROTATION_ATTR, None):
        raise QuantbenchError("this model is already rotated; rotate it once")
    residual = RandomHadamard(model.config.hidden_size, seed)
    head = untie_lm_head(model)
    blocks = decoder_blocks(model)
    for block in blocks:
        _fold_norm(block.input_layernorm, _attention_readers(block))
        _fold_norm(block.post_attention_layernorm, _mlp_readers(block))
    _fold_norm(model.get_submodule("model.norm"), [head])

    embed = model.get_input_embeddings()
    _assign(embed.weight, residual.rows(embed.weight.double()))
    for block in blocks:
        for layer in [*_attention_readers(block), *_mlp_readers(block)]:
            _assign(layer.weight, residual.rows(layer.weight.double()))
        for layer in _writers(block):
            _assign(layer.weight, residual.rows(layer.weight.double().T).T)
            if layer.bias is not None:
                _assign(layer.bias, residual.rows(layer.bias.double()))
    _assign(head.weight, residual.rows(head.weight.double()))

    if online_down_proj:
        for block in blocks:
            for down in _mlp_layers(block, MLP_WRITERS):
                online = RandomHadamard(down.in_features, seed)
                _assign(down.weight, online.rows(down.weight.double()))
                rotate_inputs_of(down, online)
    descriptor = {**residual.descriptor, "online_down_proj": online_down_proj}
    setattr(model, MODEL_ROTATION_ATTR, descriptor)
    return descriptor


def _fold_norm(norm: nn.Module, readers: list[nn.Linear]) -> None:
    scale = norm.weight.double()
    for layer in readers:
        _assign(layer.weight, layer.weight.double() * scale)
    norm.weight.fill_(1.0)


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def max_logit_change(model: nn.Module, input_ids: torch.Tensor, reference: torch.Tensor) -> float:
    """max |Δlogit| of `model` on `input_ids` against `reference` logits."""
    return (model(input_ids=input_ids).logits.float() - reference.float()).abs().max().item()
