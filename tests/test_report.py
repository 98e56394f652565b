"""The leaderboard report from hand-written result files: grouping of unlike settings, deltas, sorting, output."""

import json
import re

import pytest
from typer.testing import CliRunner

from quantbench.cli import app
from quantbench.errors import QuantbenchError
from quantbench.eval.leaderboard import block_layer_grid, build_leaderboard, method_of
from quantbench.eval.report import write_report
from quantbench.eval.report_plots import pareto_front

MODEL = "org/tiny-model"


def ppl(value, windows=16, seqlen=2048, fingerprint="wiki"):
    return {"wikitext2": {"dataset": "wikitext2", "ppl": value, "nll": 0.0, "windows": windows, "seqlen": seqlen,
                          "tokens": windows * (seqlen - 1), "text_fingerprint": fingerprint}}


def tasks(scores: dict, limit=500):
    per_task = {name: {"lm_eval_task": f"{name}_local", "num_fewshot": 0, "limit": limit, "samples": limit,
                       "metrics": {"acc": score - 0.01, "acc_norm": score}, "stderr": {"acc": 0.02, "acc_norm": 0.02},
                       "score_metric": "acc_norm", "score": score} for name, score in scores.items()}
    return {"tasks": per_task, "average": sum(scores.values()) / len(scores)}


def result(name, schemes, bits, quantized_ppl, baseline_ppl=None, quantized_tasks=None, baseline_tasks=None,
           windows=16, limit=500, finished="2026-11-22T10:00:00", model=MODEL, layer_bits=None):
    layers = layer_bits or {f"model.layers.{b}.self_attn.q_proj": bits for b in range(2)}
    record = {
        "name": name, "model": model, "dtype": "float32",
        "quantization": {"schemes": schemes, "layers": {}, "layer_bits": layers, "avg_bits_per_weight": bits,
                         "model_bytes": {"fp16": 200_000_000, "quantized": int(200_000_000 * bits / 16)}},
        "perplexity": {"baseline": ppl(baseline_ppl, windows) if baseline_ppl else {},
                       "quantized": ppl(quantized_ppl, windows)},
        "timings_s": {"quantize": 12.5, "total": 60.0},
        "environment": {"device": "cuda:0", "device_name": "NVIDIA H200"},
        "finished_at": finished,
    }
    if quantized_tasks:
        record["tasks"] = {"baseline": tasks(baseline_tasks, limit) if baseline_tasks else None,
                           "quantized": tasks(quantized_tasks, limit)}
    return record


def write_runs(root, records):
    for record in records:
        folder = root / record["name"]
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(record))
    return root


@pytest.fixture()
def runs(tmp_path):
    scores = {"piqa": 0.66, "arc_easy": 0.50}
    return write_runs(tmp_path / "runs", [
        result("rtn4", {"int4-g128-rtn": 10}, 4.25, 44.7, baseline_ppl=28.1, quantized_tasks={"piqa": 0.62, "arc_easy": 0.45},
               baseline_tasks=scores, finished="2026-11-22T09:00:00"),
        result("gptq3", {"int3-g128-gptq-act": 10}, 3.25, 117.1, quantized_tasks={"piqa": 0.58, "arc_easy": 0.40}),
        result("gptq4", {"int4-g128-gptq-act": 10}, 4.25, 39.1, baseline_ppl=28.1, quantized_tasks={"piqa": 0.64, "arc_easy": 0.47},
               baseline_tasks=scores, finished="2026-11-22T11:00:00"),
        result("mixed", {"int3-g128-gptq-act": 6, "int4-g128-gptq-act": 4}, 3.65, 70.0,
               quantized_tasks={"piqa": 0.60, "arc_easy": 0.43},
               layer_bits={f"model.layers.{b}.{kind}": 3.25 + (b == 0) for b in range(3)
                           for kind in ("self_attn.q_proj", "mlp.down_proj")} | {"lm_head": 8.0}),
        # unlike settings: fewer perplexity windows, and a smaller task limit
        result("rtn4-short", {"int4-g128-rtn": 10}, 4.25, 40.0, baseline_ppl=25.0, windows=4,
               quantized_tasks={"piqa": 0.62, "arc_easy": 0.45}, baseline_tasks=scores),
        result("rtn4-limit100", {"int4-g128-rtn": 10}, 4.25, 44.7, quantized_tasks={"piqa": 0.70, "arc_easy": 0.40},
               limit=100),
    ])


