"""Submodule outputs one statistics pass hands the next, so a true-sequential pass does not recompute them.

Each pass of a block's true-sequential calibration runs the block from its start up to the layers it
calibrates. What finished before the previous pass reached its own layers (the layers quantized since) is
computed again from the same inputs and weights: Llama's input_layernorm and q/k/v projections in the o_proj
pass, the whole attention half in the down_proj pass. A `PassCache` records the outputs of the outermost
submodules that finished before its pass first called one of its layers (their first calls), and serves them
to the next pass, or to the propagation of the block's outputs, in place of those calls. The first batch of
every pass runs whole, and each output must equal the recorded one bit for bit as its module returns it;
where one does not (an output changed in place after it was returned, say), the pass runs whole. What is
recorded is kept only where it fits in half the memory free on its device.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from quantbench.memory import free_bytes


class PassCache:
    """Outputs by batch and submodule name, recorded by one pass and served to the next. `next_pass(layers,
    record)` sets up a pass over `layers` (the linears it calibrates; `record`: whether a pass follows);
    `run(batch, forward)` runs one batch of it.

    A pass also records its layers' inputs, but for layers whose parent returned something else on the first
    batch (an expert's gate and up) and for layers the first batch did not call (an expert none of its tokens
    were routed to: tails are found on the first batch). A submodule whose output is one of those layers'
    output (Llama's self_attn returns o_proj's) is then served that layer, quantized since, on the recorded
    input: its "tail". The first batch checks that the submodule returns the layer's output object,
    unchanged, and that the layer's input is the recorded one."""

    def __init__(self, block: nn.Module, batches: int) -> None:
        self.block, self.batches = block, batches
        self.modules = dict(block.named_modules())
        self.name_of = {id(module): name for name, module in self.modules.items()}
        self.shared = shared_modules(block)
        self.served: list[dict[str, object]] = []  # what the previous pass recorded, by batch
        self.recorded: list[dict[str, object]] = []
        self.layer_inputs: list[dict[str, torch.Tensor]] = []  # the previous pass's layers' inputs, by batch
        self.recorded_inputs: list[dict[str, torch.Tensor]] = []
        self.tails: dict[str, tuple[str, tuple | None]] = {}  # submodule → (layer, rest of its output tuple)
        self.record = self.serving = False
        self._layers: list[nn.Module] = []
        self._names: list[str] = []
        self._no_tail: set[str] = set()  # this pass's layers whose input no submodule can be served on

    def next_pass(self, layers: list[nn.Module], record: bool) -> None:
        holding = {prefix for layer in layers for prefix in prefixes(self.name_of[id(layer)])}  # the layers and above
        self._names = [name for name in self.modules if name and name not in holding and name not in self.shared]
        kept = set(self._names)  # a module holding one of this pass's layers must run, for its hooks
        self.served = [{name: out for name, out in outputs.items() if name in kept} for outputs in self.recorded]
        self.layer_inputs = self.recorded_inputs
        self.tails = {prefix: (layer, None) for layer in (self.layer_inputs[0] if self.layer_inputs else {})
                      for prefix in prefixes(layer)[:-1] if prefix in kept}  # candidates, checked on batch 0
        self.recorded, self.recorded_inputs, self._layers, self._no_tail = [], [], layers, set()
        self.record, self.serving = record, bool(self.served)

    def clear(self) -> None:
        """Forget what was recorded (a stage without a pass came between)."""
        self.served, self.recorded, self.record, self.serving = [], [], False, False
        self.layer_inputs, self.recorded_inputs, self.tails = [], [], {}

    def run(self, batch: int, forward):
        """`forward()` for batch `batch`: recorded outputs served (but on the first batch, which checks
        them), and this pass's recorded."""
        check = self.serving and batch == 0
        serve = self.serving and 0 < batch < len(self.served)
        finished: dict[str, object] = {}  # each module's first output before the pass reached its layers
        again: set[str] = set()  # modules called more than once by then
        reached = []  # one entry once the pass has called one of its layers
        differs = []  # the names whose fresh output is not what was recorded, compared as each finishes
        inputs: dict[str, torch.Tensor] = {}  # this pass's layers' first inputs
        tail_layers: dict[str, tuple] = {}  # on the first batch: a tail candidate layer's input, output, copy
        tail_outputs: dict[str, object] = {}

        def on_finish(name: str):
            def hook(_module, _args, output) -> None:
                if name in self.tails and name not in tail_outputs:
                    tail_outputs[name] = output
                if reached:
                    return
                if name in finished:
                    again.add(name)
                    return
                finished[name] = output
                if check and name in self.served[0] and not _same(output, self.served[0][name]):
                    differs.append(name)
            return hook

        def on_layer_input(name: str):
            def hook(_module, args) -> None:
                if name not in self._no_tail and (batch == 0 or name in self.recorded_inputs[0]):
                    inputs.setdefault(name, args[0])
            return hook

        returned: dict[str, object] = {}  # on the first recorded batch: layers' and their parents' first outputs

        def on_return(name: str):
            def hook(_module, _args, output) -> None:
                returned.setdefault(name, output)
            return hook

        def on_tail_layer(name: str):
            def before(_module, args) -> None:
                tail_layers.setdefault(name, [args[0]])

            def after(_module, _args, output) -> None:
                if len(tail_layers.get(name, ())) == 1:
                    tail_layers[name] += [output, output.clone() if isinstance(output, torch.Tensor) else None]
            return before, after

        handles = []
        if self.record or check:
            handles += [layer.register_forward_pre_hook(lambda *_: reached.append(True)) for layer in self._layers]
            handles += [self.modules[name].register_forward_hook(on_finish(name)) for name in self._names]
        if self.record:
            handles += [layer.register_forward_pre_hook(on_layer_input(self.name_of[id(layer)]), prepend=True)
                        for layer in self._layers]
        if self.record and batch == 0:
            for name in {n for layer in self._layers for n in _layer_and_parent(self.name_of[id(layer)])}:
                handles.append(self.modules[name].register_forward_hook(on_return(name)))
        if check:
            for layer in {layer for layer, _ in self.tails.values()}:
                before, after = on_tail_layer(layer)
                handles += [self.modules[layer].register_forward_pre_hook(before, prepend=True),
                            self.modules[layer].register_forward_hook(after)]
        replaced = []
        if serve:
            for name, output in self.served[batch].items():
                replaced.append(serve_first_call(self.modules[name], lambda output=output: output))
            for name, (layer, rest) in self.tails.items():
                if layer not in self.layer_inputs[batch]:  # an expert no token of this batch was routed to
                    continue
                x, module = self.layer_inputs[batch][layer], self.modules[layer]
                replaced.append(serve_first_call(self.modules[name], lambda x=x, module=module, rest=rest:
                                                 module(x) if rest is None else (module(x), *rest)))
        try:
            return forward()
        finally:
            for handle in handles:
                handle.remove()
            restore_forwards(replaced)
            if serve:
                self.served[batch] = {}  # released as the pass goes
                self.layer_inputs[batch] = {}
            if check:
                self.serving = not differs and finished.keys() >= self.served[0].keys()
                self.tails = _checked_tails(self.tails, tail_outputs, tail_layers, self.layer_inputs[0])
                self.served = [{}] + self.served[1:] if self.serving else []
                if not self.serving:
                    self.tails, self.layer_inputs = {}, []
            if self.record:
                if batch == 0:
                    self._no_tail = _never_tails(inputs, returned)
                    inputs = {name: x for name, x in inputs.items() if name not in self._no_tail}
                self.recorded.append(outermost({name: out for name, out in finished.items() if name not in again}))
                self.recorded_inputs.append(inputs)
                if batch == 0 and not self._fits([self.recorded[0], inputs]):
                    self.record, self.recorded, self.recorded_inputs = False, [], []

    def _fits(self, recorded: list[dict[str, object]]) -> bool:
        tensors = [t for outputs in recorded for output in outputs.values() for t in tensors_of(output)]
        if not tensors:
            return True
        free = free_bytes(tensors[0].device)
        need = self.batches * sum(t.numel() * t.element_size() for t in tensors)
        return free is not None and 2 * need <= free


