"""Two quantized checkpoints on the same lm-eval documents: each one's scores, and their paired difference
per task with its standard error over documents (far tighter than either score's own error when the two
models agree on most documents).

    python bench/paired_tasks.py FIRST_CKPT SECOND_CKPT --tasks piqa arc_easy hellaswag --limit 500 \
        --include-path .assets/lm_eval_tasks [--json paired.json]

Checkpoints quantized elsewhere travel with bench/checkpoint_parts.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantbench import load_quantized
from quantbench.eval.lm_eval_bridge import TaskRequest, paired_difference, run_tasks
from quantbench.model_io import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy", "hellaswag"])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--include-path", nargs="*", default=[".assets/lm_eval_tasks"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    requests = [TaskRequest(name, limit=args.limit) for name in args.tasks]
    scored = {}
    for path in (args.first, args.second):
        model = load_quantized(path, dtype=torch.float32)
        scored[path] = run_tasks(model, load_tokenizer(str(path)), requests, batch_size=args.batch_size,
                                 include_path=args.include_path, per_document=True)["tasks"]
    rows = []
    print(f"| task | {args.first.name} | {args.second.name} | difference, paired | documents that differ |")
    print("|---|---:|---:|---:|---:|")
    for name in args.tasks:
        first, second = scored[args.first][name], scored[args.second][name]
        paired = paired_difference(first, second)
        rows.append({"task": name, "metric": first["score_metric"], "first": first["score"],
                     "first_stderr": first["stderr"].get(first["score_metric"]), "second": second["score"],
                     "second_stderr": second["stderr"].get(second["score_metric"]), **paired})
        print(f"| {name} ({first['score_metric']}) | {first['score']:.4f} ± {rows[-1]['first_stderr']:.4f} | "
              f"{second['score']:.4f} ± {rows[-1]['second_stderr']:.4f} | {paired['difference']:+.4f} ± "
              f"{paired['stderr']:.4f} | {paired['disagreements']} of {paired['documents']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"first": str(args.first), "second": str(args.second), "tasks": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
