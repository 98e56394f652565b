"""Perplexity with the GPTQ paper's protocol.

The test text (WikiText-2: rows joined by "\\n\\n") is tokenized once and cut into non-overlapping windows
of `seqlen` tokens from the start; every window is scored independently and
`ppl = exp(Σ NLL / number of predicted tokens)`, each window predicting its tokens 2..seqlen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantbench.calibration.sources import load_eval_text
from quantbench.distributed import current as current_ranks
from quantbench.distributed import sum_across_ranks
from quantbench.errors import QuantbenchError


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    seqlen: int
    tokens: int  # predicted tokens
    text_fingerprint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_eval_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.int64)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, dataset: str = "") -> torch.Tensor:
    """The non-overlapping windows [windows, seqlen] scored from the start of the tokenized text."""
    available = ids.numel() // seqlen
    if available == 0:
        raise QuantbenchError(f"{dataset or 'text'} has {ids.numel()} tokens, fewer than eval seqlen={seqlen}")
    windows = min(available, max_windows) if max_windows else available
    return ids[: windows * seqlen].view(windows, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64, on CPU) of each window predicting its tokens 2..seqlen."""
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                          reduction="sum")
    return nll.double().cpu()


def perplexity_result(nll_sum: torch.Tensor, windows: torch.Tensor, dataset: str) -> PerplexityResult:
    count, seqlen = windows.shape
    tokens = count * (seqlen - 1)
    mean_nll = nll_sum.item() / tokens
    return PerplexityResult(dataset=dataset, ppl=math.exp(mean_nll), nll=mean_nll, windows=count,
                            seqlen=seqlen, tokens=tokens)


@torch.no_grad()
def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                      batch_size: int = 1, progress: bool = False, dataset: str = "") -> PerplexityResult:
    """Under torchrun each rank scores windows rank, rank + N, … and the sums are added."""
    windows = eval_windows(ids, seqlen, max_windows, dataset)
    ranks = current_ranks()
    device = next(model.parameters()).device
    nll_sum = torch.zeros((), dtype=torch.float64)
    for batch in tqdm(windows[ranks.rank::ranks.world].split(batch_size), desc=f"perplexity {dataset}".strip(),
                      unit="batch", disable=not progress):
        batch = batch.to(device)
        nll_sum += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
    return perplexity_result(sum_across_ranks(nll_sum), windows, dataset)


def dataset_perplexity(model: nn.Module, tokenizer, dataset: str, seqlen: int = 2048,
                       max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity on a named dataset (`wikitext2`, `c4`) or a local text file."""
    text, fingerprint = load_eval_text(dataset)
    result = perplexity_of_ids(model, tokenize_eval_text(tokenizer, text), seqlen, max_windows, batch_size,
                               progress, dataset)
    result.text_fingerprint = fingerprint
    return result
