"""quantbench eval runs/quickstart --max-windows 8 --kernels --dtype bfloat16, with and without the AMX paths."""
import subprocess, sys, time
for amx in ("on", "off", "on", "off"):
    code = ("import sys; from quantbench.export.kernels import cpu_packed; "
            + ("cpu_packed.has_amx = lambda: False; " if amx == "off" else "")
            + "from quantbench.cli import app; sys.argv = ['quantbench', 'eval', 'runs/quickstart', '--max-windows', '8', "
              "'--kernels', '--dtype', 'bfloat16']; app()")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - started
    ppl = [line for line in out.stdout.splitlines() if "wikitext2" in line]
    print(f"AMX paths {amx}: {wall:.1f} s wall; {ppl[-1].strip() if ppl else out.stderr[-500:]}", flush=True)
