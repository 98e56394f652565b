from contextlib import contextmanager

import pytest
import torch
from helpers import MOE_BUILDERS, tiny_qwen2_moe, tiny_qwen3_moe

from quantbench.calibration.stats import collect_stats, input_sharing
from quantbench.errors import QuantbenchError
from quantbench.experts import ExpertList, StarvedExperts, all_tokens_routed, merge_parallel_experts, split_experts
from quantbench.model_io import block_linears, decoder_blocks, model_linears
from quantbench.pipeline import capture_block_inputs, feed_block, quantize_model
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.scheme import Scheme

CPU = torch.device("cpu")
IDS = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build", MOE_BUILDERS.values(), ids=MOE_BUILDERS.keys())
def test_split_experts_compute_what_the_fused_experts_compute(build):
    model = build()
    with torch.no_grad():
        fused = model(IDS).logits
        blocks = decoder_blocks(model)
        assert any(isinstance(m, ExpertList) for m in blocks.modules())
        assert not any(p.dim() == 3 for name, p in model.named_parameters() if ".experts." in name)
        split = model(IDS).logits
    torch.testing.assert_close(split, fused, rtol=0, atol=16 * torch.finfo(torch.float32).eps * fused.abs().max().item())


def test_all_token_routing_leaves_the_block_output_unchanged():
    model = tiny_qwen3_moe()
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, IDS, CPU, batch_size=2)
    hidden, kwargs = inputs.hidden[0], inputs.kwargs[0]
    with torch.no_grad():
        routed = block(hidden, **kwargs)
        with all_tokens_routed(block):
            every = block(hidden, **kwargs)
    routed, every = (out[0] if isinstance(out, tuple) else out for out in (routed, every))
    torch.testing.assert_close(every, routed, rtol=0, atol=1e-6 * routed.abs().max().item())


def never_route_to(model, expert: int) -> None:
    """Send every token that the router gives `expert` to the next expert instead."""
    for block in decoder_blocks(model):
        def redirect(_module, _args, out):
            logits, weights, index = out
            return logits, weights, torch.where(index == expert, (index + 1) % logits.shape[-1], index)
        block.mlp.gate.register_forward_hook(redirect)


def test_every_expert_gets_statistics_from_all_token_calibration_even_one_the_router_never_picks():
    model = tiny_qwen3_moe()
    never_route_to(model, 3)
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, IDS, CPU, batch_size=2)
    linears = {name: layer for name, layer in block_linears(block).items() if ".experts." in name}
    with collect_stats(linears, set(linears)) as routed:
        feed_block(block, inputs)
    assert routed["mlp.experts.3.gate_proj"].n_samples == 0
    with all_tokens_routed(block), collect_stats(linears, set(linears)) as every:
        feed_block(block, inputs)
    assert {stats.n_samples for stats in every.values()} == {IDS.numel()}
    assert all(torch.isfinite(stats.hessian).all() and stats.hessian.diagonal().gt(0).all() for stats in every.values())


def test_grouping_sees_every_expert_and_stages_run_each_projection_of_all_experts_at_once():
    model = tiny_qwen3_moe()
    never_route_to(model, 3)
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, IDS, CPU, batch_size=2)

    def run_once():
        with all_tokens_routed(block):
            feed_block(block, inputs, batches=1)

    groups = input_sharing(block, block_linears(block), run_once)
    assert ["mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"] in groups
    stages = merge_parallel_experts(groups)
    assert [len(stage) for stage in stages] == [3, 1, 16, 8]
    assert stages[2][:4] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.1.gate_proj",
                             "mlp.experts.1.up_proj"]
    assert all(name.endswith("down_proj") for name in stages[3])


