"""Text from a model or a quantized checkpoint, greedy or sampled, and how fast it comes (`quantbench generate`).

The prompt fills a static cache in one forward (the prefill); each decode step then feeds the last token at its
position and takes the argmax, or with a temperature samples from the softmax of the logits over it, cut to the
`top_k` largest and to the nucleus of mass `top_p` (`quantbench.sampling`). The first step runs eagerly (on CUDA it also
tunes the packed kernels' tiles for one row). On CUDA the step is then captured in a CUDA graph and replayed,
one launch a token as a served model runs, unless `cuda_graph` is off; the capture's warm-up run makes a token
too (without `compiled`, it is the first step). With `compiled` the decode step runs through torch.compile (the
first step compiles it), which fuses the small operations between the matmuls (norms, rotary embedding, residual
adds): with packed matmuls these are the larger share of a step. Generation stops after an end-of-sequence
token (looked for after every step on the CPU, every 16 on CUDA) or `max_new_tokens` tokens. Several prompts
decode as one batch, a row each; with more prompts than rows, a prompt that stops hands its row to the next one
waiting (`Refill`).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.sampling import Draws, Sampling, next_tokens

EOS_CHECK_EVERY = 16  # CUDA decode steps between looks at the new tokens (each look waits for the GPU)


@dataclass
class Output:
    """One prompt's part of a generation."""
    prompt_tokens: int
    new_ids: list[int]
    text: str

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": len(self.new_ids), "text": self.text}


