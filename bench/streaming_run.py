"""A whole `quantbench run` on a random-weight Llama of real dimensions, saved to disk as safetensors
shards first: wall time, peak host RSS (sampled from outside the run every 0.1 s, and as the run records
it per stage) and peak device memory, and the projection to the full model and to larger ones.

    python bench/streaming_run.py --size 8b --text wiki.test.txt --tokenizer TOKENIZER_DIR --out /tmp/stream
    python bench/streaming_run.py --size 70b --layers 10 ...     # 70B dimensions, the first 10 blocks
    python bench/streaming_run.py --size 8b --streaming off ...  # the whole model in memory, for comparison

The run is a separate process (`run_recipe` on a recipe written here), so the figures are those of the
run alone. The random model is built on the device (seconds) and saved with save_pretrained.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml

from random_models import SIZES, build_random_llama_on

RUN = "import sys; from quantbench.recipe import load_recipe; from quantbench.runner import run_recipe; " \
      "run_recipe(load_recipe(sys.argv[1]), force=True, progress=False)"


def build_model(size: str, layers: int | None, folder: Path, tokenizer: Path) -> dict:
    started = time.perf_counter()
    model = build_random_llama_on(size, torch.bfloat16, torch.device("cuda"), layers=layers)
    model.save_pretrained(folder, max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return {"params": params, "build_and_save_s": round(time.perf_counter() - started, 1),
            "disk_gb": round(sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9, 2)}


def recipe_for(args, folder: Path, run_dir: Path) -> dict:
    return {
        "name": f"random-{args.size}",
        "model": {"name": str(folder), "dtype": "bfloat16", "device": "cuda", "streaming": args.streaming},
        "calibration": {"source": str(args.text), "n_samples": args.n_samples, "seqlen": args.seqlen, "seed": 0},
        "quantize": {"default": args.scheme},
        "eval": {"perplexity": [str(args.text)], "seqlen": args.seqlen, "max_windows": args.windows},
        "export": {"format": args.export},
        "output": {"dir": str(run_dir)},
    }


def sampled_peak_rss(process: subprocess.Popen, peak: list[int]) -> None:
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="8b")
    parser.add_argument("--layers", type=int, help="keep only the first N decoder blocks")
    parser.add_argument("--text", type=Path, required=True, help="a .txt file for calibration and evaluation")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with tokenizer.json")
    parser.add_argument("--scheme", default="int4-g128-gptq-act-static")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--export", default="compressed-tensors")
    parser.add_argument("--streaming", default="on", choices=["on", "off"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/streaming-bench"))
    parser.add_argument("--out", type=Path, required=True, help="folder for figures.json and result.json")
    args = parser.parse_args()

    folder, run_dir = args.work / f"model-{args.size}-{args.layers or 'all'}", args.work / "run"
    figures = {"size": args.size, "layers": args.layers or SIZES[args.size]["num_hidden_layers"],
               "scheme": args.scheme, "streaming": args.streaming,
               "calibration": f"{args.n_samples} x {args.seqlen}", "eval_windows": args.windows,
               "device": torch.cuda.get_device_name()}
    if not (folder / "config.json").is_file():
        figures["model"] = build_model(args.size, args.layers, folder, args.tokenizer)
    recipe = args.work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(args, folder, run_dir)))

    peak = [0]
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", RUN, str(recipe)])
    sampler = threading.Thread(target=sampled_peak_rss, args=(process, peak))
    sampler.start()
    code = process.wait()
    sampler.join()
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    figures["sampled_peak_rss_gb"] = round(peak[0] / 2**20, 2)
    figures["exit_code"] = code
    if code == 0:
        result = json.loads((run_dir / "result.json").read_text())
        shutil.copy(run_dir / "result.json", args.out / "result.json")
        blocks = figures["layers"]
        figures.update(
            timings_s=result["timings_s"], breakdown_s=result["quantize_breakdown_s"],
            peak_memory=result["peak_memory"], peak_memory_by_stage=result["peak_memory_by_stage"],
            perplexity={side: {d: round(v["ppl"], 3) for d, v in per.items()}
                        for side, per in result["perplexity"].items()},
            checkpoint_gb=round(sum(f.stat().st_size for f in (run_dir / "checkpoint").glob("*.safetensors")) / 1e9, 2))
        if "blocks" in result["timings_s"]:
            per_block = result["timings_s"]["blocks"] / blocks
            fixed = result["timings_s"]["total"] - result["timings_s"]["blocks"]
            figures["per_block_s"] = round(per_block, 2)
            figures["projected_total_s"] = {
                size: round(fixed + per_block * _block_ratio(args.size, size) * SIZES[size]["num_hidden_layers"])
                for size in ("8b", "70b", "405b")}
    print(json.dumps(figures, indent=2))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))


def _block_ratio(measured: str, target: str) -> float:
    """How much longer a block of `target` takes than one of `measured`, taken as the ratio of their
    weights: forwards and Hessians grow with it, the column solves faster (with the width), so the
    projection for a wider model is a lower bound."""
    def weights(size):
        d = SIZES[size]
        h, kv = d["hidden_size"], d["num_key_value_heads"] * d["hidden_size"] // d["num_attention_heads"]
        return 2 * h * h + 2 * h * kv + 3 * h * d["intermediate_size"]
    return weights(target) / weights(measured)


if __name__ == "__main__":
    main()
