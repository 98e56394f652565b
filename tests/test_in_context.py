"""The allocation search in context: gradient measures from first principles, candidate costs re-measured
on the inputs quantized upstream blocks give (equal to a direct recomputation), and a loop that ends."""

import copy

import pytest
import torch
from helpers import tiny_llama

from quantbench.allocation.gradients import gradient_stats
from quantbench.allocation.ilp import solve_ilp
from quantbench.allocation.in_context import frontier_candidates, neighbour_candidates, search_in_context
from quantbench.allocation.problem import DEFAULT_TIES, build_problem
from quantbench.allocation.sensitivity import CandidateCache, SensitivityStage, sensitivity_table
from quantbench.calibration.stats import LayerStats
from quantbench.model_io import model_linears
from quantbench.pipeline import QuantizeStage, drive_blocks, quantize_model
from quantbench.quantizers import quantize_weight
from quantbench.scheme import Scheme

CPU = torch.device("cpu")
IDS = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(5))
RTN = [Scheme.parse(n) for n in ("int2-g32-rtn", "int3-g32-rtn", "int4-g32-rtn", "hadamard+int3-g32-rtn", "int8-pc-rtn")]


def peaked_llama():
    return tiny_llama(layers=3, init_std=0.1).float()


def test_gradient_statistics_from_first_principles():
    """grad = ∂L/∂W per token; fisher = Σ_t g_t²(x_t²)ᵀ / T and out_sq = Σ_t g_t² / T with g_t = ∂L/∂y_t,
    computed here with autograd on the layer's output."""
    model = peaked_llama()
    name = "model.layers.1.mlp.up_proj"
    stats = gradient_stats(model, IDS, [name], CPU, batch_size=3, progress=False)
    layer = model.get_submodule(name)
    grad, fisher, out_sq, tokens = 0, 0, 0, 0
    for batch in IDS.split(3):
        seen = {}
        handle = layer.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
        with torch.enable_grad():
            logits = model(input_ids=batch).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                     reduction="sum")
            g, = torch.autograd.grad(loss, seen["y"])
        handle.remove()
        x, g = seen["x"].detach().flatten(0, 1), g.flatten(0, 1)
        grad = grad + g.T @ x
        fisher = fisher + (g.square().T @ x.square())
        out_sq = out_sq + g.square().sum(0)
        tokens += batch[:, 1:].numel()
    assert stats.tokens == tokens
    for ours, theirs in ((stats.layers[name].grad, grad), (stats.layers[name].fisher, fisher),
                         (stats.layers[name].out_sq, out_sq)):
        torch.testing.assert_close(ours, theirs / tokens, rtol=1e-4, atol=1e-9)
    assert set(stats.blocks) == {"model.layers.0", "model.layers.1", "model.layers.2"}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # as it was


def test_costs_measured_in_context_equal_a_direct_recomputation():
    """One round of the driver with [sensitivity, quantize]: a block-2 layer's candidates are measured on the
    inputs that blocks 0–1, quantized under the allocation, give it; recomputed directly here from the model
    with those two blocks quantized, the errors agree, and they differ from the full-precision ones."""
    model = peaked_llama()
    grads = gradient_stats(model, IDS, list(model_linears(model)), CPU, progress=False)
    allocation = {name: RTN[0] if "mlp" in name else RTN[2] for name in model_linears(model)}
    fp_costs = SensitivityStage(lambda name: RTN, CandidateCache(), grads)
    drive_blocks(copy.deepcopy(model), IDS, CPU, [fp_costs], batch_size=3, progress=False)
    measured = SensitivityStage(lambda name: RTN if ".layers.2." in name else [], CandidateCache(), grads)
    drive_blocks(copy.deepcopy(model), IDS, CPU, [measured, QuantizeStage(allocation.get)], batch_size=3,
                 progress=False)

    direct = copy.deepcopy(model)
    quantize_model(direct, IDS, lambda name: allocation[name] if ".layers.2." not in name else None, CPU,
                   batch_size=3, progress=False)
    name = "model.layers.2.self_attn.o_proj"
    layer = direct.get_submodule(name)
    stats = LayerStats(wants_hessian=True)
    handle = layer.register_forward_pre_hook(lambda m, a: stats.update(a[0]))
    with torch.no_grad():
        direct(input_ids=IDS)
    handle.remove()
    for scheme in RTN[:3] + RTN[4:]:
        delta = quantize_weight(layer.weight.data, scheme, stats).dequantize() - layer.weight.data
        error = measured.errors[(name, scheme.name)]
        output_error = float(((delta @ stats.xtx) * delta).sum()) / stats.n_samples
        assert error.output_error == pytest.approx(output_error, rel=1e-4)
        gradients = grads.layers[name]
        assert error.fisher == pytest.approx(0.5 * float((gradients.fisher * delta.square()).sum()), rel=1e-4)
        assert error.first_order == pytest.approx(float((gradients.grad * delta).abs().sum()), rel=1e-4)
        assert abs(error.output_error / fp_costs.errors[(name, scheme.name)].output_error - 1) > 0.01