def shared_modules(block: nn.Module) -> set[str]:
    """The modules registered under several parents (the activation every expert calls): a module's first call
    in one forward may come from another caller than in the next, so these are never recorded or served."""
    registered = Counter(id(module) for _, module in block.named_modules(remove_duplicate=False))
    name_of = {id(module): name for name, module in block.named_modules()}
    return {name_of[key] for key, count in registered.items() if count > 1}


def serve_first_call(module: nn.Module, output) -> tuple[nn.Module, object]:
    """The module's first call returns `output()`; a later one (a module called again in the forward) runs its
    own forward. Returns the module and the forward set on the instance before (None: its class's), for
    `restore_forwards`."""
    own = module.__dict__.get("forward")
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            return output()
        return own(*args, **kwargs) if own is not None else type(module).forward(module, *args, **kwargs)

    module.forward = forward
    return module, own


def restore_forwards(replaced: list[tuple[nn.Module, object]]) -> None:
    """Undo `serve_first_call`s, the last first."""
    for module, own in reversed(replaced):
        if own is None:
            del module.forward
        else:
            module.forward = own


def _checked_tails(candidates: dict[str, tuple], outputs: dict[str, object], layers: dict[str, list],
                   recorded_inputs: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple | None]]:
    """The tail candidates the first batch bore out, the outermost for each layer: the submodule returned
    the layer's output object (alone, or first with no other tensor), as the layer returned it, and the
    layer read the recorded input."""
    checked: dict[str, tuple[str, tuple | None]] = {}
    for name in sorted(candidates, key=lambda n: n.count(".")):
        layer = candidates[name][0]
        seen, output = layers.get(layer), outputs.get(name)
        if seen is None or len(seen) != 3 or any(layer == other for other, _ in checked.values()):
            continue
        x, y, copy = seen
        first, rest = (output, None) if isinstance(output, torch.Tensor) else (
            (output[0], tuple(output[1:])) if isinstance(output, tuple) and output else (None, None))
        if (first is y and copy is not None and torch.equal(y, copy) and not tensors_of(list(rest or ()))
                and _same(x, recorded_inputs[layer])):
            checked[name] = (layer, rest)
    return checked


