import math

import torch
from helpers import tiny_llama

from quantbench.eval.perplexity import dataset_perplexity, perplexity_of_ids


def test_perplexity_equals_a_hand_computation():
    model = tiny_llama()
    ids = torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(0))
    seqlen = 16
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(100 // seqlen):  # 6 windows; the 4 tokens left over are not scored
            window = ids[w * seqlen:(w + 1) * seqlen]
            probs = torch.softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                nll -= math.log(probs[t, window[t + 1]].item())
                count += 1
    result = perplexity_of_ids(model, ids, seqlen, batch_size=4)
    assert result.windows == 6 and result.tokens == count == 90
    assert math.isclose(result.ppl, math.exp(nll / count), rel_tol=1e-5)


def test_max_windows_and_batching_do_not_change_the_result():
    model = tiny_llama()
    ids = torch.randint(0, 320, (200,), generator=torch.Generator().manual_seed(1))
    one = perplexity_of_ids(model, ids, 20, max_windows=5, batch_size=1)
    batched = perplexity_of_ids(model, ids, 20, max_windows=5, batch_size=3)
    assert one.windows == 5
    assert math.isclose(one.ppl, batched.ppl, rel_tol=1e-6)
    assert one.ppl != perplexity_of_ids(model, ids, 20, max_windows=6).ppl


def test_local_text_file(model_dir, text_file, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result = dataset_perplexity(model, tokenizer, str(text_file), seqlen=64, max_windows=3, progress=False)
    assert result.windows == 3 and 1 < result.ppl < 2 * len(tokenizer)
    assert len(result.text_fingerprint) == 64
