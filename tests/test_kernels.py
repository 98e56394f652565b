"""Packed-weight matmuls: the torch fallback and the Triton kernels (through Triton's interpreter on
CPU) against the dequantized weight, and load_quantized(kernels=True)."""

import ctypes
import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from helpers import FAMILY_BUILDERS, assert_matmul_close, tiny_llama

from quantbench import load_quantized, save_quantized
from quantbench.export.kernels import PackedLinear, kernel_unsupported_reason, packed_matmul, to_kernel_layout
from quantbench.export.kernels.layout import KIND_CODES, to_base3_layout
from quantbench.export.kernels.matmul import TileConfig
from quantbench.export.kernels.reference import dequantize_kernel_weight
from quantbench.pipeline import quantize_model
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight

OUT, IN = 80, 256


def weight(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(OUT, IN) * torch.rand(OUT, 1)


def act_order_weight(bits: int = 4, group: int = 32, seed: int = 1) -> QuantizedWeight:
    """An int layer whose groups were formed in a random input order, as GPTQ's act_order leaves them."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(IN, generator=g)
    g_idx = torch.empty(IN, dtype=torch.int32)
    g_idx[order] = (torch.arange(IN) // group).int()
    n_groups = IN // group
    return QuantizedWeight(Scheme.parse(f"int{bits}-g{group}-gptq-act"),
                           torch.randint(0, 1 << bits, (OUT, IN), generator=g, dtype=torch.uint8),
                           (torch.rand(OUT, n_groups, generator=g) * 0.1 + 0.01).half(),
                           torch.randint(0, 1 << bits, (OUT, n_groups), generator=g, dtype=torch.uint8), g_idx)


def ternary_weight(group: int | None, seed: int = 2) -> TritPlaneWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if group is None else IN // group
    name = "ternary2-ptqtp" if group is None else f"ternary2-g{group}-ptqtp"
    return TritPlaneWeight(Scheme.parse(name), torch.randint(-1, 2, (2, OUT, IN), generator=g, dtype=torch.int8),
                           (torch.rand(2, OUT, n_groups, generator=g) * 0.1).half())


def stored_weights():
    w = weight()
    for name in ("int4-g128-rtn", "int4-g32-sym-rtn", "int4-pc-rtn", "int2-g64-rtn", "int8-pc-rtn", "mxfp4-rtn",
                 "nvfp4-rtn"):
        yield name, quantize_rtn(w, Scheme.parse(name))
    yield "int4-g32 act_order", act_order_weight(4)
    yield "int8-g64 act_order", act_order_weight(8, 64)
    yield "ternary2 per row", ternary_weight(None)
    yield "ternary2-g64", ternary_weight(64)


WEIGHTS = dict(stored_weights())


@pytest.mark.parametrize("label", WEIGHTS)
def test_kernel_layout_decodes_to_the_stored_weight_exactly(label):
    stored = WEIGHTS[label]
    assert torch.equal(dequantize_kernel_weight(to_kernel_layout(stored)), stored.dequantize())


@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_torch_fallback_equals_the_dequantized_matmul(label, batch):
    stored = WEIGHTS[label]
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
    got = packed_matmul(x, to_kernel_layout(stored), backend="torch")
    assert_matmul_close(got, x, stored.dequantize())


# Triton kernels run on the GPU where there is one, else in Triton's interpreter on the CPU (conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TRITON_CONFIGS = {
    "decode": TileConfig(1, 32, 64, 1),
    "decode split-k": TileConfig(1, 16, 64, 4),
    "dot": TileConfig(16, 32, 64, 1),
    "dot split-k, a load per row": TileConfig(16, 16, 32, 2, expand=False),
}


@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("config", TRITON_CONFIGS)
def test_triton_kernel_equals_the_dequantized_matmul(label, config):
    stored = WEIGHTS[label].to(TRITON_DEVICE)
    tile = TRITON_CONFIGS[config]
    x = torch.randn(1 if tile.block_m == 1 else 5, IN, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE)
    got = packed_matmul(x, to_kernel_layout(stored), backend="triton", config=tile)
    assert_matmul_close(got, x, stored.dequantize())


def test_triton_dot_multiplies_float32_as_torch_does():
    """IEEE float32 in tl.dot unless torch allows TF32 for its own float32 matmuls (on a GPU, the dot tests
    above then hold to float32's rounding bound)."""
    from quantbench.export.kernels.triton_matmul import dot_precision

    allowed = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32" and dot_precision(torch.float16) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


@pytest.mark.parametrize("label, tile", [
    ("int4-g32 act_order", TileConfig(1, 32, 64, 1, rows=4)), ("ternary2-g64", TileConfig(1, 32, 64, 1, rows=4)),
    ("mxfp4-rtn", TileConfig(1, 16, 64, 3, rows=2)), ("nvfp4-rtn", TileConfig(1, 16, 64, 3, rows=2)),
], ids=["int4 act_order, 4 rows", "ternary, 4 rows", "mxfp4, 2 rows, split-k", "nvfp4, 2 rows, split-k"])
def test_multi_row_decode_equals_the_dequantized_matmul_on_a_partial_row_tile(label, tile):
    stored = WEIGHTS[label].to(TRITON_DEVICE)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE)
    got = packed_matmul(x, to_kernel_layout(stored), backend="triton", config=tile)
    assert_matmul_close(got, x, stored.dequantize())


def test_triton_kernel_handles_inputs_that_do_not_fill_a_tile():
    g = torch.Generator().manual_seed(4)
    stored = quantize_rtn(torch.randn(50, 96, generator=g), Scheme.parse("int4-g32-rtn")).to(TRITON_DEVICE)
    x = torch.randn(2, 96, generator=g).to(TRITON_DEVICE)  # 96 inputs, 50 outputs
    got = packed_matmul(x, to_kernel_layout(stored), backend="triton", config=TileConfig(16, 32, 64, 1))
    assert_matmul_close(got, x, stored.dequantize())


@pytest.mark.parametrize("name, why", [
    ("int3-g32-rtn", "3"), ("mxfp6e2m3-rtn", "mxfp6e2m3"), ("ternary1-ptqtp", "two planes"),
])
def test_layers_without_a_kernel_say_why(name, why):
    reason = kernel_unsupported_reason(quantize_rtn(weight(), Scheme.parse(name)) if "ternary" not in name
                                       else TritPlaneWeight(Scheme.parse(name), torch.zeros(1, OUT, IN, dtype=torch.int8),
                                                            torch.ones(1, OUT, 1).half()))
    assert reason is not None and why in reason
    assert "multiple of 32" in kernel_unsupported_reason(quantize_rtn(torch.randn(8, 48), Scheme.parse("int4-g16-rtn")))


def test_load_with_kernels_swaps_in_packed_modules(tmp_path, tokenizer):
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-gptq-act",
                              overrides=[{"pattern": "mlp.down_proj", "scheme": "ternary2-ptqtp"},
                                         {"pattern": "o_proj", "scheme": "int3-g32-rtn"},
                                         {"pattern": "layers.1.mlp.up_proj", "scheme": "mxfp4-rtn"},
                                         {"pattern": "layers.0.mlp.gate_proj", "scheme": "nvfp4-rtn"}])
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    dense = load_quantized(tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", kernels=True, fuse=False)
    kinds = {name: m.kind for name, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert set(kinds) == set(quantized) - set(packed.quantbench_kernel_skips)
    assert set(packed.quantbench_kernel_skips) == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    assert {"int", "ternary", "mxfp4", "nvfp4"} == set(kinds.values())
    assert not any(name.removesuffix(".weight") in kinds for name, _ in packed.named_parameters())
    # decode steps attend on grouped heads (tests/test_decode_attention.py); the dense load keeps sdpa
    assert packed.quantbench_decode_attention and packed.config._attn_implementation == "quantbench_sdpa"
    assert dense.config._attn_implementation == "sdpa"
    for name in kinds:  # .weight decodes on demand, for code that inspects it
        assert torch.equal(packed.get_submodule(name).weight, dense.get_submodule(name).weight)
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(packed(ids).logits, expected, rtol=1e-4, atol=1e-4)
        for module in packed.modules():
            if isinstance(module, PackedLinear):
                module.backend = "triton"
        triton_logits = packed.to(TRITON_DEVICE)(ids.to(TRITON_DEVICE)).logits.cpu()
        torch.testing.assert_close(triton_logits, expected, rtol=1e-3, atol=1e-3)
    packed_bytes = sum(b.numel() * b.element_size() for n, b in packed.named_buffers() if n.rsplit(".", 1)[0] in kinds)
    dense_bytes = sum(dense.get_submodule(n).weight.numel() * 4 for n in kinds)
    assert packed_bytes < dense_bytes / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_rows_equal_nn_linear_and_leave_other_calls_to_it(dtype, monkeypatch):
    """A model's dense linear, loaded with kernels=True, multiplies up to DENSE_KERNEL_ROWS rows through the C++
    library (float32; bfloat16 where the CPU has its dot products) within float32's summation bound, an odd K and N
    and a bias included; more rows and a gradient go to nn.Linear."""
    from quantbench.export.kernels import cpu_packed, dense_cpu

    g = torch.Generator().manual_seed(11)
    linear = torch.nn.Linear(100, 37, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(37, 100, generator=g))
        linear.bias.copy_(torch.randn(37, generator=g))
    reference = torch.nn.Linear(100, 37, dtype=dtype)
    reference.load_state_dict(linear.state_dict())
    assert dense_cpu.use_dense_rows(torch.nn.Sequential(linear)) == ["0"]
    takes = dtype == torch.float32 or cpu_packed.dense_takes_bfloat16()
    calls = []
    library = cpu_packed._ops()
    monkeypatch.setattr(cpu_packed, "_ops", lambda: SimpleNamespace(
        dense_matmul=lambda x, w: calls.append(x.shape[0]) or library.dense_matmul(x, w),
        dense_takes_bfloat16=library.dense_takes_bfloat16))
    most = dense_cpu.DENSE_KERNEL_ROWS[dtype]
    for shape in [(1, 100), (2, 2, 100), (most, 100), (most + 1, 100)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        calls.clear()
        with torch.no_grad():
            got = linear(x)
        rows = x.numel() // 100
        assert calls == ([rows] if takes and rows <= most else [])
        assert got.dtype == dtype and got.shape == (*shape[:-1], 37)
        x2 = x.reshape(-1, 100)
        bound = 100 * torch.finfo(torch.float32).eps * (x2.double().abs() @ linear.weight.double().abs().T)
        bound += torch.finfo(dtype).eps * (x2.double() @ linear.weight.double().T + linear.bias.double()).abs()
        exact = x2.double() @ linear.weight.double().T + linear.bias.double()
        assert ((got.reshape(-1, 37).double() - exact).abs() <= bound).all()
    calls.clear()
    x = torch.randn(1, 100, generator=g).to(dtype).requires_grad_()
    linear(x).sum().backward()  # autograd: nn.Linear's own
    assert calls == [] and linear.weight.grad is not None


def test_load_with_kernels_takes_dense_rows_for_the_dense_linears_and_keeps_ties(tmp_path, tokenizer):
    from quantbench.export.kernels.dense_cpu import CpuDenseLinear

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ids = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(model, ids, QuantizeSection(default="int4-g32-rtn").scheme_for, torch.device("cpu"),
                               progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    dense = load_quantized(tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", kernels=True)
    assert "lm_head" in packed.quantbench_dense_rows and type(packed.lm_head) is CpuDenseLinear
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    with torch.no_grad():
        for step in (ids, ids[:, :1]):  # a prompt, then a decode step's one row
            torch.testing.assert_close(packed(step).logits, dense(step).logits, rtol=1e-4, atol=1e-4)


def test_a_quantized_lm_head_loads_packed_beside_a_dense_embedding(tmp_path, tokenizer):
    """A recipe's `quantize.lm_head` (RTN) is packed by load_quantized(kernels=True) like the decoder's layers
    (on an 8B decode it is the head's 1-GB matmul), the embedding it was untied from stays dense, and the
    logits are the dequantized model's."""
    from quantbench.pipeline import quantize_linear, untie_lm_head

    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(model, ids, lambda _name: Scheme.parse("int4-g32-rtn"), torch.device("cpu"),
                               progress=False)
    quantized["lm_head"] = quantize_linear(untie_lm_head(model), Scheme.parse("int4-g32-rtn"))
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    dense = load_quantized(tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", kernels=True)
    assert isinstance(packed.lm_head, PackedLinear) and "lm_head" not in packed.quantbench_kernel_skips
    assert torch.equal(packed.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


BASE3 = {"per row": ternary_weight(None), "g64": ternary_weight(64), "g32, 96 inputs": TritPlaneWeight(
    Scheme.parse("ternary2-g32-ptqtp"), torch.randint(-1, 2, (2, 50, 96), generator=torch.Generator().manual_seed(5),
                                                       dtype=torch.int8),
    (torch.rand(2, 50, 3, generator=torch.Generator().manual_seed(6)) * 0.1).half())}


@pytest.mark.parametrize("label", BASE3)
def test_base3_ternary_layout_reads_a_fifth_of_a_byte_per_trit_and_decodes_exactly(label):
    stored = BASE3[label]
    packed = to_base3_layout(stored)
    out_features, in_features = stored.shape
    groups = -(-in_features // packed.group)
    assert packed.qweight.shape == (2, groups * -(-packed.group // 5), out_features)
    assert torch.equal(dequantize_kernel_weight(packed), stored.dequantize())
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(7))
    assert_matmul_close(packed_matmul(x, packed, backend="torch"), x, stored.dequantize())


@pytest.mark.parametrize("label", BASE3)
@pytest.mark.parametrize("tile", [TileConfig(1, 32, 8, 1), TileConfig(1, 16, 4, 3, rows=2, lut=True)],
                         ids=["a row per program, digits by division", "two rows per program, digits by table"])
def test_base3_triton_kernel_equals_the_dequantized_matmul(label, tile):
    stored = BASE3[label].to(TRITON_DEVICE)
    x = torch.randn(3, stored.shape[1], generator=torch.Generator().manual_seed(8)).to(TRITON_DEVICE)
    got = packed_matmul(x, to_base3_layout(stored), backend="triton", config=tile)
    assert_matmul_close(got, x, stored.dequantize())


@pytest.mark.parametrize("label", ["int4-g128-rtn", "int4-g32 act_order", "int8-pc-rtn", "int4-g32-sym-rtn"])
def test_half_precision_decode_matches_within_float16_rounding(label):
    stored = WEIGHTS[label].to(TRITON_DEVICE)
    x = torch.randn(1, IN).half().to(TRITON_DEVICE)
    expected = x.float() @ stored.dequantize().T
    got = packed_matmul(x, to_kernel_layout(stored), backend="triton", config=TileConfig(1, 32, 64, 2, half=True))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("family", FAMILY_BUILDERS)
def test_every_family_loads_with_kernels_to_the_dense_logits(tmp_path, tokenizer, family):
    """Packed layers with fused siblings (q/k/v, gate/up; Cohere's parallel blocks read one norm) on the CPU
    give the dense load's logits, within float summation differences."""
    model = FAMILY_BUILDERS[family](vocab_size=len(tokenizer))
    ids = torch.randint(3, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    quantized = quantize_model(model, ids, QuantizeSection(default="int4-g32-rtn").scheme_for, torch.device("cpu"),
                               progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    dense, packed = load_quantized(tmp_path / "ckpt"), load_quantized(tmp_path / "ckpt", kernels=True)
    assert any(isinstance(module, PackedLinear) for module in packed.modules())
    with torch.no_grad():
        expected = dense(ids).logits
        torch.testing.assert_close(packed(ids).logits, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_fused_siblings_compute_the_unfused_logits_with_four_launches_per_layer(tmp_path, tokenizer, monkeypatch):
    """q/k/v and gate/up share one packed weight per input; the o projection in another format stays alone."""
    from quantbench.export.kernels import fused as fused_module

    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-gptq-act", overrides=[{"pattern": "o_proj", "scheme": "int8-pc-rtn"},
                                                                      {"pattern": "layers.1.mlp.up_proj",
                                                                       "scheme": "int4-g64-rtn"}])
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    separate = load_quantized(tmp_path / "ckpt", kernels=True, fuse=False)
    fused = load_quantized(tmp_path / "ckpt", kernels=True)
    assert fused.quantbench_fused == ["model.layers.0.self_attn.q_proj+k_proj+v_proj",
                                      "model.layers.0.mlp.gate_proj+up_proj",
                                      "model.layers.1.self_attn.q_proj+k_proj+v_proj"]  # layer 1: up in g64
    for name in ("self_attn.k_proj", "mlp.up_proj"):  # .weight still decodes each member's own rows
        assert torch.equal(fused.model.layers[0].get_submodule(name).weight,
                           separate.model.layers[0].get_submodule(name).weight)
    launches = []

    def counted(original):
        def matmul(*args, **kwargs):
            launches.append(1)
            return original(*args, **kwargs)
        return matmul

    from quantbench.export.kernels import cpu_packed
    from quantbench.export.kernels import modules as modules_module

    # a layer calls the C++ kernel itself, or (where it cannot be built) packed_matmul: one of the two a launch
    monkeypatch.setattr(cpu_packed, "cpu_packed_matmul", counted(cpu_packed.cpu_packed_matmul))
    monkeypatch.setattr(modules_module, "bound_matmul", counted(modules_module.bound_matmul))
    with torch.no_grad():
        expected = separate(ids).logits
        assert len(launches) == 2 * 7
        launches.clear()
        got = fused(ids).logits
        assert len(launches) == 4 + 5  # layer 0: qkv, o, gate-up, down; layer 1: qkv, o, gate, up, down
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for module in fused.modules():
            if isinstance(module, (fused_module.FusedPackedLinear, PackedLinear)):
                module.backend = "triton"
        triton_logits = fused.to(TRITON_DEVICE)(ids.to(TRITON_DEVICE)).logits.cpu()
        torch.testing.assert_close(triton_logits, expected, rtol=1e-3, atol=1e-3)


def test_compiled_packed_model_traces_the_matmuls_as_one_operator_each(tmp_path, tokenizer):
    """torch.compile traces a packed model, fused siblings included, in one graph (fullgraph: no break at
    the kernels) whose packed matmuls are `quantbench::packed_linear_inference` calls without gradients, and gives
    the eager logits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # frames compiled by earlier tests in this process would count here
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-rtn", overrides=[{"pattern": "o_proj", "scheme": "nvfp4-rtn"}])
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    packed = load_quantized(tmp_path / "ckpt", kernels=True)
    assert packed.quantbench_fused  # q/k/v and gate/up fused
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(packed, backend=counter, fullgraph=True)
    with torch.no_grad():
        expected = packed(ids).logits
        torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    calls = [str(n.target) for g in counter.graphs for n in g.graph.nodes if "packed_linear" in str(n.target)]
    assert calls == ["quantbench.packed_linear_inference.default"] * 2 * 4  # per layer: qkv, o, gate-up, down


def test_the_inference_operator_is_packed_linear_without_an_autograd_kernel_of_its_own():
    """Without gradients a compiled graph calls `packed_linear_inference`: the same product (bit for bit), and no
    autograd kernel of its own, so that the dispatcher passes it through in C++, not through torch.library's Python
    wrapper; `packed_linear`, called where x needs a gradient, keeps its own."""
    from quantbench.export.kernels.modules import packed_linear, packed_linear_inference

    layer = PackedLinear(to_kernel_layout(WEIGHTS["int4-g32 act_order"]))
    arguments = (layer.qweight, layer.scales, layer.zeros, layer.perm, layer.kind, layer.bits, layer.out_features,
                 layer.in_features, layer.group, layer.global_scale, layer.backend)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(7))
    assert torch.equal(packed_linear_inference(x, *arguments), packed_linear(x, *arguments))
    assert torch.equal(packed_linear_inference(x, *arguments), layer(x))
    has_autograd = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has_autograd("quantbench::packed_linear", "Autograd")
    assert not has_autograd("quantbench::packed_linear_inference", "Autograd")


@pytest.mark.parametrize("label", ["int4-g32 act_order", "ternary2-g64", "nvfp4-rtn"])
def test_x_gradient_through_a_packed_linear_is_grad_times_the_dequantized_weight(label):
    """Where x needs a gradient, a packed layer is differentiable in x (its weight frozen): x.grad is grad·W
    of the dequantized weight, act_order's permutation undone, eagerly and compiled (AOT autograd traces the
    backward; before, compiling a packed model with gradients enabled failed)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    stored = WEIGHTS[label]
    dense = stored.dequantize()
    layer = PackedLinear(to_kernel_layout(stored))
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(3, OUT, generator=g)
    counter = CompileCounterWithBackend("aot_eager")
    for run in (layer, torch.compile(layer, backend=counter, fullgraph=True)):
        x = torch.randn(3, IN, generator=g, requires_grad=True)
        y = run(x)
        assert_matmul_close(y.detach(), x.detach(), dense)
        y.backward(grad)
        assert_matmul_close(x.grad, grad, dense.T)
    calls = [str(n.target) for g in counter.graphs for n in g.graph.nodes if "packed_linear" in str(n.target)]
    assert calls == ["quantbench.packed_linear.default"]  # the differentiable operator


def test_x_gradient_on_the_cpu_decodes_through_the_cpp_kernel(monkeypatch):
    from quantbench.export.kernels import cpu_packed

    stored = WEIGHTS["int4-g32 act_order"]
    kernel = to_kernel_layout(stored)
    grad = torch.randn(3, OUT, generator=torch.Generator().manual_seed(6))
    got = cpu_packed.cpu_packed_input_gradient(grad, kernel)
    assert_matmul_close(got, grad, stored.dequantize().T)
    calls = []
    monkeypatch.setattr(cpu_packed, "cpu_packed_input_gradient", lambda g, w: calls.append(g.shape) or got)
    x = torch.randn(3, IN, requires_grad=True)
    PackedLinear(kernel)(x).backward(grad)
    assert calls == [(3, OUT)] and torch.equal(x.grad, got)


@pytest.mark.parametrize("label", WEIGHTS)
def test_cpp_cpu_gradient_kernel_is_grad_times_the_dequantized_weight(label, monkeypatch):
    """Up to GRADIENT_KERNEL_ROWS rows of grad the C++ kernel multiplies the words as they are (no slabs), in tiles
    and in rows alike; more rows take the slabs."""
    from quantbench.export.kernels import cpu_packed

    stored = WEIGHTS[label]
    rows = to_kernel_layout(stored)
    decoded = []
    slabs = cpu_packed._decoded_slabs
    monkeypatch.setattr(cpu_packed, "_decoded_slabs", lambda weight: decoded.append(weight) or slabs(weight))
    for batch in (1, cpu_packed.GRADIENT_KERNEL_ROWS, cpu_packed.GRADIENT_KERNEL_ROWS + 1):
        grad = torch.randn(batch, OUT, generator=torch.Generator().manual_seed(batch))
        for kernel in (rows, rows.in_cpu_tiles()):
            decoded.clear()
            assert_matmul_close(cpu_packed.cpu_packed_input_gradient(grad, kernel), grad, stored.dequantize().T)
            assert len(decoded) == (batch > cpu_packed.GRADIENT_KERNEL_ROWS)


def test_tuner_keeps_the_fastest_candidate_that_agrees_with_the_fallback(monkeypatch):
    """A tile whose kernel computes a wrong result is skipped with a warning, however fast it times."""
    from quantbench.export.kernels import matmul, triton_matmul

    stored = WEIGHTS["int4-g128-rtn"].to(TRITON_DEVICE)
    packed = to_kernel_layout(stored)
    right, wrong, slow = TileConfig(1, 32, 64, 1), TileConfig(1, 32, 64, 2), TileConfig(1, 16, 64, 1)
    launch = triton_matmul.launch

    def launch_breaking_split_2(x, weight, *args):
        out = launch(x, weight, *args)
        return out * 2 if args[3] == 2 else out  # args: block_m, block_n, block_k, split_k, …

    monkeypatch.setattr(triton_matmul, "launch", launch_breaking_split_2)
    times = iter([1.0, 2.0])  # the first two timed: were `wrong` timed, it would take 1.0 and win
    x = torch.randn(1, IN, generator=torch.Generator().manual_seed(9)).to(TRITON_DEVICE)

    def timed(call, warm):
        assert len(warm) == 1 and warm[0] is x  # timed with x cached, as a model's layer finds it
        return next(times)

    monkeypatch.setattr(matmul, "graph_time_ms", timed)
    with pytest.warns(RuntimeWarning, match="1 tile configurations .* disagree"):
        assert matmul._fastest(x, packed, [wrong, right, slow]) == right


def test_act_order_weights_are_tuned_apart_from_the_same_weights_without_it():
    """Their kernels gather x first: the fastest tile of one is not taken for the other."""
    from quantbench.export.kernels.matmul import TUNING_KEY_LENGTH, tuning_key

    act_order = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    plain = dataclasses.replace(act_order, perm=None)
    x = torch.randn(3, IN).half()
    assert len(tuning_key(x, plain)) == TUNING_KEY_LENGTH  # what load_tuned takes
    assert tuning_key(x, act_order) != tuning_key(x, plain)
    assert tuning_key(x, act_order)[:-1] == tuning_key(x, plain)[:-1]
    assert tuning_key(x, plain) == tuning_key(x[:1].expand(4, -1), plain)  # batches 3 and 4 share a bucket


def test_the_cycle_collector_is_held_off_only_while_a_timing_graph_captures():
    """A dead CUDA graph that the collector frees inside a capture resets itself there and invalidates it."""
    import gc

    from quantbench.export.kernels.matmul import _no_garbage_collection

    assert gc.isenabled()
    with pytest.raises(KeyError), _no_garbage_collection():
        assert not gc.isenabled()
        raise KeyError("a failed capture")
    assert gc.isenabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_timing_captures_with_the_cycle_collector_off():
    import gc

    from quantbench.export.kernels.matmul import graph_time_ms

    x = torch.ones(1024, device="cuda")
    collecting = []

    def call():
        collecting.append(gc.isenabled())
        x.mul_(1.0)

    assert graph_time_ms(call, calls=2, rounds=1, warm=(x,)) >= 0
    assert collecting == [True, False, False] and gc.isenabled()  # the eager call, then the two captured


def test_tiles_saved_by_another_version_are_tuned_afresh_not_misread(tmp_path, monkeypatch):
    """A key without act_order (older files) or a tile field this version lacks: skipped with a warning."""
    import json

    from quantbench.export.kernels import matmul

    tile = {"block_m": 1, "block_n": 64, "block_k": 0, "split_k": 1}
    current = {"key": ["int", 4, 128, True, "float16", 1, 4096, 4096, True], "tile": tile}
    older = {"key": ["int", 4, 128, True, "float16", 1, 4096, 4096], "tile": tile}
    unknown = {"key": ["int", 4, 128, True, "float16", 2, 4096, 4096, True], "tile": {**tile, "lookahead": 2}}
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "tiles": [current, older, unknown]}))
    monkeypatch.setattr(matmul, "_tuned", {})
    with pytest.warns(RuntimeWarning, match="2 of its tiles were written by another version"):
        assert matmul.load_tuned(path, "NVIDIA H200") == 1
    key = ("int", 4, 128, True, torch.float16, 1, 4096, 4096, True)
    assert matmul.tuned_configs() == {key: TileConfig(1, 64, 0, 1)}


def test_tuned_tiles_persist_for_the_same_gpu_only(tmp_path, monkeypatch):
    from quantbench.export.kernels import matmul

    key = ("int", 4, 128, True, torch.float16, 1, 4096, 4096, False)
    tile = TileConfig(1, 64, 512, 2, 8, pairs=True)
    monkeypatch.setattr(matmul, "_tuned", {key: tile})
    matmul.save_tuned(tmp_path / "tiles.json", "NVIDIA H200")
    monkeypatch.setattr(matmul, "_tuned", {})
    with pytest.warns(RuntimeWarning, match="tuned on NVIDIA H200, not NVIDIA H100"):
        assert matmul.load_tuned(tmp_path / "tiles.json", "NVIDIA H100") == 0
    assert matmul.tuned_configs() == {}
    assert matmul.load_tuned(tmp_path / "tiles.json", "NVIDIA H200") == 1
    assert matmul.tuned_configs() == {key: tile}


def test_tuned_tiles_go_to_a_file_per_gpu_kernel_code_and_engines_by_default(tmp_path, monkeypatch):
    from quantbench.export.kernels import matmul

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv(matmul.TILES_CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(matmul.TILES_ENV, raising=False)
    monkeypatch.delenv(matmul.ENGINES_ENV, raising=False)
    device = torch.device("cuda")
    default = matmul.tiles_file(device)
    assert default.parent == tmp_path and default.name.startswith("NVIDIA-H100-80GB-HBM3-")
    assert matmul.tiles_file(device) == default  # the same code, engines and torch: the same file
    monkeypatch.setenv(matmul.ENGINES_ENV, "triton,cuda,mma")
    assert matmul.tiles_file(device) not in (default, None)  # tiles timed among other engines
    monkeypatch.setattr(matmul, "_sources_digest", lambda: "another version of the kernels")
    monkeypatch.delenv(matmul.ENGINES_ENV)
    assert matmul.tiles_file(device) != default
    monkeypatch.setenv(matmul.TILES_ENV, str(tmp_path / "mine.json"))
    assert matmul.tiles_file(device) == tmp_path / "mine.json"
    monkeypatch.setenv(matmul.TILES_ENV, "off")
    assert matmul.tiles_file(device) is None


def test_saved_tiles_join_another_process_s_and_a_broken_file_is_tuned_afresh(tmp_path, monkeypatch):
    from quantbench.export.kernels import matmul

    path = tmp_path / "tiles.json"
    ours = ("int", 4, 128, True, torch.float16, 1, 4096, 4096, False)
    theirs = ("ternary", 4, 128, False, torch.float16, 8, 4096, 4096, False)
    monkeypatch.setattr(matmul, "_tuned", {theirs: TileConfig(1, 32, 0, 1, engine="mma")})
    matmul.save_tuned(path, "NVIDIA H200")  # another process's tuning
    monkeypatch.setattr(matmul, "_tuned", {ours: TileConfig(1, 64, 512, 2, 8)})
    matmul.save_tuned(path, "NVIDIA H200")
    assert [p.name for p in tmp_path.iterdir()] == ["tiles.json"]  # written whole, in one rename
    monkeypatch.setattr(matmul, "_tuned", {})
    assert matmul.load_tuned(path, "NVIDIA H200") == 2 and set(matmul.tuned_configs()) == {ours, theirs}
    path.write_text('{"device": "NVIDIA H200", "tiles": [')  # a file cut short
    monkeypatch.setattr(matmul, "_tuned", {})
    with pytest.warns(RuntimeWarning, match="not a tiles file"):
        assert matmul.load_tuned(path, "NVIDIA H200") == 0
    monkeypatch.setattr(matmul, "_tuned", {ours: TileConfig(1, 64, 512, 2, 8)})
    matmul.save_tuned(path, "NVIDIA H200")
    monkeypatch.setattr(matmul, "_tuned", {})
    assert matmul.load_tuned(path, "NVIDIA H200") == 1 and set(matmul.tuned_configs()) == {ours}


class _SeenAsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the tuner's bookkeeping, without a GPU."""

    @property
    def is_cuda(self):
        return True


@pytest.mark.parametrize("nvcc, retuned", [(None, True), ("/usr/local/cuda/bin/nvcc", False)])
def test_a_tile_from_a_file_whose_engine_refuses_the_call_here_is_tuned_afresh(tmp_path, monkeypatch, nvcc, retuned):
    """A CUDA-core tile saved where nvcc was, read where there is none, would fail its first call: it is dropped
    there and tuned afresh (and the file updated); where the engine takes the call it is used as read."""
    from quantbench.export.kernels import cuda_build, matmul

    weight = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    x = torch.zeros(1, weight.shape[1], dtype=torch.float16).as_subclass(_SeenAsCuda)
    key = matmul.tuning_key(x, weight)
    saved, fresh = TileConfig(1, 32, 0, 1, 8, 0, engine="cuda"), TileConfig(1, 64, 64, 2)
    monkeypatch.setattr(matmul, "_tuned", {key: saved})
    matmul.save_tuned(tmp_path / "tiles.json", "NVIDIA H100")
    monkeypatch.setattr(matmul, "_tuned", {})
    monkeypatch.setattr(matmul, "_from_file", set())
    monkeypatch.setattr(matmul, "_loaded", set())
    monkeypatch.setattr(matmul, "tiles_file", lambda device: tmp_path / "tiles.json")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: nvcc)
    tuned = []
    monkeypatch.setattr(matmul, "_fastest", lambda x, weight, candidates: tuned.append(key) or fresh)
    monkeypatch.setattr(matmul, "_engine_candidates", lambda x, weight: [])
    assert matmul._config_for(x, weight) == (fresh if retuned else saved)
    assert tuned == ([key] if retuned else []) and not matmul._from_file
    monkeypatch.setattr(matmul, "_tuned", {})
    matmul.load_tuned(tmp_path / "tiles.json", "NVIDIA H100")
    assert matmul.tuned_configs() == {key: fresh if retuned else saved}  # the file holds what was used


def test_tuning_screens_every_tile_then_times_the_fastest_few_in_full(monkeypatch):
    """Each runnable tile is timed once on short graphs; only the FINALISTS fastest of that are timed in full,
    and the fastest in full wins, even where the screening ranked it lower. Tiles that raise, disagree with the
    torch fallback or cannot be captured drop out."""
    from quantbench.export.kernels import matmul

    packed = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    x = torch.randn(2, IN)
    tiles = [TileConfig(1, 32 * (i + 1), 0, 1, 4, 0, engine="cuda") for i in range(3 * matmul.FINALISTS)]
    screen = {tile: 1.0 + 0.1 * i for i, tile in enumerate(tiles)}  # the screening's order: the list's
    full = dict(screen)
    full[tiles[4]] = 0.5  # fastest in full, fifth in the screening
    screened_out = tiles[3 + matmul.FINALISTS]  # the first runnable one past the finalists
    full[screened_out] = 0.1  # faster still, but not timed in full
    broken, wrong, uncapturable = tiles[0], tiles[1], tiles[2]
    timed = []

    def run(x, weight, backend, config):
        if config == broken:
            raise RuntimeError("too much shared memory")
        result = matmul.packed_matmul_reference(x.float(), weight)
        run.last = config
        return -result if config == wrong else result

    def graph_time_ms(fn, calls=10, rounds=3, warm=()):
        fn()
        if run.last == uncapturable:
            raise RuntimeError("operation not permitted when stream is capturing")
        screening = (calls, rounds) == (matmul.SCREEN_CALLS, 1)
        timed.append((run.last, screening))
        return (screen if screening else full)[run.last]

    monkeypatch.setattr(matmul, "packed_matmul", run)
    monkeypatch.setattr(matmul, "graph_time_ms", graph_time_ms)
    with pytest.warns(RuntimeWarning, match="1 tile configurations"):
        assert matmul._fastest(x, packed, tiles) == tiles[4]
    runnable = tiles[3:]
    assert [tile for tile, screening in timed if screening] == runnable
    assert [tile for tile, screening in timed if not screening] == runnable[:matmul.FINALISTS]
    timed.clear()
    with pytest.warns(RuntimeWarning):
        assert matmul._fastest(x, packed, tiles, finalists=None) == screened_out
    assert [tile for tile, screening in timed] == runnable and not any(screening for _, screening in timed)
    timed.clear()
    assert matmul._fastest(x, packed, runnable[:3]) == tiles[4]  # no more than FINALISTS: no screening
    assert not any(screening for _, screening in timed)
    with pytest.raises(RuntimeError, match="captured"):
        matmul._fastest(x, packed, [uncapturable])


def test_the_libraries_a_weight_needs_are_those_its_engines_call(monkeypatch):
    """The CUDA-core kernel's type with act_order and without (x gathered before it where shared memory cannot
    hold it), the tensor-core kernel's with the scales in registers and in B, the warpgroup one's where named."""
    from quantbench.export.kernels import matmul
    from quantbench.export.kernels.cuda_build import WeightType, library_types

    monkeypatch.delenv(matmul.ENGINES_ENV, raising=False)
    act_order = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    mma = {WeightType.for_mma(act_order, False), WeightType.for_mma(act_order, True)}
    assert library_types(act_order) == {WeightType.of(act_order, True), WeightType.of(act_order, False)} | mma
    assert len(library_types(act_order)) == 4
    plain = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    assert {t.kernel for t in library_types(plain)} == {"gemv", "mma"} and len(library_types(plain)) == 3
    assert library_types(to_base3_layout(WEIGHTS["ternary2-g64"])) == set()  # Triton's alone
    monkeypatch.setenv(matmul.ENGINES_ENV, "triton")
    assert library_types(plain) == set()
    monkeypatch.setenv(matmul.ENGINES_ENV, "cuda,mma,wgmma")
    assert WeightType.for_wgmma(plain) in library_types(plain)
    assert {t.kernel for t in library_types(to_kernel_layout(WEIGHTS["mxfp4-rtn"]))} == {"gemv", "mma"}


def test_libraries_build_side_by_side_once_each_and_not_when_cached(tmp_path, monkeypatch):
    """Two builds meet at a barrier (they run at once or the test times out); a type another layer already
    started, or whose library is on disk, is not built again; a failed build is reported, not raised, and
    remembered for the kernel's calls."""
    import threading

    from quantbench.export.kernels import cuda_build, matmul

    monkeypatch.delenv(matmul.ENGINES_ENV, raising=False)
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    plain = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    gemv, *mma = sorted(cuda_build.library_types(plain), key=str)
    cuda_build.library_path(mma[0], "90").parent.mkdir(parents=True, exist_ok=True)
    cuda_build.library_path(mma[0], "90").touch()  # built before: not again
    together, built = threading.Barrier(2, timeout=20), []

    def build(weight_type, arch):
        together.wait()
        built.append(weight_type)
        if weight_type == gemv:
            raise RuntimeError("nvcc failed")
        return cuda_build.library_path(weight_type, arch)

    monkeypatch.setattr(cuda_build, "build", build)
    monkeypatch.setattr(cuda_build, "_failures", {})
    builds = cuda_build.LibraryBuilds("90")
    builds.add(plain)
    builds.add(dataclasses.replace(plain))  # another layer of the same kind
    failures = builds.wait()
    assert sorted(built, key=str) == sorted([gemv, mma[1]], key=str)
    assert list(failures) == [gemv] and "nvcc failed" in str(failures[gemv])
    with pytest.raises(RuntimeError, match="nvcc failed"):  # remembered: the tuner's call does not build again
        cuda_build.entry_point(gemv, "90")
    assert len(built) == 2
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    without = cuda_build.LibraryBuilds("90")
    without.add(plain)
    assert without.wait() == {} and not without.started


def test_tile_candidates_offer_paired_int4_decodes_and_multi_row_decodes():
    from quantbench.export.kernels.matmul import _candidates

    int4, int8 = to_kernel_layout(WEIGHTS["int4-g128-rtn"]), to_kernel_layout(WEIGHTS["int8-pc-rtn"])
    assert any(c.pairs for c in _candidates(1, int4, torch.float16))
    assert not any(c.pairs for c in _candidates(1, int4, torch.bfloat16) + _candidates(1, int8, torch.float16))
    assert {c.rows for c in _candidates(3, int4, torch.float16) if c.block_m == 1} == {4}
    assert {c.rows for c in _candidates(16, int8, torch.float16) if c.block_m == 1} == {8}
    assert all(c.block_m > 1 for c in _candidates(17, int4, torch.float16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inline PTX runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g128-rtn", "int4-g32 act_order", "int4-g32-sym-rtn"])
def test_paired_int4_decode_matches_within_float16_rounding_on_the_gpu(label):
    stored = WEIGHTS[label]
    x = torch.randn(1, IN, device="cuda").half()
    expected = x.float() @ stored.dequantize().cuda().T
    packed = to_kernel_layout(stored.to("cuda"))
    got = packed_matmul(x, packed, backend="triton", config=TileConfig(1, 32, 64, 2, pairs=True))
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("label, expand", [("int4-g32 act_order", True), ("int8-pc-rtn", False),
                                           ("int4-g32-sym-rtn", False), ("int2-g64-rtn", True)])
def test_dot_kernel_float16_decoding_gives_the_float32_decodings_result_bit_for_bit(label, expand):
    """(1024 + q) − (1024 + z) is exact in float16 and one multiply rounds it as float32's cast does."""
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(10)).half().to(TRITON_DEVICE)
    packed = to_kernel_layout(WEIGHTS[label].to(TRITON_DEVICE))
    half, single = (packed_matmul(x, packed, backend="triton", config=TileConfig(16, 32, 64, 1, expand=expand, half=h))
                    for h in (True, False))
    assert torch.equal(half, single)


CUDA_TILES = {"1 row, 8 lanes, 256 threads": TileConfig(1, 32, 0, 1, 8, 0, rows=1, engine="cuda"),
              "1 row, 16 lanes, 512 threads, cp.async": TileConfig(1, 64, 0, 1, 16, 1, rows=1, engine="cuda"),
              "2 rows, 4 lanes, 128 threads, cp.async": TileConfig(1, 16, 0, 1, 4, 1, rows=2, engine="cuda"),
              "4 rows, 16 lanes, 256 threads": TileConfig(1, 64, 0, 1, 8, 0, rows=4, engine="cuda"),
              "8 rows, 8 lanes, 128 threads": TileConfig(1, 32, 0, 1, 4, 0, rows=8, engine="cuda"),
              "1 row, 32 lanes, 256 threads, 2 splits": TileConfig(1, 128, 0, 2, 8, 0, rows=1, engine="cuda"),
              "1 row, 4 lanes, 512 threads, cp.async, 4 splits": TileConfig(1, 16, 0, 4, 16, 1, rows=1,
                                                                             engine="cuda"),
              "2 rows, 32 lanes, 128 threads, cp.async, 3 splits (the last empty for int4)":
                  TileConfig(1, 128, 0, 3, 4, 1, rows=2, engine="cuda"),
              "4 rows, 8 lanes, 128 threads, 2 splits": TileConfig(1, 32, 0, 2, 4, 0, rows=4, engine="cuda"),
              "1 row, 16 lanes, 512 threads, streamed": TileConfig(1, 64, 0, 1, 16, 0, rows=1, streamed=True,
                                                                   engine="cuda"),
              "2 rows, 8 lanes, 128 threads, streamed, 3 splits": TileConfig(1, 32, 0, 3, 4, 0, rows=2, streamed=True,
                                                                             engine="cuda"),
              # 80 outputs are 20 units of 4: shares of 8 or 12 outputs, of 4, of 16 (each block's lanes part idle)
              "1 row, 8 lanes, 256 threads, 7 column blocks": TileConfig(1, 32, 0, 1, 8, 0, rows=1, column_blocks=7,
                                                                         engine="cuda"),
              "1 row, 4 lanes, 128 threads, cp.async, 20 column blocks, 2 splits":
                  TileConfig(1, 16, 0, 2, 4, 1, rows=1, column_blocks=20, engine="cuda"),
              "2 rows, 32 lanes, 256 threads, streamed, 5 column blocks, 3 splits":
                  TileConfig(1, 128, 0, 3, 8, 0, rows=2, streamed=True, column_blocks=5, engine="cuda")}
ODD_INPUTS = 96  # 12 int4 word rows: one whole slab of 8 and a partial one


def test_cuda_kernel_libraries_are_built_per_weight_type_with_the_scale_span_of_its_groups():
    from quantbench.export.kernels.cuda_build import NO_GROUPS_SHIFT, WeightType, library_path, row_shift

    def spans(label):
        packed = to_kernel_layout(WEIGHTS[label])
        return WeightType.of(packed, packed.perm is not None).flush, row_shift(packed)

    assert spans("int4-g128-rtn") == (8, 4)  # 16 word rows per group: two flushes of 8 share a scale
    assert spans("int4-g32-sym-rtn") == (4, 2)
    assert spans("int2-g64-rtn") == (4, 2)  # 16 codes per word
    assert spans("int8-pc-rtn") == (8, NO_GROUPS_SHIFT)
    assert spans("mxfp4-rtn") == (4, 2) and spans("nvfp4-rtn") == (2, 1)
    asym_act = WeightType.of(to_kernel_layout(WEIGHTS["int4-g32 act_order"]), perm=True)
    assert asym_act.zeros and asym_act.perm
    assert library_path(asym_act, "90") != library_path(asym_act, "80") != library_path(
        WeightType.of(to_kernel_layout(WEIGHTS["int4-g32 act_order"]), perm=False), "80")
    # bench/gemv_anatomy.py's timing builds: the loads alone (1), the loads with a tensor-core-shaped decode (2)
    int4 = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    builds = [WeightType.of(int4, False, level) for level in (0, 1, 2)]
    assert len({library_path(build, "90") for build in builds}) == 3
    assert [f"-DLOAD_ONLY={level}" in build.defines() for level, build in enumerate(builds)] == [True] * 3


def test_mxfp4_scales_go_into_b_only_where_every_block_stays_an_exact_float16_normal():
    """E8M0 codes 114–140: every E2M1 value (0.5 … 6) times 2^(code − 127) is a float16 normal, so B holds the
    dequantized weight exactly; one code beyond either end leaves the normals (0.5 · 2^-14 below them, 6 · 2^14
    above 65504). The check runs once per scales tensor; other kinds always put their scales in B at 64 rows."""
    import weakref

    from quantbench.export.kernels.cuda_mma import MX_CODES_IN_B, mx_scales_fit_b, row_choices

    e2m1 = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    smallest_normal, largest = 2.0 ** -14, 65504.0
    low, high = MX_CODES_IN_B
    for code in range(low, high + 1):
        values = e2m1 * 2.0 ** (code - 127)
        assert torch.equal(values.half().double(), values) and values.min() >= smallest_normal
        assert values.max() <= largest
    assert 0.5 * 2.0 ** (low - 1 - 127) < smallest_normal and 6 * 2.0 ** (high + 1 - 127) > largest
    mxfp4 = to_kernel_layout(WEIGHTS["mxfp4-rtn"])
    for code, fits in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        scales = mxfp4.scales.clone()
        scales[0, 0] = code
        weight = dataclasses.replace(mxfp4, scales=scales)
        assert mx_scales_fit_b(weight) is fits and (64 in row_choices(weight)) is fits
        scales[0, 0] = 126  # checked once: the answer stays with this tensor
        assert mx_scales_fit_b(weight) is fits
    assert mx_scales_fit_b(to_kernel_layout(WEIGHTS["nvfp4-rtn"])) and 64 in row_choices(mxfp4)
    alive = weakref.ref(scales)
    del scales, weight
    assert alive() is None  # the check keeps no weight's scales alive


def test_tensor_core_libraries_load_scales_once_per_span_of_k_steps_that_share_them():
    """A k-step is 4 word rows (one per thread of a quad); the span is how many share one group (at most a
    slab of 4), their sums scaled together; 0 where the rows of a k-step differ in group, or NVFP4: then
    the scales go into B."""
    from quantbench.export.kernels.cuda_build import WeightType, library_path

    def span(label):
        weight_type = WeightType.for_mma(to_kernel_layout(WEIGHTS[label]))
        assert weight_type.kernel == "mma" and not weight_type.perm and "-DSPAN" in " ".join(weight_type.defines())
        return weight_type.flush

    assert span("int4-g128-rtn") == 4  # 16 word rows per group
    assert span("int4-g32 act_order") == 1
    assert span("int4-g32-sym-rtn") == 1 and span("mxfp4-rtn") == 1  # 4 word rows: one k-step
    assert span("int8-g64 act_order") == 4 and span("int2-g64-rtn") == 1  # 16 and 4 word rows
    assert span("nvfp4-rtn") == 0 and span("int8-pc-rtn") == 4 and span("ternary2-g64") == 2
    int4 = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    in_b = WeightType.for_mma(int4, scales_in_b=True)  # 64-row blocks: the scales go into B
    assert in_b.flush == 0 and library_path(in_b, "90") != library_path(WeightType.for_mma(int4), "90")
    mxfp4 = to_kernel_layout(WEIGHTS["mxfp4-rtn"])  # 64-row blocks where its scales keep B exact
    mx_in_b = WeightType.for_mma(mxfp4, scales_in_b=True)
    assert mx_in_b.flush == 0 and library_path(mx_in_b, "90") != library_path(WeightType.for_mma(mxfp4), "90")
    assert library_path(WeightType.for_mma(int4), "90").name.startswith("packed_mma-")
    assert library_path(WeightType.of(int4, False), "90").name.startswith("packed_gemv-")


def test_tuning_times_the_cuda_engines_where_they_apply(monkeypatch):
    """Where the CUDA kernels apply (faked here: no GPU), the tuner times their tiles and not Triton's, which
    stay where none applies; QUANTBENCH_KERNEL_ENGINES adds Triton's or narrows the choice to one engine."""
    from quantbench.export.kernels import cuda_build, cuda_gemv, cuda_mma, matmul

    monkeypatch.setattr(cuda_build, "unsupported_reason", lambda x, weight: None)
    monkeypatch.setattr(cuda_gemv, "multiprocessors", lambda device: 8)
    packed = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    x = torch.randn(1, IN).half()
    default = matmul._engine_candidates(x, packed)
    cuda = [c for c in default if c.engine == "cuda"]
    mma = [c for c in default if c.engine == "mma"]
    assert cuda and mma and default == cuda + mma
    assert {(c.rows, c.num_warps, c.block_n // 32, c.num_stages) for c in mma} == {
        (rows, warps, warps_n, x_shared) for rows in (8, 16) for warps in cuda_mma.WARPS
        for warps_n in cuda_mma.WARPS_N if warps_n <= warps for x_shared in (0, 1)}
    for m, rows in ((9, {16}), (20, {16, 32}), (40, {16, 32, 64}), (64, {16, 32, 64})):
        assert {c.rows for c in matmul._engine_candidates(x.repeat(m, 1), packed) if c.engine == "mma"} == rows
    assert not any(c.overlap_gather for c in mma)
    act_order = to_kernel_layout(WEIGHTS["int4-g32 act_order"])  # the kernel may start while its gather runs
    for overlapping in (True, False):
        monkeypatch.setattr(cuda_build, "can_launch_dependent", lambda device, answer=overlapping: answer)
        overlaps = {(c.rows, c.num_warps, c.block_n, c.num_stages, c.overlap_gather)
                    for c in matmul._mma_candidates(x.repeat(4, 1), act_order)}
        assert {o for *_, o in overlaps} == ({False, True} if overlapping else {False})
        assert not overlapping or all((*tile, not o) in overlaps for *tile, o in overlaps)  # every tile both ways
    mxfp4 = to_kernel_layout(WEIGHTS["mxfp4-rtn"])  # its scales keep B exact: 64-row blocks too
    assert {c.rows for c in matmul._mma_candidates(x.repeat(64, 1), mxfp4)} == {16, 32, 64}
    wide = dataclasses.replace(mxfp4, scales=mxfp4.scales.clone().index_fill_(1, torch.tensor([3]), 141))
    assert {c.rows for c in matmul._mma_candidates(x.repeat(64, 1), wide)} == {16, 32}  # one block's 6 · 2^14
    assert {c.engine for c in matmul._engine_candidates(x.repeat(20, 1), packed)} == {"mma"}
    assert {c.engine for c in matmul._engine_candidates(x.repeat(65, 1), packed)} == {"triton"}  # none applies
    # registers a slab or a row at a time, and cp.async stages; 4 rows of x: registers only
    assert {(c.rows, c.num_stages, c.streamed) for c in cuda} == {(1, 0, False), (1, 0, True), (1, 1, False)}
    assert {(c.rows, c.num_stages, c.streamed) for c in matmul._cuda_candidates(x.repeat(3, 1), packed)} == {
        (rows, stages, streamed) for rows in (2, 4) for stages, streamed in ((0, False), (0, True), (1, False))
        if rows == 2 or (stages, streamed) == (0, False)}
    assert {(c.block_n, c.num_warps) for c in cuda} == {(4 * lanes, threads // 32) for lanes in cuda_gemv.LANES
                                                        for threads in cuda_gemv.THREADS}
    # 256 inputs are 32 int4 word rows: no split of K leaves each row lane a slab of its own
    assert {c.split_k for c in cuda} == {1}
    assert {c.x_in_shared for c in cuda} == {True, False}  # x copied to shared memory first, or read slab by slab
    act_order = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    assert {c.x_in_shared for c in matmul._cuda_candidates(x, act_order)} == {True}  # gathered there
    four_rows = [c for c in matmul._engine_candidates(x.repeat(3, 1), packed) if c.engine == "cuda"]
    assert {c.rows for c in four_rows} == {2, 4} and all(c.num_warps < 16 for c in four_rows)
    assert all(c.rows in cuda_gemv.ASYNC_ROWS for c in four_rows if c.num_stages)
    monkeypatch.setenv(matmul.ENGINES_ENV, "cuda")
    assert matmul._engine_candidates(x, packed) == cuda
    monkeypatch.setenv(matmul.ENGINES_ENV, "mma")
    assert matmul._engine_candidates(x, packed) == mma
    monkeypatch.setenv(matmul.ENGINES_ENV, "triton,cuda,mma")
    every = matmul._engine_candidates(x, packed)
    triton = [c for c in every if c.engine == "triton"]
    assert triton and every == triton + cuda + mma
    monkeypatch.setenv(matmul.ENGINES_ENV, "triton")
    assert matmul._engine_candidates(x, packed) == triton
    monkeypatch.delenv(matmul.ENGINES_ENV)  # no nvcc: Triton's tiles by default
    monkeypatch.setattr(cuda_build, "unsupported_reason", lambda x, weight: "nvcc not found")
    assert matmul._engine_candidates(x, packed) == triton


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("tile", CUDA_TILES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_cuda_decode_kernel_equals_the_dequantized_matmul_on_partial_tiles(label, tile, batch):
    """80 outputs fill no block of 16–64 evenly; 3 and 16 rows leave partial row tiles; act_order at batch 1
    is gathered inside the kernel."""
    stored = WEIGHTS[label].to("cuda")
    x = torch.randn(batch, IN, device="cuda", generator=torch.Generator("cuda").manual_seed(batch)).half()
    expected = x.float() @ stored.dequantize().T
    got = packed_matmul(x, to_kernel_layout(stored), backend="cuda", config=CUDA_TILES[tile])
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("name", ["int4-g32-rtn", "int8-g32-sym-rtn", "int2-pc-rtn", "mxfp4-rtn", "nvfp4-rtn"])
def test_cuda_decode_kernel_handles_a_partial_slab_of_word_rows(name):
    stored = quantize_rtn(torch.randn(OUT, ODD_INPUTS), Scheme.parse(name)).to("cuda")
    x = torch.randn(2, ODD_INPUTS, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    got = packed_matmul(x, to_kernel_layout(stored), backend="cuda")
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_split_k_choices_fill_the_multiprocessors_and_keep_a_slab_per_row_lane():
    from quantbench.export.kernels.cuda_gemv import split_choices, split_rows

    packed = SimpleNamespace(shape=(8192, 8192), per_word=8)  # int4
    # 8192 outputs, 32 lanes: 64 column blocks; 132 processors need 4 splits, and 8 and 16 are tried too
    assert split_choices(1, packed, 1, 32, 256, 132) == [1, 4, 8, 16]
    assert split_choices(1, packed, 1, 4, 512, 132) == [1]  # 512 blocks: enough already
    # 1024 word rows, 128 row lanes of a slab each: at most a split of 1
    assert split_choices(1, packed, 1, 4, 512, 4096) == [1]
    assert split_choices(16, packed, 8, 32, 128, 132) == [1, 2, 4, 8]  # 128 blocks: 2 splits fill, then ×2, ×4
    assert split_rows(1024, 8) == 128 and split_rows(1024, 3) == 344 and split_rows(12, 2) == 8
    assert sum(min(split_rows(100, 7), max(0, 100 - z * split_rows(100, 7))) for z in range(7)) == 100


def test_tensor_core_split_k_choices_fill_the_multiprocessors_and_keep_a_slab_per_warp():
    from quantbench.export.kernels.cuda_mma import split_choices

    down = SimpleNamespace(shape=(4096, 14336), per_word=8)  # int4: 1792 word rows, 448 k-steps
    # 8 rows, 8 warps one above another: 128 blocks of 32 outputs; 132 processors need 2 splits, and 4 is tried
    assert split_choices(8, down, 8, 8, 1, 132) == [1, 2, 4]
    assert split_choices(16, down, 16, 4, 4, 132) == [1, 8, 16]  # 32 blocks of 128 outputs: 8 splits fill
    assert split_choices(16, down, 16, 8, 1, 64) == [1]  # 128 blocks fill 64 processors already
    assert split_choices(32, down, 32, 8, 1, 132) == [1]  # split-K is built for blocks of 8 and 16 rows only
    # 8 k-steps, 8 warps along K: no split leaves each of them a slab of its own
    assert split_choices(1, SimpleNamespace(shape=(80, 256), per_word=8), 16, 8, 1, 132) == [1]


def test_tensor_core_capped_blocks_are_offered_for_32_rows_whose_warps_share_x_side_by_side():
    from quantbench.export.kernels.cuda_mma import capped_choices

    int4 = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    assert capped_choices(32, 4, True, int4) == (False, True)
    for rows, warps_n, x_shared in ((16, 4, True), (64, 4, True), (32, 2, True), (32, 4, False)):
        assert capped_choices(rows, warps_n, x_shared, int4) == (False,)
    # ternary's two planes of span sums spill under the cap; groups shorter than a k-step scale B instead
    assert capped_choices(32, 4, True, to_kernel_layout(WEIGHTS["ternary2-g64"])) == (False,)
    assert capped_choices(32, 4, True, to_kernel_layout(ternary_weight(16))) == (False, True)
    tiles = up_projection_mma_candidates(32)
    capped = [t for t in tiles if t.capped]
    assert {(t.rows, t.num_warps, t.block_n, t.num_stages) for t in capped} == {(32, 4, 128, 1), (32, 8, 128, 1)}
    assert {t.split_k for t in capped} == {1}
    assert len(tiles) == len(set(tiles))


def up_projection_mma_candidates(m: int) -> list:
    """The tensor-core tiles the tuner would time for m rows of an int4-g128 14336×4096 weight on a
    132-multiprocessor GPU without dependent launch, listed on any machine."""
    from quantbench.export.kernels.matmul import _mma_candidates

    with patch("quantbench.export.kernels.cuda_mma.unsupported_reason", return_value=None), \
            patch("quantbench.export.kernels.cuda_gemv.multiprocessors", return_value=132), \
            patch("quantbench.export.kernels.cuda_build.can_launch_dependent", return_value=False):
        up = SimpleNamespace(shape=(14336, 4096), per_word=8, kind="int", perm=None, group=128, bits=4, zeros=None)
        return _mma_candidates(torch.zeros(m, 1), up)


def test_tensor_core_scales_in_b_are_offered_below_64_rows_where_the_weight_has_span_sums():
    from quantbench.export.kernels.cuda_mma import scales_in_b_choices

    for label in ("int4-g128-rtn", "int4-g32 act_order", "ternary2-g64", "mxfp4-rtn"):
        packed = to_kernel_layout(WEIGHTS[label])
        assert [scales_in_b_choices(rows, packed) for rows in (8, 16, 32, 64)] == [(False, True)] * 3 + [(False,)]
    # NVFP4 and groups shorter than a k-step scale B already; MXFP4 codes beyond float16's range in B never do
    for packed in (to_kernel_layout(WEIGHTS["nvfp4-rtn"]), to_kernel_layout(ternary_weight(16))):
        assert scales_in_b_choices(16, packed) == (False,)
    mxfp4 = to_kernel_layout(WEIGHTS["mxfp4-rtn"])
    assert scales_in_b_choices(16, dataclasses.replace(mxfp4, scales=mxfp4.scales.clone().fill_(141))) == (False,)
    tiles = up_projection_mma_candidates(40)
    in_b = [t for t in tiles if t.scales_in_b]
    assert {t.rows for t in in_b} == {16, 32} and {t.rows for t in tiles} == {16, 32, 64}
    assert {dataclasses.replace(t, scales_in_b=False) for t in in_b} == {t for t in tiles if t.rows < 64} - set(in_b)


def test_column_blocks_are_offered_where_they_give_every_multiprocessor_one_or_two_blocks():
    from quantbench.export.kernels.cuda_gemv import column_block_choices

    # 14336 outputs in 112 blocks of 128: also 132 and 264 blocks of 108–112 and 52–56 outputs
    assert column_block_choices(14336, 32, 1, 132) == [0, 132, 264]
    # 4096 outputs, 8 blocks along K (splits × row tiles) each: 17 blocks would not hold them, 33 do
    assert column_block_choices(4096, 32, 8, 132) == [0, 33]
    assert column_block_choices(80, 4, 1, 132) == [0]  # 20 units of 4 outputs: 132 blocks cannot share them


def test_act_order_holds_the_whole_rows_of_x_it_gathers_from():
    from quantbench.export.kernels.cuda_gemv import x_held_bytes

    plain = SimpleNamespace(shape=(4096, 8192), per_word=8, perm=None)
    act_order = SimpleNamespace(shape=(4096, 8192), per_word=8, perm=torch.arange(8192))
    assert x_held_bytes(8192, plain, 1, 1) == 16384  # one row of 8192 float16 inputs
    assert x_held_bytes(8192, plain, 2, 4) == 2 * 2048 * 2  # 4 splits of 256 word rows
    assert x_held_bytes(8192, act_order, 2, 4) == 2 * (2048 + 8192) * 2  # + the rows gathered from, whole
    assert x_held_bytes(100 * 8, plain, 1, 3) == 40 * 8 * 2  # 100 word rows: splits of 5 slabs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g32 act_order", "mxfp4-rtn"])
def test_cuda_decode_kernel_takes_rows_of_x_that_are_not_16_byte_aligned(label):
    """x's rows are copied into shared memory in 16-byte pieces: a view whose rows start 8 bytes off those
    boundaries, or whose first element is off one, is copied first (called directly: `packed_matmul` makes
    x contiguous before)."""
    from quantbench.export.kernels import cuda_gemv

    stored = WEIGHTS[label].to("cuda")
    packed = to_kernel_layout(stored)
    wide = torch.randn(3, IN + 4, device="cuda").half()
    for x in (wide[:, :IN], wide[:, 4:]):
        expected = x.float() @ stored.dequantize().T
        for rows, lanes, threads, copies in ((2, 8, 128, False), (1, 16, 128, True)):
            got = cuda_gemv.launch(x, packed, rows, lanes, threads, copies)
            torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g32 act_order", "ternary2-g64", "nvfp4-rtn"])
def test_split_k_sums_in_a_fixed_order_and_rearms_its_counts(label):
    """Split-K's last block adds the partial sums in split order: a repeated call is bit-identical (its
    arrival counts went back to zero), and equals one block along K to float16 rounding."""
    packed = to_kernel_layout(WEIGHTS[label].to("cuda"))
    x = torch.randn(3, IN, device="cuda").half()
    assert_split_k_sums_are_fixed_and_replay(x, packed, TileConfig(1, 64, 0, 4, 4, 0, rows=2, engine="cuda"))


def assert_split_k_sums_are_fixed_and_replay(x: torch.Tensor, packed, tile: TileConfig) -> None:
    """A split-K tile's result is bit-identical when repeated (its arrival counts went back to zero) and in a
    graph replay on new x, and equals one block along K to float16 rounding. Leaves new values in x."""
    first = packed_matmul(x, packed, backend=tile.engine, config=tile)
    for _ in range(3):
        assert torch.equal(packed_matmul(x, packed, backend=tile.engine, config=tile), first)
    whole = packed_matmul(x, packed, backend=tile.engine, config=dataclasses.replace(tile, split_k=1))
    torch.testing.assert_close(first, whole, rtol=1e-2, atol=1e-2 * whole.abs().max().item())
    assert_replay_equals(x, packed, tile, tile)


def assert_replay_equals(x: torch.Tensor, packed, tile: TileConfig, reference: TileConfig) -> None:
    """A CUDA graph of `tile`, replayed on new values of x, gives `reference`'s eager result bit for bit. Leaves
    the new values in x."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = packed_matmul(x, packed, backend=tile.engine, config=tile)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, packed_matmul(x, packed, backend=reference.engine, config=reference))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g32 act_order", "ternary2-g64", "nvfp4-rtn"])
def test_column_blocks_share_the_outputs_without_changing_any_sum(label):
    """Where an output's block is does not change the order of its sums: bit-identical to one block per 4 ·
    lanes outputs. Fewer blocks than hold the outputs, or more than there are units of 4, are refused."""
    from quantbench.export.kernels import cuda_gemv

    packed = to_kernel_layout(WEIGHTS[label].to("cuda"))
    x = torch.randn(2, IN, device="cuda").half()
    tile = TileConfig(1, 32, 0, 1, 4, 0, rows=1, engine="cuda")
    whole = packed_matmul(x, packed, backend="cuda", config=tile)
    for blocks, splits in ((4, 1), (11, 1), (20, 2)):
        shared = dataclasses.replace(tile, column_blocks=blocks, split_k=splits)
        got = packed_matmul(x, packed, backend="cuda", config=shared)
        if splits == 1:
            assert torch.equal(got, whole)
        else:
            torch.testing.assert_close(got, whole, rtol=1e-2, atol=1e-2 * whole.abs().max().item())
    for blocks in (2, 21):
        with pytest.raises(ValueError, match="column blocks"):
            cuda_gemv.launch(x, packed, 1, 8, 128, column_blocks=blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("splits", [2, 3])
def test_split_k_handles_a_partial_slab_of_word_rows(splits):
    stored = quantize_rtn(torch.randn(OUT, ODD_INPUTS), Scheme.parse("int4-g32-rtn")).to("cuda")
    x = torch.randn(1, ODD_INPUTS, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    tile = TileConfig(1, 128, 0, splits, 4, 0, rows=1, engine="cuda")
    got = packed_matmul(x, to_kernel_layout(stored), backend="cuda", config=tile)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g32 act_order", "int2-g64-rtn", "ternary2-g64", "mxfp4-rtn"])
def test_cuda_decode_kernel_reads_x_from_memory_where_shared_memory_cannot_hold_it(label, monkeypatch):
    from quantbench.export.kernels import cuda_gemv

    monkeypatch.setattr(cuda_gemv, "X_SHARED_BYTES", 0)  # act_order: gathered by torch, then x from memory
    stored = WEIGHTS[label].to("cuda")
    x = torch.randn(3, IN, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    for tile in (TileConfig(1, 32, 0, 1, 4, 0, rows=2, engine="cuda"),
                 TileConfig(1, 64, 0, 2, 4, 1, rows=2, engine="cuda")):
        got = packed_matmul(x, to_kernel_layout(stored), backend="cuda", config=tile)
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    monkeypatch.undo()  # it fits again; the tile asks for x from memory (act_order still gathers in the kernel)
    tile = TileConfig(1, 32, 0, 2, 4, 0, rows=1, x_in_shared=False, engine="cuda")
    got = packed_matmul(x, to_kernel_layout(stored), backend="cuda", config=tile)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def assert_graph_replays_the_kernel(x: torch.Tensor, packed, backend: str) -> None:
    """The kernel launches on the stream a CUDA graph captures: a replay on new x gives the eager result."""
    before = packed_matmul(x, packed, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = packed_matmul(x, packed, backend=backend)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(captured, packed_matmul(x, packed, backend=backend))
    assert not torch.equal(captured, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA decode kernel runs on an NVIDIA GPU only")
def test_cuda_kernel_is_a_tuning_candidate_and_launches_on_the_stream_a_graph_captures():
    from quantbench.export.kernels.matmul import _cuda_candidates

    packed = to_kernel_layout(act_order_weight(4, 128).to("cuda"))
    x = torch.randn(1, IN, device="cuda").half()
    assert {c.engine for c in _cuda_candidates(x, packed)} == {"cuda"}
    assert _cuda_candidates(x.bfloat16(), packed) == [] and _cuda_candidates(x.repeat(17, 1), packed) == []
    assert_graph_replays_the_kernel(x, packed, "cuda")


def assert_equals_the_dequantized_matmul(stored, batch: int, tile: TileConfig) -> None:
    """`tile` on x of `batch` rows (seeded by the batch) gives float16 within float16 rounding of x·Wᵀ."""
    x = torch.randn(batch, IN, device="cuda", generator=torch.Generator("cuda").manual_seed(batch)).half()
    expected = x.float() @ stored.dequantize().T
    got = packed_matmul(x, to_kernel_layout(stored), backend=tile.engine, config=tile)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


MMA_TILES = {"8 rows, 4 warps side by side": TileConfig(1, 128, 0, 1, 4, 0, rows=8, engine="mma"),
             "16 rows, 8 warps splitting the inputs": TileConfig(1, 32, 0, 1, 8, 0, rows=16, engine="mma"),
             "32 rows, 8 warps, 2 along the outputs": TileConfig(1, 64, 0, 1, 8, 0, rows=32, engine="mma"),
             "8 rows, x shared by 2 warps along the outputs": TileConfig(1, 64, 0, 1, 4, 1, rows=8, engine="mma"),
             "32 rows, x shared, 4 warps splitting the inputs": TileConfig(1, 32, 0, 1, 4, 1, rows=32, engine="mma"),
             "64 rows, x shared, 4 warps, 2 along the outputs": TileConfig(1, 64, 0, 1, 4, 1, rows=64, engine="mma"),
             "64 rows, x from global memory": TileConfig(1, 128, 0, 1, 4, 0, rows=64, engine="mma"),
             "16 rows, x shared, started while act_order's gather runs":
                 TileConfig(1, 64, 0, 1, 4, 1, rows=16, overlap_gather=True, engine="mma"),
             "32 rows, capped, 4 warps side by side":
                 TileConfig(1, 128, 0, 1, 4, 1, rows=32, capped=True, engine="mma"),
             "32 rows, capped, 8 warps, 4 side by side":
                 TileConfig(1, 128, 0, 1, 8, 1, rows=32, capped=True, engine="mma"),
             "8 rows, scales in B, x from global memory":
                 TileConfig(1, 32, 0, 1, 8, 0, rows=8, scales_in_b=True, engine="mma"),
             "16 rows, scales in B, x shared, 2 splits":
                 TileConfig(1, 64, 0, 2, 4, 1, rows=16, scales_in_b=True, engine="mma"),
             "32 rows, scales in B, 4 warps side by side":
                 TileConfig(1, 128, 0, 1, 4, 1, rows=32, scales_in_b=True, engine="mma")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("tile", MMA_TILES)
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_tensor_core_kernel_equals_the_dequantized_matmul_on_partial_tiles(label, tile, batch):
    """80 outputs fill no block of 32–128; 1, 5 and 40 rows leave partial row blocks, 40 also spans two
    blocks of 32; act_order is gathered before the call. 64-row blocks put the scales into B (MXFP4's too: the
    test weight's scales keep B exact), shorter ones where asked, if the weight has span sums at all."""
    from quantbench.export.kernels.cuda_build import WeightType

    stored = WEIGHTS[label].to("cuda")
    refused = {"capped True": MMA_TILES[tile].capped and label.startswith("ternary2"),  # its span sums spill
               "scales_in_b True": MMA_TILES[tile].scales_in_b
               and WeightType.for_mma(to_kernel_layout(stored)).flush == 0}  # B holds the scales anyway
    refusal = next((match for match, expected in refused.items() if expected), None)
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            packed_matmul(torch.zeros(batch, IN, device="cuda").half(), to_kernel_layout(stored), backend="mma",
                          config=MMA_TILES[tile])
        return
    assert_equals_the_dequantized_matmul(stored, batch, MMA_TILES[tile])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("stored", [quantize_rtn(weight(), Scheme.parse("int4-g16-rtn")), ternary_weight(16)],
                         ids=["int4-g16", "ternary2-g16"])
@pytest.mark.parametrize("batch", [1, 40])
def test_tensor_core_kernel_scales_b_where_groups_are_shorter_than_a_k_step(stored, batch):
    from quantbench.export.kernels.cuda_build import WeightType

    packed = to_kernel_layout(stored.to("cuda"))
    assert WeightType.for_mma(packed).flush == 0
    x = torch.randn(batch, IN, device="cuda").half()
    expected = x.float() @ stored.to("cuda").dequantize().T
    got = packed_matmul(x, packed, backend="mma")
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("name", ["int4-g32-rtn", "int8-g32-sym-rtn", "int2-pc-rtn", "mxfp4-rtn", "nvfp4-rtn"])
@pytest.mark.parametrize("x_shared", [0, 1], ids=["x from global memory", "x through shared memory"])
def test_tensor_core_kernel_handles_a_partial_slab_of_k_steps(name, x_shared):
    """96 inputs: 3 k-steps of int4 (one slab of 4, partly empty), 1.5 of int2."""
    stored = quantize_rtn(torch.randn(OUT, ODD_INPUTS), Scheme.parse(name)).to("cuda")
    x = torch.randn(12, ODD_INPUTS, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    tile = TileConfig(1, 64, 0, 1, 4, x_shared, rows=16, engine="mma")
    got = packed_matmul(x, to_kernel_layout(stored), backend="mma", config=tile)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize(("label", "rows"), [("int4-g32 act_order", 8), ("int4-g32 act_order", 16),
                                             ("ternary2-g64", 16), ("mxfp4-rtn", 8), ("nvfp4-rtn", 16)])
def test_tensor_core_split_k_sums_in_a_fixed_order_and_rearms_its_counts(label, rows):
    """Blocks along K, their float32 sums added in split order by the last to finish (as the CUDA-core
    kernel's). 3 splits of 8 k-steps (whole slabs of 4) leave the third block none. Taller blocks have no
    split-K build: refused."""
    from quantbench.export.kernels import cuda_mma

    packed = to_kernel_layout(WEIGHTS[label].to("cuda"))
    x = torch.randn(12, IN, device="cuda").half()
    for splits, x_shared in ((2, 1), (3, 0)):
        tile = TileConfig(1, 64, 0, splits, 4, x_shared, rows=rows, engine="mma")
        assert_split_k_sums_are_fixed_and_replay(x, packed, tile)
    with pytest.raises(ValueError, match="splits 2"):
        cuda_mma.launch(x, packed, 32, 4, 2, splits=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g128-rtn", "ternary2-g64", "mxfp4-rtn"])
@pytest.mark.parametrize(("rows", "warps", "warps_n"), [(8, 8, 1), (16, 4, 4), (16, 8, 2)])
def test_tensor_core_split_k_output_is_its_partials_added_in_split_order(label, rows, warps, warps_n):
    """The last block to arrive stores exactly float16(((0 + p₀) + p₁) + p₂) of the splits' float32 partial sums
    left in the workspace, at every output of partial row and output blocks (80 outputs, 45 rows: 3 blocks of 16,
    6 of 8), with 1 to 4 units of 4 outputs a thread."""
    from quantbench.export.kernels import cuda_build

    packed = to_kernel_layout(WEIGHTS[label].to("cuda"))
    x = torch.randn(45, IN, device="cuda").half()
    splits = 3
    tile = TileConfig(1, 32 * warps_n, 0, splits, warps, 1, rows=rows, engine="mma")
    got = packed_matmul(x, packed, backend="mma", config=tile)
    partials, arrivals = cuda_build.split_workspace(x.device, splits, x.shape[0], OUT)
    parts = partials[:splits * x.shape[0] * OUT].view(splits, x.shape[0], OUT)
    expected = torch.zeros_like(parts[0])
    for part in parts:
        expected = expected + part
    assert torch.equal(got, expected.half()) and not arrivals.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("label", ["int4-g32 act_order", "int4-g128-rtn", "ternary2-g16", "mxfp4-rtn", "nvfp4-rtn"])
def test_tensor_core_capped_blocks_change_no_sum(label):
    """Capping the registers changes where values live, not one operation: bit-identical to the same tile
    uncapped, also in a graph replay. Other tiles, and capped blocks split along K, have no build: refused."""
    from quantbench.export.kernels import cuda_mma

    stored = ternary_weight(16) if label == "ternary2-g16" else WEIGHTS[label]
    packed = to_kernel_layout(stored.to("cuda"))
    x = torch.randn(27, IN, device="cuda").half()
    for warps in (4, 8):
        tile = TileConfig(1, 128, 0, 1, warps, 1, rows=32, engine="mma")
        uncapped = packed_matmul(x, packed, backend="mma", config=tile)
        capped = dataclasses.replace(tile, capped=True)
        assert torch.equal(packed_matmul(x, packed, backend="mma", config=capped), uncapped)
        assert_replay_equals(x, packed, capped, tile)
    for rows, warps_n, x_shared, splits in ((16, 4, True, 1), (64, 4, True, 1), (32, 2, True, 1), (32, 4, False, 1),
                                            (32, 4, True, 2)):
        with pytest.raises(ValueError, match="capped True"):
            cuda_mma.launch(x[:16], packed, rows, 4, warps_n, x_shared=x_shared, splits=splits, capped=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
def test_tensor_core_mxfp4_scales_in_b_build_each_blocks_power_of_two_from_its_code():
    """64-row blocks scale MXFP4's B by 2^(code − 127) built from the code's bits: blocks at the lowest code that
    fits and far above the test weight's own give the dequantized matmul, as the span sums of 32-row blocks do; a
    code beyond the range is refused at 64 rows."""
    from quantbench.export.kernels import cuda_mma
    from quantbench.export.kernels.reference import dequantize_kernel_weight

    mxfp4 = to_kernel_layout(WEIGHTS["mxfp4-rtn"].to("cuda"))
    scales = mxfp4.scales.clone()
    scales[0, :40], scales[1, 40:] = cuda_mma.MX_CODES_IN_B[0], 135
    weight = dataclasses.replace(mxfp4, scales=scales)
    x = 0.01 * torch.randn(64, IN, device="cuda").half()
    expected = x.float() @ dequantize_kernel_weight(weight).T
    for rows in (32, 64):
        got = packed_matmul(x, weight, backend="mma", config=TileConfig(1, 64, 0, 1, 4, 1, rows=rows, engine="mma"))
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    wide = dataclasses.replace(mxfp4, scales=scales.clone().fill_(141))
    with pytest.raises(ValueError, match="rows 64"):
        cuda_mma.launch(x, wide, 64, 4, 2, x_shared=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
@pytest.mark.parametrize("name", ["int4-g32-rtn", "int2-pc-rtn", "nvfp4-rtn"])
def test_tensor_core_split_k_handles_a_partial_slab_of_k_steps(name):
    """96 inputs, 2 splits: the first block takes the partial slab, the second none."""
    stored = quantize_rtn(torch.randn(OUT, ODD_INPUTS), Scheme.parse(name)).to("cuda")
    x = torch.randn(12, ODD_INPUTS, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    for x_shared in (0, 1):
        tile = TileConfig(1, 32, 0, 2, 4, x_shared, rows=16, engine="mma")
        got = packed_matmul(x, to_kernel_layout(stored), backend="mma", config=tile)
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tensor-core kernel runs on an NVIDIA GPU only")
def test_tensor_core_kernel_is_a_tuning_candidate_up_to_64_rows_and_graph_capture_replays_it():
    from quantbench.export.kernels.matmul import _mma_candidates

    packed = to_kernel_layout(act_order_weight(4, 128).to("cuda"))
    x = torch.randn(24, IN, device="cuda").half()
    assert {c.engine for c in _mma_candidates(x, packed)} == {"mma"}
    assert _mma_candidates(x.bfloat16(), packed) == [] and _mma_candidates(x.repeat(3, 1), packed) == []
    assert_graph_replays_the_kernel(x, packed, "mma")
    # 64 rows and 8 warps: 64 KB of shared memory, whose allowance is set on the eager call, not in the capture
    assert_graph_replays_the_kernel(torch.randn(64, IN, device="cuda").half(), packed, "mma")


def test_warpgroup_libraries_are_built_for_sm_90a_with_the_scales_in_the_weights_fragment():
    """wgmma is sm_90a's alone; the weight is A, so its scales always go into A (SPAN 0), which MXFP4's may not."""
    from quantbench.export.kernels.cuda_build import WeightType, _flags, every_weight_type, library_path

    int4 = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    warpgroup = WeightType.for_wgmma(int4)
    assert warpgroup.kernel == "wgmma" and warpgroup.flush == 0 and "-DSPAN=0" in warpgroup.defines()
    assert "-gencode=arch=compute_90a,code=sm_90a" in _flags(warpgroup, "90")
    assert "-gencode=arch=compute_90,code=sm_90" in _flags(WeightType.for_mma(int4), "90")
    assert library_path(warpgroup, "90").name.startswith("packed_wgmma-")
    assert library_path(warpgroup, "90") != library_path(WeightType.for_mma(int4, scales_in_b=True), "90")
    with pytest.raises(ValueError, match="MXFP4"):
        WeightType.for_wgmma(to_kernel_layout(WEIGHTS["mxfp4-rtn"]))
    built = [t for t in every_weight_type() if t.kernel == "wgmma"]
    assert {(t.kind, t.bits, t.zeros) for t in built} == {
        *((0, bits, zeros) for bits in (2, 4, 8) for zeros in (False, True)), (1, 4, False), (3, 4, False)}
    for label, stored in WEIGHTS.items():  # every kind the kernel takes has its library built ahead
        if not label.startswith("mxfp4"):
            assert WeightType.for_wgmma(to_kernel_layout(stored)) in built


def test_warpgroup_kernel_is_timed_beside_the_others_on_hopper_only(monkeypatch):
    """Faked here (no GPU): on sm_90 the tuner times the warpgroup kernel's tiles where QUANTBENCH_KERNEL_ENGINES
    names it, one or two warpgroups, the fewest rows per block that hold the batch; not beyond 64 rows, not for
    MXFP4, not on another GPU."""
    from quantbench.export.kernels import cuda_build, cuda_gemv, cuda_wgmma, matmul

    monkeypatch.setattr(cuda_build, "unsupported_reason", lambda x, weight: None)
    monkeypatch.setattr(cuda_gemv, "multiprocessors", lambda device: 132)
    packed = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    x = torch.randn(1, IN).half()
    assert matmul._wgmma_candidates(x, packed) == []  # no device of capability 9.0
    monkeypatch.setattr(cuda_build, "device_capability", lambda device: (9, 0))
    for m, rows in ((1, 8), (5, 8), (9, 16), (20, 32), (33, 64), (64, 64)):
        tiles = matmul._wgmma_candidates(x.repeat(m, 1), packed)
        assert {(c.engine, c.rows) for c in tiles} == {("wgmma", rows)}
        assert {(c.num_warps, c.block_n) for c in tiles} == {(4, 128), (8, 256)}
        assert {c.split_k for c in tiles} == {1, 2}  # 256 inputs: two slabs of 128 to split
    assert matmul._wgmma_candidates(x.repeat(65, 1), packed) == []
    assert matmul._wgmma_candidates(x, to_kernel_layout(WEIGHTS["mxfp4-rtn"])) == []
    act_order = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    monkeypatch.setattr(cuda_build, "can_launch_dependent", lambda device: True)
    assert {c.overlap_gather for c in matmul._wgmma_candidates(x.repeat(16, 1), act_order)} == {False, True}
    assert {c.engine for c in matmul._engine_candidates(x.repeat(16, 1), packed)} == {"cuda", "mma"}
    monkeypatch.setenv(matmul.ENGINES_ENV, "triton,cuda,mma,wgmma")  # timed only where named
    every = matmul._engine_candidates(x.repeat(16, 1), packed)
    assert {c.engine for c in every} == {"triton", "cuda", "mma", "wgmma"}
    monkeypatch.setenv(matmul.ENGINES_ENV, "wgmma")
    assert matmul._engine_candidates(x.repeat(16, 1), packed) == [c for c in every if c.engine == "wgmma"]
    monkeypatch.setenv(matmul.ENGINES_ENV, "mma")
    assert {c.engine for c in matmul._engine_candidates(x.repeat(16, 1), packed)} == {"mma"}
    monkeypatch.setattr(cuda_build, "device_capability", lambda device: (8, 0))
    assert "sm_90" in cuda_wgmma.unsupported_reason(x, packed)


def test_warpgroup_split_k_choices_fill_the_multiprocessors_and_keep_a_slab_per_split():
    from quantbench.export.kernels.cuda_wgmma import split_choices

    up = SimpleNamespace(shape=(14336, 4096), per_word=8)  # int4 4096×14336: 112 blocks of 128 outputs
    assert split_choices(64, up, 64, 1, 132) == [1, 2, 4]
    assert split_choices(64, up, 64, 2, 132) == [1, 4, 8]  # 56 blocks of 256: 2 splits make only 112
    down = SimpleNamespace(shape=(4096, 14336), per_word=8)  # 32 blocks; 112 slabs of 128 inputs
    assert split_choices(8, down, 8, 1, 132) == [1, 8, 16]
    assert split_choices(8, SimpleNamespace(shape=(4096, 128), per_word=8), 8, 1, 132) == [1]  # one slab
    assert split_choices(128, up, 64, 1, 132) == [1]  # two blocks of rows: 224 blocks


def fake_entry_points(monkeypatch) -> list:
    """The CUDA libraries' entry points and device faked on the CPU: each call appends (function, its arguments,
    pointers as ints) to the list returned."""
    from quantbench.export.kernels import cuda_build, kernel_call

    calls = []

    def entry_point(weight_type, arch, function=None):
        def run(*args):
            calls.append((function or weight_type.kernel, tuple(getattr(a, "value", a) for a in args)))
            return 0
        return run

    monkeypatch.setattr(cuda_build, "unsupported_reason", lambda x, weight: None)
    monkeypatch.setattr(cuda_build, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(cuda_build, "device_arch", lambda device: "90")
    monkeypatch.setattr(cuda_build, "dependent_launch", lambda device: 0)
    monkeypatch.setattr(cuda_build, "entry_point", entry_point)
    monkeypatch.setattr(kernel_call, "current_device", lambda: 0)
    monkeypatch.setattr(kernel_call, "device_of", lambda x: 0 if x.device.type == "cpu" else -1)  # the CPU as GPU 0
    monkeypatch.setattr(kernel_call, "current_stream", lambda index: 7)
    return calls


@pytest.mark.parametrize("engine", ["mma", "wgmma"])
def test_tensor_core_launches_pass_sizes_and_pointers_in_the_libraries_order(engine, monkeypatch):
    """Faked here (no GPU): the libraries' entry points take M, N, K in that order after the pointers, x as
    gathered for act_order (its own buffer, contiguous) and the output the call returns."""
    from quantbench.export.kernels import cuda_mma, cuda_wgmma

    calls = fake_entry_points(monkeypatch)
    packed = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    x = torch.randn(40, 2 * IN).half()[:, :IN]  # rows IN apart in a wider buffer: copied before the gather
    if engine == "mma":
        out = cuda_mma.launch(x, packed, 32, 4, 1)
    else:
        out = cuda_wgmma.launch(x, packed, 32, 1)
    (gather, gather_args), (kernel, args) = calls
    assert gather == "gather" and kernel == engine and gather_args[3:6] == (40, IN, IN)
    tile_ints = 6 if engine == "mma" else 3  # rows … splits; then 7 pointers, then M, N, K
    pointers, sizes = args[tile_ints:tile_ints + 7], args[tile_ints + 7:tile_ints + 10]
    assert sizes == (40, OUT, IN) and out.shape == (40, OUT)
    assert pointers[0] == gather_args[2] and pointers[4] == out.data_ptr()  # the gathered x, the output
    assert args[-1] == 7 and args[-3] == pytest.approx(1.0 / packed.global_scale)


def test_a_bound_kernel_call_passes_anew_only_x_its_stride_the_output_and_the_stream(monkeypatch):
    """Faked here (no GPU): bound once, the CUDA decode kernel's call passes the same tile, weight, sizes and
    scale at every call and x's address and row stride, a new output's address and the stream as they are then.
    Rows 16-byte aligned are read where they are, strided ones too (the tensor-core kernel copies those: it reads
    x contiguous), misaligned ones are copied; x of other rows, dtype or device than bound is refused, as an int
    past C's."""
    from quantbench.export.kernels import cuda_gemv, cuda_mma, kernel_call

    calls = fake_entry_points(monkeypatch)
    packed = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    call = cuda_gemv.bind(torch.zeros(2, IN).half(), packed, 2, 8, 128)
    wide = torch.randn(2, 2 * IN).half()
    misaligned = wide.view(-1)[1:2 * IN + 1].view(2, IN)
    inputs = [torch.randn(2, IN).half(), torch.randn(2, IN).half(), wide[:, :IN], misaligned]
    outputs = [call(x) for x in inputs]
    x_at, out_at, stride_at = call.x_at, call.out_at, call.x_stride_at
    arguments = [args for _, args in calls]
    fixed = [[a for i, a in enumerate(args) if i not in (x_at, out_at, stride_at)] for args in arguments]
    assert all(f == fixed[0] for f in fixed) and arguments[0][-1] == 7
    assert arguments[0][14:17] == (2, OUT, IN) and arguments[0][8] == packed.qweight.data_ptr()
    assert [args[x_at] == x.data_ptr() for args, x in zip(arguments, inputs)] == [True, True, True, False]
    assert [args[stride_at] for args in arguments] == [IN, IN, 2 * IN, IN]  # the misaligned rows, copied
    assert [args[out_at] for args in arguments] == [out.data_ptr() for out in outputs]
    assert all(out.shape == (2, OUT) and out.dtype == torch.float16 for out in outputs)
    for other in (torch.zeros(3, IN).half(), torch.zeros(2, IN), torch.zeros(2, IN, device="meta").half()):
        with pytest.raises(ValueError, match="bound for 2 rows of float16 x on CUDA device 0"):
            call(other)  # other rows, dtype or device
    calls.clear()
    tensor_core = cuda_mma.bind(torch.zeros(2, IN).half(), packed, 8, 4, 1)
    tensor_core(wide[:, :IN])
    args = calls[0][1]
    assert args[tensor_core.x_at] != wide.data_ptr() and args[tensor_core.x_stride_at] == IN
    with pytest.raises(ValueError, match="does not fit a C int"):
        kernel_call._as_c(ctypes.c_int, 2**31)


WGMMA_TILES = {"8 rows, one warpgroup": TileConfig(1, 128, 0, 1, 4, 0, rows=8, engine="wgmma"),
               "16 rows, two warpgroups": TileConfig(1, 256, 0, 1, 8, 0, rows=16, engine="wgmma"),
               "32 rows, one warpgroup": TileConfig(1, 128, 0, 1, 4, 0, rows=32, engine="wgmma"),
               "64 rows, one warpgroup": TileConfig(1, 128, 0, 1, 4, 0, rows=64, engine="wgmma"),
               "64 rows, two warpgroups": TileConfig(1, 256, 0, 1, 8, 0, rows=64, engine="wgmma"),
               "16 rows, started while act_order's gather runs":
                   TileConfig(1, 128, 0, 1, 4, 0, rows=16, overlap_gather=True, engine="wgmma")}
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="the warpgroup kernel runs on an sm_90 GPU only")


@hopper
@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("tile", WGMMA_TILES)
@pytest.mark.parametrize("batch", [1, 5, 16, 40])
def test_warpgroup_kernel_equals_the_dequantized_matmul_on_partial_tiles(label, tile, batch):
    """80 outputs fill no block of 128 or 256; 1, 5 and 40 rows leave partial row blocks, 40 spans 5 blocks of 8
    rows and 2 of 32; act_order is gathered before the call; MXFP4 is refused."""
    stored = WEIGHTS[label].to("cuda")
    if label.startswith("mxfp4"):
        with pytest.raises(ValueError, match="MXFP4"):
            packed_matmul(torch.zeros(batch, IN, device="cuda").half(), to_kernel_layout(stored), backend="wgmma",
                          config=WGMMA_TILES[tile])
        return
    assert_equals_the_dequantized_matmul(stored, batch, WGMMA_TILES[tile])


@hopper
@pytest.mark.parametrize("name", ["int4-g32-rtn", "int4-g8-rtn", "int8-g32-sym-rtn", "int2-pc-rtn", "nvfp4-rtn"])
@pytest.mark.parametrize("splits", [1, 2])
def test_warpgroup_kernel_handles_a_partial_slab_of_k_steps(name, splits):
    """96 inputs: one slab of 128, partly empty; 2 splits leave the second block none. Groups of 8 inputs differ
    between the two k-halves of a product."""
    stored = quantize_rtn(torch.randn(OUT, ODD_INPUTS), Scheme.parse(name)).to("cuda")
    x = torch.randn(12, ODD_INPUTS, device="cuda").half()
    expected = x.float() @ stored.dequantize().T
    tile = TileConfig(1, 128, 0, splits, 4, 0, rows=16, engine="wgmma")
    got = packed_matmul(x, to_kernel_layout(stored), backend="wgmma", config=tile)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@hopper
@pytest.mark.parametrize(("label", "rows", "groups"), [("int4-g32 act_order", 8, 1), ("int4-g128-rtn", 64, 2),
                                                       ("ternary2-g64", 16, 1), ("nvfp4-rtn", 32, 2)])
def test_warpgroup_split_k_sums_in_a_fixed_order_and_rearms_its_counts(label, rows, groups):
    """1,024 inputs are 8 slabs of 128: 2 splits take 4 each, 3 splits 3, 3 and 2."""
    stored = {"int4-g32 act_order": lambda: act_order_weight(4, 32), "int4-g128-rtn": lambda: quantize_rtn(
        torch.randn(OUT, 1024), Scheme.parse("int4-g128-rtn")), "ternary2-g64": lambda: ternary_weight(64),
        "nvfp4-rtn": lambda: quantize_rtn(torch.randn(OUT, 1024), Scheme.parse("nvfp4-rtn"))}[label]()
    packed = to_kernel_layout(stored.to("cuda"))
    x = torch.randn(12, packed.shape[1], device="cuda").half()
    for splits in (2, 3):
        tile = TileConfig(1, 128 * groups, 0, splits, 4 * groups, 0, rows=rows, engine="wgmma")
        assert_split_k_sums_are_fixed_and_replay(x, packed, tile)


@hopper
def test_warpgroup_kernel_is_a_tuning_candidate_and_graph_capture_replays_it():
    from quantbench.export.kernels.matmul import _wgmma_candidates

    packed = to_kernel_layout(act_order_weight(4, 128).to("cuda"))
    x = torch.randn(24, IN, device="cuda").half()
    assert {c.engine for c in _wgmma_candidates(x, packed)} == {"wgmma"}
    assert _wgmma_candidates(x.bfloat16(), packed) == []
    assert_graph_replays_the_kernel(x, packed, "wgmma")
    assert_graph_replays_the_kernel(torch.randn(64, IN, device="cuda").half(), packed, "wgmma")


def test_dependent_launch_follows_inductors_triton_kernels_unless_the_environment_says(monkeypatch):
    """Hopper on: unset or auto, on where inductor's Triton kernels launch dependent (off where inductor has
    no such option); 1 and 0 force it; older GPUs never."""
    from torch._inductor import config as inductor_config

    from quantbench.export.kernels import cuda_build

    device = torch.device("cuda", 0)
    monkeypatch.setattr(cuda_build, "_capability", lambda _device: (9, 0))
    for inductor_pdl in (False, True):  # config.patch restores the option; monkeypatch.setattr deletes it
        with inductor_config.patch({"triton.enable_pdl": inductor_pdl}):
            monkeypatch.delenv(cuda_build.DEPENDENT_LAUNCH_ENV, raising=False)
            assert cuda_build.dependent_launch(device) == int(inductor_pdl)
            for setting, expected in (("auto", int(inductor_pdl)), ("0", 0), ("1", 1)):
                monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, setting)
                assert cuda_build.dependent_launch(device) == expected
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "torch._inductor.config", SimpleNamespace(triton=SimpleNamespace()))
        patched.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, "auto")
        assert cuda_build.dependent_launch(device) == 0
    monkeypatch.setattr(cuda_build, "_capability", lambda _device: (8, 0))
    monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, "1")
    assert cuda_build.dependent_launch(device) == 0
    monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, "yes")
    with pytest.raises(ValueError, match="expected 1, 0 or auto"):
        cuda_build.dependent_launch(device)
    assert inductor_config.triton.enable_pdl is False  # the option is still there, as it was


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on an NVIDIA GPU only")
@pytest.mark.parametrize("label, tile, batch", [
    ("int4-g32 act_order", TileConfig(1, 32, 0, 1, 8, 0, rows=1, engine="cuda"), 1),
    ("ternary2-g64", TileConfig(1, 64, 0, 4, 4, 1, rows=2, engine="cuda"), 3),  # cp.async, split-K
    ("int2-g64-rtn", TileConfig(1, 64, 0, 2, 4, 0, rows=1, x_in_shared=False, engine="cuda"), 1),  # x from memory
    ("int4-g32 act_order", TileConfig(1, 64, 0, 1, 4, 1, rows=16, engine="mma"), 12),  # and its gather
    ("int4-g32 act_order", TileConfig(1, 64, 0, 1, 4, 0, rows=16, overlap_gather=True, engine="mma"), 12),
])
def test_dependent_launch_reads_x_only_once_the_kernel_that_writes_it_is_done(label, tile, batch, monkeypatch):
    """Launched to start while the previous kernel runs, the CUDA kernels load their weights early but x only
    after it: right behind a long matmul that writes x at its end, eagerly and in a CUDA graph, they give
    what they give on x written long before (and with dependent launch off)."""
    from quantbench.export.kernels import cuda_build

    packed = to_kernel_layout(WEIGHTS[label].to("cuda"))
    g = torch.Generator(device="cuda").manual_seed(7)
    a = torch.randn(batch, 1 << 16, device="cuda", generator=g).half() / 256
    b = torch.randn(1 << 16, IN, device="cuda", generator=g).half()
    x = torch.matmul(a, b)
    torch.cuda.synchronize()
    expected = packed_matmul(x.clone(), packed, backend=tile.engine, config=tile)
    torch.cuda.synchronize()

    def written_then_multiplied():
        x.zero_()
        torch.matmul(a, b, out=x)
        return packed_matmul(x, packed, backend=tile.engine, config=tile)

    for setting in ("1", "0"):
        monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, setting)
        for _ in range(3):
            assert torch.equal(written_then_multiplied(), expected)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = written_then_multiplied()
        for _ in range(3):
            captured.zero_()
            graph.replay()
            assert torch.equal(captured, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on an NVIDIA GPU only")
@pytest.mark.parametrize("backend", ["cuda", "mma", "auto"])
@pytest.mark.parametrize("label", ["int4-g32 act_order", "ternary2-g64", "int4-g128-rtn"])
def test_a_packed_layers_bound_cuda_calls_equal_packed_matmul_on_new_x_and_new_scales(backend, label):
    """Eager calls of a packed layer on the GPU run its bound calls: on new x of rows already seen (1, 5, 16, and
    rows with a bias and strided rows) they give packed_matmul's result bit for bit, and with its scales replaced
    by twice theirs, twice that (a stale call would still read the old scales), as do the operators that compiled
    models call (packed_linear where x needs a gradient, packed_linear_inference elsewhere)."""
    from quantbench.export.kernels.modules import packed_linear, packed_linear_inference

    kernel = to_kernel_layout(WEIGHTS[label].to("cuda"))
    bias = torch.randn(OUT, device="cuda").half()
    layer = PackedLinear(kernel, bias=bias, backend=backend, dtype=torch.float16)
    g = torch.Generator(device="cuda").manual_seed(5)
    for rows in (1, 5, 16, 5, 1):
        for x in (torch.randn(1, rows, IN, device="cuda", generator=g).half(),
                  torch.randn(rows, 2 * IN, device="cuda", generator=g).half()[:, IN:]):
            expected = packed_matmul(x, kernel, backend) + bias
            assert torch.equal(layer(x), expected)
    layer.scales = layer.scales * 2
    x = torch.randn(5, IN, device="cuda", generator=g).half()
    assert torch.equal(layer(x), 2 * packed_matmul(x, kernel, backend) + bias)
    for operator in (packed_linear, packed_linear_inference):
        got = operator(x, layer.qweight, layer.scales, layer.zeros, layer.perm, layer.kind, layer.bits, OUT, IN,
                       layer.group, layer.global_scale, backend)
        assert torch.equal(got, 2 * packed_matmul(x, kernel, backend))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on an NVIDIA GPU only")
@pytest.mark.parametrize("engine", ["cuda", "mma"])
def test_a_dependent_packed_kernel_reads_the_output_its_dependent_predecessor_writes(engine, monkeypatch):
    """Two packed matmuls in a row, the second reading the first's output: the first lets the second start
    once its loads are done, before it writes, so the second must wait before it reads x."""
    from quantbench.export.kernels import cuda_build

    first = to_kernel_layout(quantize_rtn(torch.randn(IN, IN), Scheme.parse("int4-g32-rtn")).to("cuda"))
    second = to_kernel_layout(WEIGHTS["int4-g32 act_order"].to("cuda"))
    tile = (TileConfig(1, 64, 0, 1, 16, 0, rows=1, engine="cuda") if engine == "cuda" else
            TileConfig(1, 64, 0, 1, 4, 1, rows=16, engine="mma"))
    x = torch.randn(12 if engine == "mma" else 1, IN, device="cuda").half()

    def chained():
        return packed_matmul(packed_matmul(x, first, backend=engine, config=tile), second, backend=engine,
                             config=tile)

    monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, "0")
    expected = chained()
    monkeypatch.setenv(cuda_build.DEPENDENT_LAUNCH_ENV, "1")
    for _ in range(5):
        assert torch.equal(chained(), expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chained()
    for _ in range(5):
        captured.zero_()
        graph.replay()
        assert torch.equal(captured, expected)


CPU_INT4 = ["int4-g128-rtn", "int4-g32-sym-rtn", "int4-g32 act_order"]


@pytest.mark.parametrize("label", CPU_INT4)
@pytest.mark.parametrize("batch", [1, 5])
def test_cpu_int4_kernel_equals_the_dequantized_matmul_to_bfloat16_rounding(label, batch):
    """torch's CPU int4 kernel decodes w = (q − 8)·s + (8 − z)·s with s and (8 − z)·s in bfloat16 and rounds
    its result to bfloat16: each term off by at most 2⁻⁸ of |q − 8|·s + |8 − z|·s, the sum by 2⁻⁸ of itself
    (bounds doubled for the products and sums in between)."""
    stored = WEIGHTS[label]
    from quantbench.export.kernels import cpu_int4

    kernel = to_kernel_layout(stored)
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch)).bfloat16()
    assert cpu_int4.applies(x, kernel)
    got = cpu_int4.cpu_int4_matmul(x, kernel)
    assert got.dtype == torch.bfloat16 and got.shape == (batch, OUT)
    expected = x.double() @ stored.dequantize().double().T
    def per_input(groups):  # [OUT, groups] → [OUT, IN]
        return groups[:, stored.g_idx.long()] if stored.g_idx is not None else \
            groups.repeat_interleave(stored.group_size, 1)

    scales = per_input(stored.scales.double())
    zeros = per_input(stored.zeros.double()) if stored.zeros is not None else torch.full_like(scales, 8.0)
    spread = ((stored.codes.double() - 8).abs() + (8 - zeros).abs()) * scales
    bound = 2 * 2**-8 * (x.double().abs() @ spread.T + expected.abs())
    assert ((got.double() - expected).abs() <= bound).all()
    assert (got.double() - expected).abs().max() > 0  # bfloat16, not a float32 path by accident


def test_auto_on_the_cpu_takes_the_cpp_kernel_and_torchs_int4_kernel_only_where_it_cannot_be_built(monkeypatch):
    from quantbench.export.kernels import cpu_int4, cpu_packed

    calls = []
    monkeypatch.setattr(cpu_int4, "cpu_int4_matmul", lambda x, w: calls.append(("int4", x.dtype)) or torch.zeros(
        x.shape[0], w.shape[0], dtype=x.dtype))
    monkeypatch.setattr(cpu_packed, "cpu_packed_matmul", lambda x, w: calls.append(("cpp", x.dtype)) or torch.zeros(
        x.shape[0], w.shape[0], dtype=x.dtype))
    kernel = to_kernel_layout(WEIGHTS["int4-g128-rtn"])
    packed_matmul(torch.randn(2, IN), kernel)
    packed_matmul(torch.randn(2, IN).bfloat16(), kernel)
    packed_matmul(torch.randn(2, IN).bfloat16(), to_kernel_layout(WEIGHTS["int8-pc-rtn"]))
    assert calls == [("cpp", torch.float32), ("cpp", torch.bfloat16), ("cpp", torch.bfloat16)]
    base3 = to_base3_layout(WEIGHTS["ternary2-g64"])
    x = torch.ones(1, IN)
    assert torch.equal(packed_matmul(x, base3), packed_matmul(x, base3, backend="torch"))
    with pytest.raises(ValueError, match="backend 'cpu' takes float x .* but base-3"):
        packed_matmul(x, base3, backend="cpu")
    monkeypatch.setattr(cpu_packed, "available", lambda: False)  # no compiler: torch's int4 kernel for bfloat16
    calls.clear()
    packed_matmul(torch.randn(2, IN).bfloat16(), kernel)
    packed_matmul(torch.randn(2, IN), kernel)
    assert calls == [("int4", torch.bfloat16)]


# batches of 1–4 rows share one decode; 6 runs a tile of 4 and one of 2; 100 runs 25 tiles of 4; 200 decodes slabs
# for a dense matmul (beyond cpu_packed.MATMUL_ROWS with any vector width)
CPU_KERNEL_BATCHES = [1, 3, 6, 100, 200]


@pytest.mark.parametrize("label", WEIGHTS)
@pytest.mark.parametrize("batch", CPU_KERNEL_BATCHES)
def test_cpp_cpu_kernel_equals_the_dequantized_matmul(label, batch):
    from quantbench.export.kernels import cpu_packed

    assert cpu_packed.available()  # CI has a C++ compiler: the kernel must build there
    stored = WEIGHTS[label]
    x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
    got = cpu_packed.cpu_packed_matmul(x, to_kernel_layout(stored))
    assert got.dtype == torch.float32 and got.shape == (batch, OUT)
    assert_matmul_close(got, x, stored.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label", ["int8-g64 act_order", "ternary2-g64", "nvfp4-rtn"])
def test_cpp_cpu_kernel_takes_half_precision_x_and_sums_in_float32(label, dtype):
    """Each output is the float32 result rounded once to x's dtype: float16 x, and bfloat16 x where no pair
    kernel takes it, through the float32 kernel; bfloat16 x in the pair kernel within its own bound (below)."""
    from quantbench.export.kernels import cpu_packed

    stored = WEIGHTS[label]
    kernel = to_kernel_layout(stored)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = packed_matmul(x, kernel, backend="cpu")
    assert got.dtype == dtype
    if dtype == torch.bfloat16 and cpu_packed.takes_bfloat16(kernel):
        assert_pair_sums_close(pair_kernel_float32(x, kernel), x, stored)
    else:
        assert torch.equal(got, cpu_packed.cpu_packed_matmul(x.float(), kernel).to(dtype))
    assert_matmul_close(got, x.float(), stored.dequantize())


def pair_kernel_float32(x: torch.Tensor, kernel) -> torch.Tensor:
    """The C++ kernel's float32 result for bfloat16 x (before the rounding to x's dtype)."""
    from quantbench.export.kernels import cpu_packed

    return torch.ops.quantbench_cpu.packed_matmul(x, kernel.qweight, cpu_packed.kernel_scales(kernel),
                                                  cpu_packed._zeros(kernel), KIND_CODES[kernel.kind], kernel.bits,
                                                  kernel.group)


def cpu_has_bfloat16_dots() -> bool:
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


def pair_sum_magnitudes(stored) -> torch.Tensor:
    """[OUT, IN]: what each input's x multiplies on its way through the pair kernel's float32 sums, where w is not
    itself summed: int s·(2^b·2 + 2^b + z) (2^b·v with v < 2, then (2^b + z)·Σx), ternary
    (|α1| + |α2|)·(4·2 + 5), fp4 |w| (e2m1(q) summed as it is)."""
    if isinstance(stored, TritPlaneWeight):
        alphas = stored.scales.double().abs().sum(0)  # [OUT, groups]
        return (alphas.repeat_interleave(IN // alphas.shape[1], 1) * 13)
    if stored.scheme.format in ("mxfp4", "nvfp4"):
        return stored.dequantize().double().abs()
    levels = 2 ** stored.scheme.bits
    group_of = stored.g_idx.long() if stored.g_idx is not None else torch.arange(IN) // (IN // stored.scales.shape[1])
    zeros = stored.zeros.double()[:, group_of] if stored.zeros is not None else levels / 2
    return stored.scales.double()[:, group_of] * (3 * levels + zeros)


def assert_pair_sums_close(got: torch.Tensor, x: torch.Tensor, stored) -> None:
    """The pair kernel's float32 result within n·eps of the magnitudes its sums pass through (the textbook bound
    of assert_matmul_close, over pair_sum_magnitudes instead of |w|)."""
    x64 = x.double()
    bound = IN * torch.finfo(torch.float32).eps * (x64.abs() @ pair_sum_magnitudes(stored).T)
    error = (got.double() - x64 @ stored.dequantize().double().T).abs()
    assert (error <= bound).all(), f"error {float((error - bound).max()):.3g} above the rounding bound"


@pytest.mark.parametrize("label", WEIGHTS)
def test_cpp_cpu_pair_kernel_multiplies_bfloat16_x_as_it_is(label, monkeypatch):
    """Where the CPU has bfloat16 dot products (AVX512_BF16) and no AMX tiles, bfloat16 x goes into the pair kernel
    as it is for every kind but int8, at every batch (it stays ahead of decoded slabs: no slabs), in tiles and in
    rows alike (act_order: x gathered into the stored order first)."""
    from quantbench.export.kernels import cpu_packed
    from quantbench.export.kernels.layout import with_inputs_gathered

    stored = WEIGHTS[label]
    rows = to_kernel_layout(stored)
    if cpu_packed.ARCH_ENV not in os.environ:  # compiled for this CPU (-march=native)
        assert cpu_packed.takes_bfloat16(rows) == (cpu_has_bfloat16_dots() and not label.startswith("int8"))
    if not cpu_packed.takes_bfloat16(rows):
        return
    monkeypatch.setattr(cpu_packed, "has_amx", lambda: False)
    monkeypatch.setattr(cpu_packed, "_decoded_slabs", lambda weight: pytest.fail("slabs decoded for bfloat16 x"))
    for batch in CPU_KERNEL_BATCHES:
        x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch)).bfloat16()
        for kernel in (rows, rows.in_cpu_tiles()):
            got = pair_kernel_float32(*with_inputs_gathered(x, kernel))
            assert_pair_sums_close(got, x, stored)
            assert torch.equal(cpu_packed.cpu_packed_matmul(x, kernel), got.bfloat16())


@pytest.mark.parametrize("label", WEIGHTS)
def test_cpp_cpu_bfloat16_matmul_of_the_decoded_weight_is_within_bfloat16_rounding(label):
    """path "bfloat16" (any CPU): the weight decoded whole to bfloat16 (each value off by at most 2⁻⁹ of itself),
    x·Wᵀ summed in float32 by torch's matmul and rounded once to bfloat16 (2⁻⁹ of the result), in tiles and in
    rows, act_order's x gathered first."""
    from quantbench.export.kernels import cpu_packed

    stored = WEIGHTS[label]
    x = torch.randn(40, IN, generator=torch.Generator().manual_seed(3)).bfloat16()
    x64, w64 = x.double(), stored.dequantize().double()
    exact = x64 @ w64.T
    bound = 2.0 ** -9 * (x64.abs() @ w64.abs().T) * (1 + IN * 2.0 ** -20) + 2.0 ** -9 * exact.abs()
    rows = to_kernel_layout(stored)
    for kernel in (rows, rows.in_cpu_tiles()):
        got = cpu_packed.cpu_packed_matmul(x, kernel, path="bfloat16")
        assert got.dtype == torch.bfloat16 and got.shape == (40, OUT)
        error = (got.double() - exact).abs()
        assert (error <= bound).all(), f"error {float((error - bound).max()):.3g} above the rounding bound"
    float32 = cpu_packed.cpu_packed_matmul(x.float(), rows, path="bfloat16")
    assert float32.dtype == torch.float32 and torch.equal(float32, got.float())


def test_cpp_cpu_bfloat16_x_takes_the_decoded_bfloat16_matmul_past_a_few_rows_on_amx(monkeypatch):
    """On a CPU with AMX tiles bfloat16 x beyond AMX_KERNEL_ROWS rows takes the weight decoded to bfloat16 (torch's
    matmul on AMX), 2 to AMX_KERNEL_ROWS rows the float32 kernel, one row the pair kernel; without AMX bfloat16 x
    takes the pair kernel at every batch; a weight past BFLOAT16_WEIGHT_MOST values and float32 x never take the
    decoded matmul (a CPU without bfloat16 dot products: the float32 kernel where the pair kernel would be)."""
    from quantbench.export.kernels import cpu_packed

    kernel = to_kernel_layout(WEIGHTS["int4-g32 act_order"]).in_cpu_tiles()
    pair = "bfloat16" if cpu_packed.takes_bfloat16(kernel) else "float32"  # without bfloat16 dots: float32 kernel
    most = cpu_packed.AMX_KERNEL_ROWS["int"]
    x = torch.randn(most + 1, IN, generator=torch.Generator().manual_seed(5)).bfloat16()
    ops, decode, paths = cpu_packed._ops(), cpu_packed._decoded_bfloat16, []

    class Recorded:  # the library's operators, its matmul recording the dtype of the x it multiplies
        def __getattr__(self, name):
            return getattr(ops, name)

        def packed_matmul(self, x, *args, **kwargs):
            paths.append(str(x.dtype).removeprefix("torch."))
            return ops.packed_matmul(x, *args, **kwargs)

    monkeypatch.setattr(cpu_packed, "_ops", Recorded)
    monkeypatch.setattr(cpu_packed, "_decoded_bfloat16", lambda weight: paths.append("decoded") or decode(weight))
    decoded = cpu_packed.cpu_packed_matmul(x, kernel, path="bfloat16")
    cases = [(True, x, 1 << 27, "decoded"), (True, x[:most], 1 << 27, "float32"), (True, x[:1], 1 << 27, pair),
             (False, x, 1 << 27, pair), (True, x, OUT * IN - 1, "float32"), (True, x.float(), 1 << 27, "float32")]
    for amx, rows, weight_most, path in cases:
        monkeypatch.setattr(cpu_packed, "has_amx", lambda amx=amx: amx)
        monkeypatch.setattr(cpu_packed, "BFLOAT16_WEIGHT_MOST", weight_most)
        paths.clear()
        got = cpu_packed.cpu_packed_matmul(rows, kernel)
        assert paths == [path], (amx, rows.shape[0], weight_most)
        assert got.dtype == rows.dtype
    monkeypatch.setattr(cpu_packed, "BFLOAT16_WEIGHT_MOST", 1 << 27)
    assert torch.equal(cpu_packed.cpu_packed_matmul(x, kernel), decoded)


@pytest.mark.parametrize("label", WEIGHTS)
def test_cpp_cpu_decode_equals_the_torch_decode(label):
    """Exactly, but for ternary's α1·lo + α2·hi − (α1 + α2), which rounds where the torch decode's
    (lo − 1)·α1 + (hi − 1)·α2 may not: there within float32's rounding of the terms."""
    from quantbench.export.kernels import cpu_packed
    from quantbench.export.kernels.reference import decode_slab

    kernel = to_kernel_layout(WEIGHTS[label])
    expected = decode_slab(kernel, 0, IN)
    got = cpu_packed.decode(kernel)
    if kernel.kind == "ternary":
        scales = kernel.scales.float().abs().repeat_interleave(kernel.group, 1).sum(0)
        assert ((got - expected).abs() <= 4 * torch.finfo(torch.float32).eps * scales).all()
    else:
        assert torch.equal(got, expected)
    start, stop = 64, 192  # whole groups and words of every layout here
    assert torch.equal(cpu_packed.decode(kernel, start, stop), got[start:stop])


@pytest.mark.parametrize("name", ["int4-g64-rtn", "int8-g64-rtn", "ternary2-g64-ptqtp"])
def test_cpp_cpu_kernel_takes_a_last_group_shorter_than_the_others(name):
    """96 inputs in groups of 64 (as SmolLM2's 576 in groups of 128): the last group has 32."""
    from quantbench.export.kernels import cpu_packed
    from quantbench.export.kernels.reference import decode_slab

    g = torch.Generator().manual_seed(9)
    stored = quantize_rtn(torch.randn(OUT, 96, generator=g), Scheme.parse(name)) if name.startswith("int") else \
        TritPlaneWeight(Scheme.parse(name), torch.randint(-1, 2, (2, OUT, 96), generator=g, dtype=torch.int8),
                        (torch.rand(2, OUT, 2, generator=g) * 0.1).half())
    kernel = to_kernel_layout(stored)
    assert kernel.scales.shape[-2] == 2 and kernel.group == 64
    for batch in (1, 5, 200):
        x = torch.randn(batch, 96, generator=g)
        assert_matmul_close(cpu_packed.cpu_packed_matmul(x, kernel), x, stored.dequantize())
    if name.startswith("int"):
        assert torch.equal(cpu_packed.decode(kernel), decode_slab(kernel, 0, 96))


def test_cpp_cpu_kernel_reads_int_and_ternary_scales_as_stored():
    """No float copy beside a packed int or ternary weight; MXFP4/NVFP4 keep one float32 scale per block."""
    from quantbench.export.kernels import cpu_packed

    for label in ("int4-g32 act_order", "ternary2-g64"):
        kernel = to_kernel_layout(WEIGHTS[label])
        assert cpu_packed.kernel_scales(kernel).data_ptr() == kernel.scales.data_ptr()
    kernel = to_kernel_layout(WEIGHTS["nvfp4-rtn"])
    scales = cpu_packed.kernel_scales(kernel)
    assert scales.dtype == torch.float32 and scales.shape == kernel.scales.shape
    assert cpu_packed.kernel_scales(kernel) is scales  # made once


def test_cpp_cpu_kernels_spread_their_tasks_over_torchs_threads():
    """Compiled with OpenMP, as torch's at::parallel_for needs: without it the kernels ran on one thread."""
    from quantbench.export.kernels import cpu_packed

    assert cpu_packed.available()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.quantbench_cpu.threads_used(64) == 2
    finally:
        torch.set_num_threads(threads)


def test_cpp_cpu_kernel_outputs_do_not_depend_on_their_neighbours():
    """Fused q/k/v and gate/up layers concatenate outputs: each output's sum is the same whatever task of
    outputs and whichever rows of its tile of 4 it falls in."""
    from quantbench.export.kernels import cpu_packed

    kernel = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(8))
    whole = cpu_packed.cpu_packed_matmul(x, kernel)
    part = dataclasses.replace(kernel, qweight=kernel.qweight[:, 12:].contiguous(),
                               scales=kernel.scales[:, 12:].contiguous(), zeros=kernel.zeros[:, 12:].contiguous(),
                               shape=(OUT - 12, IN))
    assert torch.equal(cpu_packed.cpu_packed_matmul(x[2:5], part), whole[2:5, 12:])


@pytest.mark.parametrize("label", WEIGHTS)
def test_cpp_cpu_kernel_reads_words_in_tiles_as_it_reads_rows(label):
    """The CPU layout (tiles of 64 outputs; here 80 outputs: a full tile and a padded one) gives the same bits as
    rows of the whole output width, at every batch (kernel and slabs) and in the decode, and converts back."""
    from quantbench.export.kernels import cpu_packed

    rows = to_kernel_layout(WEIGHTS[label])
    tiled = rows.in_cpu_tiles()
    assert tiled.tiled and tiled.qweight.shape == (2, rows.qweight.shape[0], 64)
    assert torch.equal(tiled.row_major().qweight, rows.qweight)
    assert torch.equal(tiled.word_rows(4, 12), rows.qweight[4:12])
    for batch in CPU_KERNEL_BATCHES:
        x = torch.randn(batch, IN, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(cpu_packed.cpu_packed_matmul(x, tiled), cpu_packed.cpu_packed_matmul(x, rows))
    assert torch.equal(cpu_packed.decode(tiled), cpu_packed.decode(rows))
    assert torch.equal(packed_matmul(x, tiled, backend="torch"), packed_matmul(x, rows, backend="torch"))


def test_packed_linear_keeps_its_words_in_tiles_where_the_cpp_kernel_runs_it(monkeypatch):
    """On the CPU in tiles; moved elsewhere (here the meta device), or where the kernel cannot be built, in rows
    of the whole output width, as every other kernel reads them."""
    from quantbench.export.kernels import cpu_packed

    kernel = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    layer = PackedLinear(kernel)
    assert layer.qweight.shape == (2, kernel.qweight.shape[0], 64)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(3))
    assert torch.equal(layer(x), cpu_packed.cpu_packed_matmul(x, kernel))
    assert torch.equal(layer.weight, dequantize_kernel_weight(kernel))
    layer.to("meta")
    assert layer.qweight.shape == kernel.qweight.shape and layer.qweight.is_meta
    monkeypatch.setattr(cpu_packed, "available", lambda: False)
    assert torch.equal(PackedLinear(kernel).qweight, kernel.qweight)


def test_packed_linear_on_the_cpu_calls_the_cpp_kernel_itself_unless_given_another_backend(monkeypatch):
    """Eager inference on the CPU goes straight to the C++ kernel, past packed_matmul's dispatch (half of a small
    layer's call), with its result bit for bit; a layer given another backend still goes through packed_matmul."""
    from quantbench.export.kernels import cpu_packed, modules

    kernel = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(4))
    backends = []
    dispatch = modules.bound_matmul
    monkeypatch.setattr(modules, "bound_matmul",
                        lambda x, weight, backend="auto": backends.append(backend) or dispatch(x, weight, backend))
    layer = PackedLinear(kernel)
    for dtype in (torch.float32, torch.bfloat16):
        got = layer(x.to(dtype))
        assert got.dtype == dtype and got.shape == (2, 3, OUT)
        assert torch.equal(got, cpu_packed.cpu_packed_matmul(x.to(dtype).reshape(-1, IN), kernel).view(2, 3, OUT))
    assert backends == []
    reference = PackedLinear(kernel, backend="torch")
    torch.testing.assert_close(reference(x), layer(x), rtol=1e-4, atol=1e-4)
    assert backends == ["torch"]
    del layer.__dict__["_cpu_kernel"]  # as a layer pickled by an older quantbench: through packed_matmul, alike
    assert torch.equal(layer(x), cpu_packed.cpu_packed_matmul(x.reshape(-1, IN), kernel).view(2, 3, OUT))
    assert backends == ["torch", "auto"]


def test_the_operators_on_the_cpu_call_the_cpp_kernel_itself_on_tiled_words(monkeypatch):
    """What a compiled model calls on the CPU (both operators) multiplies a layer's tiled words with the C++ kernel,
    past packed_matmul's choice, bit for bit the eager layer's result; a weight in rows, or another backend, still
    goes through packed_matmul."""
    from quantbench.export.kernels import matmul
    from quantbench.export.kernels.modules import packed_linear, packed_linear_inference

    layer = PackedLinear(to_kernel_layout(WEIGHTS["nvfp4-rtn"]))
    assert layer.kernel_weight.tiled
    chosen = []
    choose = matmul.packed_matmul
    monkeypatch.setattr(matmul, "packed_matmul", lambda x, weight, backend="auto": chosen.append(backend)
                        or choose(x, weight, backend))
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(8))
    for dtype in (torch.float32, torch.bfloat16):
        for operator in (packed_linear, packed_linear_inference):
            got = operator(x.to(dtype), layer.qweight, layer.scales, layer.zeros, layer.perm, layer.kind, layer.bits,
                           OUT, IN, layer.group, layer.global_scale, "auto")
            assert got.dtype == dtype and torch.equal(got, layer(x.to(dtype)))
    assert chosen == []
    rows = layer.kernel_weight.row_major()
    for weight, backend in ((rows, "auto"), (layer.kernel_weight, "torch")):
        got = packed_linear_inference(x, weight.qweight, weight.scales, weight.zeros, weight.perm, weight.kind,
                                      weight.bits, OUT, IN, weight.group, weight.global_scale, backend)
        torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-4)
    assert chosen == ["auto", "torch"]


def test_bound_matmul_binds_once_per_weight_and_rows_and_lets_the_weight_go(monkeypatch):
    """bound_matmul (eager packed layers and the packed_linear operator on CUDA; faked here) binds a weight's call
    once per rows of x, dtype and backend and reuses it; new scales bind again; where no CUDA kernel runs the call
    (or x has more rows than they take) packed_matmul does; its cache does not keep a weight alive: the entry goes
    with the words."""
    import gc

    from quantbench.export.kernels import matmul

    bound, fallbacks = [], []

    class Call:
        def __init__(self, weight):
            self.holds, self.scales = weight.tensors(), weight.scales  # as a KernelCall holds them

        def __call__(self, x):
            return x[:, :1] * self.scales.float().sum() + torch.zeros(x.shape[0], OUT)

    def bind(x, weight, backend, gated=False):
        bound.append((x.shape[0], x.dtype, backend))
        return None if backend == "torch" or gated else Call(weight)  # gated: as where the tile's engine cannot

    monkeypatch.setattr(matmul, "bind", bind)
    monkeypatch.setattr(matmul, "packed_matmul", lambda x, weight, backend: fallbacks.append(backend) or x)
    weight = to_kernel_layout(WEIGHTS["int4-g32 act_order"])
    x = torch.randn(2, 3, IN)
    first = matmul.bound_matmul(x, weight)
    assert first.shape == (2, 3, OUT) and bound == [(6, torch.float32, "auto")]
    for _ in range(2):
        assert torch.equal(matmul.bound_matmul(x, weight), first)
    matmul.bound_matmul(x[:1], weight)
    matmul.bound_matmul(x.double(), weight)
    assert [rows for rows, _, _ in bound] == [6, 3, 6] and len(matmul._bound_calls[id(weight.qweight)]) == 3
    doubled = dataclasses.replace(weight, scales=weight.scales * 2)
    assert torch.equal(matmul.bound_matmul(x, doubled), 2 * first) and len(bound) == 4
    assert all(call.holds == () for *_, call in matmul._bound_calls[id(weight.qweight)].values())
    assert matmul.bound_matmul(x, weight, "torch") is x and matmul.bound_matmul(x, weight, "torch") is x
    assert len(bound) == 5 and fallbacks == ["torch", "torch"]  # bound once, found to need packed_matmul
    tiled = weight.in_cpu_tiles()  # the CPU kernel's words (with "auto", straight to it: the test above)
    assert matmul.bound_matmul(x, tiled, "torch") is x and id(tiled.qweight) not in matmul._bound_calls
    tall = torch.randn(matmul.BOUND_ROWS + 1, IN)  # beyond the CUDA kernels' rows: packed_matmul, nothing bound
    assert matmul.bound_matmul(tall, weight) is tall and len(bound) == 5
    for _ in range(2):  # gated: bound apart, once; the activation applied after packed_matmul where no kernel can
        assert torch.equal(matmul.bound_matmul(x, weight, gated=True), matmul.silu_and_mul(x))
    assert len(bound) == 6 and fallbacks == ["torch"] * 3 + ["auto"] * 3  # the tall x's, then the gated ones
    key = id(weight.qweight)
    del weight, doubled
    gc.collect()
    assert key not in matmul._bound_calls


def test_without_a_compiler_the_cpu_kernels_say_why_and_torch_runs(monkeypatch, tmp_path):
    from quantbench.export.kernels import cpu_packed

    monkeypatch.setenv(cpu_packed.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        cpu_packed.build()
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(cpu_packed, "available", lambda: False)
    kernel = to_kernel_layout(WEIGHTS["nvfp4-rtn"])
    x = torch.randn(2, IN)
    assert torch.equal(packed_matmul(x, kernel), packed_matmul(x, kernel, backend="torch"))
    with pytest.raises(ValueError, match="a C\\+\\+ compiler"):
        packed_matmul(x, kernel, backend="cpu")


