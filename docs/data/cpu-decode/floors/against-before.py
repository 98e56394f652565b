# next_tokens of the code before the floors (git show 37202ea~1:quantbench/sampling.py > /tmp/sampling_before.py)
# against the current one, in one process, three rounds of 10 calls each, the fastest round each way.
# python docs/data/cpu-decode/floors/against-before.py
import sys, torch, importlib.util
sys.path.insert(0, "bench")
from timing import timed
spec = importlib.util.spec_from_file_location("sampling_before", "/tmp/sampling_before.py")
before = importlib.util.module_from_spec(spec); sys.modules["sampling_before"] = before; spec.loader.exec_module(before)
from quantbench import sampling as now
torch.manual_seed(0)
dev = torch.device("cpu")
print(f"{'vocab':>7} {'rows':>4} {'spread':>6} {'cut':<12} {'before µs':>10} {'now µs':>9} {'speed-up':>8}")
for V in (49152, 128256):
    for rows in (1, 8):
        for spread in (3.0, 1.0):
            logits = torch.randn(rows, V) * spread
            for name, kw in (("temperature", {}), ("top-k 50", dict(top_k=50)), ("top-p 0.9", dict(top_p=0.9)),
                             ("both", dict(top_k=50, top_p=0.9))):
                sb = before.Sampling(0.8, seed=1, **kw); sn = now.Sampling(0.8, seed=1, **kw)
                db = before.Draws.of(sb, range(rows), dev); dn = now.Draws.of(sn, range(rows), dev)
                tb = []; tn = []
                for _ in range(3):
                    tb.append(timed(lambda: before.next_tokens(logits, sb, db), dev, 10, warmup=True)[0])
                    tn.append(timed(lambda: now.next_tokens(logits, sn, dn), dev, 10, warmup=True)[0])
                b, n = min(tb), min(tn)
                print(f"{V:>7} {rows:>4} {spread:>6.1f} {name:<12} {1e6*b:>10.1f} {1e6*n:>9.1f} {b/n:>7.2f}×", flush=True)
