"""What a streamed run keeps so that `quantbench run RECIPE --resume` continues where it died.

The run works in `.<run dir name>.partial/` beside its run directory (the run directory itself appears
only when the run is complete):

  journal.json   the recipe hash the progress belongs to
  checkpoint/    the checkpoint being written: one finished part per block (CheckpointWriter)
  state-<n>/     the hidden states entering block `next_block` (evaluation windows, and calibration where a
                 later block reads it: none for round to nearest alone), one file per tensor so that host
                 memory holds one at a time, and r<rank>-state.pt: the small state of the stages (layer
                 sizes, zeroed weights) and the number of tensors; under torchrun every rank writes its own
                 r<rank>-… files (its share of the calibration and windows)
  state.json     which state-<n>/ is complete and how many ranks wrote it; replaced (one rename, by rank 0)
                 only once every rank has written the new folder

A save comes at most every `output.journal_every_s` seconds, and never sooner than ten times the last
save's duration after it, so saving costs at most about a tenth of the run (`journal_every_s: 0` saves
after every block, whatever it costs).

A resumed run re-reads the tensors outside the blocks, captures the masks and positions again, loads the
state folder and continues at `next_block`; every block before it has its part on disk. The blocks after it
are computed again from exactly the same inputs, so the codes are those of an uninterrupted run.

Under torchrun rank 0 decides when to save (every rank saves at the same block), and a run resumes only on
as many ranks as it was saved from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from quantbench.distributed import barrier, from_main
from quantbench.distributed import current as current_ranks
from quantbench.errors import QuantbenchError
from quantbench.pipeline import BlockContext, EveryBlockStage

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
META_FILE = "journal.json"
MAX_SAVE_SHARE = 0.1


def journal_dir(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.partial"


class Journal(EveryBlockStage):
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
        """Start afresh (a previous partial run is discarded) or, with `resume`, return this rank's saved state
        (None when the run died before its first save: it starts from the first block, keeping no part)."""
        ranks = current_ranks()
        folder = self._saved_folder(ranks.world) if resume else None
        barrier()  # every rank has read what it needs before rank 0 discards anything
        if folder is not None:
            state = self._load(self.dir / folder, ranks.rank)
            log.info("resuming at block %d from %s", state["next_block"], self.dir)
            return state
        if ranks.main:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
            (self.dir / META_FILE).write_text(json.dumps({"recipe_hash": self.recipe_hash}) + "\n")
        barrier()
        return None

    def _saved_folder(self, world: int) -> str | None:
        meta = self.dir / META_FILE
        if not meta.is_file():
            log.warning("--resume: no partial run at %s; starting from the first block", self.dir)
            return None
        if json.loads(meta.read_text()).get("recipe_hash") != self.recipe_hash:
            raise QuantbenchError(f"--resume: the partial run in {self.dir} belongs to another version of this "
                                  "recipe; run without --resume to start again (its progress is discarded)")
        if not (self.dir / STATE_FILE).is_file():
            return None
        pointer = json.loads((self.dir / STATE_FILE).read_text())
        if pointer.get("ranks", 1) != world:
            raise QuantbenchError(f"--resume: the partial run in {self.dir} was saved by {pointer.get('ranks', 1)} "
                                  f"rank(s); resume it on as many (this run has {world}), or run without --resume")
        return pointer["folder"]

    def restore(self, state: dict) -> None:
        for key, stage in self.stages.items():
            stage.restore(state["stages"].get(key, {}))

    def after_block(self, ctx: BlockContext) -> None:
        waited = time.monotonic() - self.last_save
        due = self.every_s == 0 or (waited >= self.every_s and waited * MAX_SAVE_SHARE >= self.save_seconds)
        if from_main(due):  # rank 0's clock decides, so that every rank saves at the same block
            with ctx.timer("journal"):
                self.save(ctx.index + 1, ctx.inputs.hidden if ctx.wants_outputs else [])

    def save(self, next_block: int, hidden: list[torch.Tensor]) -> None:
        started = time.monotonic()
        ranks = current_ranks()
        folder = self.dir / f"state-{next_block:05d}"
        if ranks.main:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        barrier()
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
                torch.save(tensor.cpu(), folder / _tensor_file(ranks.rank, position, index))
        torch.save({"next_block": next_block, "counts": counts, "small": small}, folder / _head_file(ranks.rank))
        barrier()  # every rank's files are written: the folder is complete
        if ranks.main:
            staging = self.dir / f"{STATE_FILE}.tmp"
            previous = self._current()
            staging.write_text(json.dumps({"folder": folder.name, "ranks": ranks.world}) + "\n")
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
    def _load(folder: Path, rank: int) -> dict:
        head = torch.load(folder / _head_file(rank), weights_only=True)
        tensors = {name: [torch.load(folder / _tensor_file(rank, position, i), weights_only=True) for i in range(count)]
                   for position, (name, count) in enumerate(head["counts"].items())}
        stages = dict(head["small"])
        for name, values in tensors.items():
            if "/" in name:
                key, inner = name.split("/", 1)
                stages.setdefault(key, {})[inner] = values
        return {"next_block": head["next_block"], "calibration": tensors["calibration"], "stages": stages}

    def remove(self) -> None:
        if current_ranks().main:
            shutil.rmtree(self.dir, ignore_errors=True)


def _head_file(rank: int) -> str:
    return f"r{rank}-state.pt"


def _tensor_file(rank: int, position: int, index: int) -> str:
    return f"r{rank}-{position:03d}-{index:05d}.pt"
