"""What the calibration loss's gradient says about each layer, from one backward pass per batch of the
full-precision model: the first-order and Fisher measures of how much a weight change ΔW costs.

For a linear y = W x, with g_t = ∂L/∂y_t at token t (L the summed next-token loss) and T tokens:
  grad     ∂L/∂W / T = Σ_t g_t x_tᵀ / T               first order: ΔL ≈ Σ |grad ⊙ ΔW| (AutoScheme's measure)
  fisher   Σ_t (g_t²)(x_t²)ᵀ / T                       diagonal Fisher: ΔL ≈ ½ Σ fisher ⊙ ΔW²
  out_sq   Σ_t g_t² / T  (per output)                   with the input second moment A: ΔL ≈ ½ Σ_i out_sq_i (ΔW A ΔWᵀ)_ii
and per decoder block the same per hidden unit of the block's output (`block_sq`), which weighs a change of
the block's output: ΔL ≈ ½ Σ_d block_sq_d Σ_t Δy_td² / T.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.distributed import reduce_in_place
from quantbench.fsutil import save_tensors
from quantbench.model_io import blocks_path, decoder_blocks


@dataclass
class LayerGradients:
    grad: torch.Tensor  # [out, in] float32, mean over tokens
    fisher: torch.Tensor  # [out, in] float32
    out_sq: torch.Tensor  # [out] float32


@dataclass
class GradientStats:
    layers: dict[str, LayerGradients]  # by full module name
    blocks: dict[str, torch.Tensor]  # block name → [hidden] mean squared gradient of its output
    tokens: int

    def save(self, path: str | Path) -> None:
        tensors = {f"layer|{name}|{field}": getattr(g, field).contiguous()
                   for name, g in self.layers.items() for field in ("grad", "fisher", "out_sq")}
        tensors.update({f"block|{name}": t.contiguous() for name, t in self.blocks.items()})
        save_tensors(tensors, Path(path), {"tokens": str(self.tokens)})

    @classmethod
    def load(cls, path: str | Path) -> "GradientStats":
        from safetensors import safe_open

        layers: dict[str, dict] = {}
        blocks = {}
        with safe_open(str(path), "pt") as handle:
            tokens = int(handle.metadata()["tokens"])
            for key in handle.keys():
                kind, name, *field = key.split("|")
                if kind == "block":
                    blocks[name] = handle.get_tensor(key)
                else:
                    layers.setdefault(name, {})[field[0]] = handle.get_tensor(key)
        return cls({name: LayerGradients(**fields) for name, fields in layers.items()}, blocks, tokens)


def gradient_stats(model: nn.Module, input_ids: torch.Tensor, layer_names: list[str], device: torch.device,
                   batch_size: int = 4, progress: bool = True, across_ranks: bool = False) -> GradientStats:
    """One forward and backward pass per batch of `input_ids` through the whole model (float32, on `device`),
    accumulating each named linear's gradient, Fisher diagonal and per-output squared gradient, and each
    decoder block's per-unit squared output gradient. The model's weights and grads are left as they were.
    `across_ranks`: `input_ids` is this rank's share, and the sums and token counts are added across ranks."""
    param = next(model.parameters())
    home, dtype = param.device, param.dtype
    linears = {name: model.get_submodule(name) for name in layer_names}
    prefix = blocks_path(model)
    blocks = {f"{prefix}.{i}": block for i, block in enumerate(decoder_blocks(model))}
    sums = {name: LayerGradients(torch.zeros(m.weight.shape, device=device), torch.zeros(m.weight.shape, device=device),
                                 torch.zeros(m.out_features, device=device)) for name, m in linears.items()}
    block_sums: dict[str, torch.Tensor] = {}
    tokens = 0
    requires = {p: p.requires_grad for p in model.parameters()}
    model.to(device=device, dtype=torch.float32)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with _hooks(model, linears, blocks, sums, block_sums):
            for batch in tqdm(input_ids.split(batch_size), desc="gradients", unit="batch", disable=not progress):
                batch = batch.to(device)
                with torch.enable_grad():
                    logits = model(input_ids=batch, use_cache=False).logits.float()
                    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                       reduction="sum")
                    loss.backward()
                tokens += batch[:, 1:].numel()
    finally:
        model.to(device=home, dtype=dtype)
        for p, flag in requires.items():
            p.requires_grad_(flag)
    if across_ranks:  # every rank ran every block, so every rank holds the same names
        counted = torch.tensor([float(tokens)], device=device)
        reduce_in_place([counted, *(t for name in sorted(sums) for t in (sums[name].grad, sums[name].fisher,
                                                                      sums[name].out_sq)),
                         *(block_sums[name] for name in sorted(block_sums))])
        tokens = int(counted.item())
    layers = {name: LayerGradients(*(t.div(tokens).cpu() for t in (s.grad, s.fisher, s.out_sq)))
              for name, s in sums.items()}
    return GradientStats(layers, {name: t.div(tokens).cpu() for name, t in block_sums.items()}, tokens)


@contextmanager
def _hooks(model: nn.Module, linears: dict[str, nn.Linear], blocks: dict[str, nn.Module],
           sums: dict[str, LayerGradients], block_sums: dict[str, torch.Tensor]):
    """The embedding output is made to require grad (the weights stay frozen), so the backward reaches every
    layer; each linear keeps its input and, when its output's gradient arrives, adds g xᵀ, g² (x²)ᵀ and g²."""
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(_module, args):
            inputs[name] = args[0].detach()
        return hook

    def on_output(name):
        def hook(_module, _args, output):
            x = inputs.pop(name).float().flatten(0, -2)

            def accumulate(g):
                g = g.detach().float().flatten(0, -2)
                s = sums[name]
                s.grad.add_(g.T @ x)
                s.fisher.add_(g.square().T @ x.square())
                s.out_sq.add_(g.square().sum(0))
            output.register_hook(accumulate)
        return hook

    def on_block(name):
        def hook(_module, _args, output):
            def accumulate(g):
                total = g.detach().float().square().flatten(0, -2).sum(0)
                block_sums[name] = block_sums[name] + total if name in block_sums else total
            (output[0] if isinstance(output, (tuple, list)) else output).register_hook(accumulate)
        return hook

    handles = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))]
    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(keep_input(name)))
        handles.append(module.register_forward_hook(on_output(name)))
    for name, block in blocks.items():
        handles.append(block.register_forward_hook(on_block(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
