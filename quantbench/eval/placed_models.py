"""Whole models for lm-eval in a streamed run, placed by free memory: as many blocks as fit on the device,
then host memory, then the disk (accelerate's device maps and offload). The full-precision model comes
from its checkpoint through from_pretrained(device_map=...); the quantized one from the run's native
checkpoint, tensor by tensor, each quantized layer dequantized as it is placed, with its online transforms
(Hadamard input rotation, activation quantization) as load_quantized restores them."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantbench import memory

DEVICE_SHARE = 0.8  # of the free device memory, the rest for lm-eval's batches
HOST_SHARE = 0.5  # of the available host memory


def memory_budget(device: torch.device) -> dict:
    """accelerate's max_memory for a model placed by what is free now."""
    budget: dict = {}
    if device.type == "cuda":
        budget[device.index or 0] = int(memory.free_bytes(device) * DEVICE_SHARE)
    budget["cpu"] = int((memory.available_host_bytes() or 0) * HOST_SHARE)
    return budget


def placed_pretrained(name: str, dtype: torch.dtype, max_memory: dict, offload_dir: Path,
                      trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=str(offload_dir), trust_remote_code=trust_remote_code)
    return model.eval()


def placed_quantized(directory: Path, dtype: torch.dtype, max_memory: dict, offload_dir: Path) -> nn.Module:
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device
    from quantbench.export.checkpoint import checkpoint_skeleton, restore_online_transforms, stored_items
    from quantbench.export.checkpoint_reader import read_checkpoint

    checkpoint = read_checkpoint(directory)
    model = checkpoint_skeleton(directory, dtype)
    model.tie_weights()
    device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                       no_split_module_classes=model._no_split_modules)
    offload_dir.mkdir(parents=True, exist_ok=True)
    index: dict = {}
    tied = checkpoint.qconfig.get("tied", {})
    for key, item in stored_items(checkpoint, torch.device("cpu")):
        if isinstance(item, torch.Tensor):
            value = item.to(dtype) if item.is_floating_point() else item
        else:
            key, value = f"{key}.weight", item.dequantize(dtype)
        for name in [key, *(dropped for dropped, kept in tied.items() if kept == key)]:
            where = _device_of(name, device_map)
            if where == "disk":  # a tied copy offloaded under each name it is read by
                offload_weight(value, name, str(offload_dir), index)
            else:
                set_module_tensor_to_device(model, name, where, value=value)
    save_offload_index(index, str(offload_dir))
    if tied:
        model.tie_weights()
    restore_online_transforms(model, checkpoint.qconfig, {n: layer.scheme for n, layer in checkpoint.layers.items()},
                              directory)
    return dispatch_model(model, device_map, offload_dir=str(offload_dir), offload_index=index or None).eval()


def _device_of(key: str, device_map: dict):
    """The device the longest module prefix of `key` is mapped to ("" maps the whole model)."""
    best = max((name for name in device_map if name == "" or key == name or key.startswith(name + ".")), key=len)
    return device_map[best]
