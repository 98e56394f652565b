"""GPTQ of a random-weight model on 1, 2, 4 … ranks, each count launched by torchrun in this run: wall time
of the quantization, its speed-up over one rank, and how many codes differ from one rank's.

    python bench/distributed_speed.py --random 8b --ranks 1 2 4 --device cuda --json out.json
    python bench/distributed_speed.py --random smollm2-135m --layers 2 --n-samples 16 --seqlen 256 --ranks 1 2 --device cpu

Every rank builds the same model (same seed) and the same random calibration tokens, then quantizes with
its share of the sequences (distributed.py). The time is rank 0's, from the start of `quantize_model` to
the end of the last block, every rank synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantbench import distributed  # noqa: E402
from quantbench.pipeline import StageTimer, quantize_model  # noqa: E402
from quantbench.scheme import Scheme  # noqa: E402
from random_models import SIZES, build_random_llama, build_random_llama_on  # noqa: E402


def worker(args) -> None:
    ranks = distributed.init_from_environment()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = (build_random_llama_on(args.random, dtype, device, args.layers).to("cpu") if device.type == "cuda"
             else build_random_llama(args.random, dtype, layers=args.layers))
    torch.cuda.empty_cache() if device.type == "cuda" else None
    ids = torch.randint(0, model.config.vocab_size, (args.n_samples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    scheme = Scheme.parse(args.scheme)
    timer = StageTimer(device)
    _barrier(ranks)
    started = time.perf_counter()
    quantized = quantize_model(model, ids, lambda name: scheme, device, args.batch_size, progress=False, timer=timer)
    _barrier(ranks)
    seconds = time.perf_counter() - started
    if ranks.main:
        torch.save({name: weight.codes for name, weight in quantized.items()}, args.out + ".codes")
        Path(args.out).write_text(json.dumps({"ranks": ranks.world, "quantize_s": seconds,
                                              "stages_s": timer.summary()}))
    distributed.finish()


def _barrier(ranks) -> None:
    if ranks.active:
        torch.distributed.barrier()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random", choices=list(SIZES), default="8b")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder blocks")
    parser.add_argument("--scheme", default="int4-g128-gptq")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.ranks:
            out = os.path.join(scratch, f"ranks{count}.json")
            forwarded = [a for a in sys.argv[1:] if a not in ("--json", args.json or "")]
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count),
                       __file__, *forwarded, "--worker", "--out", out]
            subprocess.run(command, check=True)
            row = json.loads(Path(out).read_text())
            codes = torch.load(out + ".codes")
            reference = reference or (row["quantize_s"], codes)
            row["speedup"] = reference[0] / row["quantize_s"]
            row["codes_differing"] = sum(int((codes[n] != reference[1][n]).sum()) for n in codes)
            row["codes"] = sum(c.numel() for c in codes.values())
            rows.append(row)
            print(f"{count} rank(s): {row['quantize_s']:7.1f} s, ×{row['speedup']:.2f} over one rank, "
                  f"{row['codes_differing']} of {row['codes']} codes differ from one rank's", flush=True)
    result = {"model": args.random, "layers": args.layers, "scheme": args.scheme, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "n_samples": args.n_samples, "seqlen": args.seqlen, "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