@dataclass
class Generation:
    outputs: list[Output]  # one per prompt, in their order
    prefill_s: float  # the first batch's forward, first tokens included
    warmup_steps: int  # the first decode steps: one eager (compiling the step with `compiled`), and on CUDA
    warmup_s: float  # one more, the CUDA graph's capture with its warm-up run
    steady_steps: int  # the decode steps after them (each makes a token in every row of the batch)
    steady_s: float  # with the prefills of the prompts that took a finished prompt's row
    cuda_graph: bool
    compiled: bool
    sampling: Sampling = Sampling()
    batch_size: int = 1  # rows decoded at once
    admitted: int = 0  # prompts that took a finished prompt's row during the decode
    steady_row_steps: int | None = None  # the rows' tokens of the steady steps (default every row of each)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens a second over the steady steps, every row's counted (a stopped prompt's too: the batch still
        computes its row)."""
        if not self.steady_steps:
            return None
        tokens = self.batch_size * self.steady_steps if self.steady_row_steps is None else self.steady_row_steps
        return tokens / self.steady_s

    @property
    def tokens_per_s(self) -> float:
        """The new tokens kept a second over the whole generation: prefills, warm-up and steps."""
        return sum(len(output.new_ids) for output in self.outputs) / (self.prefill_s + self.warmup_s + self.steady_s)

    @property
    def only(self) -> Output:
        if len(self.outputs) != 1:
            raise ValueError(f"a generation of {len(self.outputs)} prompts: read its outputs")
        return self.outputs[0]

    @property
    def prompt_tokens(self) -> int:
        return self.only.prompt_tokens

    @property
    def new_ids(self) -> list[int]:
        return self.only.new_ids

    @property
    def text(self) -> str:
        return self.only.text

    def to_dict(self) -> dict:
        produced = self.only.to_dict() if len(self.outputs) == 1 else {
            "prompts": [output.to_dict() for output in self.outputs]}
        return {**produced, "prefill_s": self.prefill_s, "warmup_steps": self.warmup_steps,
                "warmup_s": self.warmup_s, "steady_steps": self.steady_steps, "steady_s": self.steady_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "tokens_per_s": self.tokens_per_s,
                "batch_size": self.batch_size, "admitted": self.admitted, "cuda_graph": self.cuda_graph,
                "compiled": self.compiled, "sampling": self.sampling.to_dict()}


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """int64 [1, tokens]: the prompt as is, or as the user's turn of the tokenizer's chat template."""
    if not prompt:
        raise QuantbenchError("the prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise QuantbenchError("--chat: this tokenizer has no chat template; leave --chat off")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def end_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokens that end a generation: the generation config's end-of-sequence ids, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set() if ids is None else {ids} if isinstance(ids, int) else set(ids)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | Sequence[str], max_new_tokens: int, chat: bool = False,
             stop_ids: set[int] | None = None, cuda_graph: bool = True, compiled: bool = False,
             sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None,
             batch_size: int | None = None, on_output: Callable[[int, Output], None] | None = None,
             numbers: Sequence[int] | None = None) -> Generation:
    """Up to `max_new_tokens` tokens after `prompt` (or after each of several, decoded together as one batch, the
    shorter ones padded on the left) from `model` (on its device), greedy or as `sampling` says, timed.
    `stop_ids`: the end-of-sequence tokens (default `end_ids`); a prompt stops at its first. `batch_size`: the rows
    decoded at once (default: every prompt); with more prompts than rows, a prompt that stops hands its row to
    the next one waiting (`Refill`), and the batch runs until every prompt has stopped. A prompt's draws are
    keyed by the seed, its number in `numbers` (default its place among the prompts; a run resumed gives those of
    the prompts left) and its tokens' (`Draws`): it draws the same noise however it is batched. `on_text` (one
    prompt only) is handed the text in pieces as it comes, at each look for a stop token (`TextPieces`; the
    decode rate then includes its time); together they are the result's text. `on_output` is handed each
    prompt's index (among `prompt`) and output as it stops."""
    from transformers import StaticCache

    if max_new_tokens < 1:
        raise QuantbenchError(f"max_new_tokens {max_new_tokens}: ask for at least one token")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise QuantbenchError("no prompt: give at least one")
    if on_text and len(prompts) > 1:
        raise QuantbenchError(f"text in pieces comes from one prompt, not {len(prompts)}")
    if batch_size is not None and batch_size < 1:
        raise QuantbenchError(f"batch size {batch_size}: decode at least one row")
    numbers = list(range(len(prompts))) if numbers is None else list(numbers)
    if len(numbers) != len(prompts):
        raise ValueError(f"{len(numbers)} prompt numbers for {len(prompts)} prompts")
    device = model.device
    stop_ids = end_ids(model, tokenizer) if stop_ids is None else stop_ids
    rows = [prompt_ids(tokenizer, text, chat)[0] for text in prompts]
    n = max(len(row) for row in rows)
    most = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if most is not None and n + max_new_tokens > most:
        raise QuantbenchError(f"{n} prompt tokens and {max_new_tokens} new ones pass the model's {most} positions: "
                              f"ask for at most {max(most - n, 0)} new tokens")
    width = len(rows) if batch_size is None else min(batch_size, len(rows))
    look_every = _steps_between_looks(device)
    several = width < len(rows)
    cache_length = Refill.columns(n, max_new_tokens, look_every) if several else n + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=cache_length)
    if several and not Refill.fits(cache):
        return _in_fixed_batches(model, tokenizer, prompts, width, max_new_tokens, chat, stop_ids, cuda_graph,
                                 compiled, sampling, on_output, numbers)
    pad_id = _pad_id(tokenizer, stop_ids)
    graphs = cuda_graph and device.type == "cuda"
    sampling = sampling.seeded()
    draws = Draws.of(sampling, numbers[:width], device)
    prefill_padding, step_padding, next_positions = _padding(rows[:width], n, cache_length, device, several)

    started = _now(device)
    cached = {cache_argument(model): cache, "use_cache": True}
    token = _prefilled(model, rows[:width], n, pad_id, cache, prefill_padding, sampling, draws)
    position = torch.tensor([n], device=device)  # read before transformers 5.25; later ones count in the cache
    new = [token.clone()]  # the tokens of the steps since the last look
    made_steps = 1  # the prefill's tokens and each step's
    prefill_s = _now(device) - started
    refill = Refill(model, rows, cache, token, position, next_positions, step_padding.get("attention_mask"),
                    most, sampling, draws, numbers, pad_id) if several else None

    forward = torch.compile(model, dynamic=False) if compiled else model

    def step() -> None:
        out = forward(token, cache_position=position, **cached, **step_padding).logits
        token.copy_(next_tokens(out[:, -1], sampling, draws))
        position.add_(1)
        if next_positions is not None:
            next_positions.add_(1)
            if refill is not None and refill.last_position is not None:
                next_positions.clamp_(max=refill.last_position)  # a row past its tokens runs on to the next look

    def advanced() -> None:
        nonlocal made_steps
        new.append(token.clone())
        made_steps += 1
        if refill is not None:
            refill.column += 1

    serving: list[int | None] = list(range(width))  # the prompt each row decodes (None: no prompt left for it)
    made: list[list[int]] = [[] for _ in range(width)]  # each row's tokens for it, as looked at
    outputs: list[Output | None] = [None] * len(rows)

    def look() -> bool:
        """Reads the tokens since the last look; a prompt that made a stop token or all its tokens is done, its row
        taken by the next prompt waiting. True when every prompt is done."""
        if not new:
            return all(at is None for at in serving)
        handed = []
        for row, tokens in enumerate(torch.cat(new, dim=1).tolist()):
            if serving[row] is None:
                continue
            made[row].extend(tokens)
            if stop_ids.isdisjoint(made[row]) and len(made[row]) < max_new_tokens:
                continue
            kept = until_stop(made[row][:max_new_tokens], stop_ids)
            outputs[serving[row]] = Output(len(rows[serving[row]]), kept,
                                           tokenizer.decode(kept, skip_special_tokens=True))
            if on_output:
                on_output(serving[row], outputs[serving[row]])
            serving[row] = refill.next_prompt() if refill is not None else None
            if serving[row] is not None:
                handed.append(row)
        if handed:  # the prompts that took a row, prefilled together
            for row, first in zip(handed, refill.admit({row: serving[row] for row in handed})):
                made[row] = [first]
        new.clear()
        if refill is not None:
            refill.make_room(serving, look_every)
        return all(at is None for at in serving)

    started = _now(device)
    run = step
    if not look() and (compiled or not graphs):
        step()  # with `compiled` this compiles the step before any capture, so no recompile meets one
        advanced()
    if graphs and not look():
        run = captured(step).replay  # the capture's warm-up run makes a token too (its graph is not run)
        advanced()
    warmup_steps, warmup_s = made_steps - 1, _now(device) - started
    pieces = TextPieces(tokenizer, stop_ids, on_text) if on_text else None
    started = _now(device)
    steps = 0
    while refill is not None or made_steps < max_new_tokens:
        if steps % look_every == 0:
            if look():
                break
            if pieces:
                pieces.update(made[0])
        run()
        advanced()
        steps += 1
    steady_s = _now(device) - started
    look()  # the prompts that ran out of tokens
    if pieces:
        pieces.finish(outputs[0].text)
    return Generation(outputs, prefill_s, warmup_steps, warmup_s, steps, steady_s, graphs, compiled, sampling,
                      width, refill.admitted if refill is not None else 0)


