import pytest
import torch
from helpers import (FAMILY_BUILDERS, MOE_BUILDERS, tiny_deepseek_v3, tiny_gemma2, tiny_gemma3_text, tiny_gpt_neox,
                     tiny_llama, tiny_opt, tiny_phi3)

from quantbench.calibration.stats import LayerStats, collect_stats, input_sharing
from quantbench.errors import QuantbenchError
from quantbench.model_io import block_linears, check_supported, decoder_blocks, model_linears
from quantbench.pipeline import capture_block_inputs, quantize_model, run_block
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme

CPU = torch.device("cpu")


def calibration_ids(vocab=320, n=6, seqlen=32, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("build", FAMILY_BUILDERS.values(), ids=FAMILY_BUILDERS.keys())
def test_rtn_through_the_pipeline_equals_rtn_layer_by_layer(build):
    model = build()
    reference = {name: quantize_rtn(layer.weight.data, Scheme(bits=3, group_size=32))
                 for name, layer in model_linears(model).items()}
    quantized = quantize_model(model, calibration_ids(), lambda name: Scheme(bits=3, group_size=32), CPU,
                               batch_size=4, progress=False)
    assert quantized.keys() == reference.keys() and len(quantized) >= 8
    for name, layer in model_linears(model).items():
        assert torch.equal(quantized[name].codes, reference[name].codes)
        assert torch.equal(quantized[name].scales, reference[name].scales)
        assert torch.equal(layer.weight.data, reference[name].dequantize())


@pytest.mark.parametrize("build", FAMILY_BUILDERS.values(), ids=FAMILY_BUILDERS.keys())
def test_propagated_activations_match_a_full_forward_of_the_quantized_model(build):
    """Each block must get what the quantized model really gives it: the captured keyword arguments
    (attention mask, position ids, rotary embeddings) have to pass through correctly for every family, and
    sliding-window blocks need their own masks (with block 0's everywhere, Qwen2's last block was 0.05 off)."""
    model = build()
    ids = calibration_ids()
    quantize_model(model, ids, lambda name: Scheme(bits=4, group_size=32), CPU, batch_size=4, progress=False)
    inputs = capture_block_inputs(model, ids, CPU, batch_size=4)
    for index, block in enumerate(decoder_blocks(model)):
        inputs.block = index
        inputs.hidden = run_block(block, inputs)
    seen = []
    handle = decoder_blocks(model)[-1].register_forward_hook(lambda m, a, out: seen.append(
        out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    assert torch.allclose(torch.cat(inputs.hidden), seen[0], atol=1e-5)


def test_ignored_and_overridden_layers():
    model = tiny_llama()
    original = {n: l.weight.detach().clone() for n, l in model_linears(model).items()}
    section = QuantizeSection(default="int4-g32-rtn", ignore=[r"\.0\.self_attn\."],
                              overrides=[{"pattern": "down_proj", "scheme": "int8-pc-sym-rtn"}])
    quantized = quantize_model(model, calibration_ids(), section.scheme_for, CPU, progress=False)
    layers = model_linears(model)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        full = f"model.layers.0.self_attn.{name}"
        assert full not in quantized and torch.equal(layers[full].weight, original[full])
    assert quantized["model.layers.1.mlp.down_proj"].scheme.name == "int8-pc-sym-rtn"
    assert quantized["model.layers.1.mlp.up_proj"].scheme.name == "int4-g32-rtn"
    assert len(quantized) == 10


def test_layer_stats_hessian_equals_direct_computation():
    model = tiny_llama()
    ids = calibration_ids(n=4, seqlen=16)
    block = decoder_blocks(model)[0]
    inputs = capture_block_inputs(model, ids, CPU, batch_size=2)
    linears = block_linears(block)
    seen = []
    handle = linears["mlp.down_proj"].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with collect_stats(linears, hessian_for={"mlp.down_proj"}) as stats:
        run_block(block, inputs)
    handle.remove()
    x = torch.cat(seen)
    assert stats["mlp.down_proj"].n_samples == 4 * 16 == x.shape[0]
    assert torch.allclose(stats["mlp.down_proj"].hessian, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(stats["mlp.down_proj"].act_absmax, x.abs().amax(0))
    assert stats["self_attn.q_proj"].xtx is None  # only asked-for Hessians are accumulated


@pytest.mark.parametrize("scheme", ["int8-g32-rtn", "int8-g32-gptq-act"])
@pytest.mark.parametrize("build, expected", [(tiny_opt, 12), (tiny_gpt_neox, 8), (tiny_gemma2, 28),
                                             (tiny_gemma3_text, 28), (tiny_phi3, 8)])
def test_other_families_run_through_the_pipeline(build, expected, scheme):
    model = build()
    ids = calibration_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    quantized = quantize_model(model, ids, lambda name: Scheme.parse(scheme), CPU, progress=False)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert len(quantized) == expected
    assert not torch.equal(before, after)
    assert (before - after).abs().max() < 0.05 * before.abs().max()  # 8 bits barely moves the logits


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(QuantbenchError, match="not supported; supported families: Llama"):
        check_supported(GPT2Config())


def test_the_float32_gram_summed_above_the_diagonal_is_the_whole_symmetric_sum():
    """Widths past the 256-wide leaf (odd splits included): the Gram matrix collect_stats leaves is exactly
    symmetric and within float32's summation bound (n·eps·Σ|x_i||x_j|) of the float64 sum, everywhere."""
    generator = torch.Generator().manual_seed(0)
    for width in (257, 700, 1100):
        linear = torch.nn.Linear(width, 3)
        batches = [torch.randn(2, 37, width, generator=generator) for _ in range(3)]
        with collect_stats({"layer": linear}, hessian_for={"layer"}) as stats:
            for x in batches:
                linear(x)
        xtx = stats["layer"].xtx
        flat = torch.cat(batches).reshape(-1, width).double()
        bound = flat.shape[0] * torch.finfo(torch.float32).eps * (flat.abs().T @ flat.abs())
        assert torch.equal(xtx, xtx.T)
        assert ((xtx.double() - flat.T @ flat).abs() <= bound).all()
        assert stats["layer"].n_samples == flat.shape[0]


def test_tensor_core_hessian_modes_fall_back_to_float32_off_cuda():
    x = torch.randn(3, 40, 16).bfloat16()
    exact = LayerStats(wants_hessian=True, accumulation="fp32")
    requested = [LayerStats(wants_hessian=True, accumulation=mode) for mode in ("compensated", "tensor_cores")]
    for stats in (exact, *requested):
        stats.update(x)
        stats.update(x * 2)
    for stats in requested:
        assert torch.equal(exact.xtx, stats.xtx)  # bf16 products are exact in float32
    flat = torch.cat([x, x * 2]).reshape(-1, 16).double()
    assert torch.allclose(exact.xtx.double(), flat.T @ flat, rtol=1e-6, atol=1e-4)
    assert exact.act_absmax.dtype == torch.float32


@pytest.mark.parametrize("true_sequential", [True, False])
@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_the_block_driver_gives_the_codes_of_the_earlier_pipeline(build, true_sequential):
    """Uniform and mixed recipes through the one block driver quantize to exactly the codes the block loop
    before it produced (tests/reference_pipeline.py), for every solver and a rotated scheme."""
    import copy

    from reference_pipeline import reference_quantize_model

    section = QuantizeSection(default="int3-g32-gptq-act",
                              overrides=[{"pattern": "down_proj|fc2|dense_4h", "scheme": "hadamard+int4-g32-gptq"},
                                         {"pattern": "v_proj|fc1", "scheme": "ternary2-g32-ptqtp-aw"},
                                         {"pattern": "o_proj|out_proj", "scheme": "mxfp4-rtn"}],
                              ignore=["layers\\.1\\.self_attn\\.q_proj"])
    model = build()
    twin = copy.deepcopy(model)
    ours = quantize_model(model, calibration_ids(), section.scheme_for, CPU, batch_size=4, progress=False,
                          true_sequential=true_sequential)
    theirs = reference_quantize_model(twin, calibration_ids(), section.scheme_for, CPU, batch_size=4,
                                      true_sequential=true_sequential)
    assert ours.keys() == theirs.keys() and len({q.scheme.name for q in ours.values()}) >= 3
    for name in ours:
        assert all(torch.equal(a, b) for a, b in zip(ours[name].pack().values(), theirs[name].pack().values())), name
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


class _EveryBlock:
    """A stage that does nothing and does not say which blocks it needs: the driver then runs them all."""

    def run_block(self, ctx) -> None:
        pass


def test_the_driver_stops_after_the_last_block_a_stage_needs():
    """Quantizing blocks 0 and 1 of 4 (or measuring their candidates) runs neither block 2 nor 3, and gives
    the codes and sensitivity table of a run that drives every block."""
    import copy

    from quantbench.allocation.sensitivity import SensitivityStage
    from quantbench.pipeline import QuantizeStage, drive_blocks

    section = QuantizeSection(default="int3-g32-gptq-act", ignore=[r"layers\.[23]\."])
    model = tiny_llama(layers=4)
    ran = []
    for index, block in enumerate(decoder_blocks(model)):  # the MLP: capturing the inputs calls each block
        block.mlp.register_forward_pre_hook(lambda *_, index=index: ran.append(index))
    runs = {}
    for label, others in (("needed", []), ("every block", [_EveryBlock()])):
        quantize = QuantizeStage(section.scheme_for)
        measure = SensitivityStage(lambda name: [Scheme.parse("int4-g32-rtn")] if section.scheme_for(name) else [])
        ran.clear()
        drive_blocks(copy.deepcopy(model), calibration_ids(), CPU, [measure, quantize, *others], batch_size=4,
                     progress=False)
        runs[label] = quantize.results, measure.errors, sorted(set(ran))
    (codes, errors, blocks), (all_codes, all_errors, all_blocks) = runs["needed"], runs["every block"]
    assert blocks == [0, 1] and all_blocks == [0, 1, 2, 3]
    assert codes.keys() == all_codes.keys() and len(codes) == 14
    assert all(torch.equal(codes[name].codes, all_codes[name].codes) for name in codes)
    assert errors.keys() == all_errors.keys() and all(errors[k] == all_errors[k] for k in errors)


@pytest.mark.parametrize("overrides, saved", [
    ([], {0: 2, 1: 2, 2: 2, 3: 2}),
    ([{"pattern": r"layers\.2\.mlp", "scheme": "int4-g32-gptq"}], {3: 2}),
    ([{"pattern": r"layers\.1\.", "scheme": "awq+int4-g32-rtn"}], {1: 2, 2: 2, 3: 2})],
    ids=["round to nearest alone", "GPTQ in block 2", "AWQ in block 1"])
def test_the_driver_runs_blocks_forward_only_for_inputs_a_stage_reads(overrides, saved):
    """Round to nearest reads no calibration input: a recipe of it alone runs no block forward, and one with a
    calibrated layer runs the blocks before it (for its inputs) and its own passes, but not its propagation
    (GPTQ's last pass hands it the outputs anyway; AWQ's does not). `saved`: each block's MLP calls (two
    batches) that a run driving every block forward makes and this one does not. The codes are the same."""
    import copy
    from collections import Counter

    from quantbench.pipeline import QuantizeStage, drive_blocks

    section = QuantizeSection(default="int4-g32-rtn", overrides=overrides)
    model = tiny_llama(layers=4)
    ran = []
    for index, block in enumerate(decoder_blocks(model)):
        block.mlp.register_forward_pre_hook(lambda *_, index=index: ran.append(index))
    runs = {}
    for label, others in (("needed", []), ("every block", [_EveryBlock()])):
        quantize = QuantizeStage(section.scheme_for)
        ran.clear()
        drive_blocks(copy.deepcopy(model), calibration_ids(), CPU, [quantize, *others], batch_size=4,
                     progress=False)
        runs[label] = quantize.results, Counter(ran)
    (codes, calls), (all_codes, all_calls) = runs["needed"], runs["every block"]
    assert all_calls - calls == Counter(saved) and not calls - all_calls
    assert codes.keys() == all_codes.keys() and len(codes) == 28
    assert all(torch.equal(codes[name].codes, all_codes[name].codes) for name in codes)


def test_blocks_the_forward_does_not_run_are_a_clear_error():
    """A config that runs fewer layers than the model holds would leave blocks without inputs."""
    model = tiny_llama()
    model.config.num_hidden_layers = 1
    with pytest.raises(QuantbenchError, match=r"did not run decoder blocks \[1\]"):
        capture_block_inputs(model, calibration_ids(), CPU, batch_size=4)


@pytest.mark.parametrize(("build", "kinds"), [(lambda: tiny_llama(layers=3), 1), (tiny_deepseek_v3, 2)],
                         ids=["llama, 3 blocks alike", "deepseek-v3, a dense block then MoE blocks"])
def test_input_groups_are_traced_once_per_kind_of_block(build, kinds):
    """Which linears share an input is found by running a block once; blocks of one class with the same
    linears share inputs alike, so a run traces one block of each kind (a dense first block and MoE blocks
    are two kinds)."""
    from unittest.mock import patch

    from quantbench import pipeline

    traced = []

    def counting(block, linears, run_once):
        traced.append(tuple(linears))
        return input_sharing(block, linears, run_once)

    with patch.object(pipeline, "input_sharing", counting):
        quantized = quantize_model(build(), calibration_ids(), lambda _name: Scheme.parse("int4-g32-gptq"), CPU,
                                   batch_size=4, progress=False)
    assert len(traced) == len(set(traced)) == kinds and quantized


# the blocks the driver runs again to propagate their outputs, with the passes reusing: none where the block
# adds down_proj's output to a submodule's input (residual_outputs.py), nor where the last pass hands the
# propagation what it computed (pass_cache.py); only the first block of a kind that has no such residual
# (post-norms, a parallel residual, Granite's scaled residual, DeepSeek's shared experts last), found missing
# there. The last block is never propagated: no block after it reads its outputs.
RUN_AGAIN = {"gpt_neox": [0], "gemma2": [0], "gemma3_text": [0], "deepseek_v2": [1], "deepseek_v3": [1],
             "olmo2": [0], "olmo3": [0], "glm4": [0], "exaone4": [0], "cohere": [0], "cohere2": [0], "granite": [0],
             "glm4_moe": [1], "glm4_moe_lite": [1], "dots1": [1], "exaone_moe": [1], "solar_open": [0], "afmoe": [0],
             "phi": [0], "falcon": [0], "falcon_7b": [0], "gptj": [0], "gemma3": [0]}


def quantize_counting_forwards(model, reuse_passes: bool, scheme: str = "int4-g32-gptq"):
    """The codes, and how many blocks the driver ran again to propagate their outputs."""
    from unittest.mock import patch

    from quantbench import pipeline

    propagated = []

    def counting(block, inputs):
        propagated.append(inputs.block)
        return run_block(block, inputs)

    with patch.object(pipeline, "run_block", counting):
        quantized = quantize_model(model, calibration_ids(), lambda _name: Scheme.parse(scheme), CPU, batch_size=4,
                                   progress=False, reuse_passes=reuse_passes)
    return quantized, propagated


@pytest.mark.parametrize("family", FAMILY_BUILDERS)
def test_block_outputs_from_the_last_pass_are_a_forward_bit_for_bit(family):
    """The block's outputs come from what the last statistics pass kept or computed, without running the
    block again (but for the first block of a kind without a residual source); codes and weights are bit
    for bit those of the run that propagates every block by a forward."""
    import copy

    model = FAMILY_BUILDERS[family]()
    twin = copy.deepcopy(model)
    ours, propagated = quantize_counting_forwards(model, reuse_passes=True)
    theirs, every_block = quantize_counting_forwards(twin, reuse_passes=False)
    blocks = list(range(len(decoder_blocks(model))))
    assert every_block == blocks[:-1]
    assert propagated == RUN_AGAIN.get(family, [])
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name].codes, theirs[name].codes) and torch.equal(ours[name].scales, theirs[name].scales)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_block_that_changes_the_kept_input_in_place_is_run_again(monkeypatch):
    """The kept input of the first batch must give the linear's output again: an MLP that overwrites the
    down_proj input after the call fails that check, and the block is propagated by a forward."""
    import copy

    from transformers.models.llama.modeling_llama import LlamaMLP

    def overwriting(self, x):
        inner = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        out = self.down_proj(inner)
        inner.zero_()
        return out

    monkeypatch.setattr(LlamaMLP, "forward", overwriting)
    model = tiny_llama(layers=3)
    twin = copy.deepcopy(model)
    ours, propagated = quantize_counting_forwards(model, reuse_passes=True)
    theirs, _ = quantize_counting_forwards(twin, reuse_passes=False)
    assert propagated == [0, 1]
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)


def test_kept_tensors_that_would_not_fit_are_not_kept(monkeypatch):
    """The inputs and residuals are kept only where they take at most half the memory free (and with no
    memory for them, nothing a pass computed is recorded either: every block runs again)."""
    from quantbench import pass_cache, residual_outputs

    model = tiny_llama(layers=3)
    tokens, width = 6 * 32, model.config.hidden_size + model.config.intermediate_size
    monkeypatch.setattr(pass_cache, "free_bytes", lambda _device: 0)
    monkeypatch.setattr(residual_outputs, "free_bytes", lambda _device: 2 * tokens * width * 4 - 1)
    assert quantize_counting_forwards(model, reuse_passes=True)[1] == [0, 1]
    monkeypatch.setattr(residual_outputs, "free_bytes", lambda _device: 2 * tokens * width * 4)
    assert quantize_counting_forwards(tiny_llama(layers=3), reuse_passes=True)[1] == []


def count_attention_forwards(monkeypatch, reuse_passes: bool, mutate_input: bool = False,
                             build=tiny_llama, double_output: bool = False) -> tuple[int, dict]:
    """Quantize a tiny model (3 calibration batches), counting its attention modules' own forwards (a served
    module's are not called); with `mutate_input`, attention changes its input in place after use; with
    `double_output`, it doubles o_proj's output in place before returning it."""
    model = build()
    attention = type(decoder_blocks(model)[0].self_attn)
    own = attention.forward
    calls = []

    def counting(self, hidden_states, *args, **kwargs):
        calls.append(1)
        out = own(self, hidden_states, *args, **kwargs)
        if mutate_input:
            hidden_states.add_(1.0)  # input_layernorm's output, after attention has read it
        if double_output:
            out[0].mul_(2.0)
        return out

    monkeypatch.setattr(attention, "forward", counting)
    try:
        quantized = quantize_model(model, calibration_ids(n=12), lambda _name: Scheme.parse("int4-g32-gptq"), CPU,
                                   batch_size=4, progress=False, reuse_passes=reuse_passes)
    finally:
        monkeypatch.setattr(attention, "forward", own)  # the next count wraps the model's own forward again
    return len(calls), quantized


def test_each_statistics_pass_is_served_what_the_one_before_computed(monkeypatch):
    """Four true-sequential passes and the propagation ran attention 5 times a batch (the last block, whose
    outputs no block reads, 4). With the passes reusing: the q/k/v and o_proj passes run it (q/k/v changed);
    the gate/up pass is served its output as o_proj (quantized since) on o_proj's recorded input, and the
    down_proj pass that output, both but on the first batch, which checks them; the propagation needs no
    forward. (One more call: the first block's trace of which linears share an input.)"""
    blocks, batches = 2, 3
    plain, theirs = count_attention_forwards(monkeypatch, reuse_passes=False)
    reused, ours = count_attention_forwards(monkeypatch, reuse_passes=True)
    assert plain == blocks * 5 * batches - batches + 1
    assert reused == blocks * (2 * batches + 2) + 1
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)