def test_unlike_settings_never_share_a_group(runs):
    board = build_leaderboard(runs)
    by_runs = [sorted(row.run for row in group.rows if not row.baseline) for group in board.groups]
    assert by_runs == [["gptq3", "gptq4", "mixed", "rtn4"], ["rtn4-short"], ["rtn4-limit100"]]
    assert board.groups[0].datasets == ["wikitext2"] and board.groups[0].task_names == ["arc_easy", "piqa"]
    for group in board.groups:
        described = group.describe()
        assert len({row.settings for row in group.rows}) == 1, described  # one table, one way of measuring
    short = next(g for g in board.groups if any(r.run == "rtn4-short" for r in g.rows))
    assert "4 windows × 2048 tokens" in short.describe()
    limited = next(g for g in board.groups if any(r.run == "rtn4-limit100" for r in g.rows))
    assert "100 docs" in limited.describe() and not any(row.baseline for row in limited.rows)


def test_deltas_sorting_and_one_baseline_per_model(runs):
    group = build_leaderboard(runs).groups[0]
    assert [row.run for row in group.rows] == ["gptq4", "gptq4", "rtn4", "mixed", "gptq3"]
    baseline = group.rows[0]
    assert baseline.baseline and baseline.method == "full precision" and baseline.bits == 16.0
    assert baseline.finished_at == "2026-11-22T11:00:00"  # the newest of the two identical baselines
    rows = {row.run: row for row in group.rows[1:]}
    assert rows["gptq3"].ppl_delta["wikitext2"] == pytest.approx(117.1 - 28.1)
    assert rows["gptq3"].task_delta["piqa"] == pytest.approx(0.58 - 0.66)
    assert rows["gptq3"].average_delta == pytest.approx((0.58 + 0.40) / 2 - (0.66 + 0.50) / 2)
    assert rows["gptq4"].compression == pytest.approx(16 / 4.25)
    assert rows["mixed"].method == "mixed GPTQ int" and rows["mixed"].mixed
    assert rows["mixed"].scheme == "int3-g128-gptq-act ×6, int4-g128-gptq-act ×4"
    assert rows["rtn4"].method == "RTN int" and rows["rtn4"].device == "NVIDIA H200"
    assert method_of({"mxfp4-gptq-act-static": 7}) == "GPTQ MXFP4"
    assert method_of({"int8-pc-sym-rtn-a:int8": 7}) == "RTN int W+A"
    assert method_of({"ternary2-g128-ptqtp-aw": 7}) == "PTQTP ternary"


