"""The CUDA libraries a model's packed layers need, built one after another (as the tile tuner's first calls build
them) and side by side (cuda_build.LibraryBuilds, as `load_quantized(kernels=True)` builds them while the model
loads), each way into an empty cache. Runs without a GPU: nvcc targets the architecture named.

    python bench/library_builds.py --arch 90 --variants "int4-g128 act_order"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_speed import VARIANTS, kernel_weight  # noqa: E402

from quantbench.export.kernels import cuda_build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90")
    parser.add_argument("--variants", nargs="+", default=["int4-g128 act_order"], choices=list(VARIANTS))
    args = parser.parse_args()
    weights = [kernel_weight(label, 4096, 4096, "cpu") for label in args.variants]
    types = sorted(set().union(*(cuda_build.library_types(weight) for weight in weights)), key=str)
    print(f"{len(types)} libraries for {', '.join(args.variants)} (sm_{args.arch}), {os.cpu_count()} cores, "
          f"nvcc {cuda_build.nvcc_path()}")
    for way in ("one after another", "side by side"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ[cuda_build.CACHE_ENV] = cache
            start = time.perf_counter()
            if way == "one after another":
                for weight_type in types:
                    cuda_build.build(weight_type, args.arch)
            else:
                builds = cuda_build.LibraryBuilds(args.arch)
                for weight in weights:
                    builds.add(weight)
                failures = builds.wait()
                assert not failures, failures
            print(f"{way}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