def test_an_output_changed_in_place_after_it_was_recorded_is_not_served(monkeypatch):
    """Attention that adds to its input after reading it changes input_layernorm's output after the gate/up
    pass recorded it (on its first batch, which runs attention whole). The down_proj pass's check sees the
    change and that pass runs whole; the codes are those of the passes without reuse."""
    blocks, batches = 2, 3
    plain, theirs = count_attention_forwards(monkeypatch, reuse_passes=False, mutate_input=True)
    reused, ours = count_attention_forwards(monkeypatch, reuse_passes=True, mutate_input=True)
    assert reused == blocks * (3 * batches + 1) + 1  # 2 * batches + 2 had the changed output been served
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)


def test_the_propagation_of_a_block_without_a_residual_is_served_what_the_last_pass_computed(monkeypatch):
    """Gemma 2 adds a normed down_proj output: no residual gives its outputs. The last pass records what
    finished before down_proj (attention among it) and the propagation is served it, but on its first batch,
    which checks it; the kind's first block, where the residual is looked for and not found, runs again. The
    last block is not propagated (no block reads its outputs)."""
    blocks, batches = len(decoder_blocks(tiny_gemma2())), 3
    plain, theirs = count_attention_forwards(monkeypatch, reuse_passes=False, build=tiny_gemma2)
    reused, ours = count_attention_forwards(monkeypatch, reuse_passes=True, build=tiny_gemma2)
    assert plain == blocks * 5 * batches - batches + 1
    assert reused == blocks * (3 * batches + 1) + batches + (blocks - 2) + 1
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)


