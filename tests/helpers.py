"""Tiny models and tokenizers built in-process for unit tests."""

from __future__ import annotations

import random

import torch

WORDS = ("the quantized model reads every block of weights and rounds each group to a small grid while the "
         "calibration data flows through layers one at a time so that errors stay small and perplexity stays "
         "low on text about rivers cities music science history and the weather in spring").split()


def pseudo_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        length = rng.randint(5, 15)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        words += length
    return " ".join(sentences)


TINY_TASK_DOCS = [
    {"question": "Where does the river flow", "choices": ["to the sea", "into the music", "up the city"], "label": 0},
    {"question": "What rounds each group", "choices": ["the weather", "the quantized model"], "label": 1},
    {"question": "When is the data small", "choices": ["in spring", "at the block", "while rounding"], "label": 2},
    {"question": "Who reads every block", "choices": ["the model", "history", "cities"], "label": 0},
    {"question": "What stays low", "choices": ["perplexity", "science"], "label": 0},
    {"question": "How do layers run", "choices": ["one at a time", "all at once", "never"], "label": 0},
]


def write_tiny_task(folder) -> None:
    """A local lm-eval multiple-choice task `tiny_mc_local` over TINY_TASK_DOCS, as the offline task copies are."""
    import json

    import yaml

    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in TINY_TASK_DOCS))
    config = {
        "task": "tiny_mc_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice", "training_split": None, "validation_split": "validation",
        "test_split": None, "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "label",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (folder / "tiny_mc_local.yaml").write_text(yaml.safe_dump(config))


def make_recipe(tmp_path, model_dir, text_file, **changes):
    """A small run recipe on the tiny model directory; `changes` update its sections."""
    import yaml

    data = {
        "name": "tiny",
        "model": {"name": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {"source": str(text_file), "n_samples": 4, "seqlen": 32, "seed": 0},
        "quantize": {"default": "int4-g32-rtn", "overrides": [{"pattern": "down_proj", "scheme": "int8-pc-rtn"}]},
        "eval": {"perplexity": [str(text_file)], "seqlen": 64, "max_windows": 4},
        "output": {"dir": str(tmp_path / "runs" / "tiny")},
    }
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def invoke(*args):
    """Run the `quantbench` command line in-process; arguments may be paths."""
    from typer.testing import CliRunner

    from quantbench.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([pseudo_text(3000, seed) for seed in range(3)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def tiny_llama(vocab_size: int = 320, tie: bool = True, layers: int = 2, hidden: int = 64, seed: int = 0,
               init_std: float = 0.02, kv_heads: int = 2):
    """A random Llama. With the default init its next-token distribution is nearly uniform, so measures of
    how far quantization moves the output (KL) sit at float rounding level; init_std 0.1 gives a peaked
    distribution whose KL values are far above it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                         max_position_embeddings=512, tie_word_embeddings=tie, initializer_range=init_std)
    return LlamaForCausalLM(config).eval()


def tiny_opt(vocab_size: int = 320, seed: int = 0, positions: int = 512):
    """A random OPT: learned positions, a table of `positions` rows (a position past them fails)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=vocab_size, word_embed_proj_dim=64, max_position_embeddings=positions)
    return OPTForCausalLM(config).eval()


def tiny_gpt_neox(vocab_size: int = 320, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=vocab_size, max_position_embeddings=512)
    return GPTNeoXForCausalLM(config).eval()


def _from_config(model_type: str, seed: int, **shape):
    """A random model of `model_type` from its registered config class, with special token ids inside the
    tiny vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2, **shape)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_phi(vocab_size: int = 320, seed: int = 0):
    """Phi-1/1.5/2: attention and MLP in parallel off one LayerNorm, partial rotary, biases everywhere."""
    return _from_config("phi", seed, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, vocab_size=vocab_size, max_position_embeddings=512)


def tiny_falcon(vocab_size: int = 320, seed: int = 0):
    """Falcon-40B/180B: fused query_key_value with grouped kv heads, two LayerNorms feeding attention and the MLP
    in parallel."""
    return _from_config("falcon", seed, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                        new_decoder_architecture=True, vocab_size=vocab_size)


def tiny_falcon_7b(vocab_size: int = 320, seed: int = 0):
    """Falcon-7B: one kv head, one LayerNorm feeding attention and the MLP in parallel."""
    return _from_config("falcon", seed, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                        new_decoder_architecture=False, parallel_attn=True, vocab_size=vocab_size)


def tiny_gptj(vocab_size: int = 320, seed: int = 0):
    """GPT-J: parallel attention and MLP off one LayerNorm, rotary positions on part of each head."""
    return _from_config("gptj", seed, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=vocab_size,
                        n_positions=512)


def tiny_bloom(vocab_size: int = 320, seed: int = 0):
    """BLOOM: ALiBi positions, fused query_key_value, a LayerNorm after the embeddings."""
    return _from_config("bloom", seed, hidden_size=64, n_layer=2, n_head=4, vocab_size=vocab_size)


def assert_matmul_close(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` equals x @ weightᵀ up to float summation error: within n·eps·(|x| @ |weight|ᵀ) of the exact
    product (n the inner dimension, eps that of `got`'s dtype), the textbook bound whatever order the sums
    run in, so it holds on any CPU and thread count."""
    x64, w64 = x.double(), weight.double()
    bound = x.shape[-1] * torch.finfo(got.dtype).eps * (x64.abs() @ w64.abs().T)
    error = (got.double() - x64 @ w64.T).abs()
    assert (error <= bound).all(), f"error {float((error - bound).max()):.3g} above the rounding bound"


def tiny_qwen2_sliding_window(vocab_size: int = 320, seed: int = 0):
    """Qwen2 with its last two of four layers on a 4-token sliding window: blocks of two layer types, which the
    model passes different attention masks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                         use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    return Qwen2ForCausalLM(config).eval()


def tiny_gemma2(vocab_size: int = 320, seed: int = 0):
    """Gemma 2: sliding-window and global layers alternate, norms scale by 1 + w, attention and final logits
    are soft-capped."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                          vocab_size=vocab_size, max_position_embeddings=512)
    return _random_norms(Gemma2ForCausalLM(config).eval(), seed)


def tiny_gemma3_text(vocab_size: int = 320, seed: int = 0):
    """Gemma 3 (text): sliding-window layers with their own rotary base between global ones, q/k norms."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                              sliding_window_pattern=2, vocab_size=vocab_size, max_position_embeddings=512)
    return _random_norms(Gemma3ForCausalLM(config).eval(), seed)


def tiny_gemma3(vocab_size: int = 320, seed: int = 0):
    """Gemma 3 as released: a SigLIP vision encoder and projector beside the language model
    (`model.language_model`), Gemma 3 text's layers."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = AutoConfig.for_model("gemma3", text_config=tiny_gemma3_text(vocab_size, seed).config.to_dict(),
                                  vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=28, patch_size=14),
                                  mm_tokens_per_image=4, image_token_index=vocab_size - 1,
                                  boi_token_index=vocab_size - 2, eoi_token_index=vocab_size - 3)
    return _random_norms(AutoModelForImageTextToText.from_config(config).eval(), seed)


def tiny_phi3(vocab_size: int = 320, seed: int = 0):
    """Phi-3/4: fused qkv_proj and gate_up_proj."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config).eval()


def _llama_shaped(model_type: str, vocab_size: int, seed: int, **extra):
    """A random model of a family laid out like Llama (blocks under `model.layers`, q/k/v/o under `self_attn`,
    the MLP under `mlp`)."""
    return _from_config(model_type, seed, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                        max_position_embeddings=512, **extra)


def tiny_gemma(vocab_size: int = 320, seed: int = 0):
    """Gemma (1): norms scale by 1 + w, embeddings by √hidden."""
    return _random_norms(_llama_shaped("gemma", vocab_size, seed, head_dim=16), seed)


def tiny_olmo2(vocab_size: int = 320, seed: int = 0):
    """OLMo 2: norms after attention and MLP (on their outputs), q/k norms over the whole projection."""
    return _random_norms(_llama_shaped("olmo2", vocab_size, seed), seed)


def tiny_olmo3(vocab_size: int = 320, seed: int = 0):
    """OLMo 3: OLMo 2's norms, sliding-window layers between global ones."""
    return _random_norms(_llama_shaped("olmo3", vocab_size, seed, sliding_window=4), seed)


def tiny_granite(vocab_size: int = 320, seed: int = 0):
    """Granite: embeddings, residual branches and attention scores multiplied, logits divided, all away from 1."""
    return _llama_shaped("granite", vocab_size, seed, embedding_multiplier=3.0, residual_multiplier=0.5,
                         attention_multiplier=0.2, logits_scaling=4.0)


def tiny_cohere(vocab_size: int = 320, seed: int = 0):
    """Cohere (Command R): attention and MLP in parallel off one layer norm, q/k layer norms, logits scaled."""
    return _llama_shaped("cohere", vocab_size, seed, use_qk_norm=True, logit_scale=0.5)


def tiny_cohere2(vocab_size: int = 320, seed: int = 0):
    """Cohere 2 (Command R7B, A): attention and MLP in parallel off one layer norm, sliding-window layers,
    logits scaled."""
    return _llama_shaped("cohere2", vocab_size, seed, sliding_window=4, logit_scale=0.5)


def tiny_smollm3(vocab_size: int = 320, seed: int = 0):
    """SmolLM3: every fourth layer without rotary positions."""
    return _llama_shaped("smollm3", vocab_size, seed)


def tiny_glm4(vocab_size: int = 320, seed: int = 0):
    """GLM-4: fused gate_up_proj, norms after attention and MLP as well as before, partial rotary."""
    return _random_norms(_llama_shaped("glm4", vocab_size, seed, head_dim=16), seed)


def tiny_starcoder2(vocab_size: int = 320, seed: int = 0):
    """StarCoder2: LayerNorms with biases, an MLP without a gate (c_fc, c_proj), biases everywhere."""
    return _llama_shaped("starcoder2", vocab_size, seed)


def tiny_stablelm(vocab_size: int = 320, seed: int = 0):
    """StableLM: LayerNorms, rotary positions on a quarter of each head, q/k/v biases."""
    return _llama_shaped("stablelm", vocab_size, seed, use_qkv_bias=True)


def tiny_exaone4(vocab_size: int = 320, seed: int = 0):
    """EXAONE 4: norms after attention and the MLP, q/k norms, sliding-window layers."""
    return _random_norms(_llama_shaped("exaone4", vocab_size, seed, sliding_window=4), seed)


def tiny_ernie4_5(vocab_size: int = 320, seed: int = 0):
    return _llama_shaped("ernie4_5", vocab_size, seed)


def tiny_seed_oss(vocab_size: int = 320, seed: int = 0):
    """Seed-OSS: q/k/v biases."""
    return _llama_shaped("seed_oss", vocab_size, seed)


def tiny_helium(vocab_size: int = 320, seed: int = 0):
    return _llama_shaped("helium", vocab_size, seed, head_dim=16)


def tiny_apertus(vocab_size: int = 320, seed: int = 0):
    """Apertus: an MLP without a gate (up, then xIELU, then down), q/k norms."""
    return _llama_shaped("apertus", vocab_size, seed, rope_parameters={"rope_type": "default", "rope_theta": 1e4})


def tiny_arcee(vocab_size: int = 320, seed: int = 0):
    """Arcee (AFM): an MLP without a gate (up, then ReLU², then down)."""
    return _llama_shaped("arcee", vocab_size, seed)


def _random_norms(model, seed: int):
    """Gemma initialises its norm weights w to 0 (scale 1 + w): random ones show a norm handled as plain w."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def _moe(model_class, config, seed: int):
    """A tiny mixture-of-experts model with random expert weights (transformers leaves fused expert tensors
    uninitialised when built from a config)."""
    torch.manual_seed(seed)
    config._experts_implementation = "eager"
    model = model_class(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 3 or name.endswith("gate.weight"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def tiny_qwen3_moe(vocab_size: int = 320, seed: int = 0, experts: int = 8):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts,
                            num_experts_per_tok=2, vocab_size=vocab_size, max_position_embeddings=512)
    return _moe(Qwen3MoeForCausalLM, config, seed)


def tiny_qwen2_moe(vocab_size: int = 320, seed: int = 0):
    """Qwen2-MoE: routed experts plus a shared expert behind a sigmoid gate (a linear that stays in 16 bits)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=vocab_size,
                            max_position_embeddings=512)
    return _moe(Qwen2MoeForCausalLM, config, seed)


