"""Where the block driver finds each block's weights.

`ResidentWeights`: the whole model sits in host memory and each block visits the device in turn.
`DiskWeights`: the model is a skeleton on the meta device (names and shapes, no storage), and each
block's tensors are read from the model's safetensors files, memory-mapped, only when its turn comes,
straight onto the device; they are dropped when the block is done. The tensors outside the blocks
(embeddings, final norm, LM head) are read when the driver starts and dropped when it ends. Host memory
then holds one tensor in flight, not the model.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from quantbench.errors import QuantbenchError
from quantbench.experts import fused_part, fused_source
from quantbench.model_io import (all_finite, blocks_path, check_supported, decoder_blocks, move_except_blocks,
                                 nonfinite_counts)

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ResidentWeights:
    """The model is in memory; blocks move to the device and back where they came from.

    On CUDA the moves overlap the computation: `prefetch` copies the next block's tensors to the device on
    a side stream (through pinned memory) from a worker thread while the current block is solved, and
    `release_block` moves a finished block home from that thread. QUANTBENCH_PREFETCH=0 turns this off.
    """

    def __init__(self, model: nn.Module) -> None:
        self.home = next(model.parameters()).device
        self._worker: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        self._moving_home: list[Future] = []

    def load_outside(self, model: nn.Module, device: torch.device) -> None:
        move_except_blocks(model, device)

    def release_outside(self, model: nn.Module) -> None:
        self.wait()
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None
        model.to(self.home)

    def _overlaps(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.home.type == "cpu" and os.environ.get("QUANTBENCH_PREFETCH", "1") != "0"

    def _submit(self, job) -> Future:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="quantbench-prefetch")
        return self._worker.submit(job)

    def prefetch(self, block: nn.Module, device: torch.device) -> None:
        if not self._overlaps(device) or id(block) in self._pending:
            return
        tensors = [*block.parameters(), *block.buffers()]

        def copy() -> tuple[dict, torch.cuda.Event]:
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                copies = {id(t): t.pin_memory().to(device, non_blocking=True) for t in tensors}
                done = torch.cuda.Event()
                done.record(stream)
            done.synchronize()  # the pinned staging buffers may go once the copies are complete
            return copies, done

        self._pending[id(block)] = self._submit(copy)

    def load_block(self, block: nn.Module, prefix: str, device: torch.device) -> None:
        pending = self._pending.pop(id(block), None)
        if pending is None:
            block.to(device)
            return
        copies, _ = pending.result()
        current = torch.cuda.current_stream(device)
        for tensor in copies.values():
            tensor.record_stream(current)
        block._apply(lambda t: copies[id(t)] if id(t) in copies else t.to(device))

    def release_block(self, block: nn.Module) -> None:
        device = next(block.parameters()).device
        if not self._overlaps(device):
            block.to(self.home)
            return
        finished = torch.cuda.Event()
        finished.record(torch.cuda.current_stream(device))

        def move_home() -> None:
            stream = torch.cuda.Stream(device)
            stream.wait_event(finished)
            with torch.cuda.stream(stream):
                block.to(self.home)

        self._moving_home.append(self._submit(move_home))

    def wait(self) -> None:
        """Until every block moved by the worker is where it belongs (re-raising what failed there)."""
        for future in [*self._pending.values(), *self._moving_home]:
            future.result()
        self._pending.clear()
        self._moving_home.clear()


def skeleton_model(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model `config` describes with its parameters on the meta device (no storage) and its
    non-persistent buffers (rotary frequencies) computed as from_pretrained computes them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    check_supported(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if not model.name_or_path:  # a multimodal release's language model: its config is the release's text part
        model.name_or_path = model.config._name_or_path = config._name_or_path
    decoder_blocks(model)  # experts by the per-expert names checkpoints use
    return model.eval()


def weights_folder(name_or_path: str) -> Path:
    """The folder holding a model's safetensors files: a local directory, or the hub cache's snapshot."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as exc:  # the hub client raises many types; all mean the same here
        raise QuantbenchError(f"cannot find the weights of {name_or_path!r} ({str(exc).splitlines()[0]}); offline, "
                              "source .assets/env.sh or give a local directory") from None


