import functools
import json

import helpers
import pytest
import torch
from helpers import invoke, make_recipe, tiny_llama

from quantbench import load_quantized
from quantbench.errors import QuantbenchError
from quantbench.generate import generate, prompt_ids
from quantbench.model_io import load_tokenizer
from quantbench.sampling import Sampling

PROMPT = "the river and the stone"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, text_file):
    """A run of a tiny Llama whose larger weights make each token depend on those before it (as a cache bug
    would show), its checkpoint packed."""
    folder = tmp_path_factory.mktemp("generate")
    tiny_llama(vocab_size=len(tokenizer), init_std=0.3).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    recipe = make_recipe(folder, folder / "model", text_file, eval={"baseline": False})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    return folder / "runs" / "tiny"


def assert_greedy(model, tokenizer, new_ids: list[int], prompt: str = PROMPT) -> None:
    """Each new token is the argmax of one forward over the prompt and the tokens before it, without a cache
    (another order of float32 sums: within 1e-4 of the largest logit's size)."""
    ids = prompt_ids(tokenizer, prompt)
    text = torch.cat([ids, torch.tensor([new_ids[:-1]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(text).logits[0, ids.shape[1] - 1:]
    best = logits.max(-1).values
    chosen = logits[torch.arange(len(new_ids)), torch.tensor(new_ids)]
    assert torch.all(chosen >= best - 1e-4 * logits.abs().max()), (chosen - best).tolist()


@pytest.mark.parametrize("family", ["tiny_opt", "tiny_gpt_neox", "tiny_qwen2_sliding_window", "tiny_gemma2",
                                    "tiny_gemma3_text", "tiny_phi3",
                                    *(build.__name__ for build in helpers.LLAMA_SHAPED_BUILDERS.values()),
                                    *(build.__name__ for build in helpers.MOE_BUILDERS.values()),
                                    *(build.__name__ for build in helpers.OLDER_BUILDERS.values())])
def test_every_supported_family_generates_from_its_static_cache(tokenizer, family):
    model = getattr(helpers, family)(vocab_size=len(tokenizer)).eval()
    result = generate(model, tokenizer, PROMPT, 8, stop_ids=set())
    assert len(result.new_ids) == 8 and result.steady_steps == 6
    assert_greedy(model, tokenizer, result.new_ids)


PROMPTS = ["the river", PROMPT, "a stone in the river and the river over the stone"]  # three lengths


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt", "tiny_gpt_neox", "tiny_qwen2_sliding_window",
                                    "tiny_gemma2", "tiny_gemma3_text", "tiny_phi3", "tiny_qwen3_moe",
                                    "tiny_deepseek_v2"])
def test_prompts_of_several_lengths_decode_together_as_each_alone(tokenizer, family):
    """The shorter prompts padded on the left, masked, their positions counted from their own first token: each
    one's tokens are the argmax of full forwards over it alone."""
    model = getattr(helpers, family)(vocab_size=len(tokenizer), **({"init_std": 0.3} if family == "tiny_llama" else {}))
    result = generate(model.eval(), tokenizer, PROMPTS, 8, stop_ids=set())
    assert [output.prompt_tokens for output in result.outputs] == [prompt_ids(tokenizer, p).shape[1] for p in PROMPTS]
    assert len(set(output.prompt_tokens for output in result.outputs)) == 3
    for prompt, output in zip(PROMPTS, result.outputs):
        assert len(output.new_ids) == 8
        assert_greedy(model, tokenizer, output.new_ids, prompt)
    assert result.decode_tokens_per_s == 3 * result.steady_steps / result.steady_s  # every prompt's tokens
    with pytest.raises(ValueError, match="3 prompts"):
        result.text


def test_a_batch_runs_until_every_prompt_has_stopped(run_dir):
    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    # the same batch without stop tokens (not each prompt alone: another order of float sums may flip a near tie)
    free = [output.new_ids for output in generate(model, tokenizer, PROMPTS, 16, stop_ids=set()).outputs]
    stop = free[1][3]  # the second prompt stops early; the others may stop later or never
    together = generate(model, tokenizer, PROMPTS, 16, stop_ids={stop}).outputs
    for made, output in zip(free, together):
        first = made.index(stop) if stop in made else len(made) - 1
        assert output.new_ids == made[:first + 1]
    with pytest.raises(QuantbenchError, match="one prompt, not 3"):
        generate(model, tokenizer, PROMPTS, 4, on_text=print)


MANY = ["the river", PROMPT, "a stone in the river and the river over the stone", "the stone", "river stone river",
        "over the river the stone and the stone over the river and", "a", "the river over", "stone and river"]


def assert_each_alone(model, tokenizer, prompts: list[str], result, max_new_tokens: int, stop_ids: set[int]) -> None:
    """Every prompt's tokens are the argmax of full forwards over it alone, up to its first stop token or all
    its tokens."""
    assert [output.prompt_tokens for output in result.outputs] == [prompt_ids(tokenizer, p).shape[1] for p in prompts]
    for prompt, output in zip(prompts, result.outputs):
        made = output.new_ids
        assert stop_ids.isdisjoint(made[:-1]) and (made[-1] in stop_ids or len(made) == max_new_tokens), made
        assert_greedy(model, tokenizer, made, prompt)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_opt", "tiny_gpt_neox", "tiny_phi3", "tiny_qwen3_moe",
                                    "tiny_deepseek_v2"])