def tiny_mixtral(vocab_size: int = 320, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           vocab_size=vocab_size, max_position_embeddings=512)
    return _moe(MixtralForCausalLM, config, seed)


def tiny_deepseek_v3(vocab_size: int = 320, seed: int = 0):
    """DeepSeek-V3: multi-head latent attention (low-rank q and kv projections), a dense first layer, then
    routed experts in groups plus shared experts."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                              q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                              n_group=2, topk_group=1, vocab_size=vocab_size, max_position_embeddings=512)
    return _moe(DeepseekV3ForCausalLM, config, seed)


def tiny_deepseek_v2(vocab_size: int = 320, seed: int = 0):
    """DeepSeek-V2: latent attention with a full-rank q projection (q_lora_rank None), softmax routing over
    expert groups, shared experts."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                              q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                              n_group=2, topk_group=1, topk_method="group_limited_greedy",
                              vocab_size=vocab_size, max_position_embeddings=512)
    return _moe(DeepseekV2ForCausalLM, config, seed)


def _moe_shaped(model_type: str, vocab_size: int, seed: int, **extra):
    """A random mixture-of-experts model of a family laid out like Qwen3-MoE (blocks under `model.layers`,
    fused experts under `mlp.experts`), from its registered config class; `extra` names its expert counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2)
    return _moe(AutoModelForCausalLM.from_config, AutoConfig.for_model(model_type, **{**shape, **extra}), seed)


def tiny_olmoe(vocab_size: int = 320, seed: int = 0):
    """OLMoE: q/k norms over the whole projection, softmax routing without renormalising the top k."""
    return _moe_shaped("olmoe", vocab_size, seed, num_experts=8, num_experts_per_tok=2)


def tiny_phimoe(vocab_size: int = 320, seed: int = 0):
    """Phi-3.5-MoE: LayerNorms, q/k/v biases, sparse-mixer routing."""
    return _moe_shaped("phimoe", vocab_size, seed, num_local_experts=4, num_experts_per_tok=2)


def tiny_glm4_moe(vocab_size: int = 320, seed: int = 0):
    """GLM-4.5: a dense first layer, then sigmoid routing with a correction bias plus a shared expert."""
    return _moe_shaped("glm4_moe", vocab_size, seed, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, use_qk_norm=True)


def tiny_ernie4_5_moe(vocab_size: int = 320, seed: int = 0):
    """ERNIE 4.5 MoE: a dense first layer, routed experts plus shared ones."""
    return _moe_shaped("ernie4_5_moe", vocab_size, seed, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
                       moe_num_shared_experts=1, moe_layer_start_index=1)


def tiny_hunyuan_v1_moe(vocab_size: int = 320, seed: int = 0):
    """Hunyuan-A13B: q/k norms, a router linear named `wg` computed in float32, a shared MLP."""
    return _moe_shaped("hunyuan_v1_moe", vocab_size, seed, head_dim=16, num_experts=4, moe_topk=2,
                       moe_intermediate_size=32)


def tiny_dots1(vocab_size: int = 320, seed: int = 0):
    """dots.llm1: DeepSeek-V3's routing and shared expert on q/k/v/o attention with q/k norms."""
    return _moe_shaped("dots1", vocab_size, seed, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)


