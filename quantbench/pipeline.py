"""The block-by-block driver: capture block inputs → per block: collect stats, quantize, re-propagate.

Only one block and one block's activations for all calibration samples live on the compute device at a
time; the rest of the model stays where it was loaded (usually CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quantbench.calibration.stats import collect_stats
from quantbench.model_io import block_linears, blocks_path, decoder_blocks, move_except_blocks
from quantbench.quantized_weight import QuantizedWeight
from quantbench.quantizers import solver_for
from quantbench.scheme import Scheme

log = logging.getLogger(__name__)
SchemeLookup = Callable[[str], "Scheme | None"]


@dataclass
class BlockInputs:
    """The hidden states entering a block, one tensor per calibration mini-batch, and the keyword
    arguments (attention mask, position ids, rotary embeddings, …) the model passed with each."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, device: torch.device,
                         batch_size: int) -> BlockInputs:
    """Run the model up to its first decoder block for every mini-batch, keeping what the block receives."""
    first_block = decoder_blocks(model)[0]
    captured = BlockInputs(hidden=[], kwargs=[])

    def catch(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.hidden.append(hidden)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [_block_output(block(hidden, **kwargs)) for hidden, kwargs in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def quantize_model(model: nn.Module, input_ids: torch.Tensor, scheme_for: SchemeLookup, device: torch.device,
                   batch_size: int = 8, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize every decoder-block linear that `scheme_for(full_name)` assigns a scheme, in place.

    Per block: if any of its solvers reads calibration statistics, run the block once with input hooks
    filling `LayerStats`; quantize each linear; run the block again (quantized) to make the next block's
    inputs.

    The model's weights are replaced by their dequantized values (in the model's dtype); the returned
    QuantizedWeights (on CPU) hold the codes that export packs.
    """
    home = next(model.parameters()).device
    prefix = blocks_path(model)
    blocks = decoder_blocks(model)
    move_except_blocks(model, device)
    try:
        inputs = capture_block_inputs(model, input_ids, device, batch_size)
        results: dict[str, QuantizedWeight] = {}
        for index, block in enumerate(tqdm(blocks, desc="quantize blocks", unit="block", disable=not progress)):
            block.to(device)
            linears = block_linears(block)
            schemes = {name: scheme_for(f"{prefix}.{index}.{name}") for name in linears}
            schemes = {name: scheme for name, scheme in schemes.items() if scheme is not None}
            hessian_for = {name for name, scheme in schemes.items() if solver_for(scheme).needs_hessian}
            stats = {}
            if hessian_for:  # a statistics pass costs a block forward: run it only for solvers that read it
                with collect_stats({name: linears[name] for name in schemes}, hessian_for) as stats:
                    run_block(block, inputs)
            for name, scheme in schemes.items():
                results[f"{prefix}.{index}.{name}"] = quantize_linear(linears[name], scheme, stats.get(name))
            inputs.hidden = run_block(block, inputs)
            block.to(home)
    finally:
        model.to(home)
    return results


def quantize_linear(linear: nn.Linear, scheme: Scheme, stats=None) -> QuantizedWeight:
    """Quantize one linear in place (its weight becomes the dequantized value) and return the codes on CPU."""
    quantized = solver_for(scheme).quantize(linear.weight.data, scheme, stats)
    linear.weight.data = quantized.dequantize(linear.weight.dtype).to(linear.weight.device)
    return QuantizedWeight(
        scheme=quantized.scheme,
        codes=quantized.codes.cpu(),
        scales=quantized.scales.cpu(),
        zeros=None if quantized.zeros is None else quantized.zeros.cpu(),
    )


def untie_lm_head(model: nn.Module) -> nn.Linear:
    """Give lm_head its own weight (a copy of the embedding) so it can be quantized alone."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return head
