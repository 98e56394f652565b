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


def tiny_llama(vocab_size: int = 320, tie: bool = True, layers: int = 2, hidden: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=512, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def tiny_opt(vocab_size: int = 320, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=vocab_size, word_embed_proj_dim=64, max_position_embeddings=512)
    return OPTForCausalLM(config).eval()


def tiny_gpt_neox(vocab_size: int = 320, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=vocab_size, max_position_embeddings=512)
    return GPTNeoXForCausalLM(config).eval()
