import ast
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from helpers import invoke, make_recipe

import quantbench
from quantbench import load_quantized


def test_run_writes_result_checkpoint_and_summary(tmp_path, model_dir, text_file):
    recipe = make_recipe(tmp_path, model_dir, text_file)
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "result.json").read_text())
    q = saved["quantization"]
    assert q["schemes"] == {"int4-g32-rtn": 12, "int8-pc-rtn": 2} and q["quantized_layers"] == 14
    assert 4 < q["avg_bits_per_weight"] < 6  # 64 inputs: zero points padded to a word weigh here
    assert q["weight_bytes"]["quantized_layers"] < q["weight_bytes"]["quantized_layers_fp16"] / 2.5
    ppl = saved["perplexity"]
    dataset = str(text_file)
    assert ppl["baseline"][dataset]["windows"] == ppl["quantized"][dataset]["windows"] == 4
    assert ppl["quantized"][dataset]["ppl"] != ppl["baseline"][dataset]["ppl"]
    for key in ("recipe_hash", "timings_s", "peak_memory", "environment", "dtype", "checkpoint"):
        assert saved[key]
    assert saved["environment"]["packages"]["torch"].startswith("2.")
    assert {"load", "calibration", "quantize", "eval_quantized", "export", "total"} <= saved["timings_s"].keys()

    model = load_quantized(run_dir / "checkpoint")
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32

    inspected = invoke("inspect", run_dir, "--json")
    assert inspected.exit_code == 0, inspected.output
    layers = json.loads(inspected.output)
    assert len(layers) == 14 and {layer["scheme"] for layer in layers} == {"int4-g32-rtn", "int8-pc-rtn"}
    stored_bits = 8 * sum(layer["bytes"] for layer in layers)  # inspect reads the file; the run predicted it
    assert stored_bits == 8 * q["weight_bytes"]["quantized_layers"]
    assert stored_bits / q["quantized_params"] == pytest.approx(q["avg_bits_per_weight"], rel=1e-12)

    evaluated = invoke("eval", run_dir, "--dataset", text_file, "--seqlen", 64, "--max-windows", 4,
                       "--output", tmp_path / "dense")
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{ppl['quantized'][dataset]['ppl']:.3f}" in evaluated.output  # the checkpoint scores as in the run
    record = json.loads((tmp_path / "dense" / "result.json").read_text())
    assert not record["kernels"] and record["quantization"] == q

    served = invoke("eval", run_dir, "--dataset", text_file, "--seqlen", 64, "--max-windows", 4, "--kernels",
                    "--output", tmp_path / "served")
    assert served.exit_code == 0, served.output
    record = json.loads((tmp_path / "served" / "result.json").read_text())
    assert record["kernels"] and record["quantization"] == q  # every layer packed, the same sizes
    # the packed layers' matmuls sum in another order than the dense ones: equal within float32 rounding
    assert record["perplexity"]["quantized"][dataset]["ppl"] == pytest.approx(ppl["quantized"][dataset]["ppl"],
                                                                              rel=1e-4)


def test_existing_run_is_refused_without_force_and_kept(tmp_path, model_dir, text_file):
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    result_file = tmp_path / "runs" / "tiny" / "result.json"
    before = result_file.read_text()
    again = invoke("run", recipe, "--quiet")
    assert again.exit_code == 2
    assert "already exists; pass --force" in again.output
    assert result_file.read_text() == before
    stale = result_file.parent / "stale-marker"
    stale.write_text("left by the earlier run")
    forced = invoke("run", recipe, "--quiet", "--force")
    assert forced.exit_code == 0, forced.output
    assert result_file.is_file() and not stale.exists()  # the run directory was replaced as a whole


def test_failed_run_with_force_keeps_the_earlier_results(tmp_path, model_dir, text_file):
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False})
    assert invoke("run", recipe, "--quiet").exit_code == 0
    before = (tmp_path / "runs" / "tiny" / "result.json").read_text()
    broken = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False},  # the text has 18,662 tokens
                         calibration={"seqlen": 20000, "n_samples": 1})
    result = invoke("run", broken, "--quiet", "--force")
    assert result.exit_code == 2 and "fewer than calibration.seqlen=20000" in result.output
    assert (tmp_path / "runs" / "tiny" / "result.json").read_text() == before


