"""The block loop as it was before the one block driver, kept as the reference the driver must reproduce
code for code (tests/test_pipeline.py). Test-only."""

import torch

from quantbench.calibration.stats import collect_stats, input_sharing
from quantbench.model_io import block_linears, blocks_path, decoder_blocks, move_except_blocks
from quantbench.pipeline import capture_block_inputs, feed_block, quantize_linear, quantize_linears, run_block
from quantbench.quantizers import needs_hessian, needs_stats


@torch.no_grad()
def reference_quantize_model(model, input_ids, scheme_for, device, batch_size=8, true_sequential=True):
    home = next(model.parameters()).device
    prefix = blocks_path(model)
    move_except_blocks(model, device)
    try:
        inputs = capture_block_inputs(model, input_ids, device, batch_size)
        results = {}
        for index, block in enumerate(decoder_blocks(model)):
            block.to(device)
            inputs.block = index
            linears = block_linears(block)
            schemes = {name: scheme_for(f"{prefix}.{index}.{name}") for name in linears}
            schemes = {name: scheme for name, scheme in schemes.items() if scheme is not None}
            for name, quantized in _quantize_block(block, linears, schemes, inputs, true_sequential).items():
                results[f"{prefix}.{index}.{name}"] = quantized
            inputs.hidden = run_block(block, inputs)
            block.to(home)
    finally:
        model.to(home)
    return results


def _quantize_block(block, linears, schemes, inputs, true_sequential):
    stats_layers = {name for name, scheme in schemes.items() if needs_stats(scheme)}
    hessian_layers = {name for name, scheme in schemes.items() if needs_hessian(scheme)}
    if not stats_layers:
        return {name: quantize_linear(linears[name], scheme) for name, scheme in schemes.items()}
    quantized_linears = {name: linears[name] for name in schemes}
    groups = input_sharing(block, quantized_linears, lambda: feed_block(block, inputs, batches=1))
    stages = groups if true_sequential else [[name for group in groups for name in group]]
    results = {}
    for stage in stages:
        shared = {follower: group[0] for group in groups for follower in group[1:] if follower in stage}
        stats = dict.fromkeys(stage)
        if stats_layers & set(stage):
            with collect_stats({name: linears[name] for name in stage}, hessian_layers & set(stage), shared,
                               stop_when_seen=True) as stats:
                feed_block(block, inputs)
        batches = {}
        for name in stage:
            batches.setdefault((schemes[name], id(stats[name])), []).append(name)
        for names in batches.values():
            results.update(quantize_linears([linears[n] for n in names], names, schemes[names[0]], stats[names[0]]))
    return results
