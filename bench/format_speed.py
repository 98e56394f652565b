"""Quantize / dequantize throughput of every weight format on one 4096×4096 tensor, and of per-token
activation quantization on 4096 tokens × 4096.

    python bench/format_speed.py --device cpu
    python bench/format_speed.py --device cuda

quantize = RTN: fit every group's scale, encode, store the scales as the checkpoint holds them;
dequantize = stored codes and scales back to float32. Median of `--repeat` timed calls after a warm-up
(CUDA events on the GPU). Each row also gives its time relative to int4-g128 RTN measured in the same
run, and on CUDA whether codes and scales equal those computed on the CPU, bit for bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantbench.activations import quantize_activations
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme
from timing import timed

WEIGHT_SCHEMES = ["int4-g128-rtn", "int4-g32-rtn", "int8-pc-sym-rtn", "mxfp4-rtn", "mxfp6e2m3-rtn", "mxfp6e3m2-rtn",
                  "mxfp8e4m3-rtn", "mxfp8e5m2-rtn", "mxint8-rtn", "nvfp4-rtn"]
ACTIVATION_FORMATS = ["int8", "int4", "mxfp8e4m3", "mxfp4", "nvfp4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    weight_cpu = torch.randn(args.size, args.size, generator=g) * 0.02
    weight = weight_cpu.to(device)
    elements = weight.numel()
    rows = []
    for name in WEIGHT_SCHEMES:
        scheme = Scheme.parse(name)
        quantize_s = timed(lambda: quantize_rtn(weight, scheme), device, args.repeat, warmup=True)[0]
        quantized = quantize_rtn(weight, scheme)
        dequantize_s = timed(quantized.dequantize, device, args.repeat, warmup=True)[0]
        row = {"kind": "weight", "format": name, "bits_per_weight": round(quantized.bits_per_weight, 4),
               "quantize_s": quantize_s, "dequantize_s": dequantize_s,
               "quantize_Gelem_s": elements / quantize_s / 1e9, "dequantize_Gelem_s": elements / dequantize_s / 1e9}
        if device.type == "cuda":
            on_cpu = quantize_rtn(weight_cpu, scheme)
            row["equal_to_cpu"] = bool(torch.equal(quantized.codes.cpu(), on_cpu.codes)
                                       and torch.equal(quantized.scales.cpu(), on_cpu.scales))
        rows.append(row)
    activations = weight.to(torch.bfloat16)
    for name in ACTIVATION_FORMATS:
        seconds = timed(lambda: quantize_activations(activations, name), device, args.repeat, warmup=True)[0]
        rows.append({"kind": "activation", "format": name, "quantize_s": seconds,
                     "quantize_Gelem_s": elements / seconds / 1e9})
    baseline = rows[0]
    for row in rows:
        row["quantize_vs_int4_g128"] = row["quantize_s"] / baseline["quantize_s"]
        if "dequantize_s" in row:
            row["dequantize_vs_int4_g128"] = row["dequantize_s"] / baseline["dequantize_s"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{where}, torch {torch.__version__}, {args.size}×{args.size} float32\n")
    print("| format | kind | bits/weight | quantize Gelem/s | × int4-g128 time | dequantize Gelem/s | × int4-g128 time |"
          + (" same as CPU |" if device.type == "cuda" else ""))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---|" if device.type == "cuda" else ""))
    for r in rows:
        deq = (f"{r['dequantize_Gelem_s']:.3f} | {r['dequantize_vs_int4_g128']:.2f}" if "dequantize_s" in r else "– | –")
        line = (f"| {r['format']} | {r['kind']} | {r.get('bits_per_weight', '–')} | {r['quantize_Gelem_s']:.3f} | "
                f"{r['quantize_vs_int4_g128']:.2f} | {deq} |")
        if device.type == "cuda":
            line += f" {r.get('equal_to_cpu', '–')} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
