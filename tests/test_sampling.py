import random

import pytest
import torch

from quantbench.errors import QuantbenchError
from quantbench.sampling import (Draws, Sampling, _fmix32_tensor, _signed, _splitmix_tensor, fmix32, kept_floors,
                                 next_tokens, prompt_key, splitmix)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
KERNELS_ON = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: Triton's interpreter


def test_the_reference_hashes_give_splitmix64s_and_murmur3s_published_outputs():
    state, outputs = 1234567, []
    for _ in range(3):  # SplitMix64 seeded 1234567, as its reference implementation prints
        outputs.append(splitmix(state))
        state += 0x9E3779B97F4A7C15
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    assert fmix32(0) == 0 and fmix32(1) == 0x514E28B7


@pytest.mark.parametrize("device", DEVICES)
def test_the_hashes_on_tensors_wrap_as_unsigned_words_do(device):
    """Bit for bit the references' words, the extremes of both signs included: a multiplication that overflowed
    otherwise, or a shift that copied the sign bit, changes them."""
    pick = random.Random(0)
    words = [0, 1, -1, 2**63 - 1, -2**63] + [pick.getrandbits(64) for _ in range(500)]
    signed = torch.tensor([_signed(word, 64) for word in words], device=device)
    assert _splitmix_tensor(signed).tolist() == [_signed(splitmix(word), 64) for word in words]
    halves = [0, 1, -1, 2**31 - 1, -2**31] + [pick.getrandbits(32) for _ in range(500)]
    signed = torch.tensor([_signed(word, 32) for word in halves], dtype=torch.int32, device=device)
    assert _fmix32_tensor(signed).tolist() == [_signed(fmix32(word), 32) for word in halves]


def expected_uniform(seed: int, number: int, token: int, entry: int) -> float:
    """Row `number`'s uniform for vocabulary entry `entry` at its token `token`, from the references alone."""
    key = splitmix(prompt_key(seed, number) + token * 0x9E3779B97F4A7C15)
    word = fmix32((key >> 32) + (entry + 1) * 0x9E3779B9)
    return ((word >> 9) + 0.5) / 2 ** 23


@pytest.mark.parametrize("device", DEVICES)
def test_a_prompts_uniforms_depend_on_its_number_and_token_alone(device):
    draws = Draws.of(Sampling(1.0, seed=-5), [7, 3], torch.device(device))
    vocabulary = torch.arange(40, device=device)
    first, second = draws.uniform(vocabulary), draws.uniform(vocabulary)
    for row, number in enumerate([7, 3]):
        for token, uniform in enumerate([first, second]):
            assert uniform[row].tolist() == [expected_uniform(-5, number, token, v) for v in range(40)]
    alone = Draws.of(Sampling(1.0, seed=-5), [3], torch.device(device))
    assert torch.equal(alone.uniform(vocabulary)[0], first[1])
    draws.start(0, 3)  # row 0 now draws prompt 3's tokens from its first, as prompt 3 did in row 1
    assert torch.equal(draws.uniform(vocabulary)[0], first[1]) and draws.counts.tolist() == [1, 3]
    copied = draws[[1]]
    assert torch.equal(copied.uniform(vocabulary)[0], draws[[1]].uniform(vocabulary)[0])
    assert draws.counts.tolist() == [1, 3]
    picked = torch.tensor([[5, 0, 39], [2, 2, 17]], device=device)  # some entries only, each row its own
    assert torch.equal(Draws.of(Sampling(1.0, seed=-5), [7, 3], torch.device(device)).uniform(picked),
                       first.gather(1, picked))
    other_seed = Draws.of(Sampling(1.0, seed=-4), [7, 3], torch.device(device))
    assert not torch.equal(other_seed.uniform(vocabulary), first)