def test_more_prompts_than_rows_take_the_rows_of_those_that_stopped(tokenizer, family):
    """Nine prompts in two rows, stopping at different steps: each prompt that stops hands its row to the next,
    prefilled (with any taking a row at the same look) into the columns before the next one written, and every
    prompt's tokens are still those of full forwards over it alone. Without stops both rows are handed on at once
    (two prompts of different lengths prefilled together), and the run passes the cache's length: the rows'
    columns move left on the way."""
    from quantbench.generate import Refill

    model = getattr(helpers, family)(vocab_size=len(tokenizer), **({"init_std": 0.3} if family == "tiny_llama" else {}))
    model.eval()
    free = generate(model, tokenizer, MANY[0], 12, stop_ids=set()).new_ids
    stop_ids = {free[4], free[9]}
    handed = []
    result = generate(model, tokenizer, MANY, 12, stop_ids=stop_ids, batch_size=2,
                      on_output=lambda at, output: handed.append((at, output)))
    assert result.batch_size == 2 and result.admitted == len(MANY) - 2
    assert sorted(handed, key=lambda pair: pair[0]) == list(enumerate(result.outputs))  # each once, as it stopped
    assert_each_alone(model, tokenizer, MANY, result, 12, stop_ids)
    assert result.decode_tokens_per_s == 2 * result.steady_steps / result.steady_s  # both rows' tokens
    made = sum(len(output.new_ids) for output in result.outputs)
    assert result.tokens_per_s == made / (result.prefill_s + result.warmup_s + result.steady_s)
    unstopped = generate(model, tokenizer, MANY, 16, stop_ids=set(), batch_size=2)
    assert_each_alone(model, tokenizer, MANY, unstopped, 16, set())
    longest = max(output.prompt_tokens for output in result.outputs)
    assert unstopped.warmup_steps + unstopped.steady_steps > Refill.columns(longest, 16, 1) - longest


@pytest.mark.parametrize("look_every", [1, 4])
def test_rows_looked_at_every_few_steps_keep_each_prompts_tokens_and_positions(run_dir, monkeypatch, look_every):
    """On CUDA the tokens are looked at every 16 steps: a prompt's row runs past its stop or its last token to the
    next look, and what it made there is dropped (here every 4, on the CPU). Prompts and tokens as many as an OPT's
    learned positions still decode: the steps past a prompt's last token hold their positions in its table."""
    import quantbench.generate as generation

    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    monkeypatch.setattr(generation, "_steps_between_looks", lambda device: look_every)
    free = generate(model, tokenizer, MANY[1], 10, stop_ids=set()).new_ids
    stop_ids = {free[6]}
    result = generate(model, tokenizer, MANY, 10, stop_ids=stop_ids, batch_size=3)
    assert result.admitted == len(MANY) - 3
    assert_each_alone(model, tokenizer, MANY, result, 10, stop_ids)
    longest = max(prompt_ids(tokenizer, p).shape[1] for p in MANY)
    short = helpers.tiny_opt(vocab_size=len(tokenizer), positions=longest + 10)  # learned positions, no more
    at_the_end = generate(short, tokenizer, MANY, 10, stop_ids=set(), batch_size=3)
    assert_each_alone(short, tokenizer, MANY, at_the_end, 10, set())


