"""Streamed runs (model.streaming: on): weights read block by block from a sharded checkpoint, the
checkpoint written block by block, perplexity computed in the same pass, and --resume after a kill -9."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked import run_forked
from helpers import FAMILY_BUILDERS, MOE_BUILDERS, invoke, make_recipe, tiny_llama

from quantbench import load_quantized
from quantbench.errors import QuantbenchError
from quantbench.export.checkpoint_reader import INDEX_FILE, read_checkpoint
from quantbench.model_io import decoder_blocks, final_logits
from quantbench.recipe import load_recipe
from quantbench.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = {"default": "int4-g32-gptq-act-static",
           "overrides": [{"pattern": "down_proj|dense_4h_to_h", "scheme": "int3-g32-gptq"}]}


def saved_in_shards(model, tokenizer, folder: Path, shard: str = "40KB") -> Path:
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory, tokenizer) -> Path:
    """Four blocks, tied embeddings, saved as about twenty safetensors shards."""
    folder = saved_in_shards(tiny_llama(vocab_size=len(tokenizer), layers=4), tokenizer,
                             tmp_path_factory.mktemp("sharded-llama"))
    assert len(list(folder.glob("*.safetensors"))) > 10
    return folder


def streamed_recipe(tmp_path, model_dir, text_file, streaming="on", **changes):
    sections = {"model": {"streaming": streaming}, "quantize": SCHEMES,
                "calibration": {"n_samples": 6, "batch_size": 2}, "eval": {"batch_size": 2}}
    for section, values in changes.items():
        sections[section] = {**sections.get(section, {}), **values}
    tmp_path.mkdir(parents=True, exist_ok=True)
    return make_recipe(tmp_path, model_dir, text_file, **sections)


def checkpoint_contents(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = read_checkpoint(run_dir / "checkpoint")
    return checkpoint.load_tensors(), checkpoint.qconfig


def assert_same_checkpoint(a: Path, b: Path) -> None:
    (tensors_a, config_a), (tensors_b, config_b) = checkpoint_contents(a), checkpoint_contents(b)
    assert sorted(tensors_a) == sorted(tensors_b)
    assert [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])] == []
    assert config_a == config_b


@pytest.mark.parametrize("build", FAMILY_BUILDERS.values(), ids=FAMILY_BUILDERS.keys())
def test_final_logits_of_the_last_block_output_are_the_model_logits(build):
    model = build()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    captured = {}
    decoder_blocks(model)[-1].register_forward_hook(lambda _m, _a, out: captured.update(h=out[0] if isinstance(
        out, tuple) else out))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(final_logits(model, captured["h"]), logits)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2_sliding_window", "gemma2", "phi3", "granite",
                                    "cohere2", "olmo3", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss",
                                    "qwen3_next", "granitemoe"])
def test_a_streamed_run_gives_the_codes_checkpoint_perplexity_and_task_scores_of_the_in_memory_run(
        tmp_path, tokenizer, text_file, sharded_llama, family, tiny_task_dir):
    """lm-eval scores (Llama only): the streamed run's come from models placed by free memory. The streamed
    perplexity is computed block by block; the in-memory one by whole-model forwards, with each layer's own
    attention mask (Qwen2 with sliding-window layers)."""
    model_dir = sharded_llama if family == "llama" else saved_in_shards(
        FAMILY_BUILDERS[family](vocab_size=len(tokenizer)), tokenizer, tmp_path / family)
    tasks = {"tasks": ["tiny_mc"], "lm_eval": {"limit": 6, "include_path": [str(tiny_task_dir)]}}
    results = {}
    for mode in ("off", "on"):
        recipe = streamed_recipe(tmp_path / mode, model_dir, text_file, mode,
                                 quantize={**SCHEMES, "lm_head": "int8-pc-rtn"}, eval=tasks if family == "llama" else {})
        results[mode] = run_recipe(load_recipe(recipe), progress=False)
    memory, streamed = results["off"], results["on"]
    assert "streaming" in streamed and "streaming" not in memory
    assert streamed["perplexity"] == memory["perplexity"]
    if family == "llama":
        for side in ("baseline", "quantized"):
            assert streamed["tasks"][side]["tasks"]["tiny_mc"]["metrics"] == pytest.approx(
                memory["tasks"][side]["tasks"]["tiny_mc"]["metrics"], rel=1e-9)
    assert streamed["quantization"] == memory["quantization"]
    assert streamed["starved_experts"] == memory["starved_experts"]
    assert bool(memory["starved_experts"]) == (family in MOE_BUILDERS)  # its tiny calibration starves experts
    assert_same_checkpoint(tmp_path / "off" / "runs" / "tiny", tmp_path / "on" / "runs" / "tiny")
    index = json.loads((tmp_path / "on" / "runs" / "tiny" / "checkpoint" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == len(decoder_blocks_of(model_dir)) + 1  # a shard per block


@pytest.mark.parametrize("release, model_type, block", [("tiny_qwen3_5_moe_release", "qwen3_5_moe_text", "linear_attn"),
                                                       ("tiny_gemma3", "gemma3", "language_model.layers")])
def test_a_released_multimodal_checkpoint_quantizes_its_language_model(tmp_path, tokenizer, text_file, release,
                                                                       model_type, block):
    """Checkpoints as released, a vision encoder beside `model.language_model.*`: Qwen3.5-MoE's language model
    loads alone (AutoModelForCausalLM), Gemma 3's stays inside the whole model (only its language model's
    blocks are quantized). Validation, the in-memory and the streamed runs agree (the same codes, perplexity
    and checkpoint, which names the model type quantized), and the model quantized computes the release's
    logits on text."""
    import helpers

    from quantbench.model_io import load_model

    released = getattr(helpers, release)(vocab_size=len(tokenizer))
    model_dir = saved_in_shards(released, tokenizer, tmp_path / "release")
    language_model, _ = load_model(str(model_dir), torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the release computes text positions through its multimodal rotary: float rounding
        expected = released(input_ids=ids).logits
        torch.testing.assert_close(language_model(input_ids=ids).logits, expected, rtol=0,
                                   atol=16 * torch.finfo(torch.float32).eps * expected.abs().max().item())
    recipes = {mode: streamed_recipe(tmp_path / mode, model_dir, text_file, mode) for mode in ("off", "on")}
    validated = invoke("validate", recipes["on"])
    assert validated.exit_code == 0 and f"model: {model_type}," in validated.output, validated.output
    results = {mode: run_recipe(load_recipe(recipe), progress=False) for mode, recipe in recipes.items()}
    assert results["on"]["perplexity"] == results["off"]["perplexity"]
    assert results["on"]["quantization"] == results["off"]["quantization"]
    assert_same_checkpoint(tmp_path / "off" / "runs" / "tiny", tmp_path / "on" / "runs" / "tiny")
    saved = json.loads((tmp_path / "on" / "runs" / "tiny" / "checkpoint" / "config.json").read_text())
    assert saved["model_type"] == model_type
    layers = results["off"]["quantization"]["layers"]
    assert layers and all("vision" not in name for name in layers) and any(block in name for name in layers)


def decoder_blocks_of(model_dir: Path) -> range:
    return range(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def test_experts_packed_in_mxfp4_blocks_are_refused_with_what_to_do(tmp_path):
    """The original GPT-OSS release stores its experts as MXFP4 blocks and scales, which only from_pretrained
    unpacks: streaming names the missing expert and says what to do."""
    from safetensors.torch import load_file, save_file

    from quantbench.block_weights import DiskWeights, skeleton_model

    model = MOE_BUILDERS["gpt_oss"]()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[f"{name}_blocks"] = tensors.pop(name).to(torch.uint8)
    save_file(tensors, tmp_path / "model.safetensors")
    skeleton = skeleton_model(model.config, torch.float32)
    weights = DiskWeights(skeleton, tmp_path, torch.float32)
    with pytest.raises(QuantbenchError, match=r"no tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight.*"
                                              r"packed in MXFP4 blocks.*model\.streaming: off"):
        weights.load_block(decoder_blocks(skeleton)[0], "model.layers.0", torch.device("cpu"))


def test_a_sharded_compressed_tensors_export_loads_in_transformers_with_our_weights(tmp_path, sharded_llama,
                                                                                     text_file):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    recipe = make_recipe(tmp_path, sharded_llama, text_file, model={"streaming": "on"},
                         quantize={"default": "int4-g32-gptq-act-static", "overrides": []},
                         export={"format": "compressed-tensors"})
    result = run_recipe(load_recipe(recipe), progress=False)
    exported = Path(result["interop_checkpoint"])
    assert (exported / INDEX_FILE).is_file() and len(list(exported.glob("*.safetensors"))) == 5
    ours = load_quantized(result["checkpoint"])
    theirs = AutoModelForCausalLM.from_pretrained(exported, quantization_config=CompressedTensorsConfig(
        run_compressed=False))
    for name in result["quantization"]["layers"]:
        assert torch.equal(theirs.get_submodule(name).weight, ours.get_submodule(name).weight), name
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


def test_models_placed_over_host_memory_and_disk_compute_as_the_models_in_memory(tmp_path, sharded_llama,
                                                                                text_file):
    from transformers import AutoModelForCausalLM

    from quantbench.eval.placed_models import placed_pretrained, placed_quantized

    recipe = make_recipe(tmp_path, sharded_llama, text_file, model={"streaming": "on"},
                         quantize={"default": "hadamard+int4-g32-gptq", "overrides": []})
    result = run_recipe(load_recipe(recipe), progress=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    budget = {"cpu": 600_000}  # bytes: some blocks fit (with accelerate's reserve), the rest goes to disk
    pairs = [(placed_quantized(Path(result["checkpoint"]), torch.float32, budget, tmp_path / "offload-q"),
              load_quantized(result["checkpoint"])),
             (placed_pretrained(str(sharded_llama), torch.float32, budget, tmp_path / "offload-b"),
              AutoModelForCausalLM.from_pretrained(sharded_llama, dtype=torch.float32))]
    for placed, whole in pairs:
        assert set(placed.hf_device_map.values()) == {"cpu", "disk"}
        with torch.no_grad():
            assert torch.equal(placed(input_ids=ids).logits, whole(input_ids=ids).logits)


def random_llama_checkpoint(folder: Path, tokenizer, layers: int, hidden: int) -> float:
    """A random Llama written straight as safetensors shards, one per block (no module init: fast); its
    weights' size in MB."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden + 32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         max_position_embeddings=512, tie_word_embeddings=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict] = {}
    for key, shape in shapes.items():
        block = key.split(".")[2] if key.startswith("model.layers.") else "rest"
        shards.setdefault(f"model-{block}.safetensors", {})[key] = 0.02 * torch.randn(shape, generator=generator)
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
    weight_map = {key: name for name, tensors in shards.items() for key in tensors}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values()) / 2**20


