import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# `make test` runs one pytest-xdist worker per core: each computes on one thread so that the workers do not
# oversubscribe the cores (set before torch is first imported; the suite is also checked on one thread).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import pseudo_text, tiny_llama, tiny_tokenizer, write_tiny_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(os.environ.get("QUANTBENCH_ASSETS", ROOT / ".assets"))


def _use_offline_assets() -> None:
    """Point the Hugging Face libraries at the materialized caches, as `source .assets/env.sh` does.

    Done at import time: huggingface_hub reads these variables once, when it is first imported.
    """
    env_file = ASSETS / "env.sh"
    if not env_file.is_file():
        return
    for line in env_file.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            os.environ.setdefault(key, value.strip('"'))


_use_offline_assets()
# Without a GPU, Triton kernels run in Triton's interpreter (set before triton is first imported).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        from triton_interpreter import patch_device_calls_once_per_launch

        patch_device_calls_once_per_launch()
    except ImportError:  # no Triton: its tests skip
        pass


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["QUANTBENCH_CACHE"] = str(tmp_path_factory.mktemp("quantbench-cache"))
    os.environ["QUANTBENCH_TILES_CACHE"] = str(tmp_path_factory.mktemp("quantbench-tiles"))  # tuned on a GPU


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_llama()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(pseudo_text(6000, seed=7))
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with its tokenizer saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def assets() -> Path:
    """The materialized real model and data; integration tests need them (CI builds them first)."""
    if not (ASSETS / "manifest.json").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{ASSETS} is missing: run `make assets` (CI must build the assets before the tests)")
        pytest.skip(f"{ASSETS} not built: run `make assets`")
    return ASSETS


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    """A folder of local lm-eval task configs holding `tiny_mc_local`."""
    path = tmp_path_factory.mktemp("lm-eval-tasks")
    write_tiny_task(path)
    return path
