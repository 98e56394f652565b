"""Triton's interpreter, which runs the kernels in the other tests on the CPU, takes code that a GPU's compiler
may refuse, and skips what only a GPU runs (inline PTX, num_warps, the float16 paths chosen on CUDA alone). Here
every Triton kernel the package launches compiles to sm_90 machine code through its real launcher, on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("compile_for_hopper.py")


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_a_hopper_gpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    compiled = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    cubins = json.loads(compiled.stdout.splitlines()[-1])
    launched = set(cubins.pop("kernels"))
    assert {"packed_gemv_kernel", "packed_gemm_kernel", "_keyed_draw_kernel", "_split_attention_chunks"} <= launched
    assert set(cubins) == launched  # a kernel added without a case here fails this
    assert all(sizes and min(sizes) > 0 for sizes in cubins.values())
    assert len(cubins["packed_gemv_kernel"]) == 3 and len(cubins["_split_attention_chunks"]) == 2
    assert len(cubins["_keyed_draw_kernel"]) == 2  # with and without the log-sum's blocks