MEASURE_RSS = """
import gc, json, sys
sys.path.insert(0, {root!r})
from quantbench.recipe import load_recipe
from quantbench.runner import run_recipe

def resident_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

peaks = {{}}
for mode, recipe in {recipes!r}.items():
    if mode == "warm-up":  # the modules a run imports are not weights (they would only add to "on")
        run_recipe(load_recipe(recipe), force=True, progress=False)
        continue
    gc.collect()
    before = resident_mb()
    peaks[mode] = run_recipe(load_recipe(recipe), force=True, progress=False)["peak_memory"]["host_rss_mb"] - before
print(json.dumps(peaks))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS per stage needs Linux")
def test_a_streamed_run_holds_one_block_in_host_memory_not_the_model(tmp_path, tokenizer, text_file):
    """Measured in a fresh process, so that what earlier tests left in the allocator does not count, on a
    run after a streamed warm-up run of a two-block copy, so that what the first run imported does not
    either. With glibc's heap left to itself the streamed peak ranged 12–67 MB between identical runs;
    returning large frees at once, 31.6–32.4 MB over five runs (the whole model: 546–549 MB); after the
    two-block warm-up 26.3–26.6 MB over three (25.1 after a warm-up on the model itself)."""
    model_mb = random_llama_checkpoint(tmp_path / "model", tokenizer, layers=24, hidden=512)
    random_llama_checkpoint(tmp_path / "small", tokenizer, layers=2, hidden=512)
    recipes = {}
    for mode, model, streaming in (("warm-up", "small", "on"), ("on", "model", "on"), ("off", "model", "off")):
        (tmp_path / mode).mkdir()
        recipes[mode] = str(make_recipe(tmp_path / mode, tmp_path / model, text_file, model={"streaming": streaming},
                                        quantize={"default": "int4-g32-rtn"}, calibration={"n_samples": 2},
                                        eval={"max_windows": 1}))
    code = MEASURE_RSS.format(root=str(ROOT), recipes=recipes)
    # glibc returns every freed allocation of 64 KiB or more at once, so that the resident set follows live
    # memory rather than what the heap happened to keep from earlier work
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    assert model_mb > 200
    assert peaks["off"] > 0.9 * model_mb  # the whole model in memory
    assert peaks["on"] < 0.25 * model_mb  # a block in flight (9 MB), its packed copy, the run's own objects


def _run_killed_after(recipe: Path, kill_after_block: int | None, force: bool) -> None:
    import quantbench.stream_runner as streaming

    take = streaming.StreamedLayers.run_block

    def run_block(self, ctx):
        take(self, ctx)
        if ctx.index == kill_after_block:
            os.kill(os.getpid(), signal.SIGKILL)

    streaming.StreamedLayers.run_block = run_block  # in the fork alone
    run_recipe(load_recipe(recipe), force=force, progress=False)


def run_child(recipe: Path, kill_after_block: int | None = None, force: bool = False) -> int:
    """`run_recipe` in a fork of this process that, with `kill_after_block`, SIGKILLs itself as soon as that
    block's checkpoint part is written (before the journal saves the next block's inputs); its exit code."""
    return run_forked(_run_killed_after, recipe, kill_after_block, force)[0]


def test_kill_9_at_a_random_block_then_resume_gives_the_uninterrupted_checkpoint(tmp_path, sharded_llama, text_file):
    reference = streamed_recipe(tmp_path / "reference", sharded_llama, text_file)
    expected = run_recipe(load_recipe(reference), progress=False)

    recipe = streamed_recipe(tmp_path, sharded_llama, text_file, output={"journal_every_s": 0})
    run_dir = tmp_path / "runs" / "tiny"
    run_recipe(load_recipe(recipe), progress=False)  # a good run stands in the run directory
    good = (run_dir / "result.json").read_text()
    killed_at = random.Random().randrange(1, 3)
    assert run_child(recipe, kill_after_block=killed_at, force=True) == -9
    assert (run_dir / "result.json").read_text() == good  # the kill left the good run in place
    partial = run_dir.parent / ".tiny.partial"
    assert sorted(p.name for p in (partial / "checkpoint" / "parts").iterdir()) == [
        f"block-{i:05d}.safetensors" for i in range(killed_at + 1)]

    resumed = invoke("run", recipe, "--force", "--resume", "--quiet")
    assert resumed.exit_code == 0, resumed.output
    result = json.loads((run_dir / "result.json").read_text())
    assert result["streaming"]["resumed_at_block"] == killed_at
    assert result["perplexity"] == expected["perplexity"]
    assert_same_checkpoint(run_dir, tmp_path / "reference" / "runs" / "tiny")
    assert not partial.exists()


def test_a_failed_streamed_run_leaves_no_checkpoint_and_keeps_the_good_one(tmp_path, sharded_llama, text_file,
                                                                          monkeypatch):
    recipe = streamed_recipe(tmp_path, sharded_llama, text_file)
    run_recipe(load_recipe(recipe), progress=False)
    run_dir = tmp_path / "runs" / "tiny"
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    import quantbench.stream_runner as streaming

    def fail(*_args):
        raise QuantbenchError("the disk is full")

    monkeypatch.setattr(streaming.CheckpointWriter, "finish", fail)
    with pytest.raises(QuantbenchError, match="disk is full"):
        run_recipe(load_recipe(recipe), force=True, progress=False)
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert [p.name for p in run_dir.parent.iterdir() if p.name.endswith(".tmp")] == []


def crash_after_block_2(monkeypatch):
    """Make a streamed run die of a MemoryError once block 2's part is written."""
    import quantbench.stream_runner as streaming

    take = streaming.StreamedLayers.run_block

    def crash_at_block_2(self, ctx):
        take(self, ctx)
        if ctx.index == 2:
            raise MemoryError("out of memory")

    monkeypatch.setattr(streaming.StreamedLayers, "run_block", crash_at_block_2)


