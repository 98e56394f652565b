"""The sensitivity stage on a tiny model: candidate errors from first principles, proxies, measured KL,
the cache the final allocation reuses, and the table's files."""

import re

import pytest
import torch

from helpers import tiny_llama
from quantbench.allocation.sensitivity import (CandidateCache, HessianOptions, allocated_weights,
                                               apply_allocation, sensitivity_table, top_eigenvalue_psd)
from quantbench.allocation.table import SensitivityTable
from quantbench.scheme import Scheme

CANDIDATES = [Scheme.parse(n) for n in ("int2-g32-gptq", "int3-g32-gptq", "int4-g32-gptq", "int8-pc-rtn",
                                        "hadamard+int3-pc-gptq")]


def peaked_llama():
    return tiny_llama(layers=2, init_std=0.1).float()  # KL of 1e-6..1e-1, far above rounding noise


@pytest.fixture(scope="module")
def measured():
    model = peaked_llama()
    ids = torch.randint(0, 320, (8, 48), generator=torch.Generator().manual_seed(1))
    cache = CandidateCache()
    table = sensitivity_table(model, ids, lambda name: [] if "layers.1.mlp" in name else CANDIDATES,
                              torch.device("cpu"), measure={"trace", "eigenvalue", "kl"},
                              hessian=HessianOptions(samples=4, seqlen=48, max_probes=12, power_iters=8),
                              kl_samples=4, batch_size=4, progress=False, cache=cache)
    return model, ids, table, cache


def test_every_allocated_layer_has_every_candidate(measured):
    _, _, table, cache = measured
    assert len(table.layers) == 7 + 4 and not any("layers.1.mlp" in name for name in table.layers)
    assert len(table.errors) == len(table.layers) * len(CANDIDATES)
    assert all(key in cache for key in table.errors)
    assert set(table.available_metrics()) == {"hutchinson", "eigenvalue", "xtx_trace", "xtx_eig", "output_error",
                                              "kfac", "kl"}


def test_errors_shrink_as_bits_grow(measured):
    _, _, table, _ = measured
    for layer in table.layers:
        ladder = [table.errors[(layer, f"int{b}-{g}")] for b, g in ((2, "g32-gptq"), (3, "g32-gptq"),
                                                                    (4, "g32-gptq"), (8, "pc-rtn"))]
        assert [e.weight_error for e in ladder] == sorted((e.weight_error for e in ladder), reverse=True)
        assert [e.output_error for e in ladder] == sorted((e.output_error for e in ladder), reverse=True)
        assert all(a.kl > 2 * b.kl for a, b in zip(ladder, ladder[1:])), [e.kl for e in ladder]
        assert ladder[-1].kl > 0


