"""Random-weight models with the dimensions of real ones, for timing (no download needed): Llamas, and
mixture-of-experts models (MOE_SIZES)."""

from __future__ import annotations

import torch

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
    "405b": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                 num_key_value_heads=8, vocab_size=128256),
}


MOE_SIZES = {  # Qwen3-30B-A3B: 48 blocks of 128 experts, 8 routed per token
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, vocab_size=151936),
}


def build_random_llama(size: str, dtype: torch.dtype, seed: int = 0):
    """Built on CPU in `dtype` the way from_pretrained builds a model (rotary buffers stay float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    dims = {"tie_word_embeddings": False, **SIZES[size]}
    config = LlamaConfig(**dims, max_position_embeddings=8192)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def build_random_llama_on(size: str, dtype: torch.dtype, device: torch.device, layers: int | None = None,
                          seed: int = 0):
    """The same, built directly on `device` (an 8B model initialises in seconds on a GPU, minutes on a CPU),
    optionally with only the first `layers` decoder blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    moe = size in MOE_SIZES
    dims = {"tie_word_embeddings": False, **(MOE_SIZES[size] if moe else SIZES[size])}
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = (Qwen3MoeConfig if moe else LlamaConfig)(**dims, max_position_embeddings=8192)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # fused expert tensors are left uninitialised
        for param in model.parameters():
            if param.dim() == 3:
                param.normal_(0.0, 0.02)
    return model
