"""What a quantized linear does to its input on the fly: an online Hadamard rotation (when its weight was
quantized in a rotated basis, see quantizers/hadamard.py) and then simulated activation quantization, so
that weight-and-activation configurations (W8A8, W4A4, MXFP8/MXFP8, …) can be scored by perplexity.

Every token is quantized on its own, dynamically: MX formats in blocks of 32 along the hidden dimension
(NVFP4: blocks of 16, under a per-tensor scale taken from the current input), `int8`/`int4` symmetric
with one scale per token. The rounding happens in float32 and the result is cast back to the input's
dtype. A hidden size that the block does not divide is padded with zeros, which changes no block scale.
Both live in one forward pre-hook per layer, rotation first. Layers that read one tensor (q/k/v, gate/up)
transform it once: the hooks remember the last input they transformed, by identity and version counter,
and hand the same result to the next layer that asks for the same transform.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.formats import BLOCK_FORMATS, IntFormat
from quantbench.quantizers.fwht import RandomHadamard

_HOOK_ATTR = "_quantbench_input_hook"


def quantize_activations(x: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """Round every token (last dimension) of `x` to `fmt_name`; same shape and dtype."""
    hidden = x.shape[-1]
    tokens = x.reshape(-1, hidden).float()
    if fmt_name in ("int8", "int4"):
        grid = IntFormat(bits=int(fmt_name[3:]), symmetric=True)
        rounded = grid.round(tokens, grid.fit(tokens))
    else:
        fmt = BLOCK_FORMATS[fmt_name].for_weight(tokens)
        block = fmt.block_size
        padded_width = -(-hidden // block) * block
        if padded_width != hidden:
            tokens = nn.functional.pad(tokens, (0, padded_width - hidden))
        blocks = tokens.view(-1, block)
        rounded = fmt.round(blocks, fmt.fit(blocks)).view(-1, padded_width)[:, :hidden]
    return rounded.reshape(x.shape).to(x.dtype)


class _LastTransformed:
    """The last (input, version, rotation, format) transformed and its result; holding the input keeps its
    identity from being reused by another tensor while it is remembered."""

    entry: tuple | None = None

    @classmethod
    def get(cls, x: torch.Tensor, rotation: RandomHadamard | None, fmt_name: str | None) -> torch.Tensor:
        entry = cls.entry
        if entry is not None and entry[0] is x and entry[1] == x._version and entry[2:4] == (rotation, fmt_name):
            return entry[4]
        y = rotation.rows(x) if rotation is not None else x
        y = quantize_activations(y, fmt_name) if fmt_name is not None else y
        cls.entry = (x, x._version, rotation, fmt_name, y)
        return y

    @classmethod
    def forget(cls) -> None:
        cls.entry = None


class InputTransform:
    """A forward pre-hook that rotates a module's first positional input and/or quantizes it."""

    def __init__(self, rotation: RandomHadamard | None = None, fmt_name: str | None = None) -> None:
        self.rotation, self.fmt_name = rotation, fmt_name

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (_LastTransformed.get(args[0], self.rotation, self.fmt_name), *args[1:])

    def __repr__(self) -> str:
        return f"InputTransform(rotation={self.rotation!r}, fmt_name={self.fmt_name!r})"


def _input_transform(linear: nn.Module) -> InputTransform | None:
    handle = getattr(linear, _HOOK_ATTR, None)
    return None if handle is None else linear._forward_pre_hooks[handle.id]


def _set_input_transform(linear: nn.Module, rotation: RandomHadamard | None, fmt_name: str | None) -> None:
    """Replace the layer's input hook; registered again (last) so hooks added later see its output."""
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(linear, _HOOK_ATTR)
    if rotation is not None or fmt_name is not None:
        setattr(linear, _HOOK_ATTR, linear.register_forward_pre_hook(InputTransform(rotation, fmt_name)))


def quantize_inputs_of(linear: nn.Module, fmt_name: str | None) -> None:
    """Quantize `linear`'s input to `fmt_name` from now on (None: stop), after its rotation if it has one."""
    _set_input_transform(linear, input_rotation_of(linear), fmt_name)


def rotate_inputs_of(linear: nn.Module, rotation: RandomHadamard | None) -> None:
    """Rotate `linear`'s input by `rotation` from now on (None: stop), before any activation quantization."""
    _set_input_transform(linear, rotation, activation_format_of(linear))


def activation_format_of(linear: nn.Module) -> str | None:
    hook = _input_transform(linear)
    return None if hook is None else hook.fmt_name


def input_rotation_of(linear: nn.Module) -> RandomHadamard | None:
    hook = _input_transform(linear)
    return None if hook is None else hook.rotation