def tiny_flex_olmo(vocab_size: int = 320, seed: int = 0):
    """FlexOlmo: OLMo 2's norms after attention and the MLP around OLMoE's experts."""
    return _random_norms(_moe_shaped("flex_olmo", vocab_size, seed, num_experts=4, num_experts_per_tok=2), seed)


def tiny_exaone_moe(vocab_size: int = 320, seed: int = 0):
    """EXAONE MoE: sliding-window layers, a dense first layer, routed experts plus a shared one."""
    return _moe_shaped("exaone_moe", vocab_size, seed, head_dim=16, moe_intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, num_shared_experts=1, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                       mlp_layer_types=["dense", "sparse", "sparse"])


def tiny_solar_open(vocab_size: int = 320, seed: int = 0):
    """Solar Open: sigmoid routing with a correction bias plus a shared expert in every layer."""
    return _moe_shaped("solar_open", vocab_size, seed, head_dim=16, moe_intermediate_size=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2)


def tiny_glm4_moe_lite(vocab_size: int = 320, seed: int = 0):
    """GLM-4.7-Flash: latent attention as DeepSeek-V3's, a dense first layer, routed plus shared experts."""
    return _moe_shaped("glm4_moe_lite", vocab_size, seed, moe_intermediate_size=32, n_routed_experts=8,
                       n_shared_experts=1, num_experts_per_tok=2, q_lora_rank=32, kv_lora_rank=32,
                       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                       mlp_layer_types=["dense", "sparse", "sparse"])


