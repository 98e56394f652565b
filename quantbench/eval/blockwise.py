"""Perplexity as a stage of the block driver: the evaluation windows' hidden states go through each block
while the driver holds it, so the model never has to be on the device whole. Placed before the quantize
stage it scores the full-precision model, after it the quantized one; both in the one pass that
quantizes. Every window is computed as `perplexity_of_ids` computes it (same batches, same masks), so the
figures equal those of a whole-model forward. Under torchrun each rank carries windows rank, rank + N, …
and the log-likelihood sums are added at the end, as `perplexity_of_ids` does."""

from __future__ import annotations

import torch
from torch import nn

from quantbench.distributed import current as current_ranks
from quantbench.distributed import sum_across_ranks
from quantbench.eval.perplexity import eval_windows, perplexity_result, window_nll
from quantbench.model_io import final_logits
from quantbench.pipeline import BlockContext, BlockInputs, EveryBlockStage, capture_block_inputs, run_block
from quantbench.recipe import EvalSection


class BlockwisePerplexity(EveryBlockStage):
    """`eval_ids` maps a dataset to its (token ids, fingerprint); `results` gets the same records as
    evaluate_perplexity once the driver finishes."""

    def __init__(self, eval_ids: dict, settings: EvalSection, label: str) -> None:
        self.settings, self.label = settings, label
        self.windows = {dataset: eval_windows(ids, settings.seqlen, settings.max_windows, dataset)
                        for dataset, (ids, _) in eval_ids.items()}
        ranks = current_ranks()
        self.local = {dataset: windows[ranks.rank::ranks.world] for dataset, windows in self.windows.items()}
        self.fingerprints = {dataset: fingerprint for dataset, (_, fingerprint) in eval_ids.items()}
        self.inputs: dict[str, BlockInputs] = {}
        self.restored: dict[str, list[torch.Tensor]] | None = None
        self.results: dict[str, dict] = {}

    def begin(self, model: nn.Module, device: torch.device) -> None:
        for dataset, windows in self.local.items():
            if not len(windows):  # more ranks than windows
                continue
            self.inputs[dataset] = capture_block_inputs(model, windows, device, self.settings.batch_size)
            if self.restored is not None:
                self.inputs[dataset].hidden = [h.to(device) for h in self.restored[dataset]]
        self.restored = None

    def run_block(self, ctx: BlockContext) -> None:
        with ctx.timer(f"eval_{self.label}"):
            for inputs in self.inputs.values():
                inputs.block = ctx.index
                inputs.hidden = run_block(ctx.block, inputs)

    @torch.no_grad()
    def finish(self, model: nn.Module, device: torch.device) -> None:
        for dataset, windows in self.windows.items():
            nll_sum = torch.zeros((), dtype=torch.float64)
            if dataset in self.inputs:
                batches = self.local[dataset].split(self.settings.batch_size)
                for hidden, batch in zip(self.inputs[dataset].hidden, batches):
                    nll_sum += window_nll(final_logits(model, hidden), batch.to(device))
            result = perplexity_result(sum_across_ranks(nll_sum), windows, dataset)
            result.text_fingerprint = self.fingerprints[dataset]
            self.results[dataset] = result.to_dict()
        self.inputs.clear()

    def state(self) -> dict[str, list[torch.Tensor]]:
        """What a resumed run needs: every window's hidden state entering the next block (on CPU)."""
        return {dataset: [h.cpu() for h in inputs.hidden] for dataset, inputs in self.inputs.items()}

    def restore(self, state: dict[str, list[torch.Tensor]]) -> None:
        self.restored = state
