"""Perplexity of one model at several quantization schemes: does error order as theory says, and by how
much does each solver beat round-to-nearest?

    python bench/ppl_ladder.py --model .assets/models/smollm2-135m-dithered --windows 16 \
        --schemes int4-g128-rtn int4-g128-gptq int3-g128-rtn int3-g128-gptq int3-g128-gptq-act

Every scheme goes through the real pipeline (block by block, C4 calibration), and each row is scored on
the same WikiText-2 windows as the full-precision row. Prints a markdown table; --json writes the rows.
On a machine without `datasets` or the data: `--export-ids DIR` here writes the token ids, and
`--calibration-ids DIR/calibration.safetensors --eval-ids DIR/wikitext2.safetensors` there reads them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantbench.model_io import load_model, resolve_device
from quantbench.pipeline import quantize_model
from quantbench.results import environment
from quantbench.scheme import Scheme


def token_ids(args):
    """(calibration [n, seqlen], WikiText-2 test stream) from files or from the datasets."""
    if args.calibration_ids and args.eval_ids:
        return load_file(args.calibration_ids)["input_ids"], load_file(args.eval_ids)["input_ids"]
    from quantbench.calibration import calibration_batches
    from quantbench.calibration.sources import load_eval_text
    from quantbench.eval.perplexity import tokenize_eval_text
    from quantbench.model_io import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    calibration = calibration_batches(tokenizer, "c4", args.n_samples, args.calibration_seqlen, seed=0)
    return calibration, tokenize_eval_text(tokenizer, load_eval_text("wikitext2")[0])


def quantized_model(model_name: str, dtype: torch.dtype, name: str, calibration: torch.Tensor, device: torch.device,
                    **options):
    """A fresh copy of the model quantized by scheme `name` ("full precision": left as loaded) through the
    pipeline (`options` go to quantize_model); returns (model, quantized weights, bits per weight, seconds)."""
    model, _ = load_model(model_name, dtype)
    start = time.perf_counter()
    quantized, bits = {}, None
    if name != "full precision":
        scheme = Scheme.parse(name)
        quantized = quantize_model(model, calibration, lambda _layer: scheme, device, progress=False, **options)
        bits = sum(q.storage_bits for q in quantized.values()) / sum(q.numel for q in quantized.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, quantized, bits, time.perf_counter() - start


def add_token_id_arguments(parser: argparse.ArgumentParser, n_samples: int, calibration_seqlen: int) -> None:
    """The options `token_ids` reads: calibration size, and id files for machines without the datasets."""
    parser.add_argument("--n-samples", type=int, default=n_samples, help="calibration windows")
    parser.add_argument("--calibration-seqlen", type=int, default=calibration_seqlen)
    parser.add_argument("--calibration-ids", help="safetensors with input_ids [n, seqlen]")
    parser.add_argument("--eval-ids", help="safetensors with the tokenized WikiText-2 test stream")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--schemes", nargs="+", default=["int8-pc-rtn", "int4-g128-rtn", "int3-g128-rtn", "int2-g128-rtn"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    add_token_id_arguments(parser, n_samples=16, calibration_seqlen=512)
    parser.add_argument("--export-ids", help="write both id files to this folder and stop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hessian", choices=["compensated", "fp32", "tensor_cores"], default="compensated")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    from quantbench.quiet import quiet_libraries

    quiet_libraries()

    calibration, ids = token_ids(args)
    if args.export_ids:
        out = Path(args.export_ids)
        out.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": calibration.contiguous()}, str(out / "calibration.safetensors"))
        save_file({"input_ids": ids.contiguous()}, str(out / "wikitext2.safetensors"))
        print(f"wrote {out}: calibration {tuple(calibration.shape)}, wikitext2 {ids.numel()} tokens")
        return

    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    from quantbench.eval.perplexity import perplexity_of_ids

    rows = []
    for name in ["full precision", *args.schemes]:
        model, _, bits, quantize_s = quantized_model(args.model, dtype, name, calibration, device, hessian=args.hessian)
        result = perplexity_of_ids(model.to(device), ids, args.seqlen, args.windows, batch_size=4, dataset="wikitext2")
        rows.append({"scheme": name, "bits_per_weight": bits and round(bits, 3), "wikitext2_ppl": round(result.ppl, 3),
                     "windows": result.windows, "seqlen": args.seqlen, "quantize_s": round(quantize_s, 1)})
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nmodel {args.model} ({args.dtype}, Hessian {args.hessian}); WikiText-2 test, first {args.windows} windows of {args.seqlen}; "
          f"calibration {tuple(calibration.shape)} C4 tokens; device {environment(device)['device_name']}\n")
    print("| scheme | bits/weight | WikiText-2 ppl | quantize s |\n|---|---:|---:|---:|")
    for row in rows:
        bits = f"{row['bits_per_weight']:.3f}" if row["bits_per_weight"] else "—"
        print(f"| {row['scheme']} | {bits} | {row['wikitext2_ppl']:.3f} | {row['quantize_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