def test_missing_model_is_a_clear_error(tmp_path, text_file):
    recipe = make_recipe(tmp_path, tmp_path / "no-such-model", text_file)
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 2
    assert "model.name: no such directory" in result.output and "no-such-model" in result.output
    assert "Traceback" not in result.output


def test_validate(tmp_path, model_dir, text_file):
    good = invoke("validate", make_recipe(tmp_path, model_dir, text_file))
    assert good.exit_code == 0 and "ok" in good.output
    bad = make_recipe(tmp_path, model_dir, text_file, quantize={"default": {"bits": 1}})
    result = invoke("validate", bad)
    assert result.exit_code == 2
    assert "quantize.default.bits: Input should be greater than or equal to 2 (got 1)" in result.output


def test_validate_notes_a_calibration_too_small_for_low_bit_gptq(tmp_path, model_dir, text_file):
    """The tiny model's widest layer (down_proj) has 160 inputs: 4 × 32 calibration tokens is under 16 per
    input for GPTQ at 3 bits, in a plain recipe or among an allocation's candidates; 4 bits, RTN, or
    16 × 256 tokens draw no note."""
    def note_of(name, **changes):
        (tmp_path / name).mkdir()
        result = invoke("validate", make_recipe(tmp_path / name, model_dir, text_file, **changes))
        assert result.exit_code == 0, result.output
        return re.findall(r"note: calibration: .*", result.output)

    low_bit = {"default": "int3-g32-gptq", "overrides": []}
    assert note_of("int3", quantize=low_bit) == [
        "note: calibration: 128 tokens for GPTQ at 3 bits or fewer on layers of up to 160 inputs; below about 16 "
        "tokens per input (2,560 here) its result varies widely with the calibration draw and can lose to "
        "round-to-nearest; more calibration, or a larger dampening (`-damp0.1` in the scheme), steadies it "
        '(docs/quality.md, "GPTQ on a small calibration")']
    allocation = {"candidates": ["int2-g32-gptq", "int4-g32-gptq"], "budget": 3.0}
    assert len(note_of("allocated", allocation=allocation)) == 1
    assert note_of("int4", quantize={"default": "int4-g32-gptq", "overrides": []}) == []
    assert note_of("rtn", quantize={"default": "int3-g32-rtn", "overrides": []}) == []
    assert note_of("enough", quantize=low_bit, calibration={"n_samples": 16, "seqlen": 256}) == []


