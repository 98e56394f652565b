"""Where time goes in the quantization pipeline, on a random-weight Llama (no download needed).

    python bench/pipeline_speed.py --device cuda --size 1b      # 1B-class dims (hidden 2048, 16 blocks)
    python bench/pipeline_speed.py --device cpu --size tiny

The model lives on CPU and moves block by block to the device, as in a real run. Reported against a
baseline measured in the same run: one plain forward pass of the whole model (already on the device)
over the same calibration tokens. Also checks on the device: codes identical to RTN computed on CPU,
bit-identical codes on a second run, and export → load giving identical logits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from quantbench import load_quantized, save_quantized
from quantbench.eval.perplexity import perplexity_of_ids
from quantbench.model_io import decoder_blocks, model_linears
from quantbench.pipeline import quantize_model
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.results import environment
from quantbench.scheme import Scheme
from random_models import SIZES, build_random_llama
from timing import timed

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scheme", default="int4-g128-rtn")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    scheme = Scheme.parse(args.scheme)
    figures = {"size": args.size, "dims": SIZES[args.size], "dtype": args.dtype, "scheme": scheme.name,
               "calibration_tokens": args.n_samples * args.seqlen, "environment": environment(device)}
    ids = torch.randint(0, SIZES[args.size]["vocab_size"], (args.n_samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))

    model = build_random_llama(args.size, dtype)
    originals = {name: layer.weight.detach().clone() for name, layer in model_linears(model).items()}
    figures["params"] = sum(p.numel() for p in model.parameters())

    # baseline: the whole model already on the device, one forward pass over the calibration tokens
    model.to(device)
    with torch.no_grad():
        model(input_ids=ids[: args.batch_size].to(device), use_cache=False)  # warm-up
        forward_s, _ = timed(lambda: [model(input_ids=b.to(device), use_cache=False).logits[:, -1]
                                      for b in ids.split(args.batch_size)], device)
    model.to("cpu")
    figures["baseline_forward_s"] = round(forward_s, 3)

    sync(device)
    t0 = time.perf_counter()
    quantized = quantize_model(model, ids, lambda _n: scheme, device, batch_size=args.batch_size, progress=False)
    sync(device)
    pipeline_s = time.perf_counter() - t0
    figures["pipeline_s"] = round(pipeline_s, 3)
    figures["pipeline_per_block_s"] = round(pipeline_s / SIZES[args.size]["num_hidden_layers"], 3)
    figures["pipeline_vs_forward"] = round(pipeline_s / forward_s, 2)
    if device.type == "cuda":
        figures["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)

    # the breakdown: moving every block to the device and back, and RTN alone on the device
    blocks = decoder_blocks(model)
    transfer_s, _ = timed(lambda: [block.to(device).to("cpu") for block in blocks], device)
    figures["block_transfers_s"] = round(transfer_s, 3)
    rtn_s, _ = timed(lambda: [quantize_rtn(w.to(device, non_blocking=True), scheme) for w in originals.values()],
                     device)
    figures["rtn_all_layers_s"] = round(rtn_s, 3)

    mismatched = [n for n, w in originals.items()
                  if not torch.equal(quantize_rtn(w, scheme).codes, quantized[n].codes)]
    figures["codes_equal_cpu_reference"] = not mismatched

    again_model = build_random_llama(args.size, dtype)
    again = quantize_model(again_model, ids, lambda _n: scheme, device, batch_size=args.batch_size, progress=False)
    figures["deterministic"] = all(torch.equal(again[n].codes, q.codes) and torch.equal(again[n].scales, q.scales)
                                   for n, q in quantized.items())
    del again_model, again

    # packing throughput for one 4096×14336 layer on the device
    layer = torch.randn(4096, 14336, device=device, dtype=dtype)
    qw = quantize_rtn(layer, scheme)
    pack_s, packed = timed(qw.pack, device, repeat=10)
    unpack_s, _ = timed(lambda: QuantizedWeight.unpack(scheme, qw.shape, packed).dequantize(dtype), device, repeat=10)
    figures["pack_4096x14336_ms"] = round(pack_s * 1e3, 2)
    figures["unpack_dequantize_4096x14336_ms"] = round(unpack_s * 1e3, 2)

    # perplexity throughput and export → load exactness on the device
    eval_ids = ids[:16].reshape(-1)
    model.to(device)
    ppl_s, _ = timed(lambda: perplexity_of_ids(model, eval_ids, args.seqlen, batch_size=args.batch_size), device)
    figures["perplexity_tokens_per_s"] = round(eval_ids.numel() / ppl_s)
    with tempfile.TemporaryDirectory() as tmp:
        model.to("cpu")
        save_s, _ = timed(lambda: save_quantized(model, None, quantized, Path(tmp) / "ckpt"), torch.device("cpu"))
        load_s, loaded = timed(lambda: load_quantized(Path(tmp) / "ckpt", device=device), torch.device("cpu"))
        model.to(device)
        probe = ids[:2, :256].to(device)
        with torch.no_grad():
            figures["export_load_logits_equal"] = torch.equal(loaded(input_ids=probe).logits,
                                                              model(input_ids=probe).logits)
        figures["save_s"], figures["load_s"] = round(save_s, 2), round(load_s, 2)

    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
