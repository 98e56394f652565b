# Persistent blocks against the tuned per-tile block at 4096x14336, int4 act_order, one launch each, for ncu
# (ran against ecf2932, whose cuda_gemv.launch took `persistent`; taken out again in db83a04).
import sys
import torch
sys.path.insert(0, "."); sys.path.append("bench")
from kernel_speed import kernel_weight
from quantbench.export.kernels import cuda_gemv
act = kernel_weight("int4-g128 act_order", 14336, 4096, "cuda")
x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
calls = {
    "per tile, 32 lanes, 256 threads": lambda: cuda_gemv.launch(x, act, 1, 32, 256),
    "per tile, loads alone": lambda: cuda_gemv.launch(x, act, 1, 32, 256, load_only=True),
    "persistent 2, registers, 32 lanes, 256 threads": lambda: cuda_gemv.launch(x, act, 1, 32, 256, persistent=2),
    "persistent 2, registers, loads alone": lambda: cuda_gemv.launch(x, act, 1, 32, 256, load_only=True, persistent=2),
    "persistent 2, streamed, 32 lanes, 128 threads": lambda: cuda_gemv.launch(x, act, 1, 32, 128, streamed=True,
                                                                               persistent=2),
    "persistent 4, streamed, 32 lanes, 128 threads, loads alone": lambda: cuda_gemv.launch(
        x, act, 1, 32, 128, load_only=True, streamed=True, persistent=4),
}
for f in calls.values():
    f()
torch.cuda.synchronize()
torch.cuda.profiler.start()
for name, f in calls.items():
    print("launch:", name, flush=True)
    f()
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
