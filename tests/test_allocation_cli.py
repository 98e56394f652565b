"""`sensitivity`, `allocate` and `run` with an allocation section, on the tiny model."""

import json

import pytest
import yaml
from helpers import invoke

from quantbench.allocation.table import SensitivityTable
from quantbench.export.checkpoint import load_quantized
from quantbench.recipe import parse_recipe

ALLOCATION = {"candidates": ["int2-g32-gptq", "int3-g32-gptq", "int4-g32-gptq", "int8-pc-rtn", "hadamard+int3-pc-gptq"],
              "metric": "output_error", "budget": 3.5}


def write_recipe(tmp_path, model_dir, text_file, allocation=None, **sections):
    data = {"name": "tiny-ilp", "model": {"name": str(model_dir), "dtype": "float32", "device": "cpu"},
            "calibration": {"source": str(text_file), "n_samples": 4, "seqlen": 32},
            "eval": {"perplexity": [str(text_file)], "seqlen": 64, "max_windows": 2},
            "output": {"dir": str(tmp_path / "run")}, **sections}
    if allocation is not False:
        data["allocation"] = {**ALLOCATION, **(allocation or {})}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_searches_applies_and_exports_the_allocation(tmp_path, model_dir, text_file):
    recipe = write_recipe(tmp_path, model_dir, text_file, {"sweep": {"budgets": "2.5:5:0.5", "evaluate": [3.0]},
                                                           "requantize": False})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    saved = json.loads((run / "result.json").read_text())
    allocation = saved["allocation"]
    assert allocation["status"] == "Optimal" and allocation["bits_per_weight"] <= 3.5
    assert saved["quantization"]["avg_bits_per_weight"] == pytest.approx(allocation["bits_per_weight"], rel=1e-3)
    written = yaml.safe_load((run / "allocation.yaml").read_text())["layers"]
    assert written == allocation["layers"] and len(written) == 14
    for block in range(2):
        assert len({written[f"model.layers.{block}.self_attn.{p}_proj"] for p in "qkv"}) == 1
    assert [p["feasible"] for p in allocation["frontier"]] == [False] + [True] * 5  # int2-g32 takes 2.5625 bits
    assert (run / "pareto.png").stat().st_size > 10_000 and (run / "sensitivity.csv").is_file()
    assert allocation["evaluated"][0]["budget"] == 3.0 and allocation["evaluated"][0]["ppl"] > 1
    loaded = load_quantized(run / "checkpoint")
    layers = json.loads((run / "checkpoint" / "config.json").read_text())["quantization_config"]["layers"]
    assert {name: entry["scheme"] for name, entry in layers.items()} == written
    assert loaded is not None


def test_requantize_quantizes_again_with_the_chosen_schemes(tmp_path, model_dir, text_file):
    recipe = write_recipe(tmp_path, model_dir, text_file, {"budget": 4.0})  # requantize is the default
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["quantization"]["avg_bits_per_weight"] <= 4.0
    assert "sensitivity" in saved["quantize_breakdown_s"] and "solve" in saved["quantize_breakdown_s"]


def test_awq_and_autoround_candidates_are_measured_allocated_and_quantized_again(tmp_path, model_dir, text_file):
    candidates = ["awq+int4-g32-rtn", "int4-g32-rtn", "int3-g32-autoround", "int2-g32-gptq", "int8-pc-rtn"]
    recipe = write_recipe(tmp_path, model_dir, text_file, {"candidates": candidates, "budget": 4.0},
                          quantize={"autoround": {"steps": 5}, "scaling": {"grid": 4}})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    table = SensitivityTable.load(run)
    assert set(table.candidates) == set(candidates)
    assert all((layer, c) in table.errors for layer in table.layers for c in candidates)
    saved = json.loads((run / "result.json").read_text())
    chosen = saved["allocation"]["layers"]
    assert saved["quantization"]["avg_bits_per_weight"] <= 4.0
    assert bool(saved.get("scaled")) == any(scheme.startswith("awq+") for scheme in chosen.values())
    assert load_quantized(run / "checkpoint") is not None


