"""Calibration token batches: `n_samples × seqlen` seeded random windows, cached by content hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantbench.calibration.sources import TextSource, load_calibration_source
from quantbench.errors import QuantbenchError
from quantbench.fsutil import atomic_write_path, save_tensors

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_DOC_CHUNK = 256


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTBENCH_CACHE", Path.home() / ".cache" / "quantbench"))


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()


def calibration_batches(tokenizer, source: str, n_samples: int, seqlen: int, seed: int,
                        split: str | None = None, text_field: str = "text", use_cache: bool = True) -> torch.Tensor:
    """[n_samples, seqlen] int64 token ids drawn as random windows (seeded) from `source`."""
    text_source = load_calibration_source(source, split, text_field)
    key = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "source": text_source.fingerprint, "tokenizer": tokenizer_fingerprint(tokenizer),
        "n": n_samples, "seqlen": seqlen, "seed": seed,
    }, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir() / "calibration" / f"{key}.safetensors"
    if use_cache and path.is_file():
        log.info("calibration batches from cache %s", path)
        return load_file(path)["input_ids"]
    ids = sample_windows(token_stream(tokenizer, text_source, n_samples * seqlen * 2, seed), n_samples, seqlen, seed)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(path) as tmp:
            save_tensors({"input_ids": ids.contiguous()}, tmp)
    return ids


def token_stream(tokenizer, source: TextSource, enough: int, seed: int) -> torch.Tensor:
    """One token stream: the text as it is, or documents in seeded random order until `enough` tokens."""
    if source.text is not None:
        return _tokenize(tokenizer, source.text)
    order = torch.randperm(len(source.documents), generator=torch.Generator().manual_seed(seed)).tolist()
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces, total = [], 0
    for start in range(0, len(order), _DOC_CHUNK):
        docs = [source.documents[i] for i in order[start:start + _DOC_CHUNK]]
        for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(ids + separator)
            total += len(ids) + len(separator)
        if total >= enough:
            break
    return torch.tensor([t for piece in pieces for t in piece], dtype=torch.int64)


def sample_windows(stream: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    if stream.numel() < seqlen:
        raise QuantbenchError(
            f"calibration text has only {stream.numel()} tokens, fewer than calibration.seqlen={seqlen}; "
            "lower seqlen or use a larger source"
        )
    if stream.numel() < n_samples * seqlen:
        log.warning("calibration text has %d tokens, so %d windows of %d overlap", stream.numel(), n_samples, seqlen)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n_samples,), generator=generator)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.int64)
