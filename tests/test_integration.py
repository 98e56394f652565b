"""The real SmolLM2-135M-Instruct and WikiText-2 from the materialized assets (see ../shared/ASSETS.md)."""

import math

import pytest
import torch

from quantbench import load_quantized, save_quantized
from quantbench.calibration import calibration_batches
from quantbench.calibration.sources import load_eval_text
from quantbench.eval.perplexity import perplexity_of_ids, tokenize_eval_text
from quantbench.model_io import load_model, model_linears
from quantbench.pipeline import quantize_linear, quantize_model
from quantbench.scheme import Scheme

pytestmark = pytest.mark.integration
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def wikitext_ids(assets):
    _, tokenizer = load_model(MODEL_ID, torch.float32)
    text, _ = load_eval_text("wikitext2")
    return tokenize_eval_text(tokenizer, text)


def test_perplexity_protocol_matches_the_reference_computation(assets, wikitext_ids):
    model, _ = load_model(MODEL_ID, torch.float32)
    seqlen = 2048
    ours = perplexity_of_ids(model, wikitext_ids, seqlen, max_windows=1)
    with torch.no_grad():  # the reference tool's way: HF's shifted mean loss over one window
        x = wikitext_ids[:seqlen][None]
        reference = math.exp(model(input_ids=x, labels=x).loss.item())
    assert ours.windows == 1 and math.isclose(ours.ppl, reference, rel_tol=1e-4)
    assert 10 < ours.ppl < 40


def test_real_model_quantize_export_load_identical_logits(assets, tmp_path):
    model, tokenizer = load_model(MODEL_ID, torch.float32)
    calibration = calibration_batches(tokenizer, "c4", 2, 64, seed=0)
    quantized = quantize_model(model, calibration, lambda name: Scheme.parse("int4-g128-rtn"),
                               torch.device("cpu"), progress=False)
    assert len(quantized) == 30 * 7
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def rtn_perplexities(assets, wikitext_ids, names: tuple[str, ...]) -> dict[str, float]:
    """First-window perplexity of the dithered copy (weights off any low-bit grid), every linear rounded
    by RTN to each scheme in turn ("fp": untouched)."""
    path = str(assets / "models" / "smollm2-135m-dithered")
    results = {}
    for name in names:
        model, _ = load_model(path, torch.float32)
        if name != "fp":
            for linear in model_linears(model).values():
                quantize_linear(linear, Scheme.parse(name))
        results[name] = perplexity_of_ids(model, wikitext_ids, 2048, max_windows=1).ppl
    return results


def test_dithered_model_perplexity_orders_by_bits(assets, wikitext_ids):
    """fp < int8 < int4 < int3 < int2."""
    results = rtn_perplexities(assets, wikitext_ids, ("fp", "int8-pc-rtn", "int4-g128-rtn", "int3-g128-rtn", "int2-g128-rtn"))
    ppl = list(results.values())
    assert ppl == sorted(ppl), results
    assert ppl[1] < ppl[0] * 1.02  # 8 bits per channel is nearly lossless
    assert ppl[4] > 2 * ppl[0]  # 2 bits is not


def test_gptq_beats_rtn_on_the_dithered_model(assets, wikitext_ids):
    path = str(assets / "models" / "smollm2-135m-dithered")
    _, tokenizer = load_model(path, torch.float32)
    calibration = calibration_batches(tokenizer, "c4", 16, 256, seed=0)
    ppl = {}
    for name in ("int3-g128-rtn", "int3-g128-gptq-act"):
        model, _ = load_model(path, torch.float32)
        scheme = Scheme.parse(name)
        quantize_model(model, calibration, lambda _n: scheme, torch.device("cpu"), progress=False)
        ppl[name] = perplexity_of_ids(model, wikitext_ids, 2048, max_windows=1).ppl
    assert ppl["int3-g128-gptq-act"] < 0.8 * ppl["int3-g128-rtn"], ppl


def test_block_formats_order_by_precision_on_the_dithered_model(assets, wikitext_ids):
    """fp < MXFP6 (E2M3) < NVFP4 < MXFP4 weight-only < MXFP4 weights and activations (README quality table)."""
    results = rtn_perplexities(assets, wikitext_ids, ("fp", "mxfp6e2m3-rtn", "nvfp4-rtn", "mxfp4-rtn", "mxfp4-rtn-a:mxfp4"))
    ppl = list(results.values())
    assert ppl == sorted(ppl), results
    assert ppl[1] < ppl[0] * 1.1  # 6-bit MX is close to full precision