def test_a_sampled_prompt_draws_the_same_tokens_alone_batched_in_turn_and_resumed(run_dir):
    """A prompt's draws are keyed by the seed, its number and its tokens': stopping at different steps, each
    prompt's tokens are the same drawn alone (under its number), in one batch, in two rows taken in turn, in a run
    of the prompts after the third (resumed) and in a run drawn again; each token is among the 4 most likely."""
    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    sampling, prompts = Sampling(5.0, top_k=4, seed=11), MANY[:6]
    stop_ids = {generate(model, tokenizer, prompts[0], 10, stop_ids=set(), sampling=sampling).new_ids[5]}
    alone = [generate(model, tokenizer, prompt, 10, stop_ids=stop_ids, sampling=sampling, numbers=[number]).only
             for number, prompt in enumerate(prompts)]
    assert len({len(output.new_ids) for output in alone}) > 1  # the stop token cuts some prompts short
    together = generate(model, tokenizer, prompts, 10, stop_ids=stop_ids, sampling=sampling)
    in_turn = generate(model, tokenizer, prompts, 10, stop_ids=stop_ids, sampling=sampling, batch_size=2)
    resumed = generate(model, tokenizer, prompts[3:], 10, stop_ids=stop_ids, sampling=sampling, batch_size=2,
                       numbers=[3, 4, 5])
    assert together.outputs == alone and in_turn.outputs == alone and resumed.outputs == alone[3:]
    assert in_turn.admitted == 4 and generate(model, tokenizer, prompts, 10, stop_ids=stop_ids, sampling=sampling,
                                              batch_size=2).outputs == alone
    renumbered = generate(model, tokenizer, prompts[3:], 10, stop_ids=stop_ids, sampling=sampling, batch_size=2)
    assert renumbered.outputs != alone[3:]  # numbered 0, 1, 2: the first three prompts' draws
    for prompt, output in zip(prompts, alone):
        assert_among_the_top(model, tokenizer, output.new_ids, 4, prompt=prompt)
    with pytest.raises(ValueError, match="2 prompt numbers for 1 prompts"):
        generate(model, tokenizer, PROMPT, 4, numbers=[0, 1])


@pytest.mark.parametrize("family", ["tiny_qwen2_sliding_window", "tiny_gemma2", "tiny_gemma3_text"])
def test_where_attention_slides_over_fewer_columns_the_prompts_go_in_fixed_batches(tokenizer, family):
    """A window of 4 keeps a layer's last 4 columns only: no row can be handed on, so the prompts go 2 at a time,
    each batch until its last prompt stops, and each prompt's tokens are still those of full forwards over it
    alone; each one's output is handed on with its own index."""
    model = getattr(helpers, family)(vocab_size=len(tokenizer)).eval()
    handed = {}
    result = generate(model, tokenizer, MANY[:5], 6, stop_ids=set(), batch_size=2,
                      on_output=lambda at, output: handed.setdefault(at, output))
    assert result.batch_size == 2 and result.admitted == 0 and len(result.outputs) == 5
    assert_each_alone(model, tokenizer, MANY[:5], result, 6, set())
    assert handed == dict(enumerate(result.outputs))
    assert result.decode_tokens_per_s == (2 + 2 + 1) * 4 / result.steady_s  # three batches of 4 steady steps
    drawn = Sampling(5.0, top_k=4, seed=2)  # and each prompt draws what it draws alone
    sampled = generate(model, tokenizer, MANY[:5], 6, stop_ids=set(), batch_size=2, sampling=drawn)
    assert sampled.outputs == [generate(model, tokenizer, prompt, 6, stop_ids=set(), sampling=drawn,
                                        numbers=[number]).only for number, prompt in enumerate(MANY[:5])]
    with pytest.raises(QuantbenchError, match="batch size 0"):
        generate(model, tokenizer, PROMPTS, 4, batch_size=0)