def tiny_afmoe(vocab_size: int = 320, seed: int = 0):
    """AFMoE (Trinity): gated attention, norms around attention and the MLP, sliding-window layers, routed
    experts with a router linear named `gate` plus shared ones."""
    return _moe_shaped("afmoe", vocab_size, seed, head_dim=16, moe_intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, num_shared_experts=1, sliding_window=4, num_dense_layers=1,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def tiny_gpt_oss(vocab_size: int = 320, seed: int = 0):
    """GPT-OSS: experts stored transposed with gate and up interleaved and biases, a clamped SwiGLU with up + 1,
    attention sinks, sliding-window layers between full ones, a router with a bias."""
    model = _moe_shaped("gpt_oss", vocab_size, seed, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        swiglu_limit=0.3, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                           "original_max_position_embeddings": 128})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("_bias", "sinks", "router.bias")):
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def tiny_qwen3_next(vocab_size: int = 320, seed: int = 0):
    """Qwen3-Next: Gated DeltaNet linear-attention layers between gated full-attention ones, norms that scale
    by 1 + w, routed experts plus a shared expert behind a gate."""
    model = _moe_shaped("qwen3_next", vocab_size, seed, head_dim=16, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32, linear_conv_kernel_dim=4,
                        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                        linear_num_value_heads=4, num_hidden_layers=4,
                        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
    return _random_norms(model, seed)  # its norms scale by 1 + w


QWEN3_5_SHAPE = dict(head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                     linear_num_key_heads=2, linear_num_value_heads=8, num_hidden_layers=4,
                     layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])