def test_real_model_tasks_offline_well_above_chance_and_int2_falls_to_chance(assets):
    """piqa through lm-eval and the offline task copy: two choices, so chance is 50%."""
    from quantbench.eval.lm_eval_bridge import TaskRequest, run_tasks

    model, tokenizer = load_model(MODEL_ID, torch.float32)
    request = [TaskRequest("piqa", limit=60)]
    full = run_tasks(model, tokenizer, request, include_path=[str(assets / "lm_eval_tasks")], progress=False)
    piqa = full["tasks"]["piqa"]
    assert piqa["lm_eval_task"] == "piqa_local" and piqa["samples"] == 60
    assert piqa["metrics"]["acc"] > 0.6 and piqa["metrics"]["acc_norm"] > 0.6
    for linear in model_linears(model).values():
        quantize_linear(linear, Scheme.parse("int2-pc-rtn"))  # destroys the model (perplexity in the millions)
    broken = run_tasks(model, tokenizer, request, include_path=[str(assets / "lm_eval_tasks")], progress=False)
    assert abs(broken["tasks"]["piqa"]["metrics"]["acc"] - 0.5) < 0.15 < piqa["metrics"]["acc"] - 0.5


def test_rotation_preserves_the_real_model_and_rescues_int4_activations(assets, wikitext_ids):
    """The rotated dithered model gives the same logits. int4 per-token activations collapse on the plain
    model (outlier channels set every token's scale) and stay usable in a rotated basis, whether the whole
    model is rotated (QuaRot) or each layer rotates its own input (hadamard+)."""
    from quantbench.rotation import max_logit_change, rotate_model

    path = str(assets / "models" / "smollm2-135m-dithered")
    window = wikitext_ids[:512][None]
    runs = {"fp": (False, "fp"), "rotated fp": (True, "fp"), "A4": (False, "int8-pc-rtn-a:int4"),
            "rotated A4": (True, "int8-pc-rtn-a:int4"), "W4A4": (False, "int4-pc-rtn-a:int4"),
            "hadamard W4A4": (False, "hadamard+int4-pc-rtn-a:int4")}
    ppl = {}
    for label, (rotated, name) in runs.items():
        model, _ = load_model(path, torch.float32)
        if rotated:
            with torch.no_grad():
                reference = model(input_ids=window).logits
            rotate_model(model)
            assert max_logit_change(model, window, reference) < 1e-3, "rotation must keep the function"
        if name != "fp":
            for linear in model_linears(model).values():
                quantize_linear(linear, Scheme.parse(name))
        ppl[label] = perplexity_of_ids(model, wikitext_ids, 2048, max_windows=1).ppl
    assert math.isclose(ppl["rotated fp"], ppl["fp"], rel_tol=1e-4), ppl
    assert ppl["A4"] > 100 * ppl["fp"], ppl  # measured: 8751 against 20.4
    assert ppl["rotated A4"] < 0.05 * ppl["A4"], ppl  # measured: 53.7
    assert ppl["hadamard W4A4"] < 0.05 * ppl["W4A4"], ppl  # measured: 100 against 13153


def test_allocation_on_the_dithered_model_spends_bits_where_they_pay(assets, wikitext_ids):
    """Two blocks allocated among int2/int3/int4 g128 and int8 at 3 bits: the loss-Hessian traces are mostly
    positive, costs fall with bits, the ILP beats greedy and random on its objective and random in perplexity."""
    from quantbench.allocation.baselines import solve_greedy, solve_random
    from quantbench.allocation.ilp import solve_ilp
    from quantbench.allocation.problem import build_problem
    from quantbench.allocation.sensitivity import CandidateCache, HessianOptions, allocated_weights, sensitivity_table

    model, tokenizer = load_model(str(assets / "models" / "smollm2-135m-dithered"), torch.float32)
    calibration = calibration_batches(tokenizer, "c4", 8, 256, seed=0)
    names = ["int2-g128-gptq", "int3-g128-gptq", "int4-g128-gptq", "int8-pc-rtn"]
    candidates = [Scheme.parse(n) for n in names]
    cache = CandidateCache()
    table = sensitivity_table(model, calibration, lambda layer: candidates if ".layers.0." in layer or
                              ".layers.1." in layer else [], torch.device("cpu"), measure={"trace"},
                              hessian=HessianOptions(samples=2, seqlen=128, max_probes=8), progress=False, cache=cache)
    assert len(table.layers) == 14
    assert sum(info.hessian_trace > 0 for info in table.layers.values()) >= 12
    for layer in table.layers:
        costs = [table.cost(layer, n, "kfac") for n in names]
        assert costs == sorted(costs, reverse=True)
    problem = build_problem(table, "kfac", budget_bits=3.0)
    best, greedy, shuffled = solve_ilp(problem), solve_greedy(problem), solve_random(problem)
    assert best.bits_per_weight <= 3.0 and best.objective <= greedy.objective and best.objective < shuffled.objective
    assert len(set(best.schemes.values())) > 1

    def ppl(schemes):
        with allocated_weights(model, schemes, cache):
            return perplexity_of_ids(model, wikitext_ids, 512, max_windows=4).ppl

    assert ppl(best.schemes) < ppl(shuffled.schemes)