@pytest.mark.parametrize("kernels", [True, False])
def test_greedy_tokens_from_the_static_cache_are_those_of_full_forwards(run_dir, kernels):
    model = load_quantized(run_dir / "checkpoint", kernels=kernels)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    assert any(type(m).__name__ == "PackedLinear" for m in model.modules()) == kernels
    result = generate(model, tokenizer, PROMPT, 12, stop_ids=set())
    assert len(result.new_ids) == 12 and result.prompt_tokens == prompt_ids(tokenizer, PROMPT).shape[1]
    assert result.steady_steps == 10 and result.decode_tokens_per_s > 0 and not result.cuda_graph
    assert result.text == tokenizer.decode(result.new_ids, skip_special_tokens=True)
    assert_greedy(model, tokenizer, result.new_ids)


def test_generation_stops_after_the_first_stop_token(run_dir):
    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    free = generate(model, tokenizer, PROMPT, 12, stop_ids=set()).new_ids
    stop = free[5]
    first = free.index(stop)
    stopped = generate(model, tokenizer, PROMPT, 12, stop_ids={stop})
    assert stopped.new_ids == free[:first + 1] and stopped.steady_steps == max(first - 1, 0)
    one = generate(model, tokenizer, PROMPT, 1, stop_ids=set())
    assert one.new_ids == free[:1] and one.steady_steps == 0 and one.decode_tokens_per_s is None