def test_uniforms_fill_the_open_unit_interval_evenly():
    """8 rows × 100,000 entries over 2 tokens: none at 0 or 1 (the Gumbel noise stays finite), each tenth of the
    interval within 5 binomial standard deviations of its share, and rows and tokens uncorrelated."""
    draws = Draws.of(Sampling(1.0, seed=1), range(8), torch.device("cpu"))
    entries = torch.arange(100_000)
    uniform = torch.stack([draws.uniform(entries), draws.uniform(entries)])
    assert uniform.dtype == torch.float32 and 0 < uniform.min() and uniform.max() < 1
    assert torch.isfinite(torch.log(-torch.log(uniform))).all()
    count = uniform.numel()
    tenths = torch.histc(uniform, bins=10, min=0, max=1)
    assert torch.all((tenths - count / 10).abs() <= 5 * (count * 0.1 * 0.9) ** 0.5), tenths
    rows = uniform.reshape(16, -1) - 0.5
    correlation = (rows @ rows.T) / (rows.norm(dim=1)[:, None] * rows.norm(dim=1)[None])
    assert (correlation - torch.eye(16)).abs().max() < 5 / 100_000 ** 0.5  # 5 standard deviations of a null one


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])


def drawn_shares(sampling: Sampling, draws: int = 40_000) -> torch.Tensor:
    """The share of each token among `draws` rows of LOGITS, one prompt each (the same on every CPU)."""
    tokens = next_tokens(LOGITS.repeat(draws, 1), sampling, Draws.of(sampling, range(draws), torch.device("cpu")))
    return torch.bincount(tokens.flatten(), minlength=len(LOGITS)) / draws


@pytest.mark.parametrize("sampling, probabilities", [
    (Sampling(1.0, seed=0), LOGITS.softmax(0)),
    (Sampling(0.5, seed=0), (LOGITS / 0.5).softmax(0)),
    (Sampling(2.0, top_k=3, seed=0), torch.cat([(LOGITS[:3] / 2).softmax(0), torch.zeros(3)])),
    # the nucleus: the fewest largest whose probabilities reach 0.8 (0.455 + 0.276 < 0.8 ≤ … + 0.167)
    (Sampling(1.0, top_p=0.8, seed=0), torch.cat([LOGITS[:3].softmax(0), torch.zeros(3)])),
    (Sampling(1.0, top_k=2, top_p=0.99, seed=0), torch.cat([LOGITS[:2].softmax(0), torch.zeros(4)])),
], ids=["softmax", "colder", "top-k", "top-p", "top-k then top-p"])
def test_drawn_tokens_follow_the_softmax_of_what_is_kept(sampling, probabilities):
    """Shares of 40,000 draws within 4.5 binomial standard deviations (at most 0.011) of the probabilities; tokens
    cut away never drawn."""
    shares = drawn_shares(sampling)
    assert torch.all(shares[probabilities == 0] == 0)
    deviation = (probabilities * (1 - probabilities) / 40_000).sqrt()
    assert torch.all((shares - probabilities).abs() <= 4.5 * deviation + 1e-9), (shares, probabilities)


@pytest.mark.parametrize("sampling, candidates", [
    (Sampling(0.7, top_k=5, seed=9), 1024), (Sampling(0.7, top_p=0.6, seed=9), 1024),
    (Sampling(0.7, top_p=0.6, seed=9), 80), (Sampling(0.7, top_p=0.6, seed=9), 8),
    (Sampling(0.7, top_k=5, top_p=0.6, seed=9), 1024),
], ids=["top-k", "top-p, every score sorted", "top-p among the 80 largest", "top-p, 8 too few", "both"])
def test_a_kept_token_has_the_noise_it_has_among_every_token(sampling, candidates, monkeypatch):
    """Whichever tokens a cut keeps, each draws the noise of its own entry: the token is the argmax of the kept
    scores plus the noise the whole vocabulary's draw gives it; the nucleus is the same found among the 80
    largest scores (they hold its mass in every row) or, where 8 do not, among all."""
    import quantbench.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "NUCLEUS_CANDIDATES", candidates)
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2))
    mass = (logits / sampling.temperature).softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    assert (mass[:, 79] >= 0.6).all() and (mass[:, 7] < 0.6).any()
    chosen = next_tokens(logits, sampling, Draws.of(sampling, range(6), torch.device("cpu")))
    noise = Draws.of(sampling, range(6), torch.device("cpu")).uniform(torch.arange(300))
    scores = logits / sampling.temperature
    for row in range(6):
        ordered, order = scores[row].sort(descending=True)
        kept = order[:sampling.top_k or 300]
        if sampling.top_p < 1:
            probabilities = ordered[:len(kept)].softmax(0)
            kept = kept[probabilities.cumsum(0) - probabilities < sampling.top_p]
        assert len(kept) > 1
        best = (scores[row, kept] - torch.log(-torch.log(noise[row, kept]))).argmax()
        assert chosen[row, 0] == kept[best]


