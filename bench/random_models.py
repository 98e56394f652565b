"""Random-weight Llama models with the dimensions of real ones, for timing (no download needed)."""

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
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    dims = {"tie_word_embeddings": False, **SIZES[size]}
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(**dims, max_position_embeddings=8192)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