def layer_inputs(model, ids, layer_name):
    seen = []
    handle = model.get_submodule(layer_name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in ids.split(4):
            model(input_ids=batch)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


@pytest.mark.parametrize("scheme", ["int3-g32-gptq", "hadamard+int3-pc-gptq"])
def test_output_error_and_storage_from_first_principles(measured, scheme):
    model, ids, table, cache = measured
    layer = "model.layers.1.self_attn.o_proj"
    x = layer_inputs(model, ids, layer).double()
    weight = model.get_submodule(layer).weight.detach().double()
    effective = cache.effective_weight(layer, scheme, torch.float64)
    delta = effective - weight
    error = table.errors[(layer, scheme)]
    assert error.output_error == pytest.approx(float((x @ delta.T).square().sum(1).mean()), rel=1e-4)
    assert error.weight_error == pytest.approx(float(delta.square().sum()), rel=1e-4)
    assert error.storage_bits == cache.get(layer, scheme).storage_bits
    info = table.layers[layer]
    assert info.xtx_trace == pytest.approx(float(x.square().sum(1).mean()), rel=1e-5)
    assert info.xtx_top_eig == pytest.approx(float(torch.linalg.eigvalsh(x.T @ x / len(x))[-1]), rel=1e-4)


def test_costs_follow_their_definitions(measured):
    _, _, table, _ = measured
    layer, scheme = "model.layers.0.mlp.down_proj", "int2-g32-gptq"
    info, error = table.layers[layer], table.errors[(layer, scheme)]
    assert info.hessian_probes >= 8 and info.hessian_trace_stderr > 0
    curvature = max(info.hessian_trace, info.hessian_trace_stderr)
    assert table.cost(layer, scheme, "hutchinson") == pytest.approx(curvature * error.weight_error)
    assert table.cost(layer, scheme, "eigenvalue") == pytest.approx(max(info.top_eigenvalue, 0) * error.weight_error)
    assert table.cost(layer, scheme, "xtx_trace") == pytest.approx(info.xtx_trace / info.in_features * error.weight_error)
    noisy = next(i for i in table.layers.values() if i.hessian_trace < i.hessian_trace_stderr)
    assert table.cost(noisy.name, scheme, "hutchinson") > 0  # a trace lost in its noise still costs something
    kfac = curvature * info.numel / (info.xtx_trace * info.out_features) * error.output_error
    assert table.cost(layer, scheme, "kfac") == pytest.approx(kfac)


def test_lobpcg_top_eigenvalue_matches_eigvalsh():
    x = torch.randn(4000, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 7] *= 20
    xtx = x.T @ x / len(x)
    assert top_eigenvalue_psd(xtx) == pytest.approx(float(torch.linalg.eigvalsh(xtx)[-1]), rel=1e-6)


def test_cached_candidates_apply_exactly(measured):
    model, ids, table, cache = measured
    schemes = {layer: "hadamard+int3-pc-gptq" if "o_proj" in layer else "int4-g32-gptq" for layer in table.layers}
    reference = model(input_ids=ids[:2]).logits
    with allocated_weights(model, schemes, cache):
        swapped = model(input_ids=ids[:2]).logits
    assert torch.equal(model(input_ids=ids[:2]).logits, reference)
    copy = peaked_llama()
    quantized = apply_allocation(copy, schemes, cache)
    assert set(quantized) == set(schemes)
    applied = copy(input_ids=ids[:2]).logits  # o_proj rotates its input online here
    scale = reference.abs().max().item()
    assert torch.allclose(applied, swapped, atol=1e-5 * scale)
    assert not torch.allclose(applied, reference, atol=1e-2 * scale)


def test_model_rotated_layers_keep_their_online_rotation(tmp_path):
    from quantbench.activations import input_rotation_of
    from quantbench.rotation import rotate_model

    model = tiny_llama(layers=1).float()
    rotate_model(model)
    down = model.model.layers[0].mlp.down_proj
    model_rotation = input_rotation_of(down)
    ids = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    cache = CandidateCache()
    table = sensitivity_table(model, ids, lambda name: [Scheme.parse("hadamard+int4-g32-gptq"), CANDIDATES[3]],
                              torch.device("cpu"), progress=False, cache=cache)
    scheme = "hadamard+int4-g32-gptq"
    assert ("model.layers.0.mlp.down_proj", scheme) not in cache.rotated
    assert ("model.layers.0.self_attn.q_proj", scheme) in cache.rotated
    schemes = {layer: scheme for layer in table.layers}
    with allocated_weights(model, schemes, cache):
        swapped = model(input_ids=ids).logits
    cache.save(tmp_path / "codes.safetensors")
    apply_allocation(model, schemes, CandidateCache.load(tmp_path / "codes.safetensors"))
    assert input_rotation_of(down) is model_rotation
    assert torch.allclose(model(input_ids=ids).logits, swapped, atol=1e-4)


def test_cache_file_round_trip(measured, tmp_path):
    _, _, table, cache = measured
    cache.save(tmp_path / "codes.safetensors")
    loaded = CandidateCache.load(tmp_path / "codes.safetensors")
    assert set(loaded.weights) == set(cache.weights)
    for layer, scheme in [("model.layers.0.mlp.down_proj", "hadamard+int3-pc-gptq"),
                          ("model.layers.1.self_attn.q_proj", "int2-g32-gptq")]:
        assert torch.equal(loaded.effective_weight(layer, scheme, torch.float32),
                           cache.effective_weight(layer, scheme, torch.float32))


def test_table_files_round_trip(measured, tmp_path):
    _, _, table, _ = measured
    json_path, csv_path = table.save(tmp_path)
    loaded = SensitivityTable.load(tmp_path)
    assert loaded.layers == table.layers and loaded.errors == table.errors
    assert set(loaded.meta["seconds"]) == {"candidates", "trace", "eigenvalue", "kl"}
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 1 + len(table.errors) and "cost_kfac" in lines[0]


def block_output_costs(build, reuse_probes: bool, model=None, blocks: str = ""):
    """block_output costs of every (layer, candidate), and how many times each block's first linear (the
    query projection, or GPT-NeoX's fused query/key/value) computed (a served call returns without).
    `blocks`: a pattern the names of the layers measured match (all of them by default)."""
    import copy

    from helpers import FAMILY_BUILDERS

    from quantbench.allocation.gradients import gradient_stats
    from quantbench.allocation.sensitivity import SensitivityStage
    from quantbench.experts import StarvedExperts
    from quantbench.model_io import decoder_blocks, model_linears
    from quantbench.pipeline import drive_blocks

    model = FAMILY_BUILDERS[build]() if model is None else model
    ids = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(5))
    names = list(model_linears(model))  # experts split into their linears first
    grads = gradient_stats(copy.deepcopy(model), ids, names, torch.device("cpu"), progress=False)
    calls = []
    for block in decoder_blocks(model):
        first = next(module for module in block.modules() if isinstance(module, torch.nn.Linear))

        def computing(x, layer=first):
            calls.append(1)
            return torch.nn.Linear.forward(layer, x)

        first.forward = computing
    candidates = [Scheme.parse("int3-g32-rtn"), Scheme.parse("int4-g32-rtn")]
    stage = SensitivityStage(lambda name: candidates if re.search(blocks, name) else [], CandidateCache(), grads,
                             block_tokens=96,
                             experts=StarvedExperts(min_tokens=0), reuse_probes=reuse_probes)
    drive_blocks(model, ids, torch.device("cpu"), [stage], batch_size=2, progress=False)
    return {key: error.block_output for key, error in stage.errors.items()}, len(calls)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_block_output_probes_served_what_the_reference_computed_give_the_same_costs(family):
    """Each (layer, candidate) probe of the block_output measure is served what the block's reference forward
    computed before that layer (and a submodule returning the layer's output, the layer on its recorded
    input): the costs are those of running the whole block, bit for bit, in dense and MoE families, post-norm
    and parallel-residual blocks; fewer layers run."""
    ours, ran = block_output_costs(family, reuse_probes=True)
    theirs, ran_whole = block_output_costs(family, reuse_probes=False)
    assert ours.keys() == theirs.keys() and all(value > 0 for value in theirs.values())
    assert all(ours[key] == theirs[key] for key in ours)
    assert ran < ran_whole