def test_steps_past_a_stop_token_between_looks_are_dropped(run_dir, monkeypatch):
    """On CUDA the new tokens are looked at every 16 steps: the steps run past a stop token until the next look,
    and what they made is dropped (here every 4 steps, on the CPU)."""
    import quantbench.generate as generation

    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    free = generate(model, tokenizer, PROMPT, 14, stop_ids=set()).new_ids
    first = free.index(free[5])
    monkeypatch.setattr(generation, "_steps_between_looks", lambda device: 4)
    stopped = generate(model, tokenizer, PROMPT, 14, stop_ids={free[5]})
    assert stopped.new_ids == free[:first + 1]
    assert stopped.steady_steps == min(-(-(first - 1) // 4) * 4, 12)  # up to the first look after the stop


def assert_among_the_top(model, tokenizer, new_ids: list[int], k: int, tolerance: float = 1e-4,
                         prompt: str = PROMPT) -> None:
    """Each new token is among the k most likely of one forward without a cache over the prompt and the tokens
    before it (within `tolerance` of the largest logit's size: float32 sums in another order, as assert_greedy)."""
    ids = prompt_ids(tokenizer, prompt)
    text = torch.cat([ids, torch.tensor([new_ids[:-1]], dtype=torch.long)], dim=1).to(model.device)
    with torch.no_grad():
        logits = model(text).logits[0, ids.shape[1] - 1:].float().cpu()
    kth = logits.topk(k, dim=-1).values[:, -1]
    chosen = logits[torch.arange(len(new_ids)), torch.tensor(new_ids)]
    assert torch.all(chosen >= kth - tolerance * logits.abs().max()), (chosen - kth).tolist()


def test_sampled_text_is_drawn_again_from_its_seed_and_stays_among_the_top_k(run_dir):
    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    sampling = Sampling(temperature=5.0, top_k=4)  # hot: the draws leave the argmax often
    first = generate(model, tokenizer, PROMPT, 16, stop_ids=set(), sampling=sampling)
    seed = first.sampling.seed
    assert seed is not None and first.sampling == Sampling(5.0, 4, 1.0, seed)
    again = generate(model, tokenizer, PROMPT, 16, stop_ids=set(), sampling=first.sampling)
    assert again.new_ids == first.new_ids
    assert_among_the_top(model, tokenizer, first.new_ids, 4)
    greedy = generate(model, tokenizer, PROMPT, 16, stop_ids=set()).new_ids
    others = {tuple(generate(model, tokenizer, PROMPT, 16, stop_ids=set(),
                             sampling=Sampling(5.0, 4, seed=s)).new_ids) for s in range(4)}
    assert len(others | {tuple(greedy)}) > 2  # the seed changes the text, and sampling leaves the greedy text


@pytest.mark.parametrize("look_every", [1, 4])
def test_text_comes_in_pieces_that_make_the_whole_text(run_dir, monkeypatch, look_every):
    """Pieces handed at each look for a stop token (every step on the CPU, every 4 here as on CUDA every 16),
    never past a stop token, joined the result's text."""
    import quantbench.generate as generation

    monkeypatch.setattr(generation, "_steps_between_looks", lambda device: look_every)
    looks = []  # the count of tokens each look hands on (the tiny model's text has no spaces to cut at)
    update = generation.TextPieces.update
    monkeypatch.setattr(generation.TextPieces, "update", lambda self, ids: looks.append(len(ids)) or update(self, ids))
    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    free = generate(model, tokenizer, PROMPT, 24, stop_ids=set())
    for stop_ids in (set(), {free.new_ids[14]}):
        pieces, looks[:] = [], []
        result = generate(model, tokenizer, PROMPT, 24, stop_ids=stop_ids, on_text=pieces.append)
        assert "".join(pieces) == result.text and all(pieces)
        assert result.new_ids == free.new_ids[:len(result.new_ids)]
        assert looks == list(range(2, len(result.new_ids), look_every))  # a look before each step after warm-up


class SpacedTokenizer:
    """Decodes ids to words joined by spaces, with a clean-up that joins a space and a following "." (as
    `clean_up_tokenization_spaces` does): text up to the last space may change no more, text after it may."""

    words = {1: "the", 2: "river", 3: ".", 4: "stone", 5: "é"}

    def decode(self, ids, skip_special_tokens=True):  # 9: the stop token, special
        return " ".join(self.words[i] for i in ids if i != 9).replace(" .", ".")


def test_pieces_hold_back_what_the_next_token_may_change():
    from quantbench.generate import TextPieces

    pieces = []
    text = TextPieces(SpacedTokenizer(), {9}, pieces.append)
    for end in range(1, 6):
        text.update([1, 2, 3, 4, 5, 9, 1][:end])
    text.update([1, 2, 3, 4, 5, 9, 1])  # the token after the stop token is never handed on
    text.finish(SpacedTokenizer().decode([1, 2, 3, 4, 5]))
    assert pieces == ["the", " river.", " stone", " é"]  # "river" held until "." could no longer follow a space


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_give_the_eager_steps_tokens(run_dir):
    model = load_quantized(run_dir / "checkpoint", "cuda", torch.float16, kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    eager = generate(model, tokenizer, PROMPT, 40, stop_ids=set(), cuda_graph=False)
    graphed = generate(model, tokenizer, PROMPT, 40, stop_ids=set())
    assert graphed.cuda_graph and not eager.cuda_graph and graphed.new_ids == eager.new_ids
    stop = eager.new_ids[20]
    first = eager.new_ids.index(stop)
    assert generate(model, tokenizer, PROMPT, 40, stop_ids={stop}).new_ids == eager.new_ids[:first + 1]
    sampling = Sampling(5.0, top_k=4, seed=3)  # the draws' counters moved on in the graph
    sampled = generate(model, tokenizer, PROMPT, 40, stop_ids=set(), sampling=sampling)
    assert generate(model, tokenizer, PROMPT, 40, stop_ids=set(), sampling=sampling).new_ids == sampled.new_ids
    assert sampled.new_ids != graphed.new_ids
    assert_among_the_top(model, tokenizer, sampled.new_ids, 4, tolerance=2e-2)  # float16 logits
    nucleus = Sampling(2.0, top_p=0.9, seed=5)  # top-p's rounds inside the graph
    assert generate(model, tokenizer, PROMPT, 40, stop_ids=set(), sampling=nucleus).new_ids == \
        generate(model, tokenizer, PROMPT, 40, stop_ids=set(), sampling=nucleus, cuda_graph=False).new_ids
    stop_ids = {eager.new_ids[9]}  # rows taken in turn, looked at every 16 steps, graphed as eager
    in_turn = generate(model, tokenizer, MANY, 24, stop_ids=stop_ids, batch_size=3)
    assert in_turn.cuda_graph and in_turn.admitted == len(MANY) - 3
    assert in_turn.outputs == generate(model, tokenizer, MANY, 24, stop_ids=stop_ids, batch_size=3,
                                       cuda_graph=False).outputs
    for prompt, output in zip(MANY, in_turn.outputs):
        assert_among_the_top(model, tokenizer, output.new_ids, 2, tolerance=2e-2, prompt=prompt)
    drawn = generate(model, tokenizer, MANY, 24, stop_ids=stop_ids, batch_size=3, sampling=sampling)
    assert drawn.cuda_graph and drawn.outputs == generate(model, tokenizer, MANY, 24, stop_ids=stop_ids, batch_size=3,
                                                          sampling=sampling, cuda_graph=False).outputs


def test_generate_command_prints_text_and_speed(run_dir, model_dir):
    served = invoke("generate", run_dir, "--prompt", PROMPT, "-n", 6, "--json", "--device", "cpu")
    assert served.exit_code == 0, served.output
    record = json.loads(served.output)
    assert record["kernels"] and record["device"] == "cpu" and record["dtype"] == "float32"
    assert 1 <= record["new_tokens"] <= 6 and record["prompt_tokens"] > 0 and record["prefill_s"] > 0
    dense = json.loads(invoke("generate", run_dir, "-p", PROMPT, "-n", 6, "--json", "--dequantized").output)
    plain = json.loads(invoke("generate", model_dir, "-p", PROMPT, "-n", 6, "--json").output)
    assert not dense["kernels"] and not plain["kernels"]
    shown = invoke("generate", run_dir, "-p", PROMPT, "-n", 1, "--dtype", "bfloat16", "--device", "cpu")
    assert shown.exit_code == 0 and "bfloat16 on cpu, packed kernels, greedy" in shown.output
    assert "too few to time the decode" in shown.output
    assert record["sampling"] == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None}
    drawn = json.loads(invoke("generate", run_dir, "-p", PROMPT, "-n", 6, "--json", "-t", "5", "--top-k", "4",
                              "--top-p", "0.9").output)
    seed = drawn["sampling"]["seed"]
    assert drawn["sampling"] == {"temperature": 5.0, "top_k": 4, "top_p": 0.9, "seed": seed} and seed is not None
    again = invoke("generate", run_dir, "-p", PROMPT, "-n", 6, "-t", "5", "--top-k", "4", "--top-p", "0.9",
                   "--seed", seed)
    assert again.exit_code == 0 and f"top-k 4, top-p 0.9, seed {seed}" in again.output
    redrawn = invoke("generate", run_dir, "-p", PROMPT, "-n", 6, "-t", "5", "--top-k", "4", "--top-p", "0.9",
                     "--seed", seed, "--json")
    assert json.loads(redrawn.output)["text"] == drawn["text"]
    streamed = invoke("generate", run_dir, "-p", PROMPT, "-n", 6, "--stream", "--device", "cpu")
    assert streamed.exit_code == 0 and streamed.output.startswith(record["text"] + "\n")
    batch = json.loads(invoke("generate", run_dir, *[a for p in PROMPTS for a in ("-p", p)], "-n", 6, "--json").output)
    assert [row["prompt_tokens"] for row in batch["prompts"]][1] == record["prompt_tokens"] and "text" not in batch
    assert [row["new_tokens"] for row in batch["prompts"]] == [6, 6, 6]
    shown = invoke("generate", run_dir, *[a for p in PROMPTS for a in ("-p", p)], "-n", 2)
    assert shown.exit_code == 0 and "[3] " + PROMPTS[2] in shown.output and "3 prompts of" in shown.output


def test_generate_command_takes_prompts_from_a_file_in_rows_taken_in_turn(run_dir, tmp_path):
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(MANY[1:6]) + "\n\n", encoding="utf-8")
    arguments = ["generate", run_dir, "-p", MANY[0], "--prompts-file", listed, "-n", 5]
    together = json.loads(invoke(*arguments, "--json").output)
    in_turn = json.loads(invoke(*arguments, "--json", "-b", 2).output)
    assert together["batch_size"] == 6 and together["admitted"] == 0
    assert in_turn["batch_size"] == 2 and in_turn["admitted"] == 4
    lengths = [row["prompt_tokens"] for row in together["prompts"]]
    assert [row["prompt_tokens"] for row in in_turn["prompts"]] == lengths and len(lengths) == 6
    assert all(1 <= row["new_tokens"] <= 5 for row in in_turn["prompts"])
    assert in_turn["tokens_per_s"] > 0
    shown = invoke(*arguments, "-b", 2)
    assert shown.exit_code == 0 and "6 prompts of" in shown.output and "in 2 rows (4 took a stopped prompt's row)" \
        in shown.output and "new tok/s in all" in shown.output and "[6] " + MANY[5] in shown.output
    missing = invoke("generate", run_dir, "--prompts-file", tmp_path / "none.txt")
    assert missing.exit_code == 2 and "none.txt: No such file" in missing.output


def test_answers_written_as_prompts_stop_survive_a_cut_and_the_next_run_does_the_rest(run_dir, tmp_path):
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(MANY[:6]), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    arguments = ["generate", run_dir, "--prompts-file", listed, "-n", 5, "-b", 2, "-o", out]
    whole = json.loads(invoke(*arguments, "--json").output)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(answer["index"] for answer in written) == list(range(6)) and whole["answered_before"] == 0
    for answer in written:
        assert answer["prompt"] == MANY[answer["index"]]
        assert {k: answer[k] for k in ("prompt_tokens", "new_tokens", "text")} == whole["prompts"][answer["index"]]
    kept = out.read_text(encoding="utf-8").splitlines(keepends=True)[:2]  # a run cut in its third answer's write
    out.write_text("".join(kept) + '{"index": 3, "pro', encoding="utf-8")
    rest = invoke(*arguments)
    assert rest.exit_code == 0 and "2 of 6 prompts answered in" in rest.output and "4 prompts of" in rest.output
    again = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert again[:2] == written[:2] and sorted(answer["index"] for answer in again) == list(range(6))
    done = invoke(*arguments)
    assert done.exit_code == 0 and "every prompt's answer is in" in done.output
    other = invoke("generate", run_dir, "-p", "something else", "-o", out)
    assert other.exit_code == 2 and "holds answers to other prompts" in other.output


def test_a_sampled_run_resumed_from_its_answers_draws_what_the_whole_run_drew(run_dir, tmp_path):
    """Each answer records its settings; a run resumed without --seed takes the file's and gives the whole run's
    answers; other settings are refused, even with every prompt answered."""
    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(MANY[:6]), encoding="utf-8")
    arguments = ["generate", run_dir, "--prompts-file", listed, "-n", 5, "-b", 2, "-t", 5, "--top-k", 4]
    whole = json.loads(invoke(*arguments, "-o", tmp_path / "whole.jsonl", "--json").output)
    written = (tmp_path / "whole.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    settings = {"model": str((run_dir / "checkpoint").resolve()), "max_new_tokens": 5, "chat": False,
                "sampling": whole["sampling"]}
    assert all(json.loads(line)["settings"] == settings for line in written) and len(written) == 6
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(written[:2]), encoding="utf-8")
    rest = invoke(*arguments, "-o", cut)
    assert rest.exit_code == 0 and f"seed {whole['sampling']['seed']}" in rest.output, rest.output
    resumed = [json.loads(line) for line in cut.read_text(encoding="utf-8").splitlines()]
    assert sorted(resumed, key=lambda answer: answer["index"]) == sorted(
        [json.loads(line) for line in written], key=lambda answer: answer["index"])
    for other in (["--seed", whole["sampling"]["seed"] + 1], ["-t", 4], ["--chat"]):
        refused = invoke(*arguments, *other, "-o", cut)
        assert refused.exit_code == 2 and "checkpoint, max_new_tokens 5, chat False, temperature 5.0, top_k 4" \
            in refused.output, refused.output
    greedy = invoke("generate", run_dir, "--prompts-file", listed, "-n", 5, "-o", cut)
    assert greedy.exit_code == 2 and "checkpoint, max_new_tokens 5, chat False, temperature 0.0" in greedy.output
    same = invoke("generate", run_dir / "checkpoint", *arguments[2:], "-o", cut)  # the run's checkpoint itself
    assert same.exit_code == 0 and "every prompt's answer is in" in same.output
    other = invoke("generate", tmp_path / "elsewhere", *arguments[2:], "-o", cut)
    assert other.exit_code == 2 and "holds answers made with model " in other.output