@pytest.mark.parametrize("scheme", ["int4-g32-gptq-a:int4", "awq+int4-g32-gptq", "hadamard+int3-g32-gptq-act"])
def test_reusing_passes_keep_the_codes_of_a_rotated_model_with_online_transforms(scheme):
    """down_proj's online Hadamard (model rotation), activation quantization and AWQ's folded scales are
    applied by the layers' own input hooks: the input kept for h + down_proj(x) is taken before them, so the
    outputs from the last pass are the forward's bit for bit."""
    import copy

    from quantbench.rotation import rotate_model

    model = tiny_llama()
    rotate_model(model, seed=3)
    twin = copy.deepcopy(model)
    ours, propagated = quantize_counting_forwards(model, reuse_passes=True, scheme=scheme)
    theirs, _ = quantize_counting_forwards(twin, reuse_passes=False, scheme=scheme)
    assert propagated == []
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_attention_that_changes_o_proj_output_in_place_is_not_served_as_o_proj(monkeypatch):
    """Attention returns o_proj's output object, but doubled in place: o_proj on its recorded input is not
    what attention gives, and the gate/up pass's check sees it (the output no longer equals o_proj's as it
    returned it). That pass runs attention whole; the codes are those of the passes without reuse."""
    blocks, batches = 2, 3
    _, theirs = count_attention_forwards(monkeypatch, reuse_passes=False, double_output=True)
    reused, ours = count_attention_forwards(monkeypatch, reuse_passes=True, double_output=True)
    assert reused == blocks * (3 * batches + 1) + 1  # 2 * batches + 2 had attention been served as o_proj
    assert all(torch.equal(ours[name].codes, theirs[name].codes) for name in ours)


