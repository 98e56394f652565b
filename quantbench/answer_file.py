"""A generation's answers kept as they come (`quantbench generate --output FILE`).

One JSON line a prompt, written and flushed to disk as the prompt stops, in the order prompts stop: a run cut
short keeps every answer it finished. A run again with the same file and prompts skips those it holds and
appends the rest. Each line records the settings it was made with (the model, tokens at most, chat, sampling with
its seed): a run again takes the file's seed where it is given none, and refuses other settings, so the answers
of a resumed run are those the whole run would have given (each prompt's draws are keyed by its number, not its
batch: `quantbench.sampling`). A last line left half-written by a crash (no newline after it) is dropped, the
file rewritten without it atomically; a file with a line that is not an answer, or answers other prompts, is
refused, and one that cannot be written, before the model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from quantbench.errors import QuantbenchError
from quantbench.fsutil import atomic_write_path
from quantbench.generate import Output
from quantbench.sampling import Sampling


class AnswerFile:
    def __init__(self, path: Path, prompts: list[str]):
        self.path, self.prompts = Path(path), prompts
        self.held: dict[int, dict] = {}
        self.made_with: dict | None = None  # the settings of the answers held
        self.settings: dict | None = None  # this run's (`resumed`)
        if self.path.is_dir():
            raise QuantbenchError(f"--output {self.path} is a directory: name a file")
        if not self.path.parent.is_dir():
            raise QuantbenchError(f"--output {self.path}: there is no folder {self.path.parent}")
        if not os.access(self.path if self.path.exists() else self.path.parent, os.W_OK):
            raise QuantbenchError(f"--output {self.path}: cannot write there")
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantbenchError(f"--output {self.path}: cannot read it ({exc})") from None
        lines = text.split("\n")
        torn = lines.pop()  # what follows the last newline: empty unless a write was cut short
        for number, line in enumerate(lines, 1):
            try:
                answer = json.loads(line)
                index, prompt = answer["index"], answer["prompt"]
            except (ValueError, KeyError, TypeError):
                raise QuantbenchError(f"--output {self.path}: line {number} is not an answer; choose another "
                                      "file") from None
            if not (isinstance(index, int) and 0 <= index < len(self.prompts) and self.prompts[index] == prompt):
                raise QuantbenchError(f"--output {self.path} holds answers to other prompts (line {number}, prompt "
                                      f"{index}): choose another file")
            settings = answer.get("settings")
            if self.made_with is not None and settings != self.made_with:
                raise QuantbenchError(f"--output {self.path} holds answers made with different settings (line "
                                      f"{number}): choose another file")
            self.made_with = settings
            self.held[index] = answer
        if torn:
            with atomic_write_path(self.path) as staged:
                staged.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    def resumed(self, model: str, sampling: Sampling, max_new_tokens: int, chat: bool) -> Sampling:
        """The sampling this run draws with (`sampling`, seeded, with the file's seed where it has none), once
        the settings agree with those of the answers held; every answer written records them. `model`: what
        names the model (a local folder's full path, else the hub id)."""
        held = self.made_with
        if held and sampling.seed is None and not sampling.greedy:
            sampling = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, held["sampling"]["seed"])
        sampling = sampling.seeded()
        settings = {"model": model, "max_new_tokens": max_new_tokens, "chat": chat, "sampling": sampling.to_dict()}
        if held is not None and settings != held:
            raise QuantbenchError(f"--output {self.path} holds answers made with {_described(held)}, not "
                                  f"{_described(settings)}: run with those or choose another file")
        self.settings = settings
        return sampling

    def waiting(self) -> list[int]:
        """The prompts without an answer in the file, in their order."""
        return [index for index in range(len(self.prompts)) if index not in self.held]

    def write(self, index: int, output: Output) -> None:
        """Appends prompt `index`'s answer and puts it on the disk before returning."""
        answer = {"index": index, "prompt": self.prompts[index], **output.to_dict(), "settings": self.settings}
        try:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(answer, ensure_ascii=False) + "\n")
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise QuantbenchError(f"--output {self.path}: cannot write prompt {index}'s answer ({exc}); the "
                                  f"{len(self.held)} answers before it are kept there") from None
        self.held[index] = answer


def _described(settings: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in
                     [*((k, v) for k, v in settings.items() if k != "sampling"), *settings["sampling"].items()])