def test_plain_model_eval_record_is_a_baseline_row(tmp_path):
    record = {"name": "plain", "model": MODEL, "dtype": "float32", "quantization": None, "parameters": 134_515_008,
              "perplexity": {"baseline": ppl(28.1)}, "tasks": {"baseline": tasks({"piqa": 0.66})},
              "environment": {"device": "cpu"}}
    root = write_runs(tmp_path / "runs", [record])
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{not json")
    board = build_leaderboard(root)
    (row,) = board.groups[0].rows
    assert row.baseline and row.ppl == {"wikitext2": 28.1} and row.tasks == {"piqa": 0.66}
    assert row.size_mb == pytest.approx(269.030016) and row.compression == 1.0
    assert [path.endswith("broken/result.json") for path, _ in board.skipped] == [True]


def test_a_checkpoint_scored_through_the_packed_kernels_is_a_method_of_its_own(tmp_path):
    dequantized = result("int4", {"int4-g128-gptq": 210}, 4.25, 30.2)
    served = {**result("int4 served", {"int4-g128-gptq": 210}, 4.25, 30.3), "kernels": True}
    board = build_leaderboard(write_runs(tmp_path / "runs", [dequantized, served]))
    methods = {row.run: row.method for group in board.groups for row in group.rows}
    assert methods == {"int4": "GPTQ int", "int4 served": "GPTQ int, packed kernels"}


def test_pareto_front_keeps_only_undominated_points():
    points = [(4.25, 44.7), (4.25, 39.1), (3.25, 117.1), (3.65, 70.0), (3.65, 130.0), (5.0, 50.0)]
    assert pareto_front(points, lower_is_better=True) == [(3.25, 117.1), (3.65, 70.0), (4.25, 39.1)]
    accuracy = [(3.0, 0.5), (4.0, 0.45), (4.0, 0.6), (2.0, 0.3)]
    assert pareto_front(accuracy, lower_is_better=False) == [(2.0, 0.3), (3.0, 0.5), (4.0, 0.6)]


def test_layer_grid_places_block_layers_and_leaves_out_the_rest():
    blocks, kinds, cells = block_layer_grid({"model.layers.1.mlp.down_proj": 4.0, "model.layers.0.mlp.down_proj": 3.0,
                                             "model.layers.0.self_attn.q_proj": 3.0, "lm_head": 8.0})
    assert blocks == [0, 1] and kinds == ["down_proj", "q_proj"]
    assert cells == {(1, "down_proj"): 4.0, (0, "down_proj"): 3.0, (0, "q_proj"): 3.0}


def test_report_files_are_complete_and_self_contained(runs, tmp_path):
    out = tmp_path / "report"
    write_report(runs, out)
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["result_files"] == 6 and len(data["groups"]) == 3
    first = data["groups"][0]
    assert first["settings"]["perplexity"]["wikitext2"]["windows"] == 16
    assert first["settings"]["tasks"]["piqa"] == {"lm_eval_task": "piqa_local", "num_fewshot": 0, "limit": 500,
                                                  "samples": 500}
    assert [row["run"] for row in first["rows"]][:2] == ["gptq4", "gptq4"]

    plots = sorted(path.name for path in (out / "plots").iterdir())
    assert "group1-mixed-layer-bits.png" in plots
    assert {"group1-org-tiny-model-wikitext2.png", "group1-org-tiny-model-average.png"} <= set(plots)
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    page = (out / "leaderboard.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") == len(plots)
    assert page.count('<tr class="baseline">') == 2 and page.count("<table") == 3
    assert "<script>" in page and 'data-kind="num"' in page
    assert '<span class="delta bad">+89.000</span>' in page  # gptq3: 117.1 vs 28.1
    assert 'title="standard error ±2.00 pt">58.00%' in page and "standard error up to ±2.00 pt" in page

    markdown = (out / "leaderboard.md").read_text()
    assert "| **org/tiny-model** | **baseline (gptq4)** | **full precision** | **float32** | **16.000** |" in markdown
    assert "117.100 (+89.000)" in markdown and "58.00% (-8.00 pt)" in markdown
    assert "standard error of up to ±2.00 pt" in markdown
    assert "![group1-mixed-layer-bits](plots/group1-mixed-layer-bits.png)" in markdown


def test_report_refuses_to_overwrite_and_cli_writes(runs, tmp_path):
    out = tmp_path / "report"
    cli = CliRunner()
    first = cli.invoke(app, ["report", str(runs), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "group 1: 5 rows" in first.output
    again = cli.invoke(app, ["report", str(runs), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    assert cli.invoke(app, ["report", str(runs), "--out", str(out), "--force"]).exit_code == 0
    with pytest.raises(QuantbenchError, match="no result.json"):
        build_leaderboard(tmp_path / "report" / "plots")
