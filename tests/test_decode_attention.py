"""A decode step's attention on grouped query heads (export/kernels/decode_attention.py): the same attention as
transformers' `sdpa` with its key/value heads repeated, without the copies."""

import pytest
import torch
from helpers import tiny_llama

from quantbench.export.kernels import decode_attention
from quantbench.export.kernels.decode_attention import ATTENTION, use_decode_attention


def test_grouped_query_heads_attend_as_with_their_key_value_heads_repeated(monkeypatch):
    """Query head h reads key/value head h // groups (transformers' repeat_kv), under a mask that hides some
    positions of each row; a single query token never takes transformers' path."""
    import transformers.integrations.sdpa_attention as sdpa

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 8, 2, 11, 16
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    mask = torch.rand(batch, 1, 1, length, generator=g) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads

    def refused(*args, **kwargs):
        raise AssertionError("a single query token went to transformers' sdpa")

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", refused)
    out, weights = decode_attention.decode_attention(module, query, key, value, mask, scaling=0.3)
    repeated = [t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.3)
    assert weights is None and out.shape == (batch, 1, heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    # a masked-out position changes nothing: the mask is applied, not ignored
    changed = value.clone()
    changed[0, :, ~mask[0, 0, 0]] += 100.0
    again, _ = decode_attention.decode_attention(module, query, key, changed, mask, scaling=0.3)
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-6)


def test_prompts_and_per_head_masks_go_to_transformers_sdpa(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    calls = []
    original = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    key = value = torch.randn(1, 2, 5, 8)
    decode_attention.decode_attention(module, torch.randn(1, 4, 3, 8), key, value, None)  # a prompt of 3
    decode_attention.decode_attention(module, torch.randn(1, 4, 1, 8), key, value, torch.ones(1, 4, 1, 5) > 0)
    assert len(calls) == 2


def sliding_mistral():
    """A Mistral whose layers see 4 positions back: the decode below runs past its window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.1,
                           attn_implementation="sdpa")
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("build", [lambda: tiny_llama(init_std=0.1), sliding_mistral], ids=["llama", "mistral"])
def test_a_static_cache_decode_gives_sdpas_logits_through_grouped_heads(monkeypatch, build):
    """A model of 4 query heads on 2 key/value heads, prefilled and decoded with a static cache as a compiled
    step would be: the same logits as `sdpa` (a sliding window's mask included), and every decode step's
    attention on grouped heads."""
    from transformers import StaticCache

    from quantbench.generate import cache_argument

    model = build()
    assert model.config._attn_implementation == "sdpa"

    def run():
        cache = StaticCache(config=model.config, max_cache_len=24)
        ids = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(1))
        tokens = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(2))  # the same in both runs
        cached = {cache_argument(model): cache, "use_cache": True}
        logits = [model(ids, cache_position=torch.arange(5), **cached).logits]
        for step, position in enumerate(range(5, 11)):
            logits.append(model(tokens[:, step:step + 1], cache_position=torch.tensor([position]), **cached).logits)
        return logits

    grouped = []
    attention = decode_attention.decode_attention

    def counted(module, query, *args, **kwargs):
        grouped.append(query.shape[2])
        return attention(module, query, *args, **kwargs)

    monkeypatch.setattr(decode_attention, "decode_attention", counted)
    try:
        with torch.no_grad():
            expected = run()
            assert use_decode_attention(model) and model.config._attn_implementation == ATTENTION
            got = run()
    finally:  # the counting function leaves transformers' registry again
        monkeypatch.undo()
        decode_attention.register()
    assert grouped == [5] * 2 + [1] * 12  # the prompt through each of 2 layers, then 6 steps of 2 layers
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not use_decode_attention(model)  # already switched


def test_other_attention_implementations_are_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_decode_attention(model) and model.config._attn_implementation == "eager"