@pytest.mark.parametrize("copies", [True, False], ids=["other experts return a copy", "every expert a tail"])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_a_module_the_experts_share_is_never_served_to_another_caller(monkeypatch, family, copies):
    """Every expert calls one shared activation module. With the first expert served as its down_proj (a
    tail) and the others returning a copy (not served), the propagation's first act_fn call comes from
    another expert than the call the last pass recorded: serving it would hand that expert the first's
    activations (other tokens, another shape). Experts are routed their own tokens (no all-token statistics),
    in several batches; the codes are those of the passes without reuse, also where every expert is a tail,
    in five layouts: plain experts, a shared expert behind a gate, Mixtral's names, shared experts after
    latent attention (two routings)."""
    import copy

    from quantbench.experts import Expert, StarvedExperts, expert_lists

    def returning_a_copy(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        out = down(self.act_fn(gate(x)) * up(x))
        return out.clone() if getattr(self, "returns_copy", False) else out

    monkeypatch.setattr(Expert, "forward", returning_a_copy)
    model = MOE_BUILDERS[family]()
    for block in decoder_blocks(model):
        for experts in expert_lists(block):
            for expert in list(experts)[1:]:
                expert.returns_copy = copies
    twin = copy.deepcopy(model)
    codes = [quantize_model(m, calibration_ids(), lambda _name: Scheme.parse("int4-g32-gptq"), CPU, batch_size=2,
                            progress=False, experts=StarvedExperts(min_tokens=0), reuse_passes=reuse)
             for m, reuse in ((model, True), (twin, False))]
    assert codes[0].keys() == codes[1].keys()
    assert all(torch.equal(codes[0][name].codes, codes[1][name].codes) for name in codes[0])


@pytest.mark.parametrize("family", MOE_BUILDERS)
def test_a_pass_keeps_no_input_that_no_submodule_can_be_served_on(monkeypatch, family):
    """An expert returns its down_proj's output, not gate's or up's: the gate/up pass keeps none of their
    inputs (the routed tokens' hidden states, k copies of the block's) for the next pass, only down_proj's
    pass keeps its layers' inputs (the experts served as their down_proj)."""
    from quantbench import pass_cache
    from quantbench.experts import DEFAULT_PROJECTION_NAMES, PROJECTION_NAMES, StarvedExperts

    kept = []
    own_next_pass = pass_cache.PassCache.next_pass

    def next_pass(self, layers, record):
        kept.extend(name for inputs in self.recorded_inputs for name in inputs)
        return own_next_pass(self, layers, record)

    monkeypatch.setattr(pass_cache.PassCache, "next_pass", next_pass)
    quantize_model(MOE_BUILDERS[family](), calibration_ids(), lambda _name: Scheme.parse("int4-g32-gptq"), CPU,
                   batch_size=2, progress=False, experts=StarvedExperts(min_tokens=0))
    down = PROJECTION_NAMES.get(family, DEFAULT_PROJECTION_NAMES)[2]
    assert {name.rsplit(".", 1)[-1] for name in kept if ".experts." in name} == {down}