def test_eval_plain_model_directory(model_dir, text_file):
    result = invoke("eval", model_dir, "--dataset", text_file, "--seqlen", 64, "--max-windows", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "full precision" in result.output and "ppl" in result.output


def test_tasks_in_a_run_in_eval_and_on_the_leaderboard(tmp_path, model_dir, text_file, tiny_task_dir):
    """One model three ways (recipe run, plain-model eval, checkpoint eval) gives equal figures and one table."""
    tasks = {"tasks": ["tiny_mc"], "lm_eval": {"limit": 5, "include_path": [str(tiny_task_dir)]}}
    recipe = make_recipe(tmp_path, model_dir, text_file, eval=tasks, output={"dir": str(tmp_path / "runs" / "tiny")})
    assert (ran := invoke("run", recipe, "--quiet")).exit_code == 0, ran.output
    assert "tiny_mc acc_norm (5 docs)" in ran.output
    saved = json.loads((tmp_path / "runs" / "tiny" / "result.json").read_text())
    for side in ("baseline", "quantized"):
        task = saved["tasks"][side]["tasks"]["tiny_mc"]
        assert task["samples"] == 5 and task["lm_eval_task"] == "tiny_mc_local" and 0 <= task["score"] <= 1
    assert {"tasks_baseline", "tasks_quantized"} <= saved["timings_s"].keys()

    same = ["--dataset", text_file, "--seqlen", 64, "--max-windows", 4, "--tasks", "tiny_mc", "--limit", 5,
            "--include-path", tiny_task_dir, "--device", "cpu"]
    plain = invoke("eval", model_dir, *same, "--output", tmp_path / "runs" / "plain")
    assert plain.exit_code == 0, plain.output
    checkpoint = invoke("eval", tmp_path / "runs" / "tiny", *same, "--output", tmp_path / "runs" / "checkpoint")
    assert checkpoint.exit_code == 0, checkpoint.output
    plain_record = json.loads((tmp_path / "runs" / "plain" / "result.json").read_text())
    checkpoint_record = json.loads((tmp_path / "runs" / "checkpoint" / "result.json").read_text())
    assert plain_record["quantization"] is None and checkpoint_record["quantization"]["quantized_layers"] == 14
    assert checkpoint_record["model"] == str(model_dir)  # the checkpoint remembers its base model
    for side, record in (("baseline", plain_record), ("quantized", checkpoint_record)):
        dataset = str(text_file)
        assert record["perplexity"][side][dataset]["ppl"] == pytest.approx(saved["perplexity"][side][dataset]["ppl"],
                                                                            rel=1e-5)
        assert record["tasks"][side]["tasks"]["tiny_mc"]["metrics"] == pytest.approx(
            saved["tasks"][side]["tasks"]["tiny_mc"]["metrics"])

    again = invoke("eval", model_dir, *same, "--output", tmp_path / "runs" / "plain")
    assert again.exit_code == 2 and "--force" in again.output
    no_export = invoke("eval", tmp_path / "runs" / "plain", *same)
    assert no_export.exit_code == 2 and "run directory without a checkpoint" in no_export.output
    reported = invoke("report", tmp_path / "runs", "--out", tmp_path / "report")
    assert reported.exit_code == 0, reported.output
    (group,) = json.loads((tmp_path / "report" / "leaderboard.json").read_text())["groups"]
    assert [row["baseline"] for row in group["rows"]] == [True, False, False]  # one baseline for the model
    assert {row["run"] for row in group["rows"][1:]} == {"tiny", "checkpoint"}
    assert group["rows"][1]["ppl_delta"][str(text_file)] == pytest.approx(
        saved["perplexity"]["quantized"][str(text_file)]["ppl"] - saved["perplexity"]["baseline"][str(text_file)]["ppl"],
        rel=1e-4)


def test_inspect_rejects_a_plain_model(model_dir):
    result = invoke("inspect", model_dir)
    assert result.exit_code == 2 and "not a quantbench checkpoint" in result.output


def test_run_with_gptq_act_order(tmp_path, model_dir, text_file):
    recipe = make_recipe(tmp_path, model_dir, text_file, quantize={"default": "int3-g32-gptq-act", "overrides": []},
                         eval={"baseline": False})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["quantization"]["schemes"] == {"int3-g32-gptq-act": 14}
    assert {"capture", "stats_forward", "solve", "propagate"} <= saved["quantize_breakdown_s"].keys()
    evaluated = invoke("eval", run_dir, "--dataset", text_file, "--seqlen", 64, "--max-windows", 4)
    dataset = str(text_file)
    assert f"{saved['perplexity']['quantized'][dataset]['ppl']:.3f}" in evaluated.output


def test_run_with_model_rotation_and_per_layer_hadamard(tmp_path, model_dir, text_file):
    from quantbench.eval.leaderboard import rows_of_result

    recipe = make_recipe(tmp_path, model_dir, text_file,
                         quantize={"default": "hadamard+int4-g32-gptq-a:int8", "overrides": []})
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "transforms": [{"name": "rotate", "seed": 1}]}))
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    saved = json.loads((run_dir / "result.json").read_text())
    (transform,) = saved["transforms"]
    assert transform["name"] == "rotate" and transform["seed"] == 1 and transform["kind"] == "sylvester"
    assert transform["max_abs_logit_change"] < 1e-4 * transform["max_abs_logit"]
    rotations = saved["quantization"]["rotations"]
    assert len(rotations) == 14 and rotations["model.layers.0.mlp.down_proj"] == "paley20"
    assert "transforms" in saved["timings_s"]
    quantized_row = [row for row in rows_of_result(saved, "run") if not row.baseline][0]
    assert quantized_row.method == "QuaRot Hadamard GPTQ int W+A"
    evaluated = invoke("eval", run_dir, "--dataset", text_file, "--seqlen", 64, "--max-windows", 4)
    assert f"{saved['perplexity']['quantized'][str(text_file)]['ppl']:.3f}" in evaluated.output