def test_sensitivity_then_allocate_then_a_recipe_reading_the_file(tmp_path, model_dir, text_file):
    recipe = write_recipe(tmp_path, model_dir, text_file)
    result = invoke("sensitivity", recipe, "--out", tmp_path / "sens", "--measure", "eigenvalue", "--quiet")
    assert result.exit_code == 0, result.output
    header = (tmp_path / "sens" / "sensitivity.csv").read_text().splitlines()[0]
    assert "cost_eigenvalue" in header and "cost_output_error" in header
    out = tmp_path / "alloc.yaml"
    result = invoke("allocate", recipe, "--table", tmp_path / "sens", "--budget", "3.0", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    chosen = yaml.safe_load(out.read_text())
    assert chosen["bits_per_weight"] <= 3.0 and chosen["solver"] == "ilp"
    greedy = invoke("allocate", recipe, "--table", tmp_path / "sens", "--budget", "3.0", "--solver", "greedy",
                    "--out", tmp_path / "greedy.yaml", "--quiet")
    assert greedy.exit_code == 0, greedy.output
    assert yaml.safe_load((tmp_path / "greedy.yaml").read_text())["objective"] >= chosen["objective"] * (1 - 1e-7)
    follower = write_recipe(tmp_path, model_dir, text_file, allocation=False,
                            quantize={"from_allocation": str(out), "default": "int8-pc-rtn"})
    result = invoke("run", follower, "--quiet", "--force")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "run" / "result.json").read_text())["quantization"]["layers"]
    assert layers == chosen["layers"]


def test_allocate_sweep_and_infeasible_budget(tmp_path, model_dir, text_file):
    recipe = write_recipe(tmp_path, model_dir, text_file)
    assert invoke("sensitivity", recipe, "--out", tmp_path / "sens", "--quiet").exit_code == 0
    result = invoke("allocate", recipe, "--table", tmp_path / "sens", "--sweep", "2:4:0.5", "--out", tmp_path / "p",
                    "--quiet")
    assert result.exit_code == 0, result.output
    frontier = json.loads((tmp_path / "p" / "pareto.json").read_text())["frontier"]
    assert [p["feasible"] for p in frontier] == [False, False, True, True, True]
    costs = [p["objective"] for p in frontier if p["feasible"]]
    assert costs == sorted(costs, reverse=True)
    result = invoke("allocate", recipe, "--table", tmp_path / "sens", "--budget", "2.2", "--out", tmp_path / "x.yaml")
    assert result.exit_code == 2
    table = SensitivityTable.load(tmp_path / "sens")
    smallest = sum(min(table.errors[(layer, c)].storage_bits for c in table.candidates) for layer in table.layers)
    numel = sum(info.numel for info in table.layers.values())
    assert f"smallest candidates need {smallest / numel:.4f} bits per weight" in " ".join(result.output.split())


def test_recipe_checks_of_the_allocation_section(tmp_path, model_dir, text_file):
    base = {"name": "r", "model": {"name": "m"}}
    parsed = parse_recipe({**base, "allocation": {**ALLOCATION, "sweep": {"budgets": "2.5:3:0.25"}}})
    assert parsed.allocation.sweep.budgets == [2.5, 2.75, 3.0]
    for bad, message in [({"budget_bytes": 100}, "not both"),
                         ({"candidates": ["int4-g32-rtn", "int4-g32-rtn"]}, "candidates repeat"),
                         ({"candidates": ["int4-g32-rtn", "mxfp8-rtn-a:mxfp8"]}, "weight-only"),
                         ({"sweep": {"budgets": "3:2:1"}}, "stop ≥ start")]:
        with pytest.raises(Exception, match=message):
            parse_recipe({**base, "allocation": {**ALLOCATION, **bad}})
    with pytest.raises(Exception, match="keep one"):
        parse_recipe({**base, "allocation": ALLOCATION, "quantize": {"from_allocation": "a.yaml"}})