@pytest.mark.parametrize("action", ["all_tokens", "rtn"])
def test_a_starved_expert_is_calibrated_on_every_token_or_rounded_and_recorded(action):
    model = tiny_qwen3_moe()
    never_route_to(model, 3)
    original = {name: layer.weight.detach().clone() for name, layer in model_linears(model).items()}
    starved = {}
    quantized = quantize_model(model, IDS, lambda _name: Scheme.parse("int4-g32-gptq"), CPU, batch_size=2,
                               progress=False, experts=StarvedExperts(min_tokens=1, action=action), starved=starved)
    expected = {f"model.layers.{b}.mlp.experts.3.{p}" for b in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    assert starved.keys() == expected
    assert {note["routed_tokens"] for note in starved.values()} == {0}
    for name in expected:
        rtn = quantize_rtn(original[name], Scheme.parse("int4-g32-rtn"))
        assert starved[name]["action"] == ("rtn" if action == "rtn" else "all-token statistics")
        assert quantized[name].scheme.solver == ("rtn" if action == "rtn" else "gptq")
        assert torch.equal(quantized[name].codes, rtn.codes) == (action == "rtn")


def test_routers_and_the_shared_expert_gate_stay_in_full_precision():
    model = tiny_qwen2_moe()
    routers = {name: p.detach().clone() for name, p in model.named_parameters() if ".gate." in name
               or "shared_expert_gate" in name}
    assert len(routers) == 4
    quantized = quantize_model(model, IDS, lambda _name: Scheme.parse("int4-g32-rtn"), CPU, progress=False)
    assert not any("gate." in name or name.endswith("shared_expert_gate") for name in quantized)
    assert all(torch.equal(p, routers[name]) for name, p in model.named_parameters() if name in routers)
    assert len([name for name in quantized if ".experts." in name]) == 2 * 4 * 3


def test_expert_layouts_that_cannot_be_split_are_refused_by_name():
    model = tiny_qwen3_moe()
    model.model.layers[1].mlp.experts.is_transposed = True
    with pytest.raises(QuantbenchError, match=r"layers\.1|mlp\.experts.*is_transposed"):
        split_experts(model, model.model.layers)


def test_experts_are_free_items_in_the_allocation_or_one_tied_item_per_projection():
    from quantbench.allocation.problem import DEFAULT_TIES, tie_groups

    model = tiny_qwen3_moe()
    layers = [name for name in model_linears(model) if ".layers.0." in name]
    free = tie_groups(layers, DEFAULT_TIES)
    assert ["model.layers.0.mlp.experts.5.gate_proj", "model.layers.0.mlp.experts.5.up_proj"] in free
    assert ["model.layers.0.mlp.experts.5.down_proj"] in free
    assert len(free) == 2 + 8 * 2  # q/k/v, o, and each expert's gate/up and down
    tied = tie_groups(layers, [*DEFAULT_TIES, ("experts",)])
    assert len(tied) == 4
    assert sorted(tied[2]) == sorted(f"model.layers.0.mlp.experts.{e}.{p}" for e in range(8)
                                     for p in ("gate_proj", "up_proj"))
    assert sorted(tied[3]) == sorted(f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(8))


def test_each_expert_is_calibrated_on_every_token_routed_to_it(monkeypatch):
    """A statistics pass may stop early once every hooked layer has run, but not over experts: one not routed
    to in some batch would let the pass stop before the others had all of that batch."""
    import quantbench.pipeline as pipeline

    model, reference = tiny_qwen3_moe(), tiny_qwen3_moe()
    seen = []
    original = pipeline.collect_stats

    @contextmanager
    def recording(*args, **kwargs):
        with original(*args, **kwargs) as stats:
            seen.append(stats)
            yield stats

    monkeypatch.setattr(pipeline, "collect_stats", recording)
    quantize_model(model, IDS, lambda name: Scheme.parse("int4-g32-gptq") if ".experts." in name else None, CPU,
                   batch_size=1, progress=False, experts=StarvedExperts(min_tokens=0))
    block = decoder_blocks(reference)[0]
    inputs = capture_block_inputs(reference, IDS, CPU, batch_size=1)
    linears = {name: layer for name, layer in block_linears(block).items() if name.endswith("gate_proj")}
    with collect_stats(linears, set()) as expected:
        feed_block(block, inputs)
    first = next(stats for stats in seen if "mlp.experts.0.gate_proj" in stats)
    counts = {name: first[name].n_samples for name in linears}
    assert counts == {name: stats.n_samples for name, stats in expected.items()}
    assert sum(counts.values()) == 2 * IDS.numel()  # two experts per token


@pytest.mark.parametrize("build", MOE_BUILDERS.values(), ids=MOE_BUILDERS.keys())
def test_gptq_quantizes_every_expert_of_every_moe_family(build):
    model = build()
    starved = {}
    quantized = quantize_model(model, IDS, lambda _name: Scheme.parse("int4-g32-gptq"), CPU, batch_size=2,
                               progress=False, starved=starved)
    assert quantized.keys() == model_linears(model).keys()
    experts = [name for name in quantized if ".experts." in name]
    assert len(experts) >= 2 * 4 * 3 and all(quantized[n].scheme.solver == "gptq" for n in experts)
    assert all(int(quantized[n].codes.min()) >= 0 and int(quantized[n].codes.max()) <= 15 for n in experts)
    assert set(starved) <= set(experts)  # 64 tokens: some experts starve, and get all-token statistics
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()
