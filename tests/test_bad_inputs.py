"""Bad inputs and faults, as a user meets them through the command line: each gives a one-line error and
exit status 2, never a traceback, and leaves every earlier result as it was."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import invoke, make_recipe, tiny_llama

from quantbench.export.checkpoint import save_quantized
from quantbench.pipeline import quantize_model
from quantbench.recipe import QuantizeSection


def one_line_error(result, *expected: str) -> str:
    """The run failed cleanly: exit 2, one `error:` line holding every expected fragment, no traceback."""
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output  # no traceback
    assert len(output.splitlines()) == 1 and output.startswith("error: "), output
    for fragment in expected:
        assert fragment in output, output
    return output


@pytest.fixture()
def earlier_run(tmp_path, model_dir, text_file):
    """A finished run directory that no failing command may touch."""
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    run_dir = tmp_path / "runs" / "tiny"
    return {path: path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}


def unchanged(files: dict) -> bool:
    return all(path.read_bytes() == data for path, data in files.items()) and all(path.exists() for path in files)


RECIPE_PROBES = {
    # name: (recipe changes, expected fragments)
    "missing calibration file": ({"calibration": {"source": "/no/such/corpus.txt"}},
                                 ["calibration.source: no such file"]),
    "missing eval file": ({"eval": {"perplexity": ["missing.txt"]}}, ["eval.perplexity: no such file"]),
    "missing model": ({"model": {"name": "/no/such/model"}}, ["model.name: no such directory"]),
    "unknown hub model": ({"model": {"name": "nobody/no-such-model"}}, ["model.name: cannot read the config"]),
    "huge n_samples": ({"calibration": {"n_samples": 100_000_000}}, ["memory:", "calibration.n_samples"]),
    "absurd n_samples": ({"calibration": {"n_samples": 10 ** 23}}, ["memory:"]),
    "export cannot store act_order": ({"quantize": {"default": "int4-g128-gptq-act", "overrides": []},
                                       "export": {"format": "compressed-tensors"}},
                                      ["act_order", "-act-static", "14 layers"]),
    "gptq cannot store mxfp4": ({"quantize": {"overrides": [], "default": "mxfp4-rtn"},
                                                       "export": {"format": "gptq"}},
                                                      ["GPTQ stores integer grids only"]),
    "misspelt task": ({"eval": {"tasks": ["piqa", "hellswag"], "baseline": False}},
                      ["eval.tasks: lm-eval task 'hellswag' not found", "similar: hellaswag"]),
}


@pytest.mark.parametrize("probe", RECIPE_PROBES)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_recipe_problems_are_refused_before_compute(tmp_path, model_dir, text_file, earlier_run, probe, command):
    changes, expected = RECIPE_PROBES[probe]
    recipe = make_recipe(tmp_path, model_dir, text_file, **changes)
    args = ["--force", "--quiet"] if command == "run" else []
    one_line_error(invoke(command, recipe, *args), *expected)
    assert unchanged(earlier_run)


def test_binary_calibration_text(tmp_path, model_dir, text_file):
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    recipe = make_recipe(tmp_path, model_dir, text_file, calibration={"source": str(binary)})
    one_line_error(invoke("run", recipe, "--quiet"), "not UTF-8 text")


def test_duplicate_yaml_key(tmp_path, model_dir, text_file):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(f"name: dup\nmodel:\n  name: {model_dir}\n  dtype: float32\n  dtype: bfloat16\n")
    one_line_error(invoke("validate", recipe), "key 'dtype' is given twice", "line 5")


def test_output_under_a_regular_file(tmp_path, model_dir, text_file):
    (tmp_path / "blocker").write_text("a file")
    recipe = make_recipe(tmp_path, model_dir, text_file, output={"dir": str(tmp_path / "blocker" / "run")})
    one_line_error(invoke("run", recipe, "--quiet"), "is a file, not a directory")


def test_full_disk(tmp_path, model_dir, text_file, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    recipe = make_recipe(tmp_path, model_dir, text_file)
    one_line_error(invoke("run", recipe, "--quiet"), "disk:", "free")


def test_unsupported_architecture_is_refused_before_any_model_code_runs(tmp_path, text_file):
    model = tmp_path / "custom"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "mystery", "auto_map": {
        "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}))
    (model / "modeling_mystery.py").write_text("raise SystemExit('remote code ran')\n")
    recipe = make_recipe(tmp_path, model, text_file, model={"trust_remote_code": True})
    one_line_error(invoke("run", recipe, "--quiet"), "model type 'mystery' is not supported")


def model_with(tmp_path, tokenizer, value: float) -> Path:
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    path = tmp_path / "broken-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_stop_the_run_naming_them(tmp_path, tokenizer, text_file, value):
    recipe = make_recipe(tmp_path, model_with(tmp_path, tokenizer, value), text_file)
    kind = "NaN" if value != value else "infinite"
    one_line_error(invoke("run", recipe, "--quiet"), "model.layers.1.mlp.up_proj.weight: 1 " + kind,
                   "nonfinite_weights: zero")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_nonfinite_weights_can_be_zeroed_on_request(tmp_path, tokenizer, text_file):
    recipe = make_recipe(tmp_path, model_with(tmp_path, tokenizer, float("nan")), text_file,
                         model={"nonfinite_weights": "zero"})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    result = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    assert result["nonfinite_weights_zeroed"] == {"model.layers.1.mlp.up_proj.weight": "1 NaN weight(s)"}
    assert all(v["ppl"] == v["ppl"] for side in result["perplexity"].values() for v in side.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finiteness_check_by_a_sum_finds_every_nonfinite_weight(dtype):
    """A finite sum proves every weight finite; one NaN or ±inf anywhere (both infinities at once give a NaN
    sum) is found, and finite weights whose sum overflows are still finite."""
    from quantbench.model_io import all_finite

    info = torch.finfo(dtype)
    weight = torch.randn(300, 70).to(dtype)
    assert all_finite(weight)
    assert all_finite(torch.full((8, 8), info.max, dtype=dtype))  # the sum is inf; the weights are not
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        broken = weight.clone()
        broken.view(-1)[torch.randperm(broken.numel(), generator=torch.Generator().manual_seed(0))[:len(bad)]] = \
            torch.tensor(bad, dtype=dtype)
        assert not all_finite(broken), bad


@pytest.mark.parametrize("budget", [["--budget", "nan"], ["--budget", "inf"], ["--budget=-3"],
                                    ["--budget", "3", "--budget-bytes", "1000"], ["--budget-bytes=-5"]])
def test_bad_budgets(tmp_path, model_dir, text_file, budget):
    recipe = make_recipe(tmp_path, model_dir, text_file, quantize={"overrides": []},
                         allocation={"candidates": ["int4-g32-rtn", "int8-pc-rtn"]})
    one_line_error(invoke("allocate", recipe, *budget, "--quiet"), "budget")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-rtn")
    save_quantized(model, tokenizer, quantize_model(model, ids, section.scheme_for, torch.device("cpu"),
                                                    progress=False), path)
    return path


def damage_config(edit):
    def damage(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        edit(config["quantization_config"]["layers"])
        (path / "config.json").write_text(json.dumps(config))
    return damage


def truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])


Q = "model.layers.0.self_attn.q_proj"
DAMAGE = {
    "edited bits": (damage_config(lambda layers: layers[Q].update(bits=3)), "model.layers.0.self_attn.q_proj.qweight"),
    "edited shape": (damage_config(lambda layers: layers[Q].update(shape=[64, 32])), "q_proj"),
    "bad format": (damage_config(lambda layers: layers[Q].update(format="int9")), "config.json layer"),
    "bad group size": (damage_config(lambda layers: layers[Q].update(group_size=12)), "group_size"),
    "extra layer": (damage_config(lambda layers: layers.update({"model.layers.9.mlp.up_proj": dict(layers[Q])})),
                    "model.layers.9.mlp.up_proj"),
    "shape not a pair": (damage_config(lambda layers: layers[Q].update(shape="big")), "shape"),
    "truncated weights": (truncate, "model.safetensors cannot be read"),
    "broken config.json": (lambda path: (path / "config.json").write_text("{not json"), "config.json is not valid"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["inspect", "eval", "export"])
def test_damaged_checkpoints_say_which_part(tmp_path, checkpoint, damage, command, text_file):
    copy = tmp_path / "ckpt"
    shutil.copytree(checkpoint, copy)
    edit, fragment = DAMAGE[damage]
    edit(copy)
    args = {"inspect": [copy], "eval": [copy, "-d", text_file, "--seqlen", 32, "--max-windows", 1, "--quiet"],
            "export": [copy, "--to", "gptq", "--out", tmp_path / "out"]}[command]
    one_line_error(invoke(command, *args), "damaged", fragment)
    assert not (tmp_path / "out").exists()


def test_paths_are_printed_as_they_are(tmp_path, model_dir, text_file):
    folder = tmp_path / "[bold]red"
    folder.mkdir()
    recipe = make_recipe(folder, model_dir, text_file)
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert "[bold]red" in " ".join(result.output.split())


def test_inspect_at_80_columns_tells_layers_apart(checkpoint):
    result = invoke("inspect", checkpoint)  # the test runner's console is 80 columns wide
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    for block in (0, 1):
        for layer in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            assert sum(f" {block}.{layer} " in line for line in lines) == 1, (block, layer, result.output)


def test_written_files_get_the_usual_mode(checkpoint):
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in checkpoint.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone would write 0600


def test_version():
    from quantbench import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"quantbench {__version__}"


def test_the_command_line_starts_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, quantbench.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert out.stdout.split() == ["False", "False"]


def test_ctrl_c_is_reported_in_one_line(tmp_path, model_dir, text_file):
    import signal
    import time

    from forked import quantbench_command, start_forked
    from helpers import pseudo_text

    long_text = tmp_path / "long.txt"
    long_text.write_text(pseudo_text(30_000, seed=1))  # about 100,000 tokens: evaluation takes half a minute
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"perplexity": [str(long_text)], "seqlen": 16,
                                                               "max_windows": None})
    run = start_forked(quantbench_command, "run", recipe)
    seen = ""
    while "perplexity" not in seen:  # the evaluation's progress bar: the run is computing
        line = run.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    code, _, rest = run.wait(timeout=60)
    err = seen + rest
    assert code == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped by Ctrl-C")
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_late_export_failure_keeps_the_results(tmp_path, tokenizer, text_file):
    """A group whose weights are all positive gets the zero point 0, which GPTQ's zero − 1 cannot store: only
    the weights tell, so the run finishes, keeps its native checkpoint and result.json, then says why."""
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, :32].abs_()
    path = tmp_path / "positive-group"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    recipe = make_recipe(tmp_path, path, text_file, quantize={"default": "int4-g32-rtn", "overrides": []},
                         export={"format": "gptq"})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "a zero point of 0" in result.output and "results are kept" in result.output
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "result.json").read_text())
    assert "a zero point of 0" in saved["interop_error"] and saved["perplexity"]["quantized"]
    assert (run_dir / "checkpoint" / "model.safetensors").is_file() and not (run_dir / "checkpoint-gptq").exists()


def test_scaling_on_a_family_without_fold_sites_is_refused_before_compute(tmp_path, tokenizer, text_file):
    from helpers import tiny_opt

    model_dir = tmp_path / "opt"
    tiny_opt(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = make_recipe(tmp_path, model_dir, text_file, quantize={"default": "awq+int4-g32-rtn"})
    one_line_error(invoke("validate", recipe), "awq scaling supports", "not 'opt'")


def test_eval_with_kernels_of_a_plain_model_is_refused_before_loading(model_dir, text_file):
    result = invoke("eval", model_dir, "-d", text_file, "--seqlen", 32, "--max-windows", 1, "--kernels", "--quiet")
    one_line_error(result, "--kernels", "not one")


def test_eval_of_a_checkpoint_that_cannot_fit_says_to_keep_it_packed(checkpoint, text_file, monkeypatch):
    import quantbench.memory

    monkeypatch.setattr(quantbench.memory, "available_host_bytes", lambda: 1000)
    result = invoke("eval", checkpoint, "-d", text_file, "--seqlen", 32, "--max-windows", 1, "--device", "cpu",
                    "--quiet")
    one_line_error(result, "loaded dequantized it takes", "1.0 kB is free", "--kernels")
