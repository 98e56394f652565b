"""A function run in a fork of the test process: a separate process that can be killed or signalled like the
command line, without the seconds a fresh interpreter spends importing torch and transformers again."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Forked:
    """A running fork: `process` (a multiprocessing.Process: pid, exitcode, negative for a signal), and its
    stdout and stderr as text streams read by this process."""

    process: multiprocessing.Process
    stdout: object
    stderr: object
    _read: dict = field(default_factory=dict)

    def send_signal(self, sig: int) -> None:
        os.kill(self.process.pid, sig)

    def wait(self, timeout: float = 300) -> tuple[int, str, str]:
        """The exit code, stdout and stderr once the fork has ended (killed after `timeout` seconds)."""
        readers = [threading.Thread(target=lambda name=name, stream=stream: self._read.__setitem__(name, stream.read()))
                   for name, stream in (("out", self.stdout), ("err", self.stderr))]
        for reader in readers:
            reader.start()
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
        for reader in readers:
            reader.join()
        self.stdout.close()
        self.stderr.close()
        return self.process.exitcode, self._read["out"], self._read["err"]


def _child(target: Callable, args: tuple, out_fd: int, err_fd: int, blocked: tuple[str, ...]) -> None:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a fresh interpreter's handlers, not pytest's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in [name for name in sys.modules if name.split(".")[0] in blocked]:
        del sys.modules[name]
    for name in blocked:
        sys.modules[name] = None  # `import name` fails as if it were not installed
    target(*args)


def start_forked(target: Callable, *args, blocked: tuple[str, ...] = ()) -> Forked:
    """Start `target(*args)` in a fork; an exception or `sys.exit(n)` there gives the exit code (1, n). The
    modules named in `blocked` import in the fork as if they were not installed. Modules this process already
    imported are not imported again: what a fresh interpreter runs at import time is not run."""
    pipes = [os.pipe(), os.pipe()]
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(target, args, pipes[0][1], pipes[1][1], blocked), daemon=True)
    process.start()
    for read_end, write_end in pipes:
        os.close(write_end)
    return Forked(process, os.fdopen(pipes[0][0], errors="replace"), os.fdopen(pipes[1][0], errors="replace"))


def run_forked(target: Callable, *args, timeout: float = 300, blocked: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`target(*args)` run to its end in a fork: its exit code, stdout and stderr."""
    return start_forked(target, *args, blocked=blocked).wait(timeout)


def quantbench_command(*args) -> None:
    """The `quantbench` command line with arguments `args`, as `python -m quantbench` runs it."""
    from quantbench.cli import main

    sys.argv = ["quantbench", *map(str, args)]
    main()