def test_resume_refuses_a_partial_run_of_another_recipe(tmp_path, sharded_llama, text_file, monkeypatch):
    crash_after_block_2(monkeypatch)
    recipe = streamed_recipe(tmp_path, sharded_llama, text_file, output={"journal_every_s": 0})
    with pytest.raises(MemoryError):
        run_recipe(load_recipe(recipe), progress=False)
    monkeypatch.undo()
    changed = streamed_recipe(tmp_path / "changed", sharded_llama, text_file, calibration={"seed": 1},
                              output={"journal_every_s": 0, "dir": str(tmp_path / "runs" / "tiny")})
    with pytest.raises(QuantbenchError, match="another version of this recipe"):
        run_recipe(load_recipe(changed), progress=False, resume=True)
    assert run_recipe(load_recipe(recipe), progress=False, resume=True)["streaming"]["resumed_at_block"] == 2


RANK_1_DIES = """
import os, signal, sys
import quantbench.stream_runner as streaming
from quantbench.cli import main
take = streaming.StreamedLayers.run_block
def run_block(self, ctx):
    take(self, ctx)
    if ctx.index == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
streaming.StreamedLayers.run_block = run_block
sys.argv = ["quantbench", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_streamed_run_on_two_ranks_dies_by_rank_name_and_resumes_to_the_one_process_result(
        tmp_path, sharded_llama, text_file):
    """Each rank streams the weights and forwards its half of the calibration and of the windows; rank 1 is
    killed after block 1, torchrun names it, and two ranks (`--nproc 2`) resume at block 1 from each rank's
    saved state. RTN codes equal one process's. AWQ sums the |x| statistics and each trial's error over the
    ranks, so it picks one process's α. GPTQ's Hessian is the same sum in another order, and its error
    feedback carries any flipped rounding into the columns after it: a share of the codes may differ (none
    here; unsummed AWQ errors change half), the perplexity may not (1e-4)."""
    changes = dict(quantize={"default": "awq+int4-g32-gptq",
                             "overrides": [{"pattern": "down_proj", "scheme": "int8-pc-rtn"}]},
                   output={"journal_every_s": 0})
    single = streamed_recipe(tmp_path / "single", sharded_llama, text_file, **changes)
    expected = run_recipe(load_recipe(single), progress=False)
    recipe = streamed_recipe(tmp_path, sharded_llama, text_file, **changes)
    (tmp_path / "rank_1_dies.py").write_text(RANK_1_DIES)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    died = subprocess.run(launch + [str(tmp_path / "rank_1_dies.py"), "run", str(recipe), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert died.returncode != 0 and re.search(r"rank: 1 .*\n(.*\n)*.*SIGKILL", died.stdout + died.stderr), died.stderr
    partial = tmp_path / "runs" / ".tiny.partial"
    assert json.loads((partial / "state.json").read_text()) == {"folder": "state-00001", "ranks": 2}
    with pytest.raises(QuantbenchError, match="saved by 2 rank"):
        run_recipe(load_recipe(recipe), progress=False, resume=True)

    resumed = subprocess.run([sys.executable, "-m", "quantbench", "run", str(recipe), "--resume", "--quiet",
                              "--nproc", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    result = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert result["ranks"] == 2 and result["streaming"]["resumed_at_block"] == 1 and not partial.exists()
    alphas = [{site: record["alpha"] for site, record in run["scaled"].items()} for run in (expected, result)]
    assert len(alphas[0]) == 4 * 2 and alphas[0] == alphas[1]  # per block, its two norms (GQA: no v → o site)
    for dataset, value in expected["perplexity"]["quantized"].items():
        assert result["perplexity"]["quantized"][dataset]["ppl"] == pytest.approx(value["ppl"], rel=1e-4)
        assert result["perplexity"]["baseline"][dataset]["ppl"] == pytest.approx(
            expected["perplexity"]["baseline"][dataset]["ppl"], rel=1e-4)
    one, _ = checkpoint_contents(tmp_path / "single" / "runs" / "tiny")
    two, _ = checkpoint_contents(tmp_path / "runs" / "tiny")
    assert one.keys() == two.keys()
    rtn = [name for name in one if "down_proj" in name]
    assert rtn and all(torch.equal(one[name], two[name]) for name in rtn)
    packed = [name for name in one if name.endswith("qweight") and "down_proj" not in name]
    differing = sum((one[n] != two[n]).sum().item() for n in packed)
    assert packed and differing <= sum(one[n].numel() for n in packed) // 50


def test_streaming_on_refuses_what_needs_the_whole_model(tmp_path, sharded_llama, text_file):
    recipe = make_recipe(tmp_path, sharded_llama, text_file, model={"streaming": "on"})
    recipe.write_text(recipe.read_text() + "transforms:\n- name: rotate\n")
    with pytest.raises(QuantbenchError, match="cannot stream a recipe with transforms"):
        run_recipe(load_recipe(recipe), progress=False)
    plain = make_recipe(tmp_path, sharded_llama, text_file, model={"streaming": "off"})
    with pytest.raises(QuantbenchError, match="nothing to resume"):
        run_recipe(load_recipe(plain), progress=False, resume=True)


def test_auto_streams_a_model_larger_than_half_the_available_memory(tmp_path, sharded_llama, text_file):
    from quantbench.preflight import _streams, preflight

    recipe = load_recipe(make_recipe(tmp_path, sharded_llama, text_file))
    assert recipe.model.streaming == "auto" and not preflight(recipe).streaming
    assert _streams(recipe, model_bytes=1000, available=1500, problems=[])
    assert not _streams(recipe, model_bytes=1000, available=2500, problems=[])
    off = load_recipe(make_recipe(tmp_path, sharded_llama, text_file, model={"streaming": "off"}))
    assert not _streams(off, model_bytes=1000, available=1500, problems=[])


def test_a_resumed_run_keeps_what_the_blocks_before_the_crash_recorded(tmp_path, sharded_llama, text_file,
                                                                      monkeypatch):
    awq = {"default": "awq+int4-g32-rtn", "overrides": [], "scaling": {"grid": 4}}
    reference = streamed_recipe(tmp_path / "reference", sharded_llama, text_file, quantize=awq)
    expected = run_recipe(load_recipe(reference), progress=False)
    crash_after_block_2(monkeypatch)
    recipe = streamed_recipe(tmp_path, sharded_llama, text_file, quantize=awq, output={"journal_every_s": 0})
    with pytest.raises(MemoryError):
        run_recipe(load_recipe(recipe), progress=False)
    monkeypatch.undo()
    resumed = run_recipe(load_recipe(recipe), progress=False, resume=True)
    assert resumed["streaming"]["resumed_at_block"] == 2
    assert resumed["scaled"] == expected["scaled"] and len(expected["scaled"]) == 3 * 4


def test_a_streamed_round_to_nearest_run_makes_no_calibration_forward_and_resumes(tmp_path, sharded_llama,
                                                                                    text_file, monkeypatch):
    """Round to nearest reads no calibration inputs: the streamed run drives every block (writes its part,
    scores the windows through it) but runs none forward on the calibration and journals no calibration
    states; crashed after block 2 it resumes to the in-memory run's checkpoint and perplexity. GPTQ's
    streamed run propagates the calibration through every block but the last."""
    import quantbench.journal as journal

    rtn = {"default": "int4-g32-rtn", "overrides": []}
    expected = run_recipe(load_recipe(streamed_recipe(tmp_path / "off", sharded_llama, text_file, "off",
                                                      quantize=rtn)), progress=False)
    crash_after_block_2(monkeypatch)
    saved_counts = []
    save = journal.Journal.save

    def counting_save(self, next_block, hidden):
        saved_counts.append(len(hidden))
        save(self, next_block, hidden)

    monkeypatch.setattr(journal.Journal, "save", counting_save)
    recipe = streamed_recipe(tmp_path, sharded_llama, text_file, quantize=rtn, output={"journal_every_s": 0})
    with pytest.raises(MemoryError):
        run_recipe(load_recipe(recipe), progress=False)
    assert saved_counts == [0, 0]  # after blocks 0 and 1: no calibration states to keep
    monkeypatch.undo()
    resumed = run_recipe(load_recipe(recipe), progress=False, resume=True)
    assert resumed["streaming"]["resumed_at_block"] == 2
    assert "propagate" not in resumed["quantize_breakdown_s"]
    assert resumed["perplexity"] == expected["perplexity"]
    assert_same_checkpoint(tmp_path / "off" / "runs" / "tiny", tmp_path / "runs" / "tiny")
    gptq = run_recipe(load_recipe(streamed_recipe(tmp_path / "gptq", sharded_llama, text_file)), progress=False)
    assert gptq["quantize_breakdown_s"]["propagate"] > 0