def bfloat16_logits(rows: int, vocabulary: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """Logits as a bfloat16 model gives them, about 20: eighths apart, many tied."""
    noise = torch.randn(rows, vocabulary, generator=torch.Generator().manual_seed(seed))
    return (20 + spread * noise).bfloat16().float()


def reference_token(scores: torch.Tensor, sampling: Sampling, uniform: torch.Tensor) -> int:
    """One row's token from its whole sort: top_k keeps every score at or above its k-th, the nucleus every token
    whose probability of tokens strictly above it (among those top_k keeps) stays below top_p."""
    ordered = scores.sort(descending=True).values
    floor = ordered[sampling.top_k - 1] if sampling.top_k else ordered[-1]
    pool = scores[scores >= floor]
    nucleus = [score for score in pool.unique()
               if (pool[pool > score] - pool.logsumexp(0)).exp().sum() < sampling.top_p]
    noisy = (scores - torch.log(-torch.log(uniform))).masked_fill(scores < min(nucleus), float("-inf"))
    return int(noisy.argmax())


@pytest.mark.parametrize("sampling", [
    Sampling(1.0, top_k=7, seed=3), Sampling(1.0, top_p=0.3, seed=3), Sampling(1.0, top_k=60, top_p=0.5, seed=3),
], ids=["top-k", "top-p", "both"])
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_tied_scores_are_cut_together(sampling, kernels, monkeypatch):
    """bfloat16 logits tie often: a cut keeps every token tied with its least kept one, on the CPU's candidates
    and in the Triton kernels (the interpreter without a GPU)."""
    import quantbench.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "_use_kernels", lambda scores: kernels)
    logits = bfloat16_logits(16, 700, seed=4, spread=3.0 if sampling.top_p == 1 else 1.0)
    device = KERNELS_ON if kernels else torch.device("cpu")
    chosen = next_tokens(logits.to(device), sampling, Draws.of(sampling, range(16), device)).cpu()
    noise = Draws.of(sampling, range(16), torch.device("cpu")).uniform(torch.arange(700))
    floors, _ = kept_floors(logits, sampling)
    tied = (logits == floors).sum(-1)
    assert (tied > 1).sum() >= 4  # rows whose least kept score is tied: the case under test
    assert chosen.flatten().tolist() == [reference_token(logits[row], sampling, noise[row]) for row in range(16)]


@pytest.mark.parametrize("rows, vocabulary", [(1, 2048), (3, 5000), (2, 49152)])
def test_the_draw_kernel_takes_each_rows_token_from_its_keyed_noise(rows, vocabulary):
    """keyed_draw against torch's draw from `Draws.uniform`: the same tokens, with floors, at counts moved on, on a
    whole block, a partial last block and SmolLM2's vocabulary; the counts are left for the caller to move."""
    from quantbench.sampling_kernels import keyed_draw

    sampling = Sampling(0.8, seed=-11)
    draws = Draws.of(sampling, [5 * row + 2 for row in range(rows)], KERNELS_ON)
    draws.counts += torch.arange(rows, device=KERNELS_ON) * 3
    scores = torch.randn(rows, vocabulary, generator=torch.Generator().manual_seed(rows)).to(KERNELS_ON)
    for floors in (torch.full((rows, 1), float("-inf"), device=KERNELS_ON),
                   scores.quantile(0.999, dim=-1, keepdim=True)):
        counts = draws.counts.clone()
        chosen = keyed_draw(scores, floors, draws.keys, draws.counts)
        assert torch.equal(draws.counts, counts)
        noisy = scores - torch.log(-torch.log(draws.uniform(torch.arange(vocabulary, device=KERNELS_ON))))
        assert torch.equal(chosen, noisy.masked_fill(scores < floors, float("-inf")).argmax(-1, keepdim=True))
        assert (scores.gather(-1, chosen) >= floors).all()


