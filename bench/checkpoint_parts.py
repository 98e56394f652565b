"""Move a native checkpoint through a channel that takes only small files: `split` writes its tensors, less
those the base model already has unchanged (the embedding by default), as parts of at most --max-mib each,
with the checkpoint's config; `join` puts them back together with the base model's tensors, so
`quantbench.load_quantized` reads the result as it read the original.

    python bench/checkpoint_parts.py split CKPT PARTS/ [--max-mib 15] [--drop 'embed_tokens|lm_head']
    python bench/checkpoint_parts.py join PARTS/ BASE_MODEL_DIR OUT/
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def split(checkpoint: Path, out: Path, max_mib: float, drop: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(checkpoint / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
        keys = [key for key in handle.keys() if not re.search(drop, key)]
        dropped = [key for key in handle.keys() if re.search(drop, key)]
        parts, sizes, current, size = [], [], {}, 0
        for key in keys:
            tensor = handle.get_tensor(key)
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_mib * 2**20:
                parts.append(current)
                sizes.append(size)
                current, size = {}, 0
            current[key] = tensor
            size += nbytes
        parts.append(current)
        sizes.append(size)
    for number, (tensors, nbytes) in enumerate(zip(parts, sizes)):
        save_file(tensors, str(out / f"part-{number:02d}.safetensors"), metadata)
        print(f"part {number}: {len(tensors)} tensors, {nbytes / 2**20:.1f} MiB")
    shutil.copy(checkpoint / "config.json", out / "config.json")
    (out / "dropped.txt").write_text("".join(f"{key}\n" for key in dropped))


def join(parts: Path, base: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors, metadata = {}, None
    for part in sorted(parts.glob("part-*.safetensors")):
        with safe_open(str(part), framework="pt") as handle:
            metadata = handle.metadata()
        tensors.update(load_file(str(part)))
    wanted = set((parts / "dropped.txt").read_text().split())
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in wanted & set(handle.keys())})
    missing = wanted - set(tensors)
    if missing:
        raise SystemExit(f"{base} lacks {', '.join(sorted(missing))}")
    save_file(tensors, str(out / WEIGHTS), metadata)
    shutil.copy(parts / "config.json", out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "generation_config.json"):
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    print(f"{out}: {len(tensors)} tensors ({len(wanted)} from {base})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("split")
    one.add_argument("checkpoint", type=Path)
    one.add_argument("out", type=Path)
    one.add_argument("--max-mib", type=float, default=15)
    one.add_argument("--drop", default=r"embed_tokens|lm_head", help="regex of tensors the base model has unchanged")
    two = sub.add_parser("join")
    two.add_argument("parts", type=Path)
    two.add_argument("base", type=Path)
    two.add_argument("out", type=Path)
    args = parser.parse_args()
    split(args.checkpoint, args.out, args.max_mib, args.drop) if args.command == "split" else join(
        args.parts, args.base, args.out)


if __name__ == "__main__":
    main()