def test_block_output_probes_compute_the_query_projection_only_where_it_cannot_be_served():
    """Tiny Llama, 2 blocks, probes on 2 batches, 2 candidates for each of its 7 layers. Without serving every
    probe computes q_proj: 7 × 2 × 2 = 28 a block. Served, only q_proj's own probes do: 24 fewer a block (the
    statistics pass and the reference forward compute it as before)."""
    _, ran = block_output_costs("llama", reuse_probes=True)
    _, ran_whole = block_output_costs("llama", reuse_probes=False)
    assert ran_whole - ran == 2 * (28 - 4)


@pytest.mark.parametrize("change", ["input", "output"])
def test_block_output_probes_are_not_served_what_the_forward_changed_in_place(monkeypatch, change):
    """Attention that adds to its input in place after reading it (input_layernorm's recorded output, then no
    longer what input_layernorm returns), or doubles o_proj's output in place before returning it (attention
    then no longer returns o_proj's output as o_proj returned it): the first batch's check sees it and those
    are computed, not served; the costs are those of running the whole block."""
    from quantbench.model_io import decoder_blocks

    attention = type(decoder_blocks(tiny_llama())[0].self_attn)
    own = attention.forward

    def changing(self, hidden_states, *args, **kwargs):
        out = own(self, hidden_states, *args, **kwargs)
        if change == "input":
            hidden_states.add_(1.0)
        else:
            out[0].mul_(2.0)
        return out

    monkeypatch.setattr(attention, "forward", changing)
    ours, _ = block_output_costs("llama", reuse_probes=True)
    theirs, _ = block_output_costs("llama", reuse_probes=False)
    assert all(ours[key] == theirs[key] for key in ours)


def test_block_output_probes_of_experts_some_batches_did_not_route_to(monkeypatch):
    """32 experts, 2 a token, 64 tokens a batch: some expert runs in one probe batch and not in the other (in
    block 0, the one measured, five of them). A batch serves what it ran, a probe of such an expert runs only
    where the reference did: the same costs."""
    from helpers import tiny_qwen3_moe

    from quantbench.allocation import probe_serving

    ran: list[set[str]] = []
    own_recorded = probe_serving.ProbeServing.recorded

    def recorded(self, batch, forward):
        seen = set()
        handles = [self.modules[name].register_forward_pre_hook(lambda *_, name=name: seen.add(name))
                   for name in self.layers]
        try:
            return own_recorded(self, batch, forward)
        finally:
            for handle in handles:
                handle.remove()
            ran.append(seen)

    monkeypatch.setattr(probe_serving.ProbeServing, "recorded", recorded)
    ours, _ = block_output_costs("qwen3_moe", True, tiny_qwen3_moe(experts=32), blocks=r"layers\.0\.")
    assert len(ran) == 2 and ran[0] != ran[1]  # the block's two probe batches
    theirs, _ = block_output_costs("qwen3_moe", False, tiny_qwen3_moe(experts=32), blocks=r"layers\.0\.")
    assert ours.keys() == theirs.keys() and all(ours[key] == theirs[key] for key in ours)
    assert len(ours) == 2 * (4 + 32 * 3)  # two candidates of block 0's attention and experts
