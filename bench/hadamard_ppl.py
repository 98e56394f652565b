"""Does rotation help? Perplexity of one model per scheme, without rotation, with the per-layer Hadamard
transform (`hadamard+<scheme>`) and on the QuaRot-rotated model (`transforms: [rotate]`).

    python bench/hadamard_ppl.py --model .assets/models/smollm2-135m-dithered --windows 16 \
        --schemes int4-pc-rtn int4-pc-gptq int3-g128-rtn int3-g128-gptq int4-pc-rtn-a:int4 int4-pc-gptq-a:int4

Every cell goes through the real pipeline (block by block, C4 calibration) and is scored on the same
WikiText-2 windows. The rotated model's full-precision perplexity is checked against the plain one.
Token ids as in ppl_ladder.py (`--calibration-ids`, `--eval-ids` where `datasets` is missing).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ppl_ladder import add_token_id_arguments, token_ids

from quantbench.eval.perplexity import perplexity_of_ids
from quantbench.model_io import load_model, resolve_device
from quantbench.pipeline import quantize_model
from quantbench.results import environment
from quantbench.rotation import rotate_model
from quantbench.scheme import Scheme

VARIANTS = ("plain", "hadamard", "quarot")


def run_cell(args, calibration, ids, device, dtype, scheme: Scheme | None, variant: str) -> dict:
    model, _ = load_model(args.model, dtype)
    start = time.perf_counter()
    if variant == "quarot":
        rotate_model(model)
    bits = None
    if scheme is not None:
        if variant == "hadamard":
            scheme = scheme.model_copy(update={"transform": "hadamard"})
        quantized = quantize_model(model, calibration, lambda _layer: scheme, device, progress=False)
        bits = sum(q.storage_bits for q in quantized.values()) / sum(q.numel for q in quantized.values())
    seconds = time.perf_counter() - start
    result = perplexity_of_ids(model.to(device), ids, args.seqlen, args.windows, batch_size=4, dataset="wikitext2")
    return {"scheme": scheme.name if scheme else "full precision", "variant": variant, "bits_per_weight": bits,
            "wikitext2_ppl": round(result.ppl, 3), "windows": result.windows, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--schemes", nargs="+", default=["int4-pc-rtn", "int3-g128-rtn", "int4-pc-rtn-a:int4"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    add_token_id_arguments(parser, n_samples=128, calibration_seqlen=2048)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    calibration, ids = token_ids(args)
    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)

    rows = []
    for variant in ("plain", "quarot"):
        rows.append(run_cell(args, calibration, ids, device, dtype, None, variant))
        print(json.dumps(rows[-1]), flush=True)
    for name in args.schemes:
        for variant in args.variants:
            rows.append(run_cell(args, calibration, ids, device, dtype, Scheme.parse(name), variant))
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel {args.model} ({args.dtype}); WikiText-2 test, first {args.windows} windows of {args.seqlen}; "
          f"calibration {tuple(calibration.shape)} C4 tokens; device {environment(device)['device_name']}\n")
    table = {(row["scheme"].removeprefix("hadamard+"), row["variant"]): row for row in rows}
    names = ["full precision", *args.schemes]
    print("| scheme | bits/weight | " + " | ".join(args.variants) + " |\n|---|---:|" + "---:|" * len(args.variants))
    for name in names:
        cells = [table.get((name, v)) for v in args.variants]
        bits = next((c["bits_per_weight"] for c in cells if c and c["bits_per_weight"]), None)
        values = [f"{c['wikitext2_ppl']:.3f}" if c else "—" for c in cells]
        print(f"| {name} | {f'{bits:.3f}' if bits else '16'} | " + " | ".join(values) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
