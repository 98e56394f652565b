"""Load Hugging Face causal LMs and find their decoder blocks and the linear layers inside them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.experts import ROUTER_NAMES, split_experts

log = logging.getLogger(__name__)
# the last name component of the linears that read a block's attention input, its MLP input, and write its output
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj", "qkv_proj")  # last name components under `self_attn`
MLP_READERS = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "shared_expert_gate")  # under `mlp`
MLP_WRITERS = ("down_proj", "w2")


@dataclass(frozen=True)
class Family:
    """Where a family's decoder blocks (an nn.ModuleList) and final norm (applied to the last block's output
    before the LM head) are, for the model types it covers. Blocks are walked generically: adding a family
    is an entry here and a tiny-config test."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    final_norm: str


FAMILY_TABLE = (
    Family("Llama family (llama, mistral, qwen2, qwen3 — SmolLM is llama)", ("llama", "mistral", "qwen2", "qwen3"),
           "model.layers", "model.norm"),
    Family("Gemma 2 and 3 (gemma2; gemma3_text, the text-only models)", ("gemma2", "gemma3_text"),
           "model.layers", "model.norm"),
    Family("Gemma 3 as released, its vision encoder beside the language model (gemma3)", ("gemma3",),
           "model.language_model.layers", "model.language_model.norm"),
    Family("Phi-3 and Phi-4 (phi3)", ("phi3",), "model.layers", "model.norm"),
    Family("others built around q/k/v/o attention (gemma, olmo2, olmo3, granite, cohere, cohere2, smollm3, glm4, "
           "starcoder2, stablelm, exaone4, ernie4_5, seed_oss, helium, apertus, arcee)",
           ("gemma", "olmo2", "olmo3", "granite", "cohere", "cohere2", "smollm3", "glm4", "starcoder2", "stablelm",
            "exaone4", "ernie4_5", "seed_oss", "helium", "apertus", "arcee"), "model.layers", "model.norm"),
    Family("mixture of experts (qwen2_moe, qwen3_moe, mixtral, deepseek_v2, deepseek_v3, olmoe, phimoe, glm4_moe, "
           "glm4_moe_lite, ernie4_5_moe, hunyuan_v1_moe, dots1, flex_olmo, exaone_moe, solar_open, afmoe, gpt_oss, "
           "qwen3_next, granitemoe)",
           ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe", "phimoe", "glm4_moe",
            "glm4_moe_lite", "ernie4_5_moe", "hunyuan_v1_moe", "dots1", "flex_olmo", "exaone_moe", "solar_open",
            "afmoe", "gpt_oss", "qwen3_next", "granitemoe"), "model.layers", "model.norm"),
    Family("Qwen3.5 (qwen3_5_text, qwen3_5_moe_text; the language model of qwen3_5 and qwen3_5_moe checkpoints)",
           ("qwen3_5_text", "qwen3_5_moe_text"), "model.layers", "model.norm"),
    Family("GPT-NeoX (gpt_neox)", ("gpt_neox",), "gpt_neox.layers", "gpt_neox.final_layer_norm"),
    Family("Phi-1, 1.5 and 2 (phi)", ("phi",), "model.layers", "model.final_layernorm"),
    Family("GPT-J, Falcon and BLOOM (gptj, falcon, bloom)", ("gptj", "falcon", "bloom"), "transformer.h",
           "transformer.ln_f"),
    Family("OPT (opt)", ("opt",), "model.decoder.layers", "model.decoder.final_layer_norm"),
)
# multimodal checkpoints whose language model AutoModelForCausalLM builds alone (its own model type)
LANGUAGE_MODEL_TYPES = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text"}
BLOCK_PATHS = {model_type: family.blocks for family in FAMILY_TABLE for model_type in family.model_types}
FINAL_NORM_PATHS = {model_type: family.final_norm for family in FAMILY_TABLE for model_type in family.model_types}
FAMILIES = ", ".join(family.name for family in FAMILY_TABLE)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QuantbenchError(f"model.device {name!r}: no CUDA device here; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def language_model_type(model_type: str | None) -> str | None:
    """The model type quantbench works on for a checkpoint of `model_type`: its language model's for a
    multimodal checkpoint that AutoModelForCausalLM loads as its language model alone."""
    return LANGUAGE_MODEL_TYPES.get(model_type, model_type)


def check_supported(config) -> None:
    if language_model_type(config.model_type) not in BLOCK_PATHS:
        raise QuantbenchError(
            f"model type {config.model_type!r} is not supported; supported families: {FAMILIES}"
        )


def load_model(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """Load a causal LM (on CPU, in `dtype`, eval mode) and its tokenizer by hub id or local path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _from_pretrained(AutoConfig, name_or_path, trust_remote_code=trust_remote_code)
    check_supported(config)
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    return model, load_tokenizer(name_or_path, trust_remote_code)


@dataclass
class LoadedTarget:
    model: nn.Module
    tokenizer: object
    checkpoint: Path | None  # the quantbench checkpoint's folder; None for a plain model


def load_target(target: str, device: torch.device, dtype: torch.dtype | None, kernels: bool = False) -> LoadedTarget:
    """What `eval` and `generate` take as a model: a hub id, a model folder, a quantbench checkpoint or a run
    directory (the checkpoint it holds). A checkpoint is loaded onto `device` (`load_quantized`; with `kernels`
    its packed layers run through the packed-weight kernels); a plain model on the CPU in `dtype` (None: the
    device's default), for the caller to move."""
    from quantbench.export.checkpoint import is_quantbench_checkpoint, load_quantized, resolve_checkpoint_dir

    path = resolve_checkpoint_dir(target)
    if is_quantbench_checkpoint(path):
        return LoadedTarget(load_quantized(path, device, dtype, kernels=kernels), load_tokenizer(str(path)), path)
    if (path / "result.json").is_file():
        raise QuantbenchError(f"{target} is a run directory without a checkpoint (its recipe had export.enabled: "
                              "false); rerun it with export enabled, or name the base model")
    if kernels:
        raise QuantbenchError(f"--kernels runs a quantbench checkpoint's packed layers; {target} is not one")
    model, tokenizer = load_model(target, dtype or resolve_dtype("auto", device))
    return LoadedTarget(model, tokenizer, None)


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model a config (object or config.json mapping) describes, built on the meta device: module names
    and shapes without weights, for checks before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        try:
            config = AutoConfig.for_model(**config)
        except (ValueError, KeyError, TypeError) as exc:
            raise QuantbenchError(f"config model_type {config.get('model_type')!r}: {str(exc).splitlines()[0]}") from None
    check_supported(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    decoder_blocks(model)  # experts by the per-expert names checkpoints use
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)


def _from_pretrained(cls, name_or_path: str, **kwargs):
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if Path(name_or_path).expanduser().exists() else "hub id"
        raise QuantbenchError(
            f"could not load {cls.__name__.removeprefix('Auto')} from {where} {name_or_path!r}: "
            f"{str(exc).splitlines()[0]} (check the name; offline, source .assets/env.sh or give a local directory)"
        ) from exc


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or ±inf. A finite float32 sum proves it (any NaN or inf makes the sum NaN
    or inf) at a fraction of `isfinite(...).all()`'s cost (a 1536 × 576 weight: 0.12 ms against 4.4 on a 2-core
    CPU); a sum that overflows falls back to the elementwise check."""
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and \
            bool(torch.isfinite(tensor.sum(dtype=torch.float32 if tensor.dtype != torch.float64 else None))):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_counts(weight: torch.Tensor) -> str:
    nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
    return " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if part) \
        + " weight(s)"


def handle_nonfinite_weights(model: nn.Module, policy: str = "error") -> dict[str, str]:
    """Find parameters holding NaN or ±inf before any work is spent on them. `error` refuses the model,
    naming them; `zero` sets those weights to 0 and returns what it changed (recorded in result.json)."""
    found = {name: nonfinite_counts(param) for name, param in model.named_parameters()
             if not all_finite(param)}
    if not found:
        return {}
    if policy == "error":
        names = sorted(found)
        shown = "; ".join(f"{name}: {found[name]}" for name in names[:5])
        more = f" and {len(names) - 5} more parameters" if len(names) > 5 else ""
        raise QuantbenchError(f"the model has non-finite weights ({shown}{more}); fix the checkpoint, or set "
                              "model.nonfinite_weights: zero to replace them by 0")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in found:
                param.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    log.warning("replaced non-finite weights by 0 in %d parameter(s): %s", len(found), ", ".join(sorted(found)))
    return found


def blocks_path(model: nn.Module) -> str:
    check_supported(model.config)
    return BLOCK_PATHS[model.config.model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks; on first use, fused expert tensors are split into per-expert linears (experts.py)."""
    blocks = model.get_submodule(blocks_path(model))
    if not getattr(model, "_quantbench_experts_split", False):
        split_experts(model, blocks)
        model._quantbench_experts_split = True
    return blocks


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder block returns (some families return a tuple, some a tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def trial_autocast(block: nn.Module, enabled: bool | None):
    """bfloat16 autocast for the many trial forwards a search or a learned rounding runs through a block
    (AWQ's α grid, AutoRound's steps), as the reference implementations run them in half precision.
    `enabled` None: on where the block computes in float32 on a GPU."""
    device = next(block.parameters()).device
    if enabled is None:
        enabled = device.type == "cuda" and next(block.parameters()).dtype == torch.float32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear layers of one block, by name relative to the block, in forward order; routers stay out."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in ROUTER_NAMES}


def model_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every quantizable linear in the decoder blocks, by full module name."""
    prefix = blocks_path(model)
    return {
        f"{prefix}.{index}.{name}": linear
        for index, block in enumerate(decoder_blocks(model))
        for name, linear in block_linears(block).items()
    }


def move_except_blocks(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer outside the decoder blocks to `device` (tied weights stay tied)."""
    blocks = decoder_blocks(model)

    def visit(module: nn.Module) -> None:
        if module is blocks:
            return
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)
        for child in module.children():
            visit(child)

    visit(model)


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the model computes from the last decoder block's output `hidden` (final norm, OPT's
    output projection where it has one, LM head, Granite's and Cohere's logit scales, Gemma 2's soft-capping)."""
    config = model.config
    hidden = model.get_submodule(FINAL_NORM_PATHS[config.model_type])(hidden)
    if config.model_type == "opt" and model.model.decoder.project_out is not None:
        hidden = model.model.decoder.project_out(hidden)
    logits = model.get_output_embeddings()(hidden)
    if config.model_type in ("granite", "granitemoe"):
        logits = logits / config.logits_scaling
    if config.model_type in ("cohere", "cohere2"):
        logits = logits * config.logit_scale
    if cap := getattr(config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits
