"""`PackedLinear`: an nn.Linear replacement that keeps only the kernel-layout tensors and multiplies
through `packed_matmul`. Under torch.compile, and where x needs a gradient, it calls the same matmul as one
operator: a compiled model traces around the kernels without graph breaks. Where x needs a gradient that operator is
`quantbench::packed_linear`, through which gradients flow to x (the weight stays frozen), as they do through an
adapter on a packed model; elsewhere `quantbench::packed_linear_inference`, the same product without an autograd
kernel of its own, which the dispatcher passes through in C++ instead of torch.library's Python autograd wrapper.
`GatedPackedLinear`, a gated MLP's gate and up in one weight, calls `quantbench::packed_gated_linear_inference`:
silu(gate)·up, which the CUDA kernels store in place of the two outputs."""

from __future__ import annotations

import torch
from torch import nn

from quantbench.export.kernels import cpu_packed
from quantbench.export.kernels.layout import KernelWeight
from quantbench.export.kernels.matmul import bound_matmul, silu_and_mul
from quantbench.export.kernels.reference import dequantize_kernel_weight, packed_matmul_input_gradient


_LIBRARY = torch.library.Library("quantbench", "DEF")  # torch.library's lower-level API: less Python a call than
# custom_op's wrappers (docs/performance.md, "Packed layers without CUDA graphs")
_WEIGHT_ARGUMENTS = ("Tensor qweight, Tensor scales, Tensor? zeros, Tensor? perm, str kind, int bits, int out_features, "
                     "int in_features, int group, float global_scale")
_LIBRARY.define(f"packed_linear(Tensor x, {_WEIGHT_ARGUMENTS}, str backend) -> Tensor")
_LIBRARY.define(f"packed_linear_inference(Tensor x, {_WEIGHT_ARGUMENTS}, str backend) -> Tensor")
_LIBRARY.define(f"packed_linear_input_gradient(Tensor grad, {_WEIGHT_ARGUMENTS}) -> Tensor")
_LIBRARY.define(f"packed_gated_linear_inference(Tensor x, {_WEIGHT_ARGUMENTS}, str backend) -> Tensor")


def _packed_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   perm: torch.Tensor | None, kind: str, bits: int, out_features: int, in_features: int, group: int,
                   global_scale: float, backend: str) -> torch.Tensor:
    """x [..., in_features] → [..., out_features] in x's dtype, through `packed_matmul` (its CUDA calls bound)."""
    weight = KernelWeight(kind, bits, (out_features, in_features), group, qweight, scales, zeros, perm, global_scale)
    return bound_matmul(x, weight, backend)


def _packed_linear_shape(x, qweight, scales, zeros, perm, kind, bits, out_features, in_features, group,
                         global_scale, backend):
    return x.new_empty(*x.shape[:-1], out_features)


def _packed_gated_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         perm: torch.Tensor | None, kind: str, bits: int, out_features: int, in_features: int,
                         group: int, global_scale: float, backend: str) -> torch.Tensor:
    """x [..., in_features] → silu(gate)·up [..., out_features / 2] of a weight whose outputs interleave a gated
    MLP's gate and up rows (fused.gate_up_interleaved)."""
    weight = KernelWeight(kind, bits, (out_features, in_features), group, qweight, scales, zeros, perm, global_scale)
    return bound_matmul(x, weight, backend, gated=True)


def _packed_gated_linear_shape(x, qweight, scales, zeros, perm, kind, bits, out_features, in_features, group,
                               global_scale, backend):
    return x.new_empty(*x.shape[:-1], out_features // 2)


def _packed_linear_input_gradient(grad: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                                  zeros: torch.Tensor | None, perm: torch.Tensor | None, kind: str, bits: int,
                                  out_features: int, in_features: int, group: int,
                                  global_scale: float) -> torch.Tensor:
    """grad [..., out_features] → grad·W [..., in_features]: packed_linear's gradient in x (one opaque
    operator too, so that AOT autograd traces the backward without looking into the decode)."""
    weight = KernelWeight(kind, bits, (out_features, in_features), group, qweight, scales, zeros, perm, global_scale)
    flat = grad.reshape(-1, out_features)
    flat = (cpu_packed.cpu_packed_input_gradient if cpu_packed.applies(flat, weight)
            else packed_matmul_input_gradient)(flat, weight)
    return flat.view(*grad.shape[:-1], in_features)


def _packed_linear_input_gradient_shape(grad, qweight, scales, zeros, perm, kind, bits, out_features, in_features,
                                        group, global_scale):
    return grad.new_empty(*grad.shape[:-1], in_features)


def _keep_weight(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:5])  # qweight, scales, zeros, perm
    ctx.layout = inputs[5:11]  # kind, bits, out_features, in_features, group, global_scale


def _input_gradient(ctx, grad):
    grad_x = packed_linear_input_gradient(grad, *ctx.saved_tensors, *ctx.layout) if ctx.needs_input_grad[0] else None
    return (grad_x,) + (None,) * 11


for _name, _kernel, _shape in (("packed_linear", _packed_linear, _packed_linear_shape),
                               ("packed_linear_inference", _packed_linear, _packed_linear_shape),
                               ("packed_linear_input_gradient", _packed_linear_input_gradient,
                                _packed_linear_input_gradient_shape),
                               ("packed_gated_linear_inference", _packed_gated_linear, _packed_gated_linear_shape)):
    _LIBRARY.impl(_name, _kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"quantbench::{_name}", _shape, lib=_LIBRARY)
torch.library.register_autograd("quantbench::packed_linear", _input_gradient, setup_context=_keep_weight, lib=_LIBRARY)
packed_linear = torch.ops.quantbench.packed_linear.default
packed_linear_inference = torch.ops.quantbench.packed_linear_inference.default
packed_linear_input_gradient = torch.ops.quantbench.packed_linear_input_gradient.default
packed_gated_linear_inference = torch.ops.quantbench.packed_gated_linear_inference.default


class PackedLinear(nn.Module):
    _cpu_kernel = False  # whether the C++ kernel runs the words (set when built or moved; a layer unpickled from an
    # older quantbench lacks it and goes through packed_matmul)

    def __init__(self, weight: KernelWeight, bias: torch.Tensor | None = None, backend: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype  # what `.weight` decodes to
        self.kind, self.bits, self.group = weight.kind, weight.bits, weight.group
        self.out_features, self.in_features = weight.shape
        self.backend, self.global_scale = backend, weight.global_scale
        for name in ("qweight", "scales", "zeros", "perm"):
            self.register_buffer(name, getattr(weight, name), persistent=False)  # built from the checkpoint
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._words_for_device()

    def _words_for_device(self) -> None:
        """qweight in the CPU kernel's tiles where that kernel runs the layer, else in rows of the whole output
        width (every other kernel's layout)."""
        weight = self.kernel_weight
        self._cpu_kernel = cpu_packed.runs(weight)
        self.qweight = (weight.in_cpu_tiles() if self._cpu_kernel else weight.row_major()).qweight

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the words move as they are, then take the layout of where they are
        self._words_for_device()
        return self

    @property
    def kernel_weight(self) -> KernelWeight:
        buffers = self._buffers  # read directly: nn.Module's attribute lookup costs a call per layer and token
        return KernelWeight(self.kind, self.bits, (self.out_features, self.in_features), self.group,
                            buffers["qweight"], buffers["scales"], buffers["zeros"], buffers["perm"], self.global_scale)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, decoded on demand (for code that inspects `.weight`; not kept)."""
        return dequantize_kernel_weight(self.kernel_weight).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        differentiable = x.requires_grad and torch.is_grad_enabled()
        if differentiable or torch.compiler.is_compiling():
            y = (packed_linear if differentiable else packed_linear_inference)(
                x, self.qweight, self.scales, self.zeros, self.perm, self.kind, self.bits, self.out_features,
                self.in_features, self.group, self.global_scale, self.backend)
        elif self._runs_cpu_kernel(x):  # eager inference skips the dispatcher, and on the CPU packed_matmul too
            flat = cpu_packed.cpu_packed_matmul(x.reshape(-1, self.in_features), self.kernel_weight)
            y = flat.view(*x.shape[:-1], self.out_features)
        else:
            y = bound_matmul(x, self.kernel_weight, self.backend)
        return y if self.bias is None else y + self.bias

    def _runs_cpu_kernel(self, x: torch.Tensor) -> bool:
        """Whether packed_matmul would hand this call to the C++ kernel (about 6 µs of choosing a call saved)."""
        return (self._cpu_kernel and self.backend in ("auto", "cpu") and x.device.type == "cpu"
                and x.dtype.is_floating_point)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, group={self.group}, act_order={self.perm is not None}")


class GatedPackedLinear(PackedLinear):
    """A gated MLP's gate and up layers in one packed weight whose outputs interleave theirs (gate j at output 2j,
    up j at 2j + 1: fused.gate_up_interleaved), without bias: x → silu(gate(x))·up(x) [..., out_features / 2]. On
    the GPU the CUDA kernels store that product in place of the two outputs (one kernel fewer a layer than the
    activation after the matmul); `.weight` decodes the interleaved rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arguments = (self.qweight, self.scales, self.zeros, self.perm, self.kind, self.bits, self.out_features,
                     self.in_features, self.group, self.global_scale, self.backend)
        if x.requires_grad and torch.is_grad_enabled():  # gradients through packed_linear's own
            return silu_and_mul(packed_linear(x, *arguments))
        if torch.compiler.is_compiling():
            return packed_gated_linear_inference(x, *arguments)
        if self._runs_cpu_kernel(x):
            flat = cpu_packed.cpu_packed_matmul(x.reshape(-1, self.in_features), self.kernel_weight)
            return silu_and_mul(flat.view(*x.shape[:-1], self.out_features))
        return bound_matmul(x, self.kernel_weight, self.backend, gated=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gated: silu(gate)·up of interleaved gate and up outputs"
