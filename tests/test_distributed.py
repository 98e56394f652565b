"""torchrun runs (two gloo ranks on the CPU) against one process: same table, allocation and perplexity; the
spread, and AutoRound's step across ranks. The two-rank run of codes, AWQ and a rank's death is in
test_streaming.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import invoke, make_recipe

from quantbench.distributed import assign_by_cost


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "quantbench"]


def test_solves_are_bin_packed_longest_first_to_the_least_loaded_rank():
    assert assign_by_cost([5, 1, 4, 3, 3], 2) == [0, 1, 1, 1, 0]  # 5 | 4, 3 | 5 + 3 | 4 + 3 + 1: loads 8 and 8
    assert assign_by_cost([2, 2, 2], 4) == [0, 1, 2]
    assert assign_by_cost([], 3) == []


def _spread_on_two_ranks(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from quantbench.distributed import spread

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ran = []

    def run(job):
        ran.append(job)
        return {job: (dist.get_rank(), job * job)}

    merged = spread(list(range(7)), cost=lambda job: job + 1, run=run)
    torch.save({"ran": ran, "merged": merged}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_spread_runs_each_job_once_and_every_rank_gets_every_result(tmp_path):
    torch.multiprocessing.spawn(_spread_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    outs = [torch.load(tmp_path / f"out.{rank}") for rank in (0, 1)]
    assert sorted(outs[0]["ran"] + outs[1]["ran"]) == list(range(7)) and outs[0]["ran"] and outs[1]["ran"]
    assert outs[0]["merged"] == outs[1]["merged"]
    assert all(outs[0]["merged"][job] == (rank, job * job) for rank in (0, 1) for job in outs[rank]["ran"])


class _Block(torch.nn.Module):
    """A block for AutoRound to learn (no transformers import in the spawned ranks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(64, 128, bias=False)
        self.down = torch.nn.Linear(128, 64, bias=False)

    def forward(self, hidden):
        return self.down(torch.relu(self.up(hidden)))


def _autoround_problem(batch_seed: int):
    """The same block on every rank, and two mini-batches of inputs drawn from `batch_seed`."""
    block = _Block()
    hidden = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(batch_seed))
    return block, {"up": block.up, "down": block.down}, [(batch, {}) for batch in hidden.split(2)]


def _learned(block, linears, batches, across_ranks: bool) -> dict[str, torch.Tensor]:
    from quantbench.quantizers.autoround import AutoRoundOptions, learn_rounding
    from quantbench.scheme import Scheme

    scheme = Scheme.parse("int3-g32-autoround")
    learned = learn_rounding(block, linears, dict.fromkeys(linears, scheme), batches, AutoRoundOptions(steps=8),
                             across_ranks=across_ranks)
    return {f"{name}.{part}": getattr(state, part) for name, state in learned.items() for part in ("offsets", "low", "high")}


def _autoround_on_two_ranks(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.save({"same": _learned(*_autoround_problem(0), across_ranks=True),
                "share": _learned(*_autoround_problem(rank), across_ranks=True)}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_autoround_across_ranks_takes_one_signed_step_from_every_rank_gradient(tmp_path):
    """Ranks holding the same batches learn exactly what one process learns on them (summed gradients have
    the same signs). Ranks holding a share each end with one learned state between them, neither rank's own."""
    torch.multiprocessing.spawn(_autoround_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{rank}") for rank in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' float order
    try:
        alone = _learned(*_autoround_problem(0), across_ranks=False)
    finally:
        torch.set_num_threads(threads)
    for run in ("same", "share"):
        assert ranks[0][run].keys() == ranks[1][run].keys() == alone.keys() and len(alone) == 2 * 3
        assert all(torch.equal(ranks[0][run][key], ranks[1][run][key]) for key in alone)
    offsets = [key for key in alone if key.endswith("offsets")]
    assert all(torch.equal(alone[key], ranks[0]["same"][key]) for key in offsets)
    assert not any(torch.equal(alone[key], ranks[0]["share"][key]) for key in offsets)


@pytest.mark.slow
def test_an_allocation_run_on_two_ranks_gives_the_one_process_table_and_allocation(tmp_path, model_dir, text_file):
    """Sensitivity candidates are spread over the ranks, and so are the perplexity windows of the sweep's
    evaluated budget; every rank sees the whole calibration set, so the table is the one process's. The
    gradient pass is split: each rank backpropagates half the sequences and the sums are added."""
    results, tables = {}, {}
    for run in ("single", "ranked"):
        (tmp_path / run).mkdir()
        recipe = make_recipe(
            tmp_path / run, model_dir, text_file,
            allocation={"candidates": ["int2-g32-gptq", "int4-g32-gptq", "hadamard+int3-pc-gptq"],
                        "requantize": False, "metric": "output_error", "measure": ["gradients"], "budget": 3.5,
                        "sweep": {"budgets": "2.5:5:0.5", "evaluate": [3.0]}})
        if run == "single":
            assert (done := invoke("run", recipe, "--quiet")).exit_code == 0, done.output
        else:
            done = subprocess.run(TORCHRUN + ["run", str(recipe), "--quiet"], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert done.returncode == 0, done.stdout + done.stderr
        folder = tmp_path / run / "runs" / "tiny"
        results[run] = json.loads((folder / "result.json").read_text())
        tables[run] = json.loads((folder / "sensitivity.json").read_text())
    one, two = tables["single"], tables["ranked"]
    assert len(one["errors"]) == len(two["errors"]) == 14 * 3
    for a, b in zip(one["errors"], two["errors"]):
        assert (a["layer"], a["scheme"], a["storage_bits"]) == (b["layer"], b["scheme"], b["storage_bits"])
        assert b["output_error"] == pytest.approx(a["output_error"], rel=1e-4)  # BLAS here has other threads
        assert a["fisher"] > 0 and b["fisher"] == pytest.approx(a["fisher"], rel=1e-4)  # each rank's half, summed
    single, ranked = results["single"], results["ranked"]
    assert ranked["ranks"] == 2 and ranked["allocation"]["layers"] == single["allocation"]["layers"]
    for a, b in zip(single["allocation"]["evaluated"], ranked["allocation"]["evaluated"]):
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-4)
    for dataset, value in single["perplexity"]["quantized"].items():
        assert ranked["perplexity"]["quantized"][dataset]["ppl"] == pytest.approx(value["ppl"], rel=1e-4)
