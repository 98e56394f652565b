"""act_order folded out of gated MLPs' down projections (export/kernels/mlp_order.py)."""

import copy
import dataclasses

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from quantbench import load_quantized, save_quantized
from quantbench.experts import Expert
from quantbench.export.kernels import PackedLinear, to_kernel_layout
from quantbench.export.kernels.fused import FusedPackedLinear
from quantbench.export.kernels.mlp_order import fold_down_orders
from quantbench.pipeline import quantize_model
from quantbench.quantized_weight import QuantizedWeight
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme

HIDDEN, INTERMEDIATE = 64, 96


def packed(out_features: int, in_features: int, seed: int, act_order: bool, group: int = 32) -> PackedLinear:
    """A packed int4 layer of random codes, its groups formed in a random input order where `act_order`."""
    g = torch.Generator().manual_seed(seed)
    g_idx = None
    if act_order:
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[torch.randperm(in_features, generator=g)] = (torch.arange(in_features) // group).int()
    n_groups = in_features // group
    weight = QuantizedWeight(Scheme.parse(f"int4-g{group}-gptq{'-act' if act_order else ''}"),
                             torch.randint(0, 16, (out_features, in_features), generator=g, dtype=torch.uint8),
                             (torch.rand(out_features, n_groups, generator=g) * 0.1 + 0.01).half(),
                             torch.randint(0, 16, (out_features, n_groups), generator=g, dtype=torch.uint8), g_idx)
    bias = torch.randn(out_features, generator=g)
    return PackedLinear(to_kernel_layout(weight), bias)


def expert(act_order_gate: bool = True) -> Expert:
    return Expert(packed(INTERMEDIATE, HIDDEN, 1, act_order_gate), packed(INTERMEDIATE, HIDDEN, 2, False),
                  packed(HIDDEN, INTERMEDIATE, 3, True), nn.SiLU(), ("gate_proj", "up_proj", "down_proj"))


def test_a_folded_expert_computes_the_same_output_with_down_reading_x_as_it_lies():
    """gate's and up's outputs come in down's stored order, down has no permutation left, and the output is the
    unfolded one bit for bit (the same products, summed in the same order)."""
    block = nn.ModuleDict({"expert": expert()})
    original = copy.deepcopy(block["expert"])  # folding replaces the children in place
    order = original.down_proj.perm.long()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = original(x)
        assert fold_down_orders(block) == ["expert.down_proj"]
        folded = block["expert"]
        assert folded.down_proj.perm is None and folded.gate_proj.perm is not None  # gate's own input order stays
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(getattr(folded, name).weight, getattr(original, name).weight[order])
            assert torch.equal(getattr(folded, name)(x), getattr(original, name)(x)[:, order])
        assert torch.equal(folded.down_proj.weight, original.down_proj.weight[:, order])
        assert torch.equal(folded(x), expected)


def test_folding_leaves_unknown_mlps_hooked_layers_and_plain_down_projections_alone():
    class OtherMLP(nn.Module):  # same children, but nothing says its forward is down(act(gate) · up)
        def __init__(self, source: Expert):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = source.gate_proj, source.up_proj, source.down_proj

    hooked = expert()
    hooked.down_proj.register_forward_pre_hook(lambda module, args: None)  # e.g. an online rotation of its input
    plain = expert()
    plain.down_proj = packed(HIDDEN, INTERMEDIATE, 3, False)
    model = nn.ModuleDict({"other": OtherMLP(expert()), "hooked": hooked, "plain": plain})
    perms = {name: model[name].down_proj.perm for name in ("other", "hooked")}
    assert fold_down_orders(model) == []
    assert all(model[name].down_proj.perm is perms[name] for name in perms)


@pytest.mark.parametrize("fuse", [False, True])
def test_a_loaded_act_order_llama_folds_every_down_projection_and_keeps_its_logits(tmp_path, tokenizer, fuse):
    """load_quantized(kernels=True) folds each layer's act_order down projection (gate and up fused after it
    where asked) and gives the logits of the unfolded load, bit for bit."""
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-gptq-act", overrides=[{"pattern": "layers.1.mlp.up_proj",
                                                                       "scheme": "int8-pc-rtn"}])
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    unfolded = load_quantized(tmp_path / "ckpt", kernels=True, fuse=fuse, fold_orders=False)
    folded = load_quantized(tmp_path / "ckpt", kernels=True, fuse=fuse)
    assert unfolded.quantbench_folded_orders == []
    assert folded.quantbench_folded_orders == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    for layer, reference in zip(folded.model.layers, unfolded.model.layers):
        assert layer.mlp.down_proj.perm is None and reference.mlp.down_proj.perm is not None
        order = reference.mlp.down_proj.perm.long()
        assert torch.equal(layer.mlp.up_proj.weight, reference.mlp.up_proj.weight[order])
    if fuse:  # layer 0's gate and up share one fused weight still; layer 1's differ in format
        assert folded.quantbench_fused == unfolded.quantbench_fused
        assert isinstance(folded.model.layers[0].mlp.gate_proj.fused, FusedPackedLinear)
    with torch.no_grad():
        assert torch.equal(folded(ids).logits, unfolded(ids).logits)