def test_generated_text_is_printed_as_it_is_not_as_markup(run_dir, monkeypatch):
    import quantbench.generate as generation

    made = generation.Generation([generation.Output(3, [1, 2], "[bold]x[/bold] 0x1f")], 0.1, 1, 0.1, 1, 0.1, False,
                                 False)
    monkeypatch.setattr(generation, "generate", lambda *args, **kwargs: made)
    shown = invoke("generate", run_dir, "-p", PROMPT)
    assert shown.exit_code == 0 and shown.output.startswith("[bold]x[/bold] 0x1f\n")


@pytest.mark.parametrize("arguments, message", [
    (["-p", ""], "prompt 1 is empty"), (["-p", "x", "-p", ""], "prompt 2 is empty"),
    (["-p", "x", "-o", "no-such-folder/answers.jsonl"], "there is no folder no-such-folder"),
    (["-p", "x", "--chat"], "has no chat template"),
    (["-p", "x", "--dtype", "float64"], "--dtype 'float64'"),
    (["-p", "x", "--top-p", "0.9"], "set a temperature above 0"),
    (["-p", "x", "-t", "-0.5"], "temperature -0.5"),
    (["-p", "x", "--stream", "--json"], "choose one"),
    (["-p", "x", "-p", "y", "--stream"], "not 2's"),
    ([], "no prompt: give -p TEXT or --prompts-file FILE"),
])
def test_generate_refuses_bad_input_in_one_line(run_dir, arguments, message):
    result = invoke("generate", run_dir, *arguments)
    assert result.exit_code == 2 and message in result.output


