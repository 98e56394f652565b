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


# The slowest tests (`pytest --durations` on 2 cores, 12 s to 190 s each), started first and in this order:
# `make test` hands tests to its workers one at a time in collection order (--dist load --maxschedchunk 1), so
# no long test starts last and ends the run alone. The real-model ones come together, so that each worker
# loads the model once.
SLOWEST_FIRST = (  # each one defined: tests/test_suite_order.py
    "test_gptq_beats_rtn_on_the_dithered_model",
    "test_allocation_on_the_dithered_model_spends_bits_where_they_pay",
    "test_real_model_tasks_offline_well_above_chance_and_int2_falls_to_chance",
    "test_rotation_preserves_the_real_model_and_rescues_int4_activations",
    "test_block_formats_order_by_precision_on_the_dithered_model",
    "test_dithered_model_perplexity_orders_by_bits",
    "test_perplexity_protocol_matches_the_reference_computation",
    "test_real_model_quantize_export_load_identical_logits",
    "test_a_streamed_run_on_two_ranks_dies_by_rank_name_and_resumes_to_the_one_process_result",
    "test_a_streamed_run_holds_one_block_in_host_memory_not_the_model",
    "test_an_allocation_run_on_two_ranks_gives_the_one_process_table_and_allocation",
    "test_loss_hessian_block_is_symmetric_and_hutchinson_matches_its_trace",
    "test_a_killed_force_run_keeps_the_earlier_run",
    "test_unknown_task_names_the_task",
    "test_ctrl_c_is_reported_in_one_line",
    "test_kill_9_at_a_random_block_then_resume_gives_the_uninterrupted_checkpoint",
)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(getattr(item, "originalname", item.name), len(rank)))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["QUANTBENCH_CACHE"] = str(tmp_path_factory.mktemp("quantbench-cache"))


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