def test_run_with_an_interop_export_format(tmp_path, model_dir, text_file):
    from quantbench.export.gptq_format import read_gptq

    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False}, export={"format": "gptq"})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "tiny"
    config, layers, _ = read_gptq(run_dir / "checkpoint-gptq")
    assert len(layers) == 14 and config["quantization_config"]["bits"] == 4
    assert json.loads((run_dir / "result.json").read_text())["interop_checkpoint"] == str(run_dir / "checkpoint-gptq")


def test_run_refuses_an_inexpressible_export_before_evaluating(tmp_path, model_dir, text_file):
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False},
                         quantize={"overrides": [{"pattern": "down_proj", "scheme": "mxfp4-rtn"}]},
                         export={"format": "gptq"})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 2
    assert "mxfp4-rtn: GPTQ stores integer grids only: 2 layers (model.layers.0.mlp.down_proj" in result.output
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_run_applies_the_recipes_autoround_and_scaling_options(tmp_path, model_dir, text_file, streaming):
    """One AutoRound step keeps step 0's state, round to nearest: a run with `autoround: {steps: 1}` scores
    exactly as the RTN run (with the default 200 steps it would not). AWQ's choices land in result.json."""
    def quantized_ppl(name, default, **quantize):
        (tmp_path / name).mkdir()
        recipe = make_recipe(tmp_path / name, model_dir, text_file, model={"streaming": streaming},
                             quantize={"default": default, "overrides": [], **quantize})
        result = invoke("run", recipe, "--quiet")
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / name / "runs" / "tiny" / "result.json").read_text())
        return saved["perplexity"]["quantized"][str(text_file)]["ppl"], saved

    nearest, _ = quantized_ppl("rtn", "int4-g32-rtn")
    one_step, _ = quantized_ppl("one", "int4-g32-autoround", autoround={"steps": 1})
    assert one_step == nearest
    _, saved = quantized_ppl("awq", "awq+int4-g32-rtn", scaling={"grid": 4})
    assert saved["scaled"] and all(r["method"] == "awq" and r["alpha"] in (0, 0.25, 0.5, 0.75)
                                   for r in saved["scaled"].values())


def _imported_at_module_level(tree) -> set[str]:
    """The top-level packages a module's code imports when the module itself is imported (not in functions)."""
    names, pending = set(), list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
        pending.extend(ast.iter_child_nodes(node))
    return names


def test_a_run_without_an_allocation_needs_no_solver(tmp_path, model_dir, text_file):
    """The ILP's solver (PuLP) is imported where an allocation is solved: no module of the package imports it
    when it is imported, and a plain recipe runs where it cannot be imported."""
    from forked import quantbench_command, run_forked

    package = Path(quantbench.__file__).parent
    modules = sorted(package.rglob("*.py"))
    assert len(modules) > 50
    assert [m.name for m in modules if "pulp" in _imported_at_module_level(ast.parse(m.read_text()))] == []
    assert "pulp" in _imported_at_module_level(ast.parse("try:\n    import pulp.apis\nexcept ImportError:\n    pass"))
    recipe = make_recipe(tmp_path, model_dir, text_file, eval={"baseline": False})
    code, _, err = run_forked(quantbench_command, "run", recipe, "--quiet", blocked=("pulp",))
    assert code == 0, err[-2000:]
    assert (tmp_path / "runs" / "tiny" / "result.json").is_file()
