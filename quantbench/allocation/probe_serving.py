"""What a block's reference forward computed, served to the probes that change one of its layers.

The `block_output` measure runs the block once per (layer, candidate) with only that layer's weight
changed. Everything the block finished before its first call of that layer is what the reference forward
computed from the same inputs and weights: the input norm and the other projections before it, the whole
attention half before the MLP. `ProbeServing` records, in the reference forward, each submodule's first
output and when it finished, and each layer's first input; a probe of a layer is then served the outermost
submodules that finished before that layer was first called. A submodule that returns the layer's output
(Llama's self_attn returns o_proj's, its MLP down_proj's) is served the layer on its recorded input: the
layer's "tail", so a down_proj probe is one matmul and the residual addition.

The reference forward checks what it records: an output is served only if it still equals, once the forward
is done, a copy taken as its module returned it (nothing changed it in place), and a tail only if it returned
the layer's output object unchanged since the layer returned it, and the layer's input is unchanged too. A
probe runs the same code after what it is served, so what the reference did not change in place it does not
either. A module that several parents share (the activation every expert calls) is never served. What is
recorded is kept only where it fits in half the memory free on its device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantbench.memory import free_bytes
from quantbench.pass_cache import (outermost, prefixes, restore_forwards, serve_first_call, shared_modules,
                                   tensors_of)


class ProbeServing:
    """Record the reference forward of each batch with `recorded(batch, forward)`; then run a probe of a layer
    (its weight already changed) with `probe(layer, batch, forward)`."""

    def __init__(self, block: nn.Module, layers: list[nn.Module], batches: int) -> None:
        self.batches = batches
        self.modules = dict(block.named_modules())
        self.name_of = {id(module): name for name, module in self.modules.items()}
        shared = shared_modules(block)
        self.layers = [self.name_of[id(layer)] for layer in layers]
        self._watched = [name for name in self.modules if name and name not in shared]
        self.outputs: list[dict[str, object]] = []  # by batch: module → its first output
        self.inputs: list[dict[str, torch.Tensor]] = []  # by batch: tail layer → its first input
        self.served: dict[str, list[str]] = {}  # layer → the modules served to its probes
        self.tails: dict[str, tuple[str, tuple | None]] = {}  # layer → (module served as it, rest of its tuple)
        self.enabled = True

    def recorded(self, batch: int, forward: Callable):
        """`forward()` of the reference block, its submodules' first outputs and layers' first inputs kept
        where they check out."""
        if not self.enabled:
            return forward()
        clock = [0]  # events so far: a module's first return, a layer's first call
        finished: dict[str, int] = {}  # module → when it first returned
        called: dict[str, int] = {}  # layer → when it was first called
        outputs: dict[str, object] = {}
        copies: dict[str, list[torch.Tensor]] = {}  # module → its output's tensors as it returned them
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer → its input and a copy
        returned: dict[str, tuple[object, torch.Tensor | None]] = {}  # layer → its output and a copy
        intact: dict[str, bool] = {}  # tail module → it returned its layer's output, as the layer returned it
        wanted = None if batch == 0 else {n for names in self.served.values() for n in names}
        tail_of = {module: layer for layer, (module, _) in self.tails.items()}

        def on_finish(name: str):
            def hook(_module, _args, output) -> None:
                if name in outputs:
                    return
                outputs[name], finished[name] = output, clock[0]
                clock[0] += 1
                if wanted is None or name in wanted:
                    copies[name] = [t.clone() for t in tensors_of(output)]
                for layer in [tail_of[name]] if name in tail_of else [n for n in returned if batch == 0]:
                    y, copy = returned.get(layer, (None, None))
                    first = _first(output)
                    if first is not None and first is y:
                        intact.setdefault(name, copy is not None and torch.equal(y, copy))
            return hook

        def on_call(name: str):
            def hook(_module, args) -> None:
                if name not in called:
                    called[name] = clock[0]
                    clock[0] += 1
                    if batch == 0 or name in self.tails:
                        inputs[name] = (args[0], args[0].clone())
            return hook

        def on_layer_return(name: str):
            def hook(_module, _args, output) -> None:
                if name not in returned and (batch == 0 or name in self.tails):
                    returned[name] = (output, output.clone() if isinstance(output, torch.Tensor) else None)
            return hook

        handles = [self.modules[name].register_forward_hook(on_finish(name)) for name in self._watched]
        for name in self.layers:
            handles.append(self.modules[name].register_forward_pre_hook(on_call(name), prepend=True))
            handles.append(self.modules[name].register_forward_hook(on_layer_return(name), prepend=True))
        try:
            return forward()
        finally:
            for handle in handles:
                handle.remove()
            unchanged = {name for name, kept in copies.items()
                         if all(torch.equal(t, c) for t, c in zip(tensors_of(outputs[name]), kept))}
            inputs_unchanged = {name for name, (x, copy) in inputs.items() if torch.equal(x, copy)}
            if batch == 0:
                self._plan(outputs, finished, called, returned, intact)
            self._drop(outputs.keys(), unchanged, inputs.keys(), inputs_unchanged, intact)
            keep = {name for served in self.served.values() for name in served}
            self.outputs.append({name: out for name, out in outputs.items() if name in keep})
            self.inputs.append({name: x for name, (x, _) in inputs.items() if name in self.tails})
            if batch == 0 and not self._fits(self.outputs[0], self.inputs[0]):
                self.enabled, self.outputs, self.inputs, self.served, self.tails = False, [], [], {}, {}

    def _plan(self, outputs: dict, finished: dict, called: dict, returned: dict, intact: dict) -> None:
        """Per layer: the outermost modules finished before its first call, and the outermost module (not the
        block) that returned the layer's output object."""
        for layer in self.layers:
            if layer not in called:
                continue
            holding = set(prefixes(layer))
            before = {name: outputs[name] for name in outputs if finished[name] < called[layer] and name not in holding}
            self.served[layer] = list(outermost(before))
            for prefix in prefixes(layer)[:-1]:
                output = outputs.get(prefix)
                rest = tuple(output[1:]) if isinstance(output, tuple) else None
                if (layer in returned and _first(output) is returned[layer][0] and intact.get(prefix)
                        and not tensors_of(list(rest or ()))):
                    self.tails[layer] = (prefix, rest)
                    break

    def _drop(self, ran, unchanged: set[str], called, inputs_unchanged: set[str], intact: dict[str, bool]) -> None:
        """Serve nothing a forward changed in place: a layer's served modules all or none, its tail alone. What
        a batch did not run (an expert none of its tokens went to) a probe of it does not run either."""
        for layer, names in self.served.items():
            if not {name for name in names if name in ran} <= unchanged:
                self.served[layer] = []
        for layer, (module, _) in list(self.tails.items()):
            if layer in called and (layer not in inputs_unchanged or not intact.get(module)):
                del self.tails[layer]

    def probe(self, layer: nn.Module, batch: int, forward: Callable):
        """`forward()` with what the reference computed before `layer` served."""
        name = self.name_of[id(layer)]
        if not self.enabled or batch >= len(self.outputs):
            return forward()
        replaced = []
        for module_name in self.served.get(name, []):
            if module_name in self.outputs[batch]:
                output = self.outputs[batch][module_name]
                replaced.append(serve_first_call(self.modules[module_name], lambda output=output: output))
        if name in self.tails and name in self.inputs[batch]:
            module_name, rest = self.tails[name]
            x = self.inputs[batch][name]
            replaced.append(serve_first_call(self.modules[module_name], lambda: layer(x) if rest is None else
                                             (layer(x), *rest)))
        try:
            return forward()
        finally:
            restore_forwards(replaced)

    def _fits(self, outputs: dict[str, object], inputs: dict[str, torch.Tensor]) -> bool:
        tensors = [t for output in [*outputs.values(), *inputs.values()] for t in tensors_of(output)]
        if not tensors:
            return True
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        free = free_bytes(tensors[0].device)
        return free is not None and 2 * self.batches * sum(unique.values()) <= free


def _first(output) -> torch.Tensor | None:
    """A module's output tensor, or the first of its tuple."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0] if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) else None
