"""Token ids for the allocation benchmark, written once where `datasets` is installed and carried to a
machine without it:

  calibration_seed{k}.safetensors  [n, seqlen] C4 windows drawn with seed k from the first
                           `--calibration-docs` documents of the offline C4 shard only
  wikitext2.safetensors    the WikiText-2 test stream (GPTQ protocol); windows from its start and its end
  c4_heldout.safetensors   the remaining C4 documents joined by blank lines: text the search never saw

    python bench/allocation_data.py --out .gpu/ids --n-samples 128 --seqlen 2048 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantbench.calibration import calibration_batches
from quantbench.calibration.sources import load_eval_text
from quantbench.eval.perplexity import tokenize_eval_text
from quantbench.model_io import load_tokenizer


def c4_documents(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="whose tokenizer")
    parser.add_argument("--c4", default=".assets/data/c4/c4-train.00000-of-01024.first1000.jsonl")
    parser.add_argument("--calibration-docs", type=int, default=800)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.model)
    documents = c4_documents(Path(args.c4))
    calibration_file = out / "c4_calibration_docs.jsonl"
    calibration_file.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:args.calibration_docs]))
    streams = {f"calibration_seed{seed}": calibration_batches(tokenizer, str(calibration_file), args.n_samples,
                                                              args.seqlen, seed, use_cache=False)
               for seed in args.seeds}
    calibration_file.unlink()
    text, _ = load_eval_text("wikitext2")
    streams["wikitext2"] = tokenize_eval_text(tokenizer, text)
    streams["c4_heldout"] = tokenize_eval_text(tokenizer, "\n\n".join(documents[args.calibration_docs:]))
    for name, ids in streams.items():
        save_file({"input_ids": ids.contiguous()}, str(out / f"{name}.safetensors"))
        print(f"{name}: {tuple(ids.shape)}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
