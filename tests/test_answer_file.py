import json

import pytest

from quantbench.answer_file import AnswerFile
from quantbench.errors import QuantbenchError
from quantbench.generate import Output
from quantbench.sampling import Sampling

PROMPTS = ["first", "second", "third"]
GREEDY = {"model": "m", "max_new_tokens": 4, "chat": False, "sampling": Sampling().to_dict()}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_are_on_disk_as_each_comes_and_a_second_run_skips_them(tmp_path):
    path = tmp_path / "answers.jsonl"
    answers = AnswerFile(path, PROMPTS)
    assert answers.waiting() == [0, 1, 2] and answers.resumed("m", Sampling(), 4, False) == Sampling()
    answers.write(2, Output(4, [7, 8], "ü text"))
    assert lines(path) == [{"index": 2, "prompt": "third", "prompt_tokens": 4, "new_tokens": 2, "text": "ü text",
                            "settings": GREEDY}]
    answers.write(0, Output(3, [5], "x"))
    again = AnswerFile(path, PROMPTS)
    assert again.waiting() == [1] and again.made_with == GREEDY
    assert again.resumed("m", Sampling(), 4, False) == Sampling()
    again.write(1, Output(2, [], ""))
    assert [answer["index"] for answer in lines(path)] == [2, 0, 1] and AnswerFile(path, PROMPTS).waiting() == []


def test_a_line_cut_short_by_a_crash_is_dropped_and_its_prompt_answered_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    answers = AnswerFile(path, PROMPTS)
    answers.resumed("m", Sampling(), 4, False)
    answers.write(1, Output(3, [5], "x"))
    whole = path.read_text(encoding="utf-8")
    path.write_text(whole + '{"index": 0, "prompt": "fir', encoding="utf-8")
    answers = AnswerFile(path, PROMPTS)
    assert answers.waiting() == [0, 2] and path.read_text(encoding="utf-8") == whole
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]  # no staging file left


@pytest.mark.parametrize("text, message", [
    ('{"index": 0, "prompt": "other"}\n', "answers to other prompts (line 1, prompt 0)"),
    ('{"index": 5, "prompt": "first"}\n', "answers to other prompts (line 1, prompt 5)"),
    ('not json\n{"index": 0, "prompt": "first"}\n', "line 1 is not an answer"),
    ('{"prompt": "first"}\n', "line 1 is not an answer"),
])
def test_a_file_of_other_answers_is_refused(tmp_path, text, message):
    path = tmp_path / "answers.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(QuantbenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AnswerFile(path, PROMPTS)
    assert path.read_text(encoding="utf-8") == text
    with pytest.raises(QuantbenchError, match="is a directory"):
        AnswerFile(tmp_path, PROMPTS)


def test_a_resumed_run_takes_the_files_seed_and_refuses_other_settings(tmp_path):
    path = tmp_path / "answers.jsonl"
    first = AnswerFile(path, PROMPTS)
    drawn = first.resumed("m", Sampling(0.7, top_k=5), 8, True)
    assert drawn.seed is not None and first.resumed("m", Sampling(0.7, top_k=5, seed=3), 8, True).seed == 3
    first.resumed("m", drawn, 8, True)
    first.write(0, Output(3, [5], "x"))
    again = AnswerFile(path, PROMPTS)
    assert again.resumed("m", Sampling(0.7, top_k=5), 8, True) == drawn
    for model, sampling, tokens, chat in [("m", Sampling(0.7, top_k=5, seed=drawn.seed + 1), 8, True),
                                          ("m", Sampling(0.7, top_k=6), 8, True), ("m", drawn, 9, True),
                                          ("m", drawn, 8, False), ("other", drawn, 8, True)]:
        with pytest.raises(QuantbenchError, match=f"holds answers made with model m, max_new_tokens 8, chat True, "
                                                  f"temperature 0.7, top_k 5, top_p 1.0, seed {drawn.seed}, not"):
            AnswerFile(path, PROMPTS).resumed(model, sampling, tokens, chat)
    other = dict(lines(path)[0], index=1, prompt="second", settings=GREEDY)
    path.write_text(path.read_text(encoding="utf-8") + json.dumps(other) + "\n", encoding="utf-8")
    with pytest.raises(QuantbenchError, match="answers made with different settings \\(line 2\\)"):
        AnswerFile(path, PROMPTS)


def test_an_answer_file_that_cannot_be_written_is_refused_before_compute_and_a_failed_write_is_one_line(
        tmp_path, monkeypatch):
    import os

    with pytest.raises(QuantbenchError, match="there is no folder"):
        AnswerFile(tmp_path / "missing" / "answers.jsonl", PROMPTS)
    path = tmp_path / "answers.jsonl"
    answers = AnswerFile(path, PROMPTS)
    answers.resumed("m", Sampling(), 4, False)
    answers.write(0, Output(3, [5], "x"))

    def full_disk(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(QuantbenchError, match="cannot write prompt 2's answer .*No space left.* the 1 answers before"):
        answers.write(2, Output(3, [5], "y"))