def _in_fixed_batches(model: nn.Module, tokenizer, prompts: list[str], width: int, max_new_tokens: int,
                      chat: bool, stop_ids: set[int], cuda_graph: bool, compiled: bool, sampling: Sampling,
                      on_output: Callable[[int, Output], None] | None, numbers: list[int]) -> Generation:
    """`prompts` `width` at a time, each batch until its last prompt stops (where rows cannot be handed on)."""
    parts = []
    sampling = sampling.seeded()
    for at in range(0, len(prompts), width):
        parts.append(generate(model, tokenizer, prompts[at:at + width], max_new_tokens, chat, stop_ids, cuda_graph,
                              compiled, sampling, on_output=on_output and functools.partial(_shifted, on_output, at),
                              numbers=numbers[at:at + width]))
    return Generation(
        [output for part in parts for output in part.outputs], sum(part.prefill_s for part in parts),
        sum(part.warmup_steps for part in parts), sum(part.warmup_s for part in parts),
        sum(part.steady_steps for part in parts), sum(part.steady_s for part in parts), parts[0].cuda_graph,
        compiled, sampling, width, steady_row_steps=sum(part.batch_size * part.steady_steps for part in parts))


def _shifted(on_output: Callable[[int, Output], None], by: int, index: int, output: Output) -> None:
    on_output(by + index, output)


