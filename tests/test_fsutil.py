"""Replacing a result directory is safe at every instant: a signal at any filesystem step leaves the old or
the new result whole, and the next write leaves no staging leftovers."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from forked import quantbench_command, run_forked

from quantbench.errors import QuantbenchError
from quantbench.eval.leaderboard import build_leaderboard
from quantbench.fsutil import atomic_directory, atomic_write_path, clean_leftovers

ROOT = Path(__file__).resolve().parent.parent

# A `--force` write of a run directory (a result file and a checkpoint), killed by signal `sig` at the
# `kill_at`-th filesystem event (audit hooks see every rename, mkdir, open, unlink, rmtree and the lookup of
# renameat2 just before the swap); kill_at 0 runs to the end and prints how many events there were.
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (a `&` job)
import quantbench.fsutil
from quantbench.fsutil import atomic_directory
target, kill_at, sig, label = Path(sys.argv[1]), int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]
if sys.argv[5] == "two renames":  # a system without renameat2
    quantbench.fsutil._exchange = lambda a, b: False
EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.scandir", "open",
          "shutil.rmtree", "tempfile.mkdtemp", "ctypes.dlsym", "os.listdir"}
count = 0
def hook(event, args):
    global count
    if event in EVENTS:
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), sig)
sys.addaudithook(hook)
with atomic_directory(target, force=True, what="run directory") as tmp:
    (tmp / "checkpoint").mkdir()
    (tmp / "checkpoint" / "model.safetensors").write_bytes(label.encode() * 4096)
    (tmp / "result.json").write_text(json.dumps({"label": label}))
print(count)
"""


def write_run(target: Path, label: str, kill_at: int = 0, sig: str = "SIGKILL",
              swap: str = "exchange") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", CHILD, str(target), str(kill_at), sig, label, swap], env=env,
                          capture_output=True, text=True, timeout=60)


def run_label(target: Path) -> str:
    """The label of a complete run directory; fails on a missing or partial one."""
    label = json.loads((target / "result.json").read_text())["label"]
    assert (target / "checkpoint" / "model.safetensors").read_bytes() == label.encode() * 4096
    return label


@pytest.mark.slow  # about 60 interpreters each
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_a_signal_at_any_step_leaves_old_or_new_results_whole(tmp_path, sig, swap):
    """With renameat2 the run directory is whole at every instant; without it, a kill between the two
    renames leaves the old run aside, and the next write's cleaning puts it back."""
    target = tmp_path / "runs" / "quickstart"
    assert write_run(target, "old").returncode == 0
    write_run(tmp_path / "probe", "probe", swap=swap)
    steps = int(write_run(tmp_path / "probe", "probe", swap=swap).stdout)  # the events of a replacing write
    assert steps >= 12
    seen = set()
    for kill_at in range(1, steps + 2):
        write_run(target, "new", kill_at, sig, swap)
        if swap == "two renames":
            clean_leftovers(target)
        label = run_label(target)
        seen.add(label)
        done = write_run(target, "next")  # the next run cleans up whatever the killed one left
        assert done.returncode == 0, done.stderr
        assert run_label(target) == "next"
        assert [p.name for p in target.parent.iterdir()] == ["quickstart"], kill_at
        assert write_run(target, "old").returncode == 0
    assert seen == {"old", "new"}  # early kills keep the old run, late ones have installed the new one


def test_an_exception_keeps_the_old_directory_and_leaves_nothing(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "result.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, force=True) as tmp:
            (tmp / "result.json").write_text("new")
            raise RuntimeError("failed late")
    assert (target / "result.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with atomic_directory(target, force=True) as tmp:
        (tmp / "result.json").write_text("new")
    assert (target / "result.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_leftovers_of_a_live_write_are_kept_and_an_old_copy_is_restored(tmp_path):
    target = tmp_path / "run"
    with atomic_directory(target, force=False) as tmp:
        (tmp / "result.json").write_text("new")
        clean_leftovers(target)  # another writer's cleaning must not touch a staging directory in use
        assert tmp.is_dir()
    # the fallback path (no renameat2) died between its two renames: the old run sits aside
    aside = tmp_path / ".run.999999999-abc.old"
    target.rename(aside)
    clean_leftovers(target)
    assert (target / "result.json").read_text() == "new" and not aside.exists()


def test_refusals_name_the_path_and_the_fix(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(QuantbenchError, match="already exists; pass --force"):
        with atomic_directory(tmp_path / "run", force=False):
            pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuantbenchError, match="is a file, not a directory"):
        with atomic_directory(tmp_path / "file" / "run", force=False):
            pass


def test_atomic_file_write(tmp_path):
    path = tmp_path / "allocation.yaml"
    with atomic_write_path(path) as tmp:
        tmp.write_text("a: 1\n")
    assert path.read_text() == "a: 1\n" and [p.name for p in tmp_path.iterdir()] == ["allocation.yaml"]


def test_report_skips_staging_directories(tmp_path):
    result = {"name": "r", "model": "m", "perplexity": {"baseline": {}, "quantized": {"wikitext2": {
        "ppl": 10.0, "windows": 1, "seqlen": 16}}}, "quantization": {}}
    for folder in ("runs/r", "runs/.r.123-abc.tmp", "runs/.r.123-abc.old"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "result.json").write_text(json.dumps(result))
    assert build_leaderboard(tmp_path / "runs").sources == 1


def _run_killed_at(runs: Path, kill_at: str, recipe: Path) -> None:
    """`quantbench run recipe --force`, SIGKILLed at the `nth` audit event `event` (`kill_at` "event:nth") on
    a path under `runs` (or, for ctypes.dlsym, the lookup of renameat2)."""
    kill_event, kill_nth = kill_at.split(":")
    seen = 0

    def hook(event, args):
        nonlocal seen
        wanted = (lambda p: p == "renameat2") if event == "ctypes.dlsym" else (lambda p: os.fsencode(runs) in
                                                                                os.fsencode(p))
        if event == kill_event and any(isinstance(p, (str, bytes, os.PathLike)) and wanted(p) for p in args):
            seen += 1
            if seen == int(kill_nth):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)  # in the fork alone, which this run ends
    quantbench_command("run", recipe, "--force", "--quiet")


def test_a_killed_force_run_keeps_the_earlier_run(tmp_path, model_dir, text_file):
    """The real command, killed just before and just after the swap (every step in between is covered
    above): the run directory is always whole, and the next run leaves no leftovers."""
    from helpers import invoke, make_recipe

    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    for kill_at in ("ctypes.dlsym:1", "shutil.rmtree:1"):  # the lookup of renameat2; deleting the old run
        code, _, err = run_forked(_run_killed_at, run_dir.parent, kill_at, recipe)
        assert code == -9, (kill_at, err)
        assert json.loads((run_dir / "result.json").read_text())["name"] == "tiny"  # whole, old or new
        assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    assert len(list(run_dir.parent.iterdir())) > 1  # the killed runs left staging directories
    assert invoke("run", recipe, "--quiet", "--force").exit_code == 0
    assert [p.name for p in run_dir.parent.iterdir()] == ["tiny"]
