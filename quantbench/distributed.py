"""Several processes through `torch.distributed`, launched by torchrun (NCCL on GPUs, gloo on CPU).

A run on N ranks is N copies of the single-process run that split its heavy work:
- calibration: each rank forwards its slice of the calibration sequences through the current block; the
  statistics (Σ xᵀx, Σ x², token counts, max |x|) are summed across ranks in float32 (`all_reduce_stats`),
  so every rank holds those of the whole calibration set, up to the order of float32 additions;
- solves: the layers of a block are bin-packed across ranks by estimated cost (`assign_by_cost`); each rank
  solves its own and the codes are broadcast to all (`share_results`);
- propagation: every rank runs its own slice through the quantized block;
- perplexity: the evaluation windows are split across ranks and their summed log-likelihoods added;
- AWQ and SmoothQuant: the per-channel |x| statistics are summed (maxed) across ranks, and each AWQ trial's
  output error is summed over every rank's search tokens, so every rank picks the same α;
- AutoRound: each step's gradients and loss are summed across ranks (every rank takes the same step);
- an allocation's gradient pass: each rank backpropagates its share, the sums are added;
- a streamed run's journal: every rank saves its own hidden states, rank 0 commits the save once all have.

Rank 0 alone writes the run directory. Without torchrun (no WORLD_SIZE above 1) nothing here does anything.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from quantbench.errors import QuantbenchError

DEFAULT_TIMEOUT_S = 7200  # a rank waits this long for the others (a long solve or evaluation) before failing


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place among the ranks (one rank of one when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched() -> bool:
    """Whether torchrun started this process (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def relaunch(nproc: int, arguments: list[str]) -> int:
    """`torchrun --standalone --nproc-per-node nproc -m quantbench …arguments`; its exit status. When a rank
    fails, torchrun stops the others and reports which rank failed and how."""
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "quantbench",
                                          *arguments]))
    except Exception as exc:  # torch.distributed.elastic's ChildFailedError names the failed ranks
        print(exc)
        return 1
    return 0


def init_from_environment(timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, …): with
    CUDA, one GPU per local rank, NCCL for CUDA tensors and gloo for CPU ones (the pickled codes, the
    log-likelihood sums); gloo alone otherwise. QUANTBENCH_DIST_BACKEND overrides it (gloo: several ranks on
    one GPU, which NCCL refuses). A single process is left alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise QuantbenchError("this torch build has no torch.distributed; run in a single process")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    backend = os.environ.get("QUANTBENCH_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def finish() -> None:
    """Wait for every rank, then leave the process group."""
    if current().active:
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if current().active:
        dist.barrier()


def from_main(value):
    """Rank 0's `value` (picklable) on every rank; every rank must call it at the same point."""
    if not current().active:
        return value
    box = [value if current().main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_rows(ids: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """This rank's calibration sequences: rows rank, rank + N, … (every rank needs at least one)."""
    ranks = ranks or current()
    if not ranks.active:
        return ids
    if ids.shape[0] < ranks.world:
        raise QuantbenchError(f"{ids.shape[0]} calibration sequences cannot be split over {ranks.world} ranks; "
                              f"set calibration.n_samples to at least {ranks.world}")
    return ids[ranks.rank::ranks.world]


def all_reduce_stats(stats: dict, in_features: dict[str, int], device: torch.device) -> None:
    """Sum every rank's LayerStats in place, in the order of the names (so every rank issues the same
    collectives): Σ xᵀx, Σ x² and the token counts add, max |x| takes the maximum. A rank that saw no input
    for a layer (an expert routed no token of its slice) contributes zeros, made on `device` (the block's)."""
    if not current().active:
        return
    done: set[int] = set()
    for name in sorted(stats):
        layer = stats[name]
        if layer is None or id(layer) in done:
            continue
        done.add(id(layer))
        width = in_features[name]
        present = torch.tensor([layer.xtx is not None, layer.square_sum is not None], dtype=torch.int32,
                               device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        if present[0] and layer.xtx is None:
            layer.xtx = torch.zeros(width, width, dtype=torch.float32, device=device)
        if present[1] and layer.square_sum is None:
            layer.square_sum = torch.zeros(width, dtype=torch.float32, device=device)
            layer.act_absmax = torch.zeros(width, dtype=torch.float32, device=device)
        count = torch.tensor([layer.n_samples], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        layer.n_samples = int(count.item())
        for tensor in (layer.xtx, layer.square_sum):
            if tensor is not None:
                dist.all_reduce(tensor)
        if layer.act_absmax is not None:
            dist.all_reduce(layer.act_absmax, op=dist.ReduceOp.MAX)
        layer.factors.clear()


def assign_by_cost(costs: list[float], world: int) -> list[int]:
    """The rank of each job: longest first, each to the least loaded rank (the lowest on a tie), which every
    rank computes alike from the same costs."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[job] = rank
        loads[rank] += costs[job]
    return owners


def share_results(mine: dict, sources: set[int]) -> dict:
    """Every rank's `mine` (key → picklable result) gathered on every rank. Each of the `sources` (the ranks
    that own any result) broadcasts its own dictionary once, pickled, through the CPU backend."""
    ranks = current()
    if not ranks.active:
        return dict(mine)
    gathered: dict = {}
    for source in sorted(sources):
        box = [mine if source == ranks.rank else None]
        dist.broadcast_object_list(box, src=source)
        gathered.update(box[0])
    return gathered


def spread(jobs: list, cost: Callable[[object], float], run: Callable[[object], dict]) -> dict:
    """Run `jobs` across the ranks (bin-packed by `cost`); every rank gets the merged results of `run`."""
    ranks = current()
    if not ranks.active:
        merged = {}
        for job in jobs:
            merged.update(run(job))
        return merged
    owners = assign_by_cost([cost(job) for job in jobs], ranks.world)
    mine = {}
    for job, owner in zip(jobs, owners):
        if owner == ranks.rank:
            mine.update(run(job))
    return share_results(mine, set(owners))


def reduce_in_place(tensors: list[torch.Tensor], op: str = "sum") -> None:
    """Each tensor summed ("sum") or maxed ("max") across the ranks, in place, in list order."""
    if not current().active:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """value summed over the ranks (float64 log-likelihood sums, on CPU), as a new tensor."""
    if not current().active:
        return value
    total = value.detach().clone()
    reduce_in_place([total])
    return total
