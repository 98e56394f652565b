from pathlib import Path

import pytest
import yaml

from quantbench.errors import QuantbenchError
from quantbench.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def write(tmp_path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    assert load_recipe(path).name == path.stem


@pytest.mark.parametrize("data, message", [
    ({"model": {"name": "m"}, "quantize": {"default": {"bits": 9}}},
     "quantize.default.bits: Input should be less than or equal to 8 (got 9)"),
    ({"model": {"name": "m", "dvice": "cpu"}},
     "model.dvice: unknown key 'dvice' in model; allowed keys: name, dtype, device, trust_remote_code"),
    ({"model": {"name": "m"}, "quantize": {"default": {"solver": "magic"}}},
     "quantize.default.solver: Input should be 'rtn', 'gptq', 'ptqtp' or 'autoround' (got 'magic')"),
    ({"model": {"name": "m", "dtype": "fp8"}}, "model.dtype: Input should be 'auto', 'float32'"),
    ({"model": {"name": "m", "device": "tpu"}}, "model.device: String should match pattern"),
    ({"model": {"name": "m"}, "quantize": {"ignore": ["("]}}, "quantize.ignore: '(' is not a valid regular expression"),
    ({"model": {"name": "m"}, "quantize": {"default": "int4_g128"}}, "quantize.default: scheme name 'int4_g128'"),
    ({"model": {"name": "m"}, "calibration": {"n_samples": 0}}, "calibration.n_samples: Input should be greater"),
    ({"calibration": {}}, "model: required but missing"),
    ({"model": {"name": "m"}, "quantize": {"hessian": "fp16"}}, "quantize.hessian: Input should be 'compensated', 'fp32' or 'tensor_cores'"),
    ({"model": {"name": "m"}, "evaluate": {}}, "unknown key 'evaluate' in the top level; allowed keys: name,"),
    ({"model": {"name": "m"}, "eval": {"tasks": ["piqa", "piqa"]}}, "eval.tasks: each task once: piqa repeated"),
    ({"model": {"name": "m"}, "eval": {"tasks": "piqa"}}, "eval.tasks: give a list of lm-eval task names"),
    ({"model": {"name": "m"}, "eval": {"tasks": [{"name": "piqa", "shots": 5}]}}, "eval.tasks.0.shots: unknown key"),
    ({"model": {"name": "m"}, "eval": {"lm_eval": {"limit": 0}}}, "eval.lm_eval.limit: Input should be greater"),
])
def test_bad_recipes_name_the_field(tmp_path, data, message):
    with pytest.raises(QuantbenchError) as info:
        load_recipe(write(tmp_path, data))
    assert message in str(info.value)
    assert str(info.value).startswith(str(tmp_path / "r.yaml"))


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(QuantbenchError, match="not valid YAML at line"):
        load_recipe(path)


def test_scheme_lookup_order():
    recipe = parse_recipe({"name": "r", "model": {"name": "m"}, "quantize": {
        "default": "int4-g128-rtn", "ignore": [r"layers\.0\."],
        "overrides": [{"pattern": "down_proj", "scheme": "int8-pc-sym-rtn"},
                      {"pattern": "mlp", "scheme": {"bits": 3, "group_size": 64}}]}})
    scheme_for = recipe.quantize.scheme_for
    assert scheme_for("model.layers.0.mlp.down_proj") is None
    assert scheme_for("model.layers.1.mlp.down_proj").name == "int8-pc-sym-rtn"  # first match wins
    assert scheme_for("model.layers.1.mlp.up_proj").name == "int3-g64-rtn"
    assert scheme_for("model.layers.1.self_attn.q_proj").name == "int4-g128-rtn"


def test_defaults_and_hash():
    recipe = parse_recipe({"name": "r", "model": {"name": "m"}})
    assert recipe.quantize.default.name == "int4-g128-rtn" and recipe.quantize.lm_head is None
    assert str(recipe.run_dir) == "runs/r" and str(recipe.export_dir) == "runs/r/checkpoint"
    other = parse_recipe({"name": "r", "model": {"name": "m"}, "quantize": {"default": "int3-g128-rtn"}})
    assert recipe.hash() != other.hash() and recipe.hash() == parse_recipe(recipe.canonical()).hash()


def test_eval_tasks_expand_and_take_their_defaults():
    recipe = parse_recipe({"name": "r", "model": {"name": "m"}, "eval": {
        "tasks": ["piqa", {"name": "hellaswag", "limit": 100, "num_fewshot": 2}],
        "lm_eval": {"limit": 500, "num_fewshot": 0, "include_path": [".assets/lm_eval_tasks"]}}})
    piqa, hellaswag = recipe.eval.task_requests()
    assert (piqa.name, piqa.limit, piqa.num_fewshot) == ("piqa", 500, 0)
    assert (hellaswag.name, hellaswag.limit, hellaswag.num_fewshot) == ("hellaswag", 100, 2)
    suite = parse_recipe({"name": "r", "model": {"name": "m"}, "eval": {"tasks": "zero-shot"}}).eval.tasks
    assert [task.name for task in suite] == ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande",
                                             "lambada_openai", "boolq"]
    assert parse_recipe({"name": "r", "model": {"name": "m"}}).eval.tasks == []


SMOLLM2_RECIPES = [p for p in RECIPES if load_recipe(p).model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"]


@pytest.mark.integration
@pytest.mark.parametrize("path", SMOLLM2_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_pass_the_preflight_on_their_model(path, assets, tmp_path):
    """Schema-valid is not enough: the preflight checks a recipe against its model's config (group sizes
    the export can store, supported families, …). Every recipe written for SmolLM2 must pass it."""
    from quantbench.preflight import preflight

    recipe = load_recipe(path)
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(tmp_path / "run")})})
    if recipe.export.enabled and recipe.export.dir:
        recipe = recipe.model_copy(update={"export": recipe.export.model_copy(update={"dir": str(tmp_path / "ex")})})
    preflight(recipe, force=True, estimate_time=False)