def _never_tails(inputs: dict[str, torch.Tensor], returned: dict[str, object]) -> set[str]:
    """The layers whose parent returned, and not the layer's output object (alone or first): no submodule
    above them returns it, so the next pass serves nothing on their input (an expert's gate and up; the
    experts' inputs are the routed tokens' hidden states, k copies of the block's)."""
    never = set()
    for layer in inputs:
        _, parent = _layer_and_parent(layer)
        if layer in returned and parent in returned:
            output = returned[parent]
            first = output[0] if isinstance(output, tuple) and output else output
            if first is not returned[layer]:
                never.add(layer)
    return never


def _layer_and_parent(name: str) -> tuple[str, str]:
    return name, name.rpartition(".")[0]


def prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def outermost(finished: dict[str, object]) -> dict[str, object]:
    """The finished submodules not inside another finished one."""
    return {name: output for name, output in finished.items()
            if not any(name.startswith(other + ".") for other in finished)}


def tensors_of(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []


def _same(a, b) -> bool:
    """Two recorded outputs, bit for bit: tensors, and tuples, lists and mappings of them, None and plain
    numbers and strings; anything else only as the same object."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (bool, int, float, str)) and isinstance(b, (bool, int, float, str)):
        return type(a) is type(b) and a == b
    return a is b