def test_a_dense_gate_takes_its_rows_in_the_new_order():
    """A gate no kernel runs (a dense nn.Linear) is reordered too."""
    block = expert()
    dense = nn.Linear(HIDDEN, INTERMEDIATE)
    with torch.no_grad():
        dense.weight.copy_(block.gate_proj.weight.float())
        dense.bias.copy_(block.gate_proj.bias)
    block.gate_proj = dense
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(5))
    holder = nn.ModuleDict({"mlp": block})
    with torch.no_grad():
        expected = block(x)
        assert fold_down_orders(holder) == ["mlp.down_proj"]
        assert type(holder["mlp"].gate_proj) is nn.Linear
        torch.testing.assert_close(holder["mlp"](x), expected, rtol=0, atol=0)


def test_the_kernel_weight_of_a_folded_down_projection_is_the_stored_one_without_its_order():
    block = nn.ModuleDict({"mlp": expert()})
    stored = block["mlp"].down_proj.kernel_weight.row_major()
    fold_down_orders(block)
    after = block["mlp"].down_proj.kernel_weight.row_major()
    assert after.perm is None
    for field in dataclasses.fields(stored):
        if field.name != "perm" and isinstance(getattr(stored, field.name), torch.Tensor):
            assert torch.equal(getattr(after, field.name), getattr(stored, field.name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_folded_expert_on_the_gpu_gives_the_unfolded_output_within_float16_rounding():
    """On the GPU down runs a kernel built without a gather (another library, tuned apart), so its sums may come in
    another order: the same output within float16 rounding."""
    block = nn.ModuleDict({"expert": expert()}).to("cuda")
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(6)).half().cuda()
    with torch.no_grad():
        expected = block["expert"](x)
        fold_down_orders(block)
        got = block["expert"](x)
    assert block["expert"].down_proj.perm is None
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_every_known_mlp_class_of_this_transformers_computes_down_of_act_gate_times_up():
    """The classes folded by name still compute down(act(gate(x)) · up(x)) in the installed transformers (a class
    that gained a step between up and down would have to leave GATED_MLPS)."""
    import importlib
    import inspect
    import re

    from quantbench.export.kernels.mlp_order import GATED_MLPS

    found = 0
    for name in GATED_MLPS:
        family = re.sub(r"(BlockSparseTop2)?MLP$", "", name)
        module_name = re.sub(r"(?<!^)(?=[A-Z])", "_", family).lower()  # Qwen2Moe → qwen2_moe
        try:
            module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is None:  # e.g. Mixtral's per-expert MLP, gone where transformers fuses the experts
            continue
        source = re.sub(r"\s+", "", inspect.getsource(cls.forward))
        assert ("self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))" in source
                or "self.act_fn(self.w1(hidden_states))*self.w3(hidden_states)" in source), name
        found += 1
    assert found >= 10  # Llama, Mistral, Qwen, Gemma, Granite, OLMo at least


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_a_loaded_act_order_moe_folds_every_expert_and_keeps_its_logits(tmp_path, tokenizer, family):
    """Every expert's down projection (Mixtral's w2; a shared expert's too) folds through load_quantized, bit for
    bit."""
    from helpers import tiny_mixtral, tiny_qwen2_moe, tiny_qwen3_moe

    model = {"qwen3_moe": tiny_qwen3_moe, "qwen2_moe": tiny_qwen2_moe, "mixtral": tiny_mixtral}[family]()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-gptq-act")
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    unfolded = load_quantized(tmp_path / "ckpt", kernels=True, fold_orders=False)
    folded = load_quantized(tmp_path / "ckpt", kernels=True)
    downs = [name for name, module in unfolded.named_modules()
             if name.endswith(("down_proj", ".w2")) and isinstance(module, PackedLinear) and module.perm is not None]
    assert downs and sorted(folded.quantbench_folded_orders) == sorted(downs)
    with torch.no_grad():
        assert torch.equal(folded(ids).logits, unfolded(ids).logits)