@pytest.mark.parametrize("rows, vocabulary, k", [(1, 2048, 1), (3, 5000, 7), (2, 4097, 64), (2, 300, 256),
                                                 (1, 49152, 50)])
def test_topk_floors_are_each_rows_kth_largest_score(rows, vocabulary, k):
    """topk_floors against torch's topk, bit for bit: bfloat16 logits of both signs (ties within and across blocks),
    -inf, both zeros; one block, a partial last block, the largest k it takes (256, of 300 scores) and SmolLM2's
    vocabulary. Past 256, or past 8,192 keys a row, torch's topk finds the floors."""
    from quantbench.sampling_kernels import topk_fits, topk_floors

    scores = bfloat16_logits(rows, vocabulary, seed=k, spread=8.0) - 20
    scores[:, :vocabulary // 3] = scores[:, :vocabulary // 3].clamp(max=-1.0)  # the k-th negative where k is large
    scores[0, 1:6] = float("-inf")
    scores[-1, -3:] = torch.tensor([0.0, -0.0, 0.0])
    assert (scores < 0).any() and (scores > 0).any() and scores.unique().numel() < scores.numel() // 2
    expected = scores.topk(k, dim=-1).values[:, -1:]
    assert torch.equal(topk_floors(scores.to(KERNELS_ON), k).cpu(), expected)
    assert torch.equal(topk_floors(torch.full((1, 100), float("-inf")).to(KERNELS_ON), 3).cpu(),
                       torch.tensor([[float("-inf")]]))
    assert topk_fits(k, vocabulary) and topk_fits(128, 128_256) and topk_fits(64, 256_000)
    assert not (topk_fits(257, 5000) or topk_fits(256, 128_256) or topk_fits(0, 5000))


def test_the_kernels_draw_takes_top_k_floors_from_the_kernels_or_past_them_from_torch():
    """The floors the CUDA draw cuts at: the kernels' for k up to 256, torch's topk past it, -inf without top-k;
    each row's k-th largest score every way."""
    from quantbench.sampling import _topk_floors

    scores = bfloat16_logits(3, 3000, seed=9, spread=3.0).to(KERNELS_ON)
    for k in (40, 256, 300, 3000):
        assert torch.equal(_topk_floors(scores, k), scores.topk(k, dim=-1).values[:, -1:])
    assert torch.equal(_topk_floors(scores, 0).cpu(), torch.full((3, 1), float("-inf")))


@pytest.mark.parametrize("spread, top_k", [(3.0, 0), (1.0, 0), (1.0, 900)],
                         ids=["tens of tokens", "thousands", "after top-k"])
def test_the_nucleus_rounds_draw_what_the_floor_draws(spread, top_k):
    """nucleus_draw against the draw at or above the nucleus's floor (a sort of the whole row), ties included, with
    nuclei of tens of tokens (the first candidate mostly in), of thousands (flat logits: candidates out for several
    rounds) and within top-k's 900; the rows whose first candidate is in keep keyed_draw's token."""
    from quantbench.sampling_kernels import keyed_draw, nucleus_draw

    sampling = Sampling(1.0, top_k=top_k, top_p=0.7, seed=12)
    scores = bfloat16_logits(12, 5000, seed=7, spread=spread).to(KERNELS_ON)  # 3 blocks of 2,048 (a partial one)
    draws = Draws.of(sampling, range(12), KERNELS_ON)
    floors, _ = kept_floors(scores.cpu(), sampling)
    k_floors = scores.topk(top_k, dim=-1).values[:, -1:] if top_k else torch.full((12, 1), float("-inf"),
                                                                                  device=KERNELS_ON)
    first = keyed_draw(scores, k_floors, draws.keys, draws.counts)
    chosen, settled = nucleus_draw(scores, k_floors, draws.keys, draws.counts, 0.7)
    shifted, _ = nucleus_draw(scores - 300, k_floors - 300, draws.keys, draws.counts, 0.7)  # exp(score) underflows
    noisy = scores.cpu() - torch.log(-torch.log(draws.uniform(torch.arange(5000, device=KERNELS_ON)).cpu()))
    expected = noisy.masked_fill(scores.cpu() < floors, float("-inf")).argmax(-1, keepdim=True)
    assert torch.equal(chosen.cpu(), expected) and torch.equal(shifted, chosen)
    assert torch.equal(first[settled], chosen[settled])
    out_first = int((first != chosen).sum())
    if spread == 1.0:  # wide nuclei: rows left to the rounds kernel after the parallel first round
        assert out_first > 0 and not settled.all()
    else:
        assert out_first < 12


@pytest.mark.parametrize("sampling", [
    Sampling(0.9, seed=8), Sampling(0.9, top_k=20, seed=8), Sampling(0.9, top_p=0.8, seed=8),
    Sampling(0.9, top_k=40, top_p=0.9, seed=8),
], ids=["temperature", "top-k", "top-p", "both"])
@pytest.mark.parametrize("candidates", [1024, 16], ids=["candidates", "16 too few"])
def test_the_kernels_draw_the_tokens_torch_draws(sampling, candidates, monkeypatch):
    """next_tokens through the Triton kernels (the interpreter without a GPU) and through torch: the same tokens
    from the same draws, three steps on; torch's nucleus (6–81 tokens at 0.8, 27–183 at 0.9) settled among the 1,024
    candidates or, past 16, by a sort."""
    import quantbench.sampling as sampling_module

    monkeypatch.setattr(sampling_module, "NUCLEUS_CANDIDATES", candidates)
    logits = bfloat16_logits(4, 3000, seed=6, spread=3.0).to(KERNELS_ON)
    mass = (logits / sampling.temperature).softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    assert (mass[:, 15] < 0.8).any() and (mass[:, 1023] >= 0.9).all()
    tokens = {}
    for kernels in (False, True):
        monkeypatch.setattr(sampling_module, "_use_kernels", lambda scores: kernels)
        draws = Draws.of(sampling, [4, 1, 7, 0], KERNELS_ON)
        tokens[kernels] = [next_tokens(logits, sampling, draws).flatten().tolist() for _ in range(3)]
        assert draws.counts.tolist() == [3] * 4
    assert tokens[True] == tokens[False]
    assert len({tuple(step) for step in tokens[True]}) > 1  # each step draws afresh


def test_greedy_choices_take_the_argmax_and_draws_need_their_noise():
    rows = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    for sampling in (Sampling(), Sampling(1.5, top_k=1)):
        assert sampling.greedy and torch.equal(next_tokens(rows, sampling), rows.argmax(-1, keepdim=True))
        assert Draws.of(sampling, range(5), torch.device("cpu")) is None
    assert not Sampling(0.7).greedy
    with pytest.raises(ValueError, match="needs its draws"):
        next_tokens(rows, Sampling(0.7, seed=1))


@pytest.mark.parametrize("sampling, message", [
    (dict(temperature=-1.0), "temperature -1.0"), (dict(temperature=float("nan")), "temperature nan"),
    (dict(temperature=1.0, top_k=-2), "top_k -2"), (dict(temperature=1.0, top_p=0.0), "top_p 0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p 1.5"), (dict(top_p=0.9), "set a temperature above 0"),
])
def test_bad_sampling_is_refused(sampling, message):
    with pytest.raises(QuantbenchError, match=message):
        Sampling(**sampling)