def test_generate_asks_for_at_least_one_token_and_no_more_than_the_model_has_positions(run_dir):
    model = load_quantized(run_dir / "checkpoint")
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    with pytest.raises(QuantbenchError, match="at least one token"):
        generate(model, tokenizer, PROMPT, 0)
    assert invoke("generate", run_dir, "-p", PROMPT, "-n", 0).exit_code == 2
    most, n = model.config.max_position_embeddings, prompt_ids(tokenizer, PROMPT).shape[1]
    with pytest.raises(QuantbenchError, match=f"pass the model's {most} positions: ask for at most {most - n} new"):
        generate(model, tokenizer, PROMPT, most - n + 1)
    assert len(generate(model, tokenizer, PROMPT, 2, stop_ids=set()).new_ids) == 2
    refused = invoke("generate", run_dir, "-p", PROMPT, "-n", most)
    assert refused.exit_code == 2 and "positions" in refused.output


def test_a_compiled_decode_step_gives_the_eager_tokens(run_dir, monkeypatch):
    """Traced by dynamo into aot_eager graphs here: inductor's C++ code for the CPU depends on the machine's
    compiler and on ATEN_CPU_CAPABILITY agreeing with the CPU (the measured runs use inductor)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = load_quantized(run_dir / "checkpoint", kernels=True)
    tokenizer = load_tokenizer(str(run_dir / "checkpoint"))
    eager = generate(model, tokenizer, PROMPT, 6, stop_ids=set())
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    try:
        compiled = generate(model, tokenizer, PROMPT, 6, stop_ids=set(), compiled=True)
    finally:
        torch._dynamo.reset()  # the compiled frames would otherwise stay for the tests after this one
    assert compiled.compiled and not eager.compiled and counter.frame_count >= 1  # the step went through dynamo
    assert_greedy(model, tokenizer, compiled.new_ids)


def test_a_compile_that_fails_on_this_machine_is_one_line(run_dir, monkeypatch):
    def broken(graph, inputs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken))
    try:
        result = invoke("generate", run_dir, "-p", PROMPT, "-n", 4, "--compile")
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 2 and "--compile: torch.compile failed here" in result.output
    assert "run without --compile" in result.output
