import json

import pytest
import torch

from quantbench.calibration import calibration_batches
from quantbench.calibration.batches import cache_dir
from quantbench.errors import QuantbenchError


def test_windows_are_seeded_random_slices_of_the_text(tokenizer, text_file):
    a = calibration_batches(tokenizer, str(text_file), 5, 32, seed=1, use_cache=False)
    b = calibration_batches(tokenizer, str(text_file), 5, 32, seed=1, use_cache=False)
    c = calibration_batches(tokenizer, str(text_file), 5, 32, seed=2, use_cache=False)
    assert a.shape == (5, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenizer(text_file.read_text())["input_ids"]
    text = " ".join(map(str, stream))
    for window in a.tolist():  # every window is a contiguous slice of the tokenized text
        assert " ".join(map(str, window)) in text


def test_batches_are_cached_by_content(tokenizer, tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("one two three four five six seven eight nine ten " * 40)
    first = calibration_batches(tokenizer, str(source), 3, 16, seed=0)
    files = list((cache_dir() / "calibration").glob("*.safetensors"))
    assert files
    assert torch.equal(calibration_batches(tokenizer, str(source), 3, 16, seed=0), first)
    assert len(list((cache_dir() / "calibration").glob("*.safetensors"))) == len(files)  # a hit: nothing new
    source.write_text("completely different words now " * 60)
    changed = calibration_batches(tokenizer, str(source), 3, 16, seed=0)
    assert not torch.equal(changed, first)  # new content, new key


def test_jsonl_documents(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document number {i} " * 12}) for i in range(30)))
    ids = calibration_batches(tokenizer, str(path), 4, 24, seed=0, use_cache=False)
    assert ids.shape == (4, 24)
    with pytest.raises(QuantbenchError, match="no column 'body'"):
        calibration_batches(tokenizer, str(path), 4, 24, seed=0, text_field="body", use_cache=False)


def test_unusable_sources_are_clear_errors(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(QuantbenchError, match="fewer than calibration.seqlen=64"):
        calibration_batches(tokenizer, str(short), 2, 64, seed=0, use_cache=False)
    with pytest.raises(QuantbenchError, match="no such file"):
        calibration_batches(tokenizer, str(tmp_path / "missing.jsonl"), 2, 64, seed=0)
    with pytest.raises(QuantbenchError, match="is not known"):
        calibration_batches(tokenizer, "wikitext", 2, 64, seed=0)
