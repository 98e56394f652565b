"""Many prompts through `generate`: rows taken in turn against fixed batches, both with the same number of rows.

Rows taken in turn (`generate(..., batch_size=B)`): a prompt that stops hands its row to the next prompt waiting.
Fixed batches: the prompts B at a time, each batch decoding until its last prompt stops (what `generate` did
before, and what one call per batch gives). Chat questions whose answers run from a word to a paragraph, greedy;
the two ways alternate, each timed over the whole list (prefills included). Prints the new tokens kept, the
seconds, the tokens a second and the rows' steps (the work done, stopped rows included).

    python bench/prompt_rows.py runs/quickstart --rows 8 --max-new-tokens 128 --repeat 2
"""

from __future__ import annotations

import argparse
import time

import torch

from quantbench.export.checkpoint import is_quantbench_checkpoint, resolve_checkpoint_dir
from quantbench.generate import generate
from quantbench.model_io import load_target, resolve_device

QUESTIONS = [
    "Answer in one word: what colour is the sky on a clear day?",
    "Write a short paragraph about the history of the bicycle.",
    "What is 12 times 12? Reply with the number only.",
    "Explain in three sentences why the sea is salty.",
    "Name the capital of Japan.",
    "Describe how to make a cup of tea, step by step.",
    "Is a tomato a fruit? Answer yes or no.",
    "Write a haiku about autumn leaves.",
    "List five animals that live in the ocean.",
    "Explain what a prime number is to a ten-year-old.",
    "Which planet is closest to the sun? One word.",
    "Give three tips for sleeping better, with a sentence on each.",
    "Translate 'good morning' into French.",
    "Tell a short story about a robot who learns to paint.",
    "What is the boiling point of water in Celsius? Just the number.",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "Spell the word 'necessary' backwards.",
    "Why do leaves change colour in the autumn? Explain in detail.",
    "How many legs does a spider have?",
    "Write a polite email declining an invitation to a party.",
    "What is the opposite of 'ancient'? One word.",
    "Describe the water cycle.",
    "Who wrote 'Pride and Prejudice'?",
    "Give a recipe for a simple pancake batter.",
    "Say hello.",
    "Explain how a rainbow forms.",
    "What is the largest mammal on Earth? Answer briefly.",
    "Write four lines of a poem about the moon.",
    "Count from one to five in words.",
    "What are the benefits of regular exercise? Give a full answer.",
    "Name a primary colour.",
    "Describe a busy market in a few sentences.",
]


def timed(run) -> tuple[float, list, int]:
    started = time.perf_counter()
    outputs, steps = run()
    return time.perf_counter() - started, outputs, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="quantbench checkpoint, run directory, model directory or hub id")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=len(QUESTIONS), help="the first this many questions")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    device = resolve_device(args.device)
    packed = args.kernels and is_quantbench_checkpoint(resolve_checkpoint_dir(args.target))
    loaded = load_target(args.target, device, torch.float16 if device.type == "cuda" else None, packed)
    model, tokenizer = loaded.model.to(device), loaded.tokenizer
    prompts = QUESTIONS[:args.prompts]
    n, rows = args.max_new_tokens, args.rows

    def in_turn():
        result = generate(model, tokenizer, prompts, n, chat=True, batch_size=rows)
        return result.outputs, rows * (result.warmup_steps + result.steady_steps + 1)

    def in_batches():
        outputs, steps = [], 0
        for at in range(0, len(prompts), rows):
            result = generate(model, tokenizer, prompts[at:at + rows], n, chat=True)
            outputs += result.outputs
            steps += len(result.outputs) * (result.warmup_steps + result.steady_steps + 1)
        return outputs, steps

    generate(model, tokenizer, prompts[:rows], 4, chat=True)  # first calls' set-up (and on CUDA, tile tuning)
    print(f"{args.target} on {device} ({'packed kernels' if packed else 'dense'}, {model.dtype}): {len(prompts)} "
          f"chat prompts, {rows} rows, at most {n} new tokens each, greedy")
    for round_ in range(1, args.repeat + 1):
        for name, run in (("rows in turn", in_turn), ("fixed batches", in_batches)):
            seconds, outputs, steps = timed(run)
            made = [len(output.new_ids) for output in outputs]
            print(f"  round {round_}  {name:<14} {sum(made):5d} tokens kept in {seconds:6.1f} s: "
                  f"{sum(made) / seconds:6.1f} tok/s; rows' steps {steps:5d}; "
                  f"answers {min(made)}–{max(made)} tokens, {sum(m == n for m in made)} cut at {n}", flush=True)


if __name__ == "__main__":
    main()
