"""AutoRound (SignRound): learned rounding that lowers the block's output error, on valid grid points."""

import copy

import pytest
import torch
from helpers import tiny_llama

from quantbench import load_quantized, save_quantized
from quantbench.export.compressed_tensors_format import export_compressed_tensors
from quantbench.model_io import decoder_blocks
from quantbench.pipeline import capture_block_inputs, quantize_model
from quantbench.quantizers.autoround import AutoRoundOptions, AutoRoundSolver, learn_rounding
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.recipe import parse_recipe
from quantbench.scheme import Scheme

IDS = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(1))
TEST_IDS = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(2))
QUICK = AutoRoundOptions(steps=30)


def logits(model, ids=TEST_IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def first_block(model):
    inputs = capture_block_inputs(model, IDS, torch.device("cpu"), batch_size=4)
    block = decoder_blocks(model)[0]
    linears = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    return block, linears, list(zip(inputs.hidden, inputs.kwargs))


@pytest.mark.parametrize("name", ["int3-g32-autoround", "int2-g32-sym-autoround", "mxfp4-autoround", "nvfp4-autoround"])
def test_the_loss_falls_and_the_codes_are_grid_points(name):
    model = tiny_llama().float()
    block, linears, batches = first_block(model)
    scheme = Scheme.parse(name)
    losses = []
    learned = learn_rounding(block, linears, dict.fromkeys(linears, scheme), batches, QUICK, losses)
    assert len(losses) == QUICK.steps
    assert min(losses) < 0.9 * losses[0]  # step 0 is round-to-nearest (zero offsets, full ranges)
    for name_, state in learned.items():
        assert state.offsets.abs().max() <= 0.5 and 0 <= state.low.min() and state.high.max() <= 1
        quantized = AutoRoundSolver().quantize(linears[name_].weight.data, scheme, state)
        codes = quantized.codes.long()
        assert codes.min() >= 0 and codes.max() < 2 ** scheme.bits
        assert quantized.dequantize().shape == linears[name_].weight.shape


def test_under_bf16_autocast_the_loss_still_falls():
    """The GPU's default: the steps' forwards in bfloat16 (forced on here, on the CPU)."""
    model = tiny_llama().float()
    block, linears, batches = first_block(model)
    scheme = Scheme.parse("int3-g32-autoround")
    losses = []
    options = AutoRoundOptions(steps=30, bf16=True)
    learn_rounding(block, linears, dict.fromkeys(linears, scheme), batches, options, losses)
    assert min(losses) < 0.9 * losses[0]
    assert all(p.dtype == torch.float32 for p in block.parameters())


def test_without_learned_offsets_it_rounds_to_nearest():
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    scheme = Scheme.parse("int4-g32-autoround")
    ours = AutoRoundSolver().quantize(weight, scheme, None)
    nearest = quantize_rtn(weight, scheme.model_copy(update={"solver": "rtn"}))
    assert torch.equal(ours.dequantize(), nearest.dequantize())


def output_error(name, model, options=QUICK):
    model = copy.deepcopy(model)
    reference = logits(model)
    quantize_model(model, IDS, lambda _layer: Scheme.parse(name), torch.device("cpu"), progress=False,
                   batch_size=4, autoround=options)
    return (logits(model) - reference).square().mean().item()


@pytest.mark.parametrize("bits,transform", [(2, ""), (3, ""), (3, "hadamard+")])
def test_autoround_beats_round_to_nearest(bits, transform):
    model = tiny_llama().float()
    nearest = output_error(f"{transform}int{bits}-g32-rtn", model)
    learned = output_error(f"{transform}int{bits}-g32-autoround", model, AutoRoundOptions(steps=40))
    assert learned < 0.85 * nearest  # measured: 0.65× at 2 bits, 0.69× at 3


def test_an_autoround_checkpoint_and_its_compressed_tensors_export_load_with_identical_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny_llama().float()
    quantized = quantize_model(model, IDS, lambda _layer: Scheme.parse("int4-g32-autoround"), torch.device("cpu"),
                               progress=False, autoround=QUICK)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    assert torch.equal(logits(load_quantized(tmp_path / "ckpt")), logits(model))
    export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")
    decompressed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(run_compressed=False))
    assert torch.equal(logits(decompressed), logits(model))


def test_mixed_blocks_and_recipe_options():
    """AutoRound layers learn first; GPTQ layers in the same block then calibrate on the result."""
    model = tiny_llama().float()
    reference = logits(model)
    schemes = {"q_proj": "int4-g32-autoround", "down_proj": "int4-g32-gptq"}
    quantized = quantize_model(model, IDS, lambda layer: Scheme.parse(schemes.get(layer.rsplit(".", 1)[-1], "int8-pc-rtn")),
                               torch.device("cpu"), progress=False, autoround=QUICK)
    assert quantized["model.layers.0.self_attn.q_proj"].scheme.solver == "autoround"
    assert quantized["model.layers.1.mlp.down_proj"].scheme.solver == "gptq"
    assert (logits(model) - reference).abs().max() < 0.1 * reference.abs().max()
    recipe = parse_recipe({"name": "r", "model": {"name": "m"}, "quantize": {"default": "int3-g128-autoround",
                                                                             "autoround": {"steps": 50}}})
    assert recipe.quantize.autoround.options(seed=3) == AutoRoundOptions(steps=50, seed=3)


@pytest.mark.parametrize("name", ["int3-g32-autoround", "mxfp4-autoround", "nvfp4-autoround"])
def test_stacking_layers_of_one_shape_changes_nothing(name):
    model = tiny_llama().float()
    block, linears, batches = first_block(model)
    schemes = dict.fromkeys(linears, Scheme.parse(name))
    runs = []
    for stack in (True, False):
        losses = []
        learned = learn_rounding(block, linears, schemes, batches, AutoRoundOptions(steps=5), losses, stack=stack)
        runs.append((losses, learned))
    (stacked_losses, stacked), (alone_losses, alone) = runs
    assert stacked_losses == alone_losses
    for layer in linears:
        for field in ("offsets", "low", "high"):
            assert torch.equal(getattr(stacked[layer], field), getattr(alone[layer], field)), (layer, field)
