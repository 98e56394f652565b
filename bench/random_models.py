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


def build_random_llama(size: str, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """Built on CPU in `dtype` the way from_pretrained builds a model (rotary buffers stay float32), optionally
    with only the first `layers` decoder blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    dims = {"tie_word_embeddings": False, **SIZES[size], **({} if layers is None else {"num_hidden_layers": layers})}
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


def random_weight(scheme_name: str, n: int, k: int, device):
    """Random codes and plausible scales in a scheme's stored form (timing does not need real values): a
    QuantizedWeight, or a TritPlaneWeight for ternary schemes."""
    from quantbench.quantized_weight import QuantizedWeight
    from quantbench.scheme import Scheme
    from quantbench.trit_planes import TritPlaneWeight

    scheme = Scheme.parse(scheme_name)
    g = torch.Generator(device=device).manual_seed(0)
    if scheme.format == "ternary":
        planes = torch.randint(-1, 2, (2, n, k), generator=g, device=device, dtype=torch.int8)
        scales = (torch.rand(2, n, 1, generator=g, device=device) * 0.02).half()
        return TritPlaneWeight(scheme, planes, scales)
    codes = torch.randint(0, 1 << (scheme.bits if scheme.format == "int" else 4), (n, k), generator=g, device=device,
                          dtype=torch.uint8)
    if scheme.format == "mxfp4":
        scales = torch.randint(118, 124, (n, k // 32), generator=g, device=device, dtype=torch.uint8)
        return QuantizedWeight(scheme, codes, scales, None)
    if scheme.format == "nvfp4":  # E4M3 codes of 1–2 (0x38–0x40), g = 448·6 / 0.05
        scales = torch.randint(0x38, 0x41, (n, k // 16), generator=g, device=device, dtype=torch.uint8)
        return QuantizedWeight(scheme, codes, scales, None, global_scale=torch.tensor([53760.0], device=device))
    groups = -(-k // 128)
    scales = (torch.rand(n, groups, generator=g, device=device) * 0.01).half()
    zeros = torch.randint(0, 1 << scheme.bits, (n, groups), generator=g, device=device, dtype=torch.uint8)
    if not scheme.act_order:
        return QuantizedWeight(scheme, codes, scales, zeros)
    # act_order's input order comes from the input's Hessian, so layers that read one input (q/k/v, gate/up)
    # share it, and fuse: one order per input width here
    order = torch.randperm(k, generator=torch.Generator(device=device).manual_seed(k), device=device)
    g_idx = torch.empty(k, dtype=torch.int32, device=device)
    g_idx[order] = (torch.arange(k, device=device) // 128).int()
    return QuantizedWeight(scheme, codes, scales, zeros, g_idx)


def write_random_checkpoint(directory, size: str, scheme_name: str, dtype: torch.dtype, device,
                            layers: int | None = None, head: bool = False) -> dict[str, int]:
    """A quantbench checkpoint of a random Llama of `size` (first `layers` blocks) whose decoder linears (and
    with `head`, lm_head) hold random codes of `scheme_name`, written without ever building the dense model:
    the linears' weights stay on the meta device, the embeddings, norms and head are drawn on `device`.
    Returns the bytes it stores, packed and not."""
    from torch import nn
    from transformers import LlamaConfig

    from quantbench import save_quantized
    from quantbench.block_weights import skeleton_model

    dims = {"tie_word_embeddings": False, **SIZES[size], **({} if layers is None else {"num_hidden_layers": layers})}
    model = skeleton_model(LlamaConfig(**dims, max_position_embeddings=8192), dtype)
    linears = {f"model.layers.{name}": module for name, module in model.model.layers.named_modules()
               if isinstance(module, nn.Linear)}
    if head:
        linears["lm_head"] = model.lm_head
    g = torch.Generator(device=device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        if name.removesuffix(".weight") in linears:
            continue
        value = (torch.ones(param.shape, device=device, dtype=dtype) if param.dim() == 1 else
                 torch.randn(param.shape, generator=g, device=device, dtype=dtype) * 0.02)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = nn.Parameter(value, requires_grad=False)
    quantized = {name: random_weight(scheme_name, linear.out_features, linear.in_features, device)
                 for name, linear in linears.items()}
    save_quantized(model, None, quantized, directory, force=True)
    packed = sum(t.numel() * t.element_size() for q in quantized.values() for t in q.pack().values())
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.is_meta)
    return {"packed_bytes": packed, "dense_bytes": dense}
