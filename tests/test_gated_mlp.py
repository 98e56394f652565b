"""A gated MLP's gate and up in one packed weight (export/kernels/fused.py: GatedMLP), whose CUDA kernels store
silu(gate)·up in place of the two outputs."""

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from quantbench import load_quantized, save_quantized
from quantbench.export.kernels import PackedLinear, to_kernel_layout
from quantbench.export.kernels.fused import (FusedPackedLinear, GatedMLP, fusable, fuse_packed_siblings,
                                             gate_up_interleaved)
from quantbench.export.kernels.matmul import TileConfig, _kernel_call
from quantbench.export.kernels.modules import GatedPackedLinear
from quantbench.export.kernels.reference import dequantize_kernel_weight
from quantbench.pipeline import quantize_model
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers.rtn import quantize_rtn
from quantbench.recipe import QuantizeSection
from quantbench.scheme import Scheme
from quantbench.trit_planes import TritPlaneWeight

OUT, IN = 80, 256
KINDS = ["int4-g128-rtn", "int4-g32-sym-rtn", "int8-pc-rtn", "int2-g64-rtn", "mxfp4-rtn", "nvfp4-rtn", "ternary2-g64",
         "int4-g32 act_order"]


def stored(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "ternary2-g64":
        return TritPlaneWeight(Scheme.parse("ternary2-g64-ptqtp"),
                               torch.randint(-1, 2, (2, OUT, IN), generator=g, dtype=torch.int8),
                               (torch.rand(2, OUT, IN // 64, generator=g) * 0.1).half())
    if kind == "int4-g32 act_order":  # gate and up read one input: one order for both, as GPTQ gives them
        g_idx = torch.empty(IN, dtype=torch.int32)
        g_idx[torch.randperm(IN, generator=torch.Generator().manual_seed(99))] = (torch.arange(IN) // 32).int()
        return QuantizedWeight(Scheme.parse("int4-g32-gptq-act"),
                               torch.randint(0, 16, (OUT, IN), generator=g, dtype=torch.uint8),
                               (torch.rand(OUT, IN // 32, generator=g) * 0.1 + 0.01).half(),
                               torch.randint(0, 16, (OUT, IN // 32), generator=g, dtype=torch.uint8), g_idx)
    base = torch.Generator().manual_seed(0)  # one weight's rows in another order: NVFP4's global scales agree
    weight = torch.randn(OUT, IN, generator=base) * torch.rand(OUT, 1, generator=base)
    return quantize_rtn(weight[torch.randperm(OUT, generator=g)], Scheme.parse(kind))


def gate_and_up(kind: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    layers = [PackedLinear(to_kernel_layout(stored(kind, seed).to(device)), dtype=dtype) for seed in (1, 2)]
    assert fusable(layers)
    return layers


@pytest.mark.parametrize("kind", KINDS)
def test_the_interleaved_weight_decodes_to_gate_and_up_rows_in_turn(kind):
    gate, up = gate_and_up(kind)
    dense = dequantize_kernel_weight(gate_up_interleaved(gate, up))
    assert dense.shape == (2 * OUT, IN)
    assert torch.equal(dense[0::2], gate.weight) and torch.equal(dense[1::2], up.weight)


@pytest.mark.parametrize("kind", ["int4-g128-rtn", "ternary2-g64", "nvfp4-rtn", "int4-g32 act_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_gated_layer_gives_silu_of_gate_times_up_on_the_cpu(kind, dtype, batch):
    """The same columns' products as gate's and up's own layers, then the activation: equal bit for bit."""
    gate, up = gate_and_up(kind, dtype=dtype)
    gated = GatedPackedLinear(gate_up_interleaved(gate, up), None, dtype=dtype)
    x = torch.randn(batch, 2, IN, generator=torch.Generator().manual_seed(batch)).to(dtype)
    with torch.no_grad():
        assert torch.equal(gated(x), nn.functional.silu(gate(x)) * up(x))


def test_gradients_reach_x_through_a_gated_layer():
    gate, up = gate_and_up("int4-g128-rtn")
    gated = GatedPackedLinear(gate_up_interleaved(gate, up), None)
    x = torch.randn(3, IN, requires_grad=True)
    (gated(x) ** 2).sum().backward()
    expected_x = x.detach().clone().requires_grad_()
    ((nn.functional.silu(gate(expected_x)) * up(expected_x)) ** 2).sum().backward()
    # one product over the interleaved rows against two summed: float32 rounding apart, far below a lost path
    torch.testing.assert_close(x.grad, expected_x.grad, rtol=1e-4, atol=1e-4 * expected_x.grad.abs().max().item())


def quantized_llama_checkpoint(tmp_path, tokenizer, overrides=()):
    model = tiny_llama()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    section = QuantizeSection(default="int4-g32-gptq-act", overrides=list(overrides))
    quantized = quantize_model(model, ids, section.scheme_for, torch.device("cpu"), progress=False)
    save_quantized(model, tokenizer, quantized, tmp_path / "ckpt")
    return tmp_path / "ckpt", ids


def test_a_llama_loaded_with_gated_mlps_keeps_its_logits(tmp_path, tokenizer):
    """Layer 0's gate and up become one gated layer; layer 1's up in another format stays apart; the logits are
    the unfused load's, bit for bit; by default gate and up are fused siblings as before."""
    directory, ids = quantized_llama_checkpoint(tmp_path, tokenizer,
                                                [{"pattern": "layers.1.mlp.up_proj", "scheme": "int4-g64-rtn"}])
    separate = load_quantized(directory, kernels=True, fuse=False)
    fused = load_quantized(directory, kernels=True, gated_mlps=True)
    assert fused.quantbench_fused == ["model.layers.0.self_attn.q_proj+k_proj+v_proj",
                                      "model.layers.0.mlp.gate_proj+up_proj",
                                      "model.layers.1.self_attn.q_proj+k_proj+v_proj"]
    assert isinstance(fused.model.layers[0].mlp, GatedMLP) and not isinstance(fused.model.layers[1].mlp, GatedMLP)
    assert fused.model.layers[0].mlp.down_proj.perm is None  # act_order folded into gate and up before
    with torch.no_grad():
        assert torch.equal(fused(ids).logits, separate(ids).logits)
    siblings = load_quantized(directory, kernels=True)
    assert siblings.quantbench_fused == fused.quantbench_fused
    assert isinstance(siblings.model.layers[0].mlp.gate_proj.fused, FusedPackedLinear)


def test_only_silu_mlps_are_gated(tmp_path, tokenizer):
    """An MLP with another activation (here GELU), or a hook on it, keeps gate and up as fused siblings."""
    directory, _ = quantized_llama_checkpoint(tmp_path, tokenizer)
    model = load_quantized(directory, kernels=True, fuse=False)
    model.model.layers[0].mlp.act_fn = nn.GELU()
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, output: None)
    assert fuse_packed_siblings(model, gated=True) == [f"model.layers.{i}.{group}" for i in range(2)
                                           for group in ("self_attn.q_proj+k_proj+v_proj", "mlp.gate_proj+up_proj")]
    assert not any(isinstance(module, GatedMLP) for module in model.modules())


def test_a_compiled_gated_llama_calls_the_gated_operator(tmp_path, tokenizer):
    """torch.compile traces the gated layers as one `quantbench::packed_gated_linear_inference` call each (fullgraph)
    and gives the eager logits."""
    from torch._dynamo.testing import CompileCounterWithBackend

    directory, ids = quantized_llama_checkpoint(tmp_path, tokenizer)
    model = load_quantized(directory, kernels=True, gated_mlps=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    try:
        with torch.no_grad():
            expected = model(ids).logits
            torch.testing.assert_close(compiled(ids).logits, expected, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()  # the Llama's frames compiled for GatedMLP do not stay for other tests' models
    calls = [str(n.target) for g in counter.graphs for n in g.graph.nodes if "linear_inference" in str(n.target)]
    inference, gated = "quantbench.packed_linear_inference.default", "quantbench.packed_gated_linear_inference.default"
    assert calls == [inference, inference, gated, inference] * 2  # per layer: qkv, o, gate-up (gated), down


GATED_TILES = {"gemv, 1 row, 8 lanes, 256 threads": TileConfig(1, 32, 0, 1, 8, 0, rows=1, engine="cuda"),
               "gemv, 1 row, cp.async, 20 column blocks, 2 splits":
                   TileConfig(1, 16, 0, 2, 4, 1, rows=1, column_blocks=20, engine="cuda"),
               "gemv, 2 rows, streamed, 3 splits": TileConfig(1, 128, 0, 3, 8, 0, rows=2, streamed=True,
                                                             engine="cuda"),
               "gemv, 4 rows, 32 lanes": TileConfig(1, 128, 0, 1, 4, 0, rows=4, engine="cuda"),
               "mma, 8 rows, 4 warps side by side": TileConfig(1, 128, 0, 1, 4, 0, rows=8, engine="mma"),
               "mma, 16 rows, x shared, 2 splits": TileConfig(1, 64, 0, 2, 4, 1, rows=16, engine="mma"),
               "mma, 32 rows, 8 warps, 2 along the outputs": TileConfig(1, 64, 0, 1, 8, 0, rows=32, engine="mma")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on an NVIDIA GPU only")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tile", GATED_TILES)
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_the_cuda_kernels_store_silu_of_gate_times_up(kind, tile, batch):
    """160 interleaved outputs fill no block evenly; 3 and 16 rows leave partial row tiles or take several; split-K
    adds its parts before the activation."""
    config = GATED_TILES[tile]
    gate, up = gate_and_up(kind, "cuda", torch.float16)
    weight = gate_up_interleaved(gate, up)
    x = torch.randn(batch, IN, device="cuda", generator=torch.Generator("cuda").manual_seed(batch)).half()
    expected = nn.functional.silu(x.float() @ gate.weight.float().T) * (x.float() @ up.weight.float().T)
    got = _kernel_call(x, weight, config, gated=True)(x)
    assert got.shape == (batch, OUT) and got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels run on an NVIDIA GPU only")
def test_a_gated_llama_decodes_as_the_unfused_one_on_the_gpu(tmp_path, tokenizer):
    """float16 on the GPU: the gated MLPs (the tuned CUDA kernels, activation stored by them) against gate and up
    apart, one prompt and one decode step."""
    directory, ids = quantized_llama_checkpoint(tmp_path, tokenizer)
    separate = load_quantized(directory, "cuda", torch.float16, kernels=True, fuse=False)
    fused = load_quantized(directory, "cuda", torch.float16, kernels=True, gated_mlps=True)
    assert all(isinstance(layer.mlp, GatedMLP) for layer in fused.model.layers)
    ids = ids.cuda()
    with torch.no_grad():
        for step in (ids, ids[:, :1]):
            expected = separate(step).logits.float()
            torch.testing.assert_close(fused(step).logits.float(), expected, rtol=2e-2,
                                       atol=2e-2 * expected.abs().max().item())
