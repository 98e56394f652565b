"""Loading a packed checkpoint: seconds and peak memory of `load_quantized`, kernels on and off.

A checkpoint of a random Llama of the given dimensions (random_models.SIZES) is written once to --dir,
without building the dense model. Each load then runs in a fresh process, so that its peak host memory
(its peak resident set, less what it held before loading) and, on a GPU, its peak device memory are its own.
The imports come before the clock starts. Each load ends by computing the logits of a fixed prompt; loads
of one setting must agree on them exactly, whichever source tree they ran.

`--tree LABEL=PATH` (repeatable) loads with the quantbench of another source tree too, in the same run and
interleaved with this one: a baseline measured beside the change.

    python bench/checkpoint_load.py --size 1b --layers 8 --device cpu --tree main=/tmp/quantbench-main
    python bench/checkpoint_load.py --size 8b --device cuda --json load.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def child(directory: str, device: str, dtype: str, kernels: bool) -> dict:
    """One load in this process; what it took."""
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports before the clock)

    from quantbench import load_quantized

    before = _status_mb("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = load_quantized(directory, device=device, dtype=getattr(torch, dtype), kernels=kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_mb = _status_mb("VmHWM")  # ru_maxrss would carry the parent's peak across fork and exec
    ids = torch.arange(1, 9, device=device)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    return {"seconds": seconds, "host_before_mb": before, "host_peak_mb": peak_mb,
            "host_added_mb": peak_mb - before,
            "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
            "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16]}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_in_fresh_process(tree: Path, args, kernels: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(args.dir), "--device", args.device,
               "--dtype", args.dtype, *(["--kernels"] if kernels else [])]
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"a load with {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks")
    parser.add_argument("--scheme", default="int4-g128-gptq-act")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/quantbench-load-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], help="LABEL=PATH: another source tree to load with")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--kernels", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.device, args.dtype, args.kernels)))  # quantbench of PYTHONPATH
        return
    sys.path.insert(0, str(REPO))
    from random_models import write_random_checkpoint

    start = time.perf_counter()
    stored = write_random_checkpoint(args.dir, args.size, args.scheme, getattr(torch, args.dtype), args.device,
                                     args.layers)
    print(f"{time.strftime('%Y-%m-%d')} {args.device}: a random {args.size} Llama"
          f"{'' if args.layers is None else f' (first {args.layers} blocks)'}, {args.scheme}, {args.dtype}: "
          f"{stored['packed_bytes'] / 2**20:.0f} MiB packed, {stored['dense_bytes'] / 2**20:.0f} MiB not, written "
          f"in {time.perf_counter() - start:.1f} s")
    trees = {"this": REPO, **{label: Path(path) for label, path in (t.split("=", 1) for t in args.tree)}}
    runs = {(label, kernels): [] for label in trees for kernels in (False, True)}
    for _ in range(args.repeat):
        for (label, kernels), results in runs.items():
            results.append(load_in_fresh_process(trees[label], args, kernels))
    rows = []
    for (label, kernels), results in runs.items():
        row = {"tree": label, "kernels": kernels, "seconds": statistics.median(r["seconds"] for r in results),
               "seconds_all": [r["seconds"] for r in results],
               "host_added_mb": statistics.median(r["host_added_mb"] for r in results),
               "device_peak_mb": results[0]["device_peak_mb"], "logits": sorted({r["logits"] for r in results})}
        rows.append(row)
        device = "" if row["device_peak_mb"] is None else f", device peak {row['device_peak_mb']:.0f} MiB"
        print(f"  {label:>8} kernels={'on ' if kernels else 'off'}: {row['seconds']:.2f} s (median of "
              f"{len(results)}: {', '.join(f'{s:.2f}' for s in row['seconds_all'])}), host memory added "
              f"{row['host_added_mb']:.0f} MiB{device}, logits {'/'.join(row['logits'])}")
    for kernels in (False, True):
        hashes = {h for row in rows if row["kernels"] == kernels for h in row["logits"]}
        print(f"  kernels={'on' if kernels else 'off'}: "
              f"{'identical logits in every load' if len(hashes) == 1 else 'LOGITS DIFFER between loads'}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "layers": args.layers, "scheme": args.scheme,
                                         "device": args.device, **stored, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
