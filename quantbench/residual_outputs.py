"""A block's outputs from the statistics pass of its last linear, instead of one more forward of the block.

With true-sequential calibration a dense block's last stage is one linear whose output the block adds to its
residual stream: Llama's `out = h + down_proj(x)`. The pass that collects that linear's statistics runs
everything before it, so it can keep x and h. Once the linear is quantized, `h + down_proj(x)` is the block's
output, bit for bit what a forward of the block would give, for one matmul instead of a block forward.

h is the input of a submodule that runs before the linear (Llama's post_attention_layernorm, OPT's
final_layer_norm). It is found on the first block of each kind as the submodule whose input plus the linear's
output equals the block's output bit for bit. In every block the first batch runs the whole block and is
checked the same way, and its kept x must give the linear's output again before the linear is quantized; the
other batches stop at the linear, as the statistics pass always did. Where anything differs (Gemma's
post-norms, GPT-NeoX's parallel residual, a kept tensor changed in place) the block runs again as before.
The tensors are kept only where they fit in half the memory free on their device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantbench.calibration.stats import StopForward
from quantbench.memory import free_bytes

UNKNOWN = "?"  # a kind of block whose residual source has not been looked for yet


@dataclass
class KeptResidual:
    """Per calibration batch: the linear's input (before its own input transforms), the residual h it is
    added to, and the shape of the block's output."""

    layer: nn.Module
    inputs: list[torch.Tensor]
    residuals: list[torch.Tensor]
    shapes: list[torch.Size]

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The block's outputs with the layer as it computes now; the kept tensors are released as it goes."""
        outputs = []
        while self.inputs:
            x, h, shape = self.inputs.pop(0), self.residuals.pop(0), self.shapes.pop(0)
            outputs.append((h + self.layer(x)).reshape(shape))
        return outputs


def fits(hidden: list[torch.Tensor], layer: nn.Linear) -> bool:
    """Whether the layer's inputs and the residuals of every batch fit in half the memory free now."""
    tokens = sum(h.numel() // h.shape[-1] for h in hidden)
    need = tokens * (layer.in_features + hidden[0].shape[-1]) * hidden[0].element_size()
    free = free_bytes(hidden[0].device)
    return free is not None and 2 * need <= free


class ResidualRecorder:
    """Hooks that keep, for each batch of a pass, the linear's input and the residual's source input;
    `source` is a submodule's name, or UNKNOWN to find it on the first batch. The forward of every batch
    but the first stops (StopForward) once the linear's other pre-hooks ran. Call `batch_done` with each
    batch's input and block output (None where it stopped); `kept()` after the pass (hooks removed) gives a
    KeptResidual, or None when a check failed. `source` afterwards: the name found, or None where the block
    has none."""

    def __init__(self, block: nn.Module, layer: nn.Module, source: str) -> None:
        self.block, self.layer, self.source = block, layer, source
        self.inputs: list[torch.Tensor] = []
        self.residuals: list[torch.Tensor] = []
        self.shapes: list[torch.Size] = []
        self.first_output: torch.Tensor | None = None
        self.failed = False
        self._before: list[tuple[str, torch.Tensor]] = []  # (module name, input) in call order before the layer
        self._layer_calls: list[torch.Tensor] = []
        self._outputs: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> ResidualRecorder:
        self._handles.append(self.layer.register_forward_pre_hook(self._layer_input, prepend=True))
        self._handles.append(self.layer.register_forward_pre_hook(self._stop_after_first))  # after the stats hook
        self._handles.append(self.layer.register_forward_hook(self._layer_output))
        if self.source == UNKNOWN:
            candidates = [(name, module) for name, module in self.block.named_modules()
                          if name and module is not self.layer]
        else:
            candidates = [(self.source, self.block.get_submodule(self.source))]
        for name, module in candidates:
            self._handles.append(module.register_forward_pre_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def record(_module, args):
            if args and isinstance(args[0], torch.Tensor) and not self._layer_calls:
                self._before.append((name, args[0]))
        return record

    def _layer_input(self, _module, args) -> None:
        self._layer_calls.append(args[0])

    def _stop_after_first(self, _module, _args) -> None:
        if self.shapes or self.failed:
            raise StopForward

    def _layer_output(self, _module, _args, output) -> None:
        self._outputs.append(output)

    def batch_done(self, hidden: torch.Tensor, out: torch.Tensor | None) -> None:
        before, inputs, outputs = self._before, self._layer_calls, self._outputs
        self._before, self._layer_calls, self._outputs = [], [], []
        if self.failed:
            return
        if len(inputs) != 1:  # an expert not routed to, or a linear called twice
            return self._fail()
        if not self.shapes:  # the first batch, run whole: find or check the residual
            if len(outputs) != 1 or out is None or out.shape != hidden.shape:
                return self._fail()
            y = self.first_output = outputs[0]
            if self.source == UNKNOWN:  # the latest submodule input that adds up
                self.source = next((name for name, h in reversed(before) if _adds_up(h, y, out)), None)
        found = [tensor for name, tensor in before if name == self.source]
        if len(found) != 1 or (not self.shapes and not _adds_up(found[0], y, out)):
            return self._fail()
        self.inputs.append(inputs[0])
        self.residuals.append(found[0])
        self.shapes.append(hidden.shape)

    def _fail(self) -> None:
        self.failed = True
        self.inputs, self.residuals, self.shapes, self.first_output = [], [], [], None

    @torch.no_grad()
    def kept(self) -> KeptResidual | None:
        """The kept tensors, once the kept input of the first batch gives the layer's output again."""
        if self.failed or not self.inputs or not torch.equal(self.layer(self.inputs[0]), self.first_output):
            return None
        return KeptResidual(self.layer, self.inputs, self.residuals, self.shapes)


def _adds_up(h: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> bool:
    return (h.shape == y.shape and h.dtype == y.dtype == out.dtype and h.numel() == out.numel()
            and torch.equal((h + y).reshape(out.shape), out))
