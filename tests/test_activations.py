import pytest
import torch
from helpers import tiny_llama
from torch import nn

from quantbench.activations import activation_format_of, quantize_activations, quantize_inputs_of
from quantbench.formats import BLOCK_FORMATS
from quantbench.pipeline import quantize_model
from quantbench.recipe import QuantizeSection

IDS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))


def test_int8_is_symmetric_per_token():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) * torch.rand(3, 5, 1) * 10
    q = quantize_activations(x, "int8")
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((x - q).abs() <= step / 2 * (1 + 1e-3)).all()
    assert torch.allclose(q.abs().amax(dim=-1), x.abs().amax(dim=-1), rtol=1e-3)  # each token's max survives
    scaled = x.clone()
    scaled[0, 0] *= 100  # one token's range does not touch another token
    assert torch.equal(quantize_activations(scaled, "int8")[1:], q[1:])


@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_block_formats_quantize_blocks_along_the_hidden_dimension(name):
    torch.manual_seed(1)
    x = torch.randn(4, 96) * 3
    fmt = BLOCK_FORMATS[name].for_weight(x)
    blocks = x.reshape(-1, fmt.block_size)
    expected = fmt.round(blocks, fmt.fit(blocks)).view(4, 96)
    assert torch.equal(quantize_activations(x, name), expected)


def test_mx_blocks_are_independent_and_ragged_hidden_sizes_work():
    torch.manual_seed(2)
    x = torch.randn(2, 40)  # 40 = one block of 32 and a padded block of 8
    q = quantize_activations(x, "mxfp4")
    changed = x.clone()
    changed[:, 35] = 1000.0
    assert torch.equal(quantize_activations(changed, "mxfp4")[:, :32], q[:, :32])
    ragged = BLOCK_FORMATS["mxfp4"]
    tail = ragged.fit(x[:, 32:])
    assert torch.equal(q[:, 32:], ragged.round(x[:, 32:], tail))


def test_dtype_is_kept_and_error_shrinks_with_bits():
    torch.manual_seed(3)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    assert quantize_activations(x, "mxfp8e4m3").dtype == torch.bfloat16
    x = x.float()
    error = {name: (x - quantize_activations(x, name)).norm().item() for name in ["int4", "int8", "mxfp4", "mxfp8e4m3"]}
    assert error["int8"] < error["int4"] and error["mxfp8e4m3"] < error["mxfp4"]


def test_hook_quantizes_the_linear_input_and_can_be_removed():
    torch.manual_seed(4)
    linear = nn.Linear(64, 8)
    x = torch.randn(3, 64)
    quantize_inputs_of(linear, "mxfp4")
    quantize_inputs_of(linear, "mxfp4")  # installing again replaces, never stacks
    assert len(linear._forward_pre_hooks) == 1 and activation_format_of(linear) == "mxfp4"
    expected = nn.functional.linear(quantize_activations(x, "mxfp4"), linear.weight, linear.bias)
    assert torch.equal(linear(x), expected)
    quantize_inputs_of(linear, None)
    assert activation_format_of(linear) is None and torch.equal(linear(x), nn.functional.linear(x, linear.weight, linear.bias))


def test_pipeline_installs_activation_quantizers_on_quantized_layers_only():
    weight_only, both = tiny_llama(), tiny_llama()
    for model, scheme in ((weight_only, "int8-pc-sym-rtn"), (both, "int8-pc-sym-rtn-a:int8")):
        section = QuantizeSection(default=scheme, ignore=["down_proj"])
        quantize_model(model, IDS, section.scheme_for, torch.device("cpu"), progress=False)
    layers = dict(both.named_modules())
    assert activation_format_of(layers["model.layers.0.self_attn.q_proj"]) == "int8"
    assert activation_format_of(layers["model.layers.1.mlp.down_proj"]) is None
    with torch.no_grad():
        a, b = weight_only(input_ids=IDS).logits, both(input_ids=IDS).logits
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()  # int8 activations: a small perturbation


def test_layers_sharing_an_input_round_it_once(monkeypatch):
    import quantbench.activations as activations

    model = tiny_llama()
    section = QuantizeSection(default="int8-pc-sym-rtn-a:mxfp4")
    quantize_model(model, IDS, section.scheme_for, torch.device("cpu"), progress=False)
    with torch.no_grad():
        cached = model(input_ids=IDS).logits
    calls = []
    original = activations.quantize_activations

    def counting(x, fmt_name):
        calls.append(fmt_name)
        return original(x, fmt_name)

    monkeypatch.setattr(activations, "quantize_activations", counting)
    activations._LastTransformed.forget()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, cached)
    assert len(calls) == 2 * 4  # per block: q/k/v once, o, gate/up once, down
    x = torch.randn(4, 64)
    first = activations._LastTransformed.get(x, None, "mxfp4")
    x.mul_(2)  # an in-place change is seen through the version counter
    assert not torch.equal(activations._LastTransformed.get(x, None, "mxfp4"), first)


def test_recipe_section_activations_apply_where_a_scheme_names_none():
    section = QuantizeSection(default="int4-g128-gptq", activations="mxfp8",
                              overrides=[{"pattern": "down_proj", "scheme": "int8-pc-sym-rtn-a:int8"}])
    assert section.scheme_for("model.layers.0.mlp.up_proj").name == "int4-g128-gptq-a:mxfp8e4m3"
    assert section.scheme_for("model.layers.0.mlp.down_proj").name == "int8-pc-sym-rtn-a:int8"
    assert QuantizeSection(default="int4-g128-rtn").scheme_for("x").activations is None