def allocate_at(bits, metric="output_fisher"):
    return lambda table: solve_ilp(build_problem(table, metric, budget_bits=bits))


@pytest.mark.parametrize("rounds,remeasure", [(0, "frontier"), (1, "frontier"), (3, "frontier"), (2, "neighbours")])
def test_the_in_context_loop_ends_and_leaves_the_model_quantized_with_its_allocation(rounds, remeasure):
    model = peaked_llama()
    grads = gradient_stats(model, IDS, list(model_linears(model)), CPU, progress=False)
    cache = CandidateCache()
    candidates = [Scheme.parse(n) for n in ("int2-g32-gptq", "int3-g32-gptq", "int4-g32-gptq", "int8-pc-rtn")]
    table = sensitivity_table(model, IDS, lambda name: candidates, CPU, batch_size=3, progress=False, cache=cache,
                              gradients=grads)
    found = search_in_context(model, IDS, lambda name: candidates, CPU, allocate_at(3.5), table, "output_fisher",
                              DEFAULT_TIES, max_rounds=rounds, remeasure=remeasure, gradients=grads, batch_size=3,
                              cache=cache, progress=False)
    assert len(found.rounds) <= rounds + 1 and found.rounds[0].round == 0
    assert found.converged == (found.rounds[-1].changed_layers == 0 and rounds > 0)
    assert {name: q.scheme.name for name, q in found.quantized.items()} == found.allocation.schemes
    for name, weight in found.quantized.items():  # the model computes with exactly these codes
        assert torch.equal(model.get_submodule(name).weight.data, weight.dequantize())
    assert found.allocation.bits_per_weight <= 3.5
    if rounds:
        assert found.table.meta["rounds"]["1"] > 0


def test_a_repeating_allocation_stops_the_loop():
    """Costs that flip every round (an allocator alternating between two answers) end at the first repeat."""
    model = peaked_llama()
    table = sensitivity_table(model, IDS, lambda name: RTN[:3], CPU, batch_size=3, progress=False)
    answers = [allocate_at(3.2, "output_error"), allocate_at(4.2, "output_error")]
    calls = []

    def alternate(t):
        calls.append(1)
        return answers[len(calls) % 2](t)

    found = search_in_context(model, IDS, lambda name: RTN[:3], CPU, alternate, table, "output_error",
                              DEFAULT_TIES, max_rounds=10, batch_size=3, progress=False)
    assert not found.converged and len(found.rounds) < 11  # stopped before its ten rounds: an answer came back
    assert found.rounds[-1].allocation.schemes in [r.allocation.schemes for r in found.rounds[:-1]]
    assert {name: q.scheme.name for name, q in found.quantized.items()} == found.allocation.schemes


def test_neighbours_are_the_chosen_option_and_the_frontier_options_next_to_it_by_size():
    model = peaked_llama()
    table = sensitivity_table(model, IDS, lambda name: RTN, CPU, batch_size=3, progress=False)
    allocation = allocate_at(3.6, "output_error")(table)
    frontier = frontier_candidates(table, "output_error", DEFAULT_TIES)
    near = neighbour_candidates(table, "output_error", DEFAULT_TIES, allocation.schemes)
    assert near.keys() == frontier.keys() == allocation.schemes.keys()
    for layer, chosen in allocation.schemes.items():
        size = {s: table.errors[(layer, s)].storage_bits for s in frontier[layer]}
        ordered = sorted(frontier[layer], key=size.get)
        at = ordered.index(chosen)  # the ILP never picks a dominated option
        assert near[layer] == ordered[max(0, at - 1):at + 2]
    assert sum(map(len, near.values())) < sum(map(len, frontier.values()))  # fewer pairs to measure


def test_in_context_rounds_with_block_output_are_the_same_with_probes_served(monkeypatch):
    """The block_output metric through round 0 and two in-context rounds (each block measured, then quantized
    by the next stage of the same driver): the costs and the allocation are those of probes that run the whole
    block."""
    from quantbench.allocation import sensitivity

    own_init = sensitivity._BlockProbe.__init__

    def search(reuse: bool):
        monkeypatch.setattr(sensitivity._BlockProbe, "__init__",
                            lambda self, ctx, gradients, tokens, _reuse=True: own_init(self, ctx, gradients, tokens,
                                                                                       reuse))
        model = peaked_llama()
        grads = gradient_stats(copy.deepcopy(model), IDS, list(model_linears(model)), CPU, progress=False)
        table = sensitivity_table(model, IDS, lambda name: RTN, CPU, progress=False, gradients=grads,
                                  block_tokens=96, batch_size=2)
        return search_in_context(model, IDS, lambda name: RTN, CPU, allocate_at(3.5, "block_output"), table,
                                 "block_output", DEFAULT_TIES, max_rounds=2, gradients=grads, block_tokens=96,
                                 batch_size=2, progress=False)

    served, whole = search(True), search(False)
    assert served.table.errors.keys() == whole.table.errors.keys()
    assert all(served.table.errors[k].block_output == whole.table.errors[k].block_output for k in whole.table.errors)
    assert served.allocation.schemes == whole.allocation.schemes
