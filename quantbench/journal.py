"""What a streamed run keeps so that `quantbench run RECIPE --resume` continues where it died.

The run works in `.<run dir name>.partial/` beside its run directory (the run directory itself appears
only when the run is complete):

  journal.json   the recipe hash the progress belongs to
  checkpoint/    the checkpoint being written: one finished part per block (CheckpointWriter)
  state-<n>/     the hidden states entering block `next_block` (calibration and evaluation windows), one
                 file per tensor so that host memory holds one at a time, and state.pt: the small state of
                 the stages (layer sizes, zeroed weights) and the number of tensors
  state.json     which state-<n>/ is complete; replaced (one rename) only once the new folder is written

A save comes at most every `output.journal_every_s` seconds, and never sooner than ten times the last
save's duration after it, so saving costs at most about a tenth of the run (`journal_every_s: 0` saves
after every block, whatever it costs).

A resumed run re-reads the tensors outside the blocks, captures the masks and positions again, loads the
state folder and continues at `next_block`; every block before it has its part on disk. The blocks after it
are computed again from exactly the same inputs, so the codes are those of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from quantbench.errors import QuantbenchError
from quantbench.pipeline import BlockContext

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
META_FILE = "journal.json"
MAX_SAVE_SHARE = 0.1


def journal_dir(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.partial"


class Journal:
    """A block stage (after_block) that saves the run's progress; `stages` maps a key to every stage
    with `state()` / `restore(state)`."""

    def __init__(self, run_dir: Path, recipe_hash: str, every_s: float) -> None:
        self.dir, self.recipe_hash, self.every_s = journal_dir(Path(run_dir)), recipe_hash, every_s
        self.stages: dict[str, object] = {}
        self.last_save, self.save_seconds = time.monotonic(), 0.0
        self.saves = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoint"

    def open(self, resume: bool) -> dict | None:
        """Start afresh (a previous partial run is discarded) or, with `resume`, return the saved state
        (None when the run died before its first save: it starts from the first block, keeping no part)."""
        meta = self.dir / META_FILE
        if resume and not meta.is_file():
            log.warning("--resume: no partial run at %s; starting from the first block", self.dir)
        if resume and meta.is_file():
            found = json.loads(meta.read_text()).get("recipe_hash")
            if found != self.recipe_hash:
                raise QuantbenchError(f"--resume: the partial run in {self.dir} belongs to another version of this "
                                      "recipe; run without --resume to start again (its progress is discarded)")
            if (self.dir / STATE_FILE).is_file():
                state = self._load(self.dir / json.loads((self.dir / STATE_FILE).read_text())["folder"])
                log.info("resuming at block %d from %s", state["next_block"], self.dir)
                return state
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        meta.write_text(json.dumps({"recipe_hash": self.recipe_hash}) + "\n")
        return None

    def restore(self, state: dict) -> None:
        for key, stage in self.stages.items():
            stage.restore(state["stages"].get(key, {}))

    def after_block(self, ctx: BlockContext) -> None:
        waited = time.monotonic() - self.last_save
        if self.every_s == 0 or (waited >= self.every_s and waited * MAX_SAVE_SHARE >= self.save_seconds):
            with ctx.timer("journal"):
                self.save(ctx.index + 1, ctx.inputs.hidden)

    def save(self, next_block: int, hidden: list[torch.Tensor]) -> None:
        started = time.monotonic()
        folder = self.dir / f"state-{next_block:05d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        tensors = {"calibration": list(hidden)}
        small = {}
        for key, stage in self.stages.items():  # lists of tensors (hidden states) go to files of their own
            small[key] = {}
            for name, value in stage.state().items():
                if isinstance(value, list) and all(isinstance(t, torch.Tensor) for t in value):
                    tensors[f"{key}/{name}"] = value
                else:
                    small[key][name] = value
        counts = {}
        for position, (name, values) in enumerate(tensors.items()):
            counts[name] = len(values)
            for index, tensor in enumerate(values):
                torch.save(tensor.cpu(), folder / f"{position:03d}-{index:05d}.pt")
        torch.save({"next_block": next_block, "counts": counts, "small": small}, folder / "state.pt")
        staging = self.dir / f"{STATE_FILE}.tmp"
        previous = self._current()
        staging.write_text(json.dumps({"folder": folder.name}) + "\n")
        os.replace(staging, self.dir / STATE_FILE)
        if previous is not None and previous != folder.name:
            shutil.rmtree(self.dir / previous, ignore_errors=True)
        self.last_save = time.monotonic()
        self.save_seconds = self.last_save - started
        self.saves += 1

    def _current(self) -> str | None:
        path = self.dir / STATE_FILE
        return json.loads(path.read_text())["folder"] if path.is_file() else None

    @staticmethod
    def _load(folder: Path) -> dict:
        head = torch.load(folder / "state.pt", weights_only=True)
        tensors = {name: [torch.load(folder / f"{position:03d}-{i:05d}.pt", weights_only=True) for i in range(count)]
                   for position, (name, count) in enumerate(head["counts"].items())}
        stages = dict(head["small"])
        for name, values in tensors.items():
            if "/" in name:
                key, inner = name.split("/", 1)
                stages.setdefault(key, {})[inner] = values
        return {"next_block": head["next_block"], "calibration": tensors["calibration"], "stages": stages}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