class DiskWeights:
    """Reads tensors by their model names from a folder of safetensors files (sharded or not).

    `nonfinite` is what to do with a NaN or ±inf weight, as model.nonfinite_weights says: `error` stops
    the run naming it, `zero` replaces it by 0 and records it in `zeroed`.
    """

    def __init__(self, model: nn.Module, folder: str | Path, dtype: torch.dtype, nonfinite: str = "error") -> None:
        self.model, self.folder, self.dtype, self.nonfinite = model, Path(folder), dtype, nonfinite
        stored_files = self._weight_map()
        self.stored = self._model_names(list(stored_files))  # model name → name in the checkpoint
        self.files = {name: stored_files[stored] for name, stored in self.stored.items()}
        self.zeroed: dict[str, str] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            return json.loads(index.read_text())["weight_map"]
        single = self.folder / SINGLE_FILE
        if not single.is_file():
            raise QuantbenchError(f"{self.folder} has no {SINGLE_FILE} or {INDEX_FILE}: streaming reads safetensors "
                                  "weights; convert the model (save_pretrained writes safetensors) or set "
                                  "model.streaming: off")
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)

    def _model_names(self, stored_keys: list[str]) -> dict[str, str]:
        """Checkpoint names renamed as from_pretrained renames them (transformers' conversion mapping: GPT-NeoX's
        `embed_out` is `lm_head`; a base model's checkpoint lacks the `model.` prefix). A checkpoint that
        needs its tensors converted, not just renamed, cannot stream."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(self.model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = self.model.state_dict()
        names = {}
        for key in stored_keys:
            name, _ = rename_source_key(key, renamings, [], self.model.base_model_prefix, meta)
            if name in meta:  # e.g. per-expert weights: quantbench splits transformers' fused experts as stored
                names[name] = key
                continue
            name, converted = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            if converted is not None:
                raise QuantbenchError(f"{self.folder}: {key} must be converted as it loads ({converted}), which "
                                      "streaming does not do; set model.streaming: off")
            names[name] = key
        return names

    def load(self, module: nn.Module, prefix: str, device: torch.device, skip: str | None = None) -> None:
        """Give every parameter and persistent buffer of `module` (named `prefix`.…), except those under
        `skip`, its stored value on `device`, in the model's dtype (floating-point tensors)."""
        wanted: dict[str, list[tuple[str, str]]] = {}
        def skipped(key: str) -> bool:
            return skip is not None and key.startswith(skip + ".")

        for name, _ in stored_tensors(module):
            key = f"{prefix}.{name}" if prefix else name
            if skipped(key):
                continue
            stored, part = self.stored.get(key), None
            if stored is None and (fused := fused_source(self.model.config.model_type, key)) is not None:
                if fused[0] in self.stored:  # an expert of a checkpoint that keeps them fused
                    key, part = fused[0], fused[1:]
                    stored = self.stored[key]
            if stored is None:
                if self._tied_elsewhere(key):
                    continue
                raise QuantbenchError(f"{self.folder} has no tensor {key}; the checkpoint does not fit its config"
                                      + _packed_hint(self.stored))
            wanted.setdefault(self.files[key], []).append((name, key, stored, part))
        from safetensors import safe_open

        for file, entries in wanted.items():
            with safe_open(str(self.folder / file), framework="pt") as handle:
                expert, slices = None, {}  # one expert's slices of the fused tensors, each read once
                for name, key, stored, part in entries:
                    if part is None:
                        value = handle.get_tensor(stored)
                    else:
                        if part[0] != expert:
                            expert, slices = part[0], {}
                        if stored not in slices:
                            slices[stored] = handle.get_slice(stored)[expert]
                        value = fused_part(slices[stored], part[1])
                    if value.is_floating_point():
                        value = self._finite(key, value.to(device=device, dtype=self.dtype))
                    _set_tensor(module, name, value.to(device))
        for name, buffer in module.named_buffers():  # computed buffers (rotary frequencies) follow
            if not buffer.is_meta and buffer.device != device and not skipped(f"{prefix}.{name}" if prefix else name):
                _set_tensor(module, name, buffer.to(device))

    def _tied_elsewhere(self, key: str) -> bool:
        head = self.model.get_output_embeddings()
        return bool(getattr(self.model.config, "tie_word_embeddings", False)) and head is not None and \
            key == _param_name(self.model, head)

    def _retie(self) -> None:
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight

    def _finite(self, key: str, value: torch.Tensor) -> torch.Tensor:
        if all_finite(value):
            return value
        if self.nonfinite == "error":
            raise QuantbenchError(f"the model has non-finite weights ({key}: {nonfinite_counts(value)}); fix the "
                                  "checkpoint, or set model.nonfinite_weights: zero to replace them by 0")
        self.zeroed[key] = nonfinite_counts(value)
        log.warning("replaced non-finite weights by 0 in %s", key)
        return value.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)

    def load_outside(self, model: nn.Module, device: torch.device) -> None:
        self.load(model, "", device, skip=blocks_path(model))
        self._retie()

    def release_outside(self, model: nn.Module) -> None:
        skip = blocks_path(model) + "."
        for name, param in list(model.named_parameters()):
            if not name.startswith(skip):
                _set_tensor(model, name, torch.empty_like(param, device="meta"))
        self._retie()

    def state(self) -> dict[str, str]:
        return dict(self.zeroed)

    def restore(self, state: dict[str, str]) -> None:
        self.zeroed.update(state)

    def load_block(self, block: nn.Module, prefix: str, device: torch.device) -> None:
        self.load(block, prefix, device)

    def release_block(self, block: nn.Module) -> None:
        for name, param in list(block.named_parameters()):
            _set_tensor(block, name, torch.empty_like(param, device="meta"))


def _packed_hint(stored: dict[str, str]) -> str:
    """What to do with experts packed in MXFP4 blocks (the original GPT-OSS release), which streaming cannot
    read: from_pretrained dequantizes them."""
    if not any(name.endswith("_blocks") for name in stored):
        return ""
    return (" (its experts are packed in MXFP4 blocks, which streaming does not unpack: set model.streaming: off, "
            "or save a 16-bit copy with from_pretrained and save_pretrained)")


def stored_tensors(module: nn.Module, remove_duplicate: bool = True):
    """Parameters (each once, or with `remove_duplicate=False` under every name a tied one has) and the
    buffers a checkpoint stores (persistent ones), by name in `module`."""
    yield from module.named_parameters(remove_duplicate=remove_duplicate)
    for name, buffer in module.named_buffers(remove_duplicate=remove_duplicate):
        owner, _, attr = name.rpartition(".")
        if attr not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buffer


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _param_name(model: nn.Module, module: nn.Module) -> str:
    return next(f"{name}.weight" for name, child in model.named_modules() if child is module)
