"""The latency table an allocation recipe can name (`allocation.latency.table_file`): for every candidate
scheme, the GPU time of one decode step's matmul (batch 1) per million weights, with quantbench's own
kernels where one runs the format (`load_quantized(kernels=True)`) and the dense float16 matmul where none
does (the layer stays dense then); Hadamard schemes add their online input rotation.

    python bench/kernel_latency.py --device cuda --out latency.json [--schemes …] [--resume]

Times are CUDA-graph replays on a cold L2 (export/kernels/matmul.graph_time_ms), averaged over the weight
shapes of an 8B Llama. The JSON holds `table` (quantbench.allocation.problem.latency_key of each kernel's
scheme, a regex that also matches its activation-order variants → µs per million weights) and every
measurement behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocation_search import CANDIDATES, SEARCH  # noqa: E402

from quantbench.allocation.problem import latency_key  # noqa: E402
from quantbench.export.kernels import kernel_unsupported_reason, packed_matmul, to_kernel_layout  # noqa: E402
from quantbench.export.kernels.matmul import graph_time_ms  # noqa: E402
from quantbench.quantizers import quantize_weight  # noqa: E402
from quantbench.quantizers.hadamard import rotation_for  # noqa: E402
from quantbench.scheme import Scheme  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K inputs, N outputs)
SCHEMES = list(dict.fromkeys([*CANDIDATES, *SEARCH, "keep"]))  # the allocation benchmark's candidates


def stored_weight(scheme: Scheme, n: int, k: int, device):
    """A random weight in the scheme's stored form (RTN for grids, PTQTP for trits: timing needs no GPTQ)."""
    weight = torch.randn(n, k, device=device) * 0.02
    plain = scheme.model_copy(update={"transform": "none", "rotation_seed": 0})
    if plain.solver == "gptq":
        plain = plain.model_copy(update={"solver": "rtn", "act_order": False, "static_groups": False})
    return quantize_weight(weight, plain, None)


def time_scheme(name: str, k: int, n: int, device) -> dict:
    x = torch.randn(1, k, device=device, dtype=torch.float16)
    if name == "keep":
        dense = torch.randn(n, k, device=device, dtype=torch.float16)
        return {"kernel": "dense fp16", "us": 1e3 * graph_time_ms(lambda: x @ dense.t())}
    scheme = Scheme.parse(name)
    weight = stored_weight(scheme, n, k, device)
    reason = kernel_unsupported_reason(weight)
    if reason is None:
        layout = to_kernel_layout(weight)
        us = 1e3 * graph_time_ms(lambda: packed_matmul(x, layout))
        kernel = "quantbench"
    else:
        dense = weight.dequantize(torch.float16)
        us = 1e3 * graph_time_ms(lambda: x @ dense.t())
        kernel = f"dense fp16 ({reason})"
    rotation = rotation_for(scheme, k)
    if rotation is not None:
        us += 1e3 * graph_time_ms(lambda: rotation.rows(x))
        kernel += " + online Hadamard"
    return {"kernel": kernel, "us": us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="latency.json")
    parser.add_argument("--resume", action="store_true", help="keep the schemes --out already holds")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "batch": 1,
              "date": time.strftime("%Y-%m-%d"), "shapes": SHAPES, "table": {}, "measured": []}
    if args.resume and out.is_file():
        result = json.loads(out.read_text())
    for name in args.schemes:
        key = latency_key(name)  # one measurement per kernel: -act variants share it
        if key in result["table"]:
            continue
        per_million = []
        for k, n in SHAPES:
            row = {"scheme": name, "shape": f"{k}x{n}", **time_scheme(name, k, n, device)}
            row["us_per_million_weights"] = row["us"] / (k * n / 1e6)
            per_million.append(row["us_per_million_weights"])
            result["measured"].append(row)
            print(json.dumps(row), flush=True)
        result["table"][key] = round(sum(per_million) / len(per_million), 4)
        out.write_text(json.dumps(result, indent=1) + "\n")  # each scheme as it is measured
    print(json.dumps(result["table"], indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
