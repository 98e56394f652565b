"""Perplexity of one model at several quantization schemes (RTN by default): does error order as theory says?

    python bench/ppl_ladder.py --model .assets/models/smollm2-135m-dithered --windows 8 \
        --schemes int8-pc-rtn int4-g128-rtn int3-g128-rtn int2-g128-rtn

Every scheme goes through the real pipeline (block by block, calibration from C4), and each row is
evaluated on the same WikiText-2 windows as the full-precision row. Prints a markdown table; --json
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantbench.calibration import calibration_batches
from quantbench.calibration.sources import load_eval_text
from quantbench.eval.perplexity import perplexity_of_ids, tokenize_eval_text
from quantbench.model_io import load_model, resolve_device
from quantbench.pipeline import quantize_model
from quantbench.quiet import quiet_libraries
from quantbench.results import environment
from quantbench.scheme import Scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--schemes", nargs="+", default=["int8-pc-rtn", "int4-g128-rtn", "int3-g128-rtn", "int2-g128-rtn"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--calibration-seqlen", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    quiet_libraries()

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, torch.float32)
    text, _ = load_eval_text("wikitext2")
    ids = tokenize_eval_text(tokenizer, text)
    calibration = calibration_batches(tokenizer, args.calibration, args.n_samples, args.calibration_seqlen, seed=0)
    rows = []
    for name in ["fp32", *args.schemes]:
        model, _ = load_model(args.model, torch.float32)
        start = time.perf_counter()
        bits = None
        if name != "fp32":
            scheme = Scheme.parse(name)
            quantized = quantize_model(model, calibration, lambda _layer: scheme, device, progress=False)
            bits = sum(q.storage_bits for q in quantized.values()) / sum(q.codes.numel() for q in quantized.values())
        quantize_s = time.perf_counter() - start
        result = perplexity_of_ids(model.to(device), ids, args.seqlen, args.windows, dataset="wikitext2")
        rows.append({"scheme": name, "bits_per_weight": bits and round(bits, 3), "wikitext2_ppl": round(result.ppl, 3),
                     "windows": result.windows, "seqlen": args.seqlen, "quantize_s": round(quantize_s, 1)})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel {args.model}; WikiText-2 test, first {args.windows} windows of {args.seqlen}; "
          f"device {device} ({environment(device)['device_name']})\n")
    print("| scheme | bits/weight | WikiText-2 ppl | quantize s |\n|---|---:|---:|---:|")
    for row in rows:
        bits = f"{row['bits_per_weight']:.3f}" if row["bits_per_weight"] else "—"
        print(f"| {row['scheme']} | {bits} | {row['wikitext2_ppl']:.3f} | {row['quantize_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
