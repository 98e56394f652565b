"""lm-eval on a model in memory: a tiny random Llama and a tiny local multiple-choice task, fully offline."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_TASK_DOCS as DOCS

from quantbench.errors import QuantbenchError
from quantbench.eval.lm_eval_bridge import TaskRequest, paired_difference, run_tasks
from quantbench.model_io import load_model


def hand_scored(model, tokenizer, docs=DOCS) -> tuple[float, float]:
    """acc and acc_norm from first principles: Σ log p(" choice" | context), normalised by the choice's length."""
    acc = acc_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            continuation = whole[len(context_ids):]
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float()
            logprobs = F.log_softmax(logits[-len(continuation):], dim=-1)
            scores.append(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item())
        lengths = torch.tensor([float(len(choice)) for choice in doc["choices"]])
        acc += int(torch.tensor(scores).argmax().item() == doc["label"])
        acc_norm += int((torch.tensor(scores) / lengths).argmax().item() == doc["label"])
    return acc / len(docs), acc_norm / len(docs)


def test_bridge_scores_the_model_in_memory_as_first_principles_do(model_dir, tokenizer, tiny_task_dir):
    model, _ = load_model(str(model_dir), torch.float32)
    result = run_tasks(model, tokenizer, [TaskRequest("tiny_mc")], batch_size=4, include_path=[str(tiny_task_dir)])
    task = result["tasks"]["tiny_mc"]
    assert task["lm_eval_task"] == "tiny_mc_local" and task["samples"] == len(DOCS) and task["num_fewshot"] == 0
    acc, acc_norm = hand_scored(model, tokenizer)
    assert task["metrics"]["acc"] == pytest.approx(acc) and task["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert task["score_metric"] == "acc_norm" and task["score"] == task["metrics"]["acc_norm"]
    assert task["stderr"]["acc"] > 0 and result["average"] == task["score"]

    # what is scored is the live model: change its weights in memory and the scores follow
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    flipped = run_tasks(model, tokenizer, [TaskRequest("tiny_mc", limit=4)], include_path=[str(tiny_task_dir)])
    task = flipped["tasks"]["tiny_mc"]
    assert task["samples"] == 4 and task["limit"] == 4
    acc, acc_norm = hand_scored(model, tokenizer, DOCS[:4])
    assert task["metrics"]["acc"] == pytest.approx(acc) and task["metrics"]["acc_norm"] == pytest.approx(acc_norm)


def test_local_tasks_index_only_the_include_path_and_others_every_stock_task(tiny_task_dir, monkeypatch):
    from quantbench.eval import lm_eval_bridge

    local = lm_eval_bridge.task_manager((str(tiny_task_dir),), ("tiny_mc",))  # the real index, in milliseconds
    assert set(local.all_tasks) == {"tiny_mc_local"}
    built = []

    def index(include_path, stock_tasks):
        built.append(stock_tasks)
        tasks = ["tiny_mc_local", *(["piqa"] if stock_tasks else [])]
        return SimpleNamespace(all_tasks=[*tasks, "a_group"], all_subtasks=tasks)

    monkeypatch.setattr(lm_eval_bridge, "_task_index", index)
    assert "piqa" not in lm_eval_bridge.task_manager(("tasks",), ("tiny_mc", "tiny_mc_local")).all_tasks
    assert built == [False]
    assert "piqa" in lm_eval_bridge.task_manager(("tasks",), ("tiny_mc", "piqa")).all_tasks  # not a local task
    assert "piqa" in lm_eval_bridge.task_manager((), ("piqa",)).all_tasks  # no include path
    lm_eval_bridge.task_manager(("tasks",), ("a_group",))  # a group's members may be stock tasks
    assert built == [False, False, True, True, False, True]


def test_unknown_task_names_the_task(model_dir, tokenizer, tiny_task_dir):
    model, _ = load_model(str(model_dir), torch.float32)
    with pytest.raises(QuantbenchError, match="tiny_mcq.*not found.*similar: tiny_mc_local"):
        run_tasks(model, tokenizer, [TaskRequest("tiny_mcq")], include_path=[str(tiny_task_dir)])


def test_a_name_no_stock_task_mentions_is_refused_without_the_stock_index(tiny_task_dir, monkeypatch):
    """Every task, group and tag of the full index is written in a stock YAML file: a name written in none (and
    not in the include path) is refused before the index's seconds; a name written somewhere builds the index,
    which decides. Glob patterns always do."""
    from quantbench.eval import lm_eval_bridge

    unmentioned, written = lm_eval_bridge._stock_task_scan(["piqa", "tiny_mcq", "hellaswag", "mmlu_zz*"])
    assert unmentioned == ["tiny_mcq"] and {"piqa", "hellaswag", "arc_easy"} <= written
    assert lm_eval_bridge._stock_task_scan(["piqa", "hellaswag"]) == ([], set())
    with pytest.raises(QuantbenchError, match="'hellswag' not found.*similar: hellaswag"):  # a typo's hint
        lm_eval_bridge.task_manager((), ("hellswag",))
    built = []

    def index(include_path, stock_tasks):
        built.append(stock_tasks)
        tasks = ["tiny_mc_local", *(["piqa", "arc_easy"] if stock_tasks else [])]
        return SimpleNamespace(all_tasks=tasks, all_subtasks=tasks)

    monkeypatch.setattr(lm_eval_bridge, "_task_index", index)
    with pytest.raises(QuantbenchError, match="'tiny_mcq' not found.*similar: tiny_mc_local"):
        lm_eval_bridge.task_manager((str(tiny_task_dir),), ("piqa", "tiny_mcq"))
    with pytest.raises(QuantbenchError, match="'no_such_task_anywhere' not found"):
        lm_eval_bridge.task_manager((), ("no_such_task_anywhere",))
    assert built == [False]
    manager = lm_eval_bridge.task_manager((), ("dataset_path",))  # a YAML key, written everywhere: the index decides
    assert built == [False, True]
    with pytest.raises(QuantbenchError, match="'dataset_path' not found"):
        lm_eval_bridge.resolve_task("dataset_path", manager)
    assert lm_eval_bridge.resolve_task("piqa", manager) == "piqa"


def test_per_document_scores_and_their_paired_difference(model_dir, tokenizer, tiny_task_dir):
    model, _ = load_model(str(model_dir), torch.float32)
    before = run_tasks(model, tokenizer, [TaskRequest("tiny_mc")], include_path=[str(tiny_task_dir)],
                       per_document=True, progress=False)["tasks"]["tiny_mc"]
    assert sorted(before["documents"]) == list(range(len(DOCS)))
    assert sum(before["documents"].values()) / len(DOCS) == pytest.approx(before["score"])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    after = run_tasks(model, tokenizer, [TaskRequest("tiny_mc")], include_path=[str(tiny_task_dir)],
                      per_document=True, progress=False)["tasks"]["tiny_mc"]
    paired = paired_difference(after, before)
    assert paired["documents"] == len(DOCS)
    assert paired["difference"] == pytest.approx(after["score"] - before["score"])
    diffs = [after["documents"][d] - before["documents"][d] for d in range(len(DOCS))]
    assert paired["disagreements"] == sum(d != 0 for d in diffs)
    assert paired["stderr"] == pytest.approx(torch.tensor(diffs).std().item() / len(DOCS) ** 0.5)
    assert paired_difference(before, before) == {"documents": len(DOCS), "difference": 0.0, "stderr": 0.0,
                                                 "disagreements": 0}


def test_a_torchrun_rank_scores_its_own_tasks(model_dir, tokenizer, tiny_task_dir, monkeypatch):
    """lm-eval keeps results only where LOCAL_RANK is 0; a rank that runs its share of the tasks alone must
    still get them (distributed.py spreads tasks over the ranks)."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    model, _ = load_model(str(model_dir), torch.float32)
    result = run_tasks(model, tokenizer, [TaskRequest("tiny_mc", limit=3)], include_path=[str(tiny_task_dir)])
    assert result["tasks"]["tiny_mc"]["samples"] == 3 and os.environ["LOCAL_RANK"] == "1"