class Refill:
    """Rows handed from prompts that stopped to prompts waiting, in one static cache whose columns every row writes
    at once. The prompts taking rows at a look are prefilled together (the shorter padded on the left), and each
    one's keys and values copied into its row's columns just before the next one to be written; the row's mask
    then opens from them, its positions count from its own first token. Every later prompt fits there, since the
    first batch's prefill is as long as the longest prompt. When fewer than a look's steps of columns are left,
    every row's columns move left by what no row still reads."""

    def __init__(self, model: nn.Module, rows: list[torch.Tensor], cache, token: torch.Tensor,
                 position: torch.Tensor, next_positions: torch.Tensor, mask: torch.Tensor, most: int | None,
                 sampling: Sampling, draws: Draws | None, numbers: list[int], pad_id: int):
        """`token`, `position` (the next column), `next_positions` and `mask`: the decode step's inputs, which
        the rows' handing over and moves change in place (a CUDA graph replays them), as are `draws`' counters;
        `numbers`: each prompt's number, which keys its draws."""
        width = len(token)
        self.model, self.rows, self.cache, self.longest = model, rows, cache, max(len(row) for row in rows)
        self.token, self.position, self.next_positions, self.mask = token, position, next_positions, mask
        self.sampling, self.draws, self.numbers, self.pad_id = sampling, draws, numbers, pad_id
        self.waiting = list(range(width, len(rows)))[::-1]
        self.cache_length = mask.shape[1]
        self.last_position = None if most is None else most - 1
        self.column = self.longest  # where the next step writes
        self.first = [self.longest - len(row) for row in rows[:width]]  # each row's first column read
        self.admitted = 0

    @staticmethod
    def columns(longest: int, max_new_tokens: int, look_every: int) -> int:
        """A prompt still decoded reads fewer than `span` columns, so a move of `make_room` leaves the next column
        at most `span` on, and at least a quarter of that (two looks' steps) free: each step attends over every
        column, so a longer cache would cost more than its rarer moves save."""
        span = longest + max_new_tokens + look_every
        return span + max(span // 4, 2 * look_every)

    @staticmethod
    def fits(cache) -> bool:
        """Whether every layer keeps every column: one whose attention slides over fewer keeps its last ones, and
        rows' columns can neither be handed on nor moved there."""
        return min(layer.max_cache_len for layer in cache.layers) == max(layer.max_cache_len for layer in cache.layers)

    def next_prompt(self) -> int | None:
        return self.waiting.pop() if self.waiting else None

    def admit(self, prompts: dict[int, int]) -> list[int]:
        """Prefills `prompts` ({row: prompt}) together, the shorter padded on the left, each into its row's columns
        before the next one; returns their first tokens."""
        from transformers import StaticCache

        chosen = [self.rows[prompt] for prompt in prompts.values()]
        longest = max(len(row) for row in chosen)
        together = StaticCache(config=self.model.config, max_cache_len=longest)
        padding = _padding(chosen, longest, longest, self.token.device)[0]
        rows = list(prompts)
        if self.draws is not None:
            for row, prompt in prompts.items():
                self.draws.start(row, self.numbers[prompt])
        first = _prefilled(self.model, chosen, longest, self.pad_id, together, padding, self.sampling,
                           self.draws and self.draws[rows])
        if self.draws is not None:
            self.draws.counts[rows] = 1
        for at, (row, prompt) in enumerate(prompts.items()):
            length = len(chosen[at])
            columns = slice(self.column - length, self.column)
            for layer, its in zip(self.cache.layers, together.layers):
                layer.keys[row, :, columns] = its.keys[at, :, longest - length:]
                layer.values[row, :, columns] = its.values[at, :, longest - length:]
            self.mask[row] = 1
            self.mask[row, :columns.start] = 0
            self.next_positions[row] = length
            self.first[row] = columns.start
        self.token[rows] = first
        self.admitted += len(prompts)
        return first[:, 0].tolist()

    def make_room(self, serving: list[int | None], look_every: int) -> None:
        """Moves every row's columns left when the steps to the next look would pass the cache's end: by the
        columns no prompt still decoded reads, keeping the longest prompt's room before the next column."""
        if self.column + look_every <= self.cache_length:
            return
        by = min([self.first[row] for row, prompt in enumerate(serving) if prompt is not None]
                 + [self.column - self.longest])
        kept = self.cache_length - by
        for layer in self.cache.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:, :, :kept] = tensor[:, :, by:].clone()
            if hasattr(layer, "cumulative_length"):  # where transformers 5.25 and later write
                layer.cumulative_length.fill_(self.column - by)
            if hasattr(layer, "cumulative_length_int"):
                layer.cumulative_length_int = self.column - by
        self.mask[:, :kept] = self.mask[:, by:].clone()
        self.mask[:, kept:] = 1
        self.column -= by
        self.position.fill_(self.column)
        self.first = [max(first - by, 0) for first in self.first]


