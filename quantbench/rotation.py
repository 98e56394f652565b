"""QuaRot-style rotation of a Llama-family model: the same function, computed in a basis without outliers.

1. Every RMSNorm's scale is folded into the linears that read its output (q/k/v, gate/up, lm_head), so
   each norm only divides by the RMS, which commutes with any orthogonal matrix.
2. The residual stream is rotated by Q, a randomised Hadamard matrix: embeddings E ← E·Q, the
   layers that read the stream W ← W·Q, the layers that write it (o_proj, down_proj) W ← Qᵀ·W and
   their biases b ← b·Q, lm_head W ← W·Q. A tied lm_head is untied first (the norm fold makes it differ).
3. down_proj additionally gets an online Hadamard R on its input: W ← W·R, and x ↦ x·R before the
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
from quantbench.model_io import decoder_blocks
from quantbench.pipeline import untie_lm_head
from quantbench.quantizers.fwht import RandomHadamard

MODEL_ROTATION_ATTR = "quantbench_model_rotation"  # the descriptor of a rotated model's residual rotation
ROTATABLE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
READERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITERS = ("self_attn.o_proj", "mlp.down_proj")


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down_proj: bool = True) -> dict:
    """Rotate `model` in place (see the module docstring); returns the residual rotation's descriptor."""
    if model.config.model_type not in ROTATABLE_TYPES:
        raise QuantbenchError(f"the model rotation supports the Llama family ({', '.join(ROTATABLE_TYPES)}), "
                              f"not {model.config.model_type!r}")
    if getattr(model, MODEL_ROTATION_ATTR, None):
        raise QuantbenchError("this model is already rotated; rotate it once")
    residual = RandomHadamard(model.config.hidden_size, seed)
    head = untie_lm_head(model)
    blocks = decoder_blocks(model)
    for block in blocks:
        _fold_norm(block.input_layernorm, [block.get_submodule(n) for n in READERS[:3]])
        _fold_norm(block.post_attention_layernorm, [block.get_submodule(n) for n in READERS[3:]])
    _fold_norm(model.get_submodule("model.norm"), [head])

    embed = model.get_input_embeddings()
    _assign(embed.weight, residual.rows(embed.weight.double()))
    for block in blocks:
        for name in READERS:
            weight = block.get_submodule(name).weight
            _assign(weight, residual.rows(weight.double()))
        for name in WRITERS:
            layer = block.get_submodule(name)
            _assign(layer.weight, residual.rows(layer.weight.double().T).T)
            if layer.bias is not None:
                _assign(layer.bias, residual.rows(layer.bias.double()))
    _assign(head.weight, residual.rows(head.weight.double()))

    if online_down_proj:
        for block in blocks:
            down = block.get_submodule("mlp.down_proj")
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
