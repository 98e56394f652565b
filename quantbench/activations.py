"""Simulated activation quantization: a linear layer's input is rounded to a format on the fly, so that
weight-and-activation configurations (W8A8, W4A4, MXFP8/MXFP8, …) can be scored by perplexity.

Every token is quantized on its own, dynamically: MX formats in blocks of 32 along the hidden dimension
(NVFP4: blocks of 16, under a per-tensor scale taken from the current input), `int8`/`int4` symmetric
with one scale per token. The rounding happens in float32 and the result is cast back to the input's
dtype. A hidden size that the block does not divide is padded with zeros, which changes no block scale.
Layers that read one tensor (q/k/v, gate/up) quantize it once: the hooks remember the last input they
rounded, by identity and version counter, and hand the same result to the next layer that asks.
"""

from __future__ import annotations

import torch
from torch import nn

from quantbench.formats import BLOCK_FORMATS, IntFormat

_HOOK_ATTR = "_quantbench_activation_hook"


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


class _LastRounded:
    """The last (input, version, format) rounded and its result; holding the input keeps its identity
    from being reused by another tensor while it is remembered."""

    entry: tuple | None = None

    @classmethod
    def get(cls, x: torch.Tensor, fmt_name: str) -> torch.Tensor:
        entry = cls.entry
        if entry is not None and entry[0] is x and entry[1] == x._version and entry[2] == fmt_name:
            return entry[3]
        rounded = quantize_activations(x, fmt_name)
        cls.entry = (x, x._version, fmt_name, rounded)
        return rounded

    @classmethod
    def forget(cls) -> None:
        cls.entry = None


class ActivationQuantizer:
    """A forward pre-hook that quantizes a module's first positional input."""

    def __init__(self, fmt_name: str) -> None:
        self.fmt_name = fmt_name

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (_LastRounded.get(args[0], self.fmt_name), *args[1:])

    def __repr__(self) -> str:
        return f"ActivationQuantizer({self.fmt_name!r})"


def quantize_inputs_of(linear: nn.Module, fmt_name: str | None) -> None:
    """Quantize `linear`'s input to `fmt_name` from now on (None: stop). Installing twice replaces."""
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(linear, _HOOK_ATTR)
    if fmt_name is not None:
        setattr(linear, _HOOK_ATTR, linear.register_forward_pre_hook(ActivationQuantizer(fmt_name)))


def activation_format_of(linear: nn.Module) -> str | None:
    handle = getattr(linear, _HOOK_ATTR, None)
    if handle is None:
        return None
    return linear._forward_pre_hooks[handle.id].fmt_name