def _prefilled(model: nn.Module, rows: list[torch.Tensor], n: int, pad_id: int, cache, padding: dict,
               sampling: Sampling, draws: Draws | None) -> torch.Tensor:
    """The rows' first tokens [rows, 1] after one forward over them into `cache`, padded on the left to `n`
    (`padding`: `_padding`'s prefill arguments)."""
    device = model.device
    ids = torch.stack([nn.functional.pad(row, (n - len(row), 0), value=pad_id) for row in rows]).to(device)
    arguments = {cache_argument(model): cache, "use_cache": True}
    logits = model(ids, cache_position=torch.arange(n, device=device), **arguments, **padding).logits
    return next_tokens(logits[:, -1], sampling, draws)


def _pad_id(tokenizer, stop_ids: set[int]) -> int:
    """The token a shorter prompt is padded with on the left (masked out: any token would do)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *sorted(stop_ids)):
        if candidate is not None:
            return candidate
    return 0


def _padding(rows: list[torch.Tensor], n: int, cache_length: int, device: torch.device, always: bool = False):
    """The prefill's and the steps' extra arguments where prompts differ in length (none where they do not, unless
    `always`): one attention mask over the whole cache (the padding off; positions past the current one are
    causal-masked), each prompt's positions counted from its first token, and the steps' positions, which each
    step moves on."""
    if len({len(row) for row in rows}) == 1 and not always:
        return {}, {}, None
    mask = torch.ones(len(rows), cache_length, dtype=torch.long, device=device)
    for at, row in enumerate(rows):
        mask[at, :n - len(row)] = 0
    positions = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)
    next_positions = positions[:, -1:] + 1
    return ({"attention_mask": mask, "position_ids": positions},
            {"attention_mask": mask, "position_ids": next_positions}, next_positions)


def until_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    """`ids` up to and with the first stop token."""
    for at, token_id in enumerate(ids):
        if token_id in stop_ids:
            return ids[:at + 1]
    return ids


class TextPieces:
    """A generation's text handed on in pieces that later tokens cannot change: up to the last whitespace (a
    tokenizer's clean-up may still join what follows it to the token after, or a character may be half made)."""

    def __init__(self, tokenizer, stop_ids: set[int], on_text: Callable[[str], None]):
        self.tokenizer, self.stop_ids, self.on_text, self.handed = tokenizer, stop_ids, on_text, ""

    def update(self, ids: list[int]) -> None:
        text = self.tokenizer.decode(until_stop(ids, self.stop_ids), skip_special_tokens=True)
        last_space = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        self._hand(text[:last_space] if last_space > len(self.handed) else "")

    def finish(self, text: str) -> None:
        self._hand(text)

    def _hand(self, text: str) -> None:
        if len(text) > len(self.handed) and text.startswith(self.handed):
            self.on_text(text[len(self.handed):])
            self.handed = text


def _steps_between_looks(device: torch.device) -> int:
    """Decode steps between looks for a stop token: on CUDA each look waits for the GPU, on the CPU it is free."""
    return EOS_CHECK_EVERY if device.type == "cuda" else 1


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the cache: `cache` since transformers 5.25, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def captured(step) -> torch.cuda.CUDAGraph:
    """`step` run once on a side stream (as capture requires), then captured in a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        step()
    return graph


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
