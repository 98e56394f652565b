"""Writes that never leave a half-written result: build under a temp name, then rename into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from quantbench.errors import QuantbenchError


@contextmanager
def atomic_write_path(path: Path):
    """Yield a temp file path beside `path`; on success it replaces `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    Path(tmp).unlink()
    try:
        yield Path(tmp)
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def refuse_existing(path: Path, force: bool, what: str) -> None:
    if Path(path).exists() and not force:
        raise QuantbenchError(f"{what} {path} already exists; pass --force to replace it or choose another path")


@contextmanager
def atomic_directory(path: Path, force: bool, what: str = "output directory"):
    """Yield a temp directory beside `path`; on success it replaces `path`.

    An existing `path` is refused without `force`; with `force` it is replaced only after the new one is
    complete, so a failed run leaves the earlier results intact.
    """
    path = Path(path)
    refuse_existing(path, force, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tmp.name}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