def tiny_qwen3_5_moe(vocab_size: int = 320, seed: int = 0):
    """Qwen3.5-MoE's language model: Qwen3-Next's layers (Gated DeltaNet with separate a/b projections)."""
    return _random_norms(_moe_shaped("qwen3_5_moe_text", vocab_size, seed, num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                     **QWEN3_5_SHAPE), seed)


def tiny_qwen3_5(vocab_size: int = 320, seed: int = 0):
    """Qwen3.5's dense language model: Gated DeltaNet layers between gated full-attention ones."""
    return _random_norms(_from_config("qwen3_5_text", seed, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                      max_position_embeddings=512, **QWEN3_5_SHAPE), seed)


def tiny_qwen3_5_moe_release(vocab_size: int = 320, seed: int = 0):
    """Qwen3.5-MoE as released: a vision encoder beside the language model (`model.language_model.*`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model("qwen3_5_moe", pad_token_id=0, bos_token_id=1, eos_token_id=2)
    text = tiny_qwen3_5_moe(vocab_size, seed).config
    config.text_config = text
    for name, value in dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64).items():
        setattr(config.vision_config, name, value)
    model = AutoModelForImageTextToText.from_config(config).eval()
    return _random_norms(model, seed)


def tiny_granitemoe(vocab_size: int = 320, seed: int = 0):
    """Granite MoE: Granite's multipliers and logit scaling, experts under `block_sparse_moe`, stored fused in its
    checkpoints (`input_linear`, `output_linear`)."""
    return _moe_shaped("granitemoe", vocab_size, seed, num_local_experts=4, num_experts_per_tok=2,
                       embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=4.0)


MOE_BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "qwen2_moe": tiny_qwen2_moe, "mixtral": tiny_mixtral,
                "deepseek_v2": tiny_deepseek_v2, "deepseek_v3": tiny_deepseek_v3, "olmoe": tiny_olmoe,
                "phimoe": tiny_phimoe, "glm4_moe": tiny_glm4_moe,
                "ernie4_5_moe": tiny_ernie4_5_moe, "hunyuan_v1_moe": tiny_hunyuan_v1_moe, "dots1": tiny_dots1,
                "flex_olmo": tiny_flex_olmo, "exaone_moe": tiny_exaone_moe, "solar_open": tiny_solar_open,
                "glm4_moe_lite": tiny_glm4_moe_lite, "afmoe": tiny_afmoe, "gpt_oss": tiny_gpt_oss,
                "qwen3_next": tiny_qwen3_next, "qwen3_5_moe_text": tiny_qwen3_5_moe, "granitemoe": tiny_granitemoe}
LLAMA_SHAPED_BUILDERS = {"gemma": tiny_gemma, "olmo2": tiny_olmo2, "olmo3": tiny_olmo3, "granite": tiny_granite,
                         "cohere": tiny_cohere, "cohere2": tiny_cohere2, "smollm3": tiny_smollm3, "glm4": tiny_glm4,
                         "starcoder2": tiny_starcoder2, "stablelm": tiny_stablelm, "exaone4": tiny_exaone4,
                         "ernie4_5": tiny_ernie4_5, "seed_oss": tiny_seed_oss, "helium": tiny_helium,
                         "apertus": tiny_apertus, "arcee": tiny_arcee}
OLDER_BUILDERS = {"phi": tiny_phi, "falcon": tiny_falcon, "falcon_7b": tiny_falcon_7b, "gptj": tiny_gptj,
                  "bloom": tiny_bloom, "qwen3_5_text": tiny_qwen3_5, "gemma3": tiny_gemma3}
FAMILY_BUILDERS = {"llama": tiny_llama, "opt": tiny_opt, "gpt_neox": tiny_gpt_neox, **OLDER_BUILDERS,
                   "qwen2_sliding_window": tiny_qwen2_sliding_window, "gemma2": tiny_gemma2,
                   "gemma3_text": tiny_gemma3_text, "phi3": tiny_phi3,
                   **LLAMA_SHAPED_BUILDERS, **MOE_BUILDERS}  # one tiny config per family of the table


def with_scaled_norms(model, seed=0, outliers=(), factor=8.0):
    """Norm scales away from 1 (so folding them matters), and optionally a few `factor` times larger: the
    outlier channels of real LLMs' activations, which make per-token activation quantization fail and which
    activation-aware scaling is for."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data = 1 + 0.3 * torch.randn(param.shape, generator=generator)
            param.data[list(outliers)] *= factor
    return model
