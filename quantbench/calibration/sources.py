"""Text sources by name: the WikiText-2 and C4 presets, any hub dataset id, or a local file.

A source yields either one continuous text (WikiText-2, .txt files) or a list of documents
(C4, .jsonl/.json/.parquet files, other hub datasets).
"""

from __future__ import annotations

import codecs
import hashlib
from dataclasses import dataclass
from pathlib import Path

from quantbench.errors import QuantbenchError

WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
C4_TRAIN_FILES = {"train": "en/c4-train.00000-of-01024.json.gz"}
C4_VALIDATION_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_EVAL_DOCUMENTS = 1100  # the GPTQ protocol: the first 1,100 validation documents joined by spaces
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class TextSource:
    """Loaded text plus a fingerprint of its content (for cache keys)."""

    fingerprint: str
    text: str | None = None
    documents: list[str] | None = None


def load_calibration_source(source: str, split: str | None, text_field: str = "text") -> TextSource:
    if source == "wikitext2":
        return _wikitext(split or "train")
    if source == "c4":
        if split not in (None, "train"):
            raise QuantbenchError(f"calibration.split {split!r}: the c4 calibration source reads the train shard; drop split")
        ds = _load_dataset("allenai/c4", data_files=C4_TRAIN_FILES, split="train")
        return TextSource(fingerprint=ds._fingerprint, documents=ds[text_field])
    return _local_or_hub(source, split, text_field)


def load_eval_text(name: str, text_field: str = "text") -> tuple[str, str]:
    """The evaluation text of a perplexity dataset and its fingerprint."""
    if name == "wikitext2":
        source = _wikitext("test")
        return source.text, source.fingerprint
    if name == "c4":
        ds = _load_dataset("allenai/c4", data_files=C4_VALIDATION_FILES, split="validation")
        return " ".join(ds[:C4_EVAL_DOCUMENTS][text_field]), ds._fingerprint
    source = _local_or_hub(name, "test", text_field)
    return (source.text if source.text is not None else "\n\n".join(source.documents)), source.fingerprint


def _wikitext(split: str) -> TextSource:
    ds = _load_dataset(*WIKITEXT, split=split)
    return TextSource(fingerprint=ds._fingerprint, text="\n\n".join(ds["text"]))


def _local_or_hub(source: str, split: str | None, text_field: str) -> TextSource:
    path = Path(source).expanduser()
    if path.is_file():
        return _local_file(path, text_field)
    if path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise QuantbenchError(f"text source {source!r}: no such file; give an existing .txt/.jsonl/.parquet path")
    if source.count("/") != 1:
        raise QuantbenchError(
            f"text source {source!r} is not known; use 'wikitext2', 'c4', a hub dataset id 'org/name', "
            "or a local .txt/.jsonl/.json/.parquet file"
        )
    ds = _load_dataset(source, split=split or "train")
    return TextSource(fingerprint=ds._fingerprint, documents=_column(ds, text_field, source))


def local_source_problem(source: str) -> str | None:
    """Why a source that names a local file cannot be read as text, or None (also for presets and hub ids,
    which only loading can check). Looks at the first megabyte: enough to catch a wrong or binary file."""
    if source in ("wikitext2", "c4"):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        looks_local = path.suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")) or source.count("/") != 1
        return f"no such file {source!r}; give an existing .txt/.jsonl/.json/.parquet path" if looks_local else None
    if not path.is_file():
        return f"{source} is not a file"
    if path.suffix not in LOCAL_SUFFIXES:
        return f"{source}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .json or .parquet"
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 20)
    except OSError as exc:
        return f"{source} cannot be read ({exc.strerror})"
    if path.suffix == ".parquet":
        return None if head[:4] == b"PAR1" else f"{source} is not a parquet file"
    if b"\0" in head or _not_utf8(head):
        return f"{source} is not UTF-8 text (a binary file?)"
    return None


def _not_utf8(head: bytes) -> bool:
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return True
    return False


def _local_file(path: Path, text_field: str) -> TextSource:
    if (problem := local_source_problem(str(path))) is not None:
        raise QuantbenchError(f"text source {problem}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if path.suffix == ".txt":
        try:
            return TextSource(fingerprint=digest, text=path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise QuantbenchError(f"text source {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix in (".jsonl", ".json"):
        ds = _load_dataset("json", data_files=str(path), split="train")
    elif path.suffix == ".parquet":
        ds = _load_dataset("parquet", data_files=str(path), split="train")
    else:
        raise QuantbenchError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl, .json or .parquet")
    return TextSource(fingerprint=digest, documents=_column(ds, text_field, str(path)))


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise QuantbenchError(
            f"{where}: no column {text_field!r}; set text_field to one of {', '.join(ds.column_names)}"
        )
    return ds[text_field]


def _load_dataset(*args, **kwargs):
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types; all mean the same to the user
        what = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        raise QuantbenchError(
            f"could not load dataset {what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
            "(offline? source .assets/env.sh so the local caches are used)"
        ) from exc
