"""GPTQ through the block driver with the input groups traced once per kind of block (the driver's way)
against tracing every block, in one process, on the dithered test model from the materialized assets.

    source .assets/env.sh && python bench/input_groups_speed.py [--samples 16 --seqlen 256 --threads 1]

Runs once, every block, once again (the spread of the machine), and checks that the codes are identical.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from quantbench import pipeline
from quantbench.calibration import calibration_batches
from quantbench.model_io import load_model
from quantbench.pipeline import quantize_model
from quantbench.scheme import Scheme

DITHERED = Path(".assets/models/smollm2-135m-dithered")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--scheme", default="int3-g128-gptq-act")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(str(DITHERED), torch.float32)
    calibration = calibration_batches(tokenizer, "c4", args.samples, args.seqlen, seed=0)
    scheme = Scheme.parse(args.scheme)
    once = pipeline.BlockContext.input_groups

    def every_block(ctx, names):
        ctx.sharing.clear()
        return once(ctx, names)

    codes = {}
    for label, groups in (("once per kind", once), ("every block", every_block), ("once per kind, again", once)):
        pipeline.BlockContext.input_groups = groups
        start = time.perf_counter()
        quantized = quantize_model(copy.deepcopy(model), calibration, lambda _name: scheme, torch.device("cpu"),
                                   progress=False)
        print(f"{label}: {time.perf_counter() - start:.1f} s", flush=True)
        codes[label] = {name: q.pack() for name, q in quantized.items()}
    pipeline.BlockContext.input_groups = once
    same = all(torch.equal(a, b) for name in codes["once per kind"]
               for a, b in zip(codes["once per kind"][name].values(), codes["every block"][name].values()))
    print(f"identical codes: {same}")


if __name__ == "__main__":
    main()
