import json

import pytest

from quantbench.answer_file import AnswerFile
from quantbench.errors import QuantbenchError
from quantbench.generate import Output

PROMPTS = ["first", "second", "third"]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_are_on_disk_as_each_comes_and_a_second_run_skips_them(tmp_path):
    path = tmp_path / "answers.jsonl"
    answers = AnswerFile(path, PROMPTS)
    assert answers.waiting() == [0, 1, 2]
    answers.write(2, Output(4, [7, 8], "ü text"))
    assert lines(path) == [{"index": 2, "prompt": "third", "prompt_tokens": 4, "new_tokens": 2, "text": "ü text"}]
    answers.write(0, Output(3, [5], "x"))
    again = AnswerFile(path, PROMPTS)
    assert again.waiting() == [1]
    again.write(1, Output(2, [], ""))
    assert [answer["index"] for answer in lines(path)] == [2, 0, 1] and AnswerFile(path, PROMPTS).waiting() == []


def test_a_line_cut_short_by_a_crash_is_dropped_and_its_prompt_answered_again(tmp_path):
    path = tmp_path / "answers.jsonl"
    AnswerFile(path, PROMPTS).write(1, Output(3, [5], "x"))
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
