"""The compiled kernel libraries' cache: a directory per kind of library, and a build that a concurrent process
never sees half written (compiled into a scratch file beside the library, then renamed into place)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


def cache_dir(env: str, kind: str) -> Path:
    """$`env`, else $XDG_CACHE_HOME/quantbench/`kind` (~/.cache/quantbench/`kind`)."""
    if os.environ.get(env):
        return Path(os.environ[env])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantbench" / kind


def compile_library(path: Path, command: list[str], what: str) -> Path:
    """`path`, built by `command` followed by `-o FILE` unless it exists; RuntimeError with the compiler's last
    output, naming `what`, where the command fails."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        built = Path(scratch) / path.name
        result = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{Path(command[0]).name} failed on {what}:\n{result.stderr[-4000:]}")
        os.replace(built, path)  # atomic: a concurrent process sees no library or a whole one
    return path