def test_a_run_with_keep_gradients_in_context_rounds_and_a_measured_latency_table(tmp_path, model_dir, text_file):
    """The whole search through `run`: output-Fisher costs (one backward pass), the option of keeping layers
    in full precision under a byte budget, a latency table read from a file, a family per block, two
    in-context rounds; the run records the rounds, kept layers stay dense in the checkpoint."""
    latency = tmp_path / "latency.json"
    latency.write_text(json.dumps({"device": "test", "table": {"^keep$": 2.0, "int8": 1.0, ".": 0.5}}))
    numel = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 160 * 64)  # the tiny model's decoder linears (2 blocks)
    budget = numel * 21 // 8  # room to keep one block in float32 (32 bits) and the other at 8 bits
    recipe = write_recipe(tmp_path, model_dir, text_file, {
        "metric": "output_fisher", "keep_full_precision": True, "family_per_block": True, "budget": None,
        "budget_bytes": budget, "latency": {"table_file": str(latency), "budget_us": 1.0}, "rounds": 2})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    allocation = saved["allocation"]
    assert allocation["bytes"] <= budget and allocation["latency_us"] <= 1.0
    assert [r["round"] for r in allocation["rounds"]][:2] == [0, 1]
    kept = [name for name, scheme in allocation["layers"].items() if scheme == "keep"]
    assert len(kept) == 7  # one whole block: a family per block
    stored = json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text())["quantization_config"]["layers"]
    assert set(stored) == set(allocation["layers"]) - set(kept)
    for block in range(2):
        schemes = [s for n, s in allocation["layers"].items() if f"layers.{block}." in n]
        families = {"dense" if s == "keep" else "mx" if s.startswith("mx") else "int" for s in schemes}
        assert len(families) == 1
    assert "gradients" in saved["quantize_breakdown_s"] and "in_context" in saved["quantize_breakdown_s"]


def test_latency_table_file_problems_are_one_line(tmp_path, model_dir, text_file):
    (tmp_path / "latency.json").write_text("{}")
    recipe = write_recipe(tmp_path, model_dir, text_file, {"latency": {"table_file": str(tmp_path / "latency.json"),
                                                                       "budget_us": 1.0}})
    result = invoke("allocate", recipe, "--budget", "3", "--quiet")
    assert result.exit_code == 2 and "not a latency table" in result.output


@pytest.mark.parametrize("requantize", [True, False])
def test_an_allocation_run_on_experts_follows_the_recipes_starved_expert_policy(tmp_path, tokenizer, text_file,
                                                                                requantize):
    """The search and its final quantization use `quantize.experts` like a plain run, and result.json says
    which experts starved and what they got: RTN when requantizing, the candidates' all-token codes when not."""
    from helpers import tiny_qwen3_moe

    model_dir = tmp_path / "moe"
    tiny_qwen3_moe(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = write_recipe(tmp_path, model_dir, text_file,
                          {"candidates": ["int4-g32-gptq", "int8-pc-rtn"], "budget": 6.0, "requantize": requantize},
                          quantize={"default": "int4-g32-gptq", "experts": {"min_tokens": 10_000, "starved": "rtn"}})
    result = invoke("run", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    starved = saved["starved_experts"]
    layers = saved["allocation"]["layers"]
    solved = {name for name, scheme in layers.items() if ".experts." in name and scheme.endswith("gptq")}
    assert sum(".experts." in name for name in layers) == 2 * 8 * 3 and solved
    assert set(starved) == solved  # 10,000 tokens: every expert starves; those allocated RTN read no statistics
    actions = {note["action"] for note in starved.values()}
    assert actions == ({"rtn"} if requantize else {"all-token statistics"})
