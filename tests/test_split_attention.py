"""The split-cache decode attention (export/kernels/split_attention.py): scaled_dot_product_attention with each
key/value head repeated for its query heads, whatever the chunks, masks and head counts. Its Triton kernels run on
the GPU where there is one, else in Triton's interpreter (conftest.py), which `_processors` gives 4 multiprocessors
so that the cache is split and merged."""

import pytest
import torch

from quantbench.export.kernels import decode_attention, split_attention
from quantbench.export.kernels.split_attention import BLOCK_L, applies, chunk_length, split_decode_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cache(batch, heads, kv_heads, length, dim, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key, value = (torch.randn(batch, kv_heads, length, dim, generator=g) for _ in range(2))
    return (t.to(DEVICE, dtype) for t in (query, key, value))


def reference(query, key, value, mask, scale):
    """float32 attention with transformers' repeated key/value heads → [B, 1, H, D]."""
    groups = query.shape[1] // key.shape[1]
    repeated = [t.float().repeat_interleave(groups, dim=1) for t in (key, value)]
    return torch.nn.functional.scaled_dot_product_attention(query.float(), *repeated, attn_mask=mask,
                                                            scale=scale).transpose(1, 2)


# (batch, query heads, key/value heads, cache length, head width, mask rows: 0 none, 1 shared, B one a sequence)
SHAPES = {
    "llama-like groups of 4, a mask a sequence": (2, 8, 2, 150, 32, 2),
    "one shared mask, chunk tails": (1, 12, 4, 200, 64, 1),
    "groups of 8 (16-row tile), no mask": (1, 16, 2, 70, 16, 0),
    "no grouping": (1, 4, 4, 150, 16, 1),
    "5 heads a group (padded rows)": (1, 10, 2, 129, 32, 1),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_split_attention_equals_attention_with_repeated_heads(shape):
    batch, heads, kv_heads, length, dim, mask_rows = SHAPES[shape]
    query, key, value = cache(batch, heads, kv_heads, length, dim)
    mask = None
    if mask_rows:
        mask = torch.rand(mask_rows, 1, 1, length, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True
        mask = mask.to(DEVICE)
    assert applies(query, key, value, mask)
    assert chunk_length(batch * kv_heads, length, split_attention._processors(query.device)) < length  # split
    got = split_decode_attention(query, key, value, mask, 0.2)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == torch.float16
    # fp16 inputs and output (outputs below 4 in size: half an fp16 step there is 2e-3) against float32
    torch.testing.assert_close(got.float(), reference(query, key, value, mask, 0.2), rtol=0, atol=4e-3)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot, triton 3.9)"))])
def test_hidden_positions_change_nothing_and_empty_chunks_add_nothing(dtype):
    """NaN keys and values where the mask hides them, whole chunks hidden (only 3 of 300 positions attended, one of
    them last): the attention of the 3 positions alone."""
    query, key, value = cache(2, 8, 2, 300, 32, dtype=dtype)
    mask = torch.zeros(1, 1, 1, 300, dtype=torch.bool, device=DEVICE)
    mask[..., [0, 130, 299]] = True
    key[:, :, ~mask[0, 0, 0]] = float("nan")
    value[:, :, ~mask[0, 0, 0]] = float("nan")
    got = split_decode_attention(query, key, value, mask, 0.17)
    visible = mask[0, 0, 0]
    expected = reference(query, key[:, :, visible], value[:, :, visible], None, 0.17)
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=4e-3 if dtype == torch.float16 else 3e-2)


def test_long_caches_split_into_whole_blocks_for_every_multiprocessor():
    for batch_heads, length, processors in [(8, 265, 132), (8, 16384, 132), (64, 4096, 132), (8, 50, 132),
                                            (2, 1000, 4)]:
        chunk = chunk_length(batch_heads, length, processors)
        parts = -(-length // chunk)
        assert chunk % BLOCK_L == 0
        blocks = -(-length // BLOCK_L)
        assert batch_heads * parts >= min(processors, batch_heads * blocks)  # every processor busy
        assert batch_heads * (parts - 1) < 2 * processors  # and no more than two programs a processor


def test_calls_the_kernel_does_not_take():
    query, key, value = cache(1, 8, 2, 40, 32)
    assert not applies(query.float(), key.float(), value.float(), None)  # float32
    assert not applies(query, key, value, torch.zeros(1, 1, 1, 40, device=DEVICE))  # an additive mask
    assert not applies(query, key, value, torch.ones(1, 8, 1, 40, dtype=torch.bool, device=DEVICE))  # per head
    assert not applies(torch.cat([query, query], 2), key, value, None)  # two query tokens
    assert not applies(query[..., :24], key[..., :24], value[..., :24], None)  # width not a power of two
    assert not applies(query, key.transpose(2, 3).contiguous().transpose(2, 3), value, None)  # strided width


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the split kernel serves CUDA tensors only")
def test_gpu_decode_attention_goes_to_the_split_kernel_compiled_or_not(monkeypatch):
    query, key, value = cache(2, 8, 2, 300, 64)
    mask = (torch.arange(300, device=DEVICE) < 200).view(1, 1, 1, 300)
    module = torch.nn.Module()
    module.num_key_value_groups = 4
    eager, _ = decode_attention.decode_attention(module, query, key, value, mask, scaling=0.125)
    compiled = torch.compile(lambda *a: decode_attention.decode_attention(module, *a, scaling=0.125)[0],
                             fullgraph=True)(query, key, value, mask)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(eager.float(), reference(query, key, value, mask, 0.125), rtol=0, atol=4e-3)
    monkeypatch.setenv(decode_attention.KERNEL_ENV, "sdpa")
    grouped, _ = decode_attention.decode_attention(module, query, key, value, mask, scaling=0.125)
    monkeypatch.setattr(split_attention, "split_decode_attention", None)  # the split kernel is not called
    torch.testing.assert_close(decode_attention.decode_attention(module, query, key, value, mask, scaling=0.125)[0],
                               grouped, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the split kernel serves CUDA tensors only")
def test_gpu_static_cache_decode_through_the_split_kernel_gives_sdpas_logits(monkeypatch):
    """A float16 Llama of 4 query heads on 2 key/value heads on the GPU, prefilled and decoded 6 steps with a static
    cache of 200 positions (4 chunks, most of them hidden): `sdpa`'s logits, every decode step through the split
    kernel."""
    from helpers import tiny_llama
    from transformers import StaticCache

    from quantbench.generate import cache_argument

    model = tiny_llama(init_std=0.1).half().to(DEVICE)
    ids = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    tokens = torch.randint(0, 320, (2, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run():
        cache = StaticCache(config=model.config, max_cache_len=200)
        cached = {cache_argument(model): cache, "use_cache": True}
        logits = [model(ids, cache_position=torch.arange(5, device=DEVICE), **cached).logits]
        for step, position in enumerate(range(5, 11)):
            logits.append(model(tokens[:, step:step + 1], cache_position=torch.tensor([position], device=DEVICE),
                                **cached).logits)
        return torch.cat(logits, 1).float()

    calls = []
    original = split_attention.split_decode_attention
    monkeypatch.setattr(split_attention, "split_decode_attention", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        expected = run()
        assert decode_attention.use_decode_attention(model)
        got = run()
    assert len(calls) == 12  # 6 steps of 2 layers
    assert expected.abs().max() > 0.5  # logits well above the tolerance
    torch.testing.assert_close(got, expected, rtol=0, atol=3e-2)
