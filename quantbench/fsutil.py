"""Writes that never leave a half-written result: build under a staging name beside the target, then put it
in place with one atomic rename.

A staging entry is named `.<target>.<pid>-<random>.tmp`. Replacing an existing directory swaps the two in a
single `renameat2(RENAME_EXCHANGE)` (Linux), so at every instant the target holds either the old or the new
result, whole; the old one then sits under the staging name until it is deleted. Where the swap is not
available (another OS, a filesystem without it) the old directory is first renamed to `.<target>.<pid>-….old`;
a crash between the two renames leaves the target missing for an instant, and the next write to that target
puts the old one back. Either way, the next write to a target deletes the staging leftovers of processes that
are gone, and `quantbench report` never reads dot-folders.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from quantbench.errors import QuantbenchError

RENAME_EXCHANGE = 2  # linux/fs.h
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")
_active: set[Path] = set()  # staging entries this process is using now


@contextmanager
def atomic_write_path(path: Path):
    """Yield a staging file path beside `path`; on success it replaces `path` (one rename)."""
    path = Path(path)
    clean_leftovers(path)
    tmp = _staging(path, mkdir=False)
    try:
        yield tmp
        tmp.replace(path)
    finally:
        _active.discard(tmp)
        tmp.unlink(missing_ok=True)


def refuse_existing(path: Path, force: bool, what: str) -> None:
    if Path(path).exists() and not force:
        raise QuantbenchError(f"{what} {path} already exists; pass --force to replace it or choose another path")


@contextmanager
def atomic_directory(path: Path, force: bool, what: str = "output directory"):
    """Yield a staging directory beside `path`; on success it replaces `path`.

    An existing `path` is refused without `force`; with `force` it is replaced only once the new one is
    complete, so a failed or interrupted run leaves the earlier results intact.
    """
    path = Path(path)
    refuse_existing(path, force, what)
    ensure_directory(path.parent, what)
    clean_leftovers(path)
    tmp = _staging(path, mkdir=True)
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        refuse_existing(path, force, what)  # it may have appeared while we worked
        _install(tmp, path)
    finally:
        _active.discard(tmp)
        _remove(tmp)  # after a swap it holds the old results


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file mode every other output gets (it writes 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def ensure_directory(directory: Path, what: str) -> None:
    """Create `directory` (and its parents) or say in one line why it cannot be."""
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise QuantbenchError(f"cannot create the {what} under {directory}: {blocker} is a file, not a directory; "
                              "choose another path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QuantbenchError(f"cannot create {directory} for the {what}: {exc.strerror}; choose another path") from None


def clean_leftovers(path: Path) -> None:
    """Delete the staging entries of `path` left by processes that are gone; if `path` itself is missing
    and an interrupted replacement left the old one aside, put it back first."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    stale = []
    for entry in path.parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["target"] == path.name and entry not in _active and not _alive(int(match["pid"]), entry):
            stale.append((match["kind"], entry))
    for kind, entry in sorted(stale, key=lambda item: item[0] != "old"):
        if kind == "old" and not os.path.lexists(path):
            entry.rename(path)
            continue
        _remove(entry)


def _staging(path: Path, mkdir: bool) -> Path:
    prefix, suffix = f".{path.name}.{os.getpid()}-", ".tmp"
    if mkdir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        tmp.unlink()
    _active.add(tmp)
    return tmp


def _install(tmp: Path, path: Path) -> None:
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        return
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    _active.add(old)
    try:
        os.rename(path, old)
        os.rename(tmp, path)
    finally:
        _active.discard(old)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then nothing happened)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _alive(pid: int, entry: Path) -> bool:
    if pid == os.getpid():
        return entry in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
