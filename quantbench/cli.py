"""The `quantbench` command line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from quantbench import __version__
from quantbench.errors import QuantbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization workbench for LLMs: quantize, evaluate, export.")
# no markup: paths and names are printed as they are (a `[bold]` in a path stays)
console = Console(markup=False, highlight=False)
err_console = Console(stderr=True, markup=False, highlight=False)


def _labelled(label: str, style: str, text: str) -> Text:
    return Text.assemble((label, style), " ", text)


def main() -> None:
    """The `quantbench` entry point: the typer app, with Ctrl-C reported in one line (exit 130)."""
    try:
        app()
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:  # typer turns Ctrl-C into a silent exit 130
        if exc.code == 130:
            _interrupted()
        raise


def _interrupted() -> None:
    err_console.print(_labelled("interrupted:", "bold red", "stopped by Ctrl-C; outputs are only written when a "
                                "command finishes, so earlier results are intact"), soft_wrap=True)
    sys.exit(130)


def _version(value: bool) -> None:
    if value:
        console.print(f"quantbench {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """Post-training quantization workbench for LLMs: quantize, evaluate, export."""


def _setup_logging(verbose: bool) -> None:
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


def _fail(exc: QuantbenchError) -> None:
    for line in str(exc).splitlines():
        err_console.print(_labelled("error:", "bold red", line), soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="YAML recipe")) -> None:
    """Check a recipe without running it: its fields, then everything a run would need (model config and
    architecture, text sources, output paths, export format, disk, memory), with estimates."""
    from quantbench.preflight import preflight
    from quantbench.recipe import load_recipe

    _setup_logging(False)
    try:
        parsed = load_recipe(recipe)
        plan = preflight(parsed, force=True)
    except QuantbenchError as exc:
        _fail(exc)
    if parsed.allocation is not None:
        section = parsed.allocation
        budget = f"{section.budget} bits per weight" if section.budget else (
            f"{section.budget_bytes:,} bytes" if section.budget_bytes else "no budget")
        schemes = f"allocation of {len(section.candidates)} candidates ({section.metric}, {budget})"
    else:
        schemes = f"default scheme {parsed.quantize.default.name}"
    console.print(_labelled("ok:", "green", f"{recipe} (recipe {parsed.name}, hash {parsed.hash()[:12]}, {schemes}, "
                            f"run dir {parsed.run_dir})"), soft_wrap=True)
    if parsed.run_dir.exists():
        plan.notes.append(f"{parsed.run_dir} exists: `quantbench run` needs --force to replace it")
    console.print(plan.summary(), soft_wrap=True)


@app.command()
def run(ctx: typer.Context, recipe: Path = typer.Argument(..., help="YAML recipe"),
        force: bool = typer.Option(False, "--force", help="replace an existing run / export directory"),
        resume: bool = typer.Option(False, "--resume", help="continue a streamed run that died, from its last "
                                    "journal save (see model.streaming)"),
        verbose: bool = typer.Option(True, "--verbose/--quiet", help="log progress"),
        nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine (one per GPU): "
                                  "relaunches itself under torchrun --standalone")) -> None:
    """Run a recipe end to end: calibrate, quantize, evaluate, export, write result.json."""
    from quantbench import distributed

    if nproc > 1 and not distributed.launched():
        _relaunch(ctx, nproc)  # before the imports only the ranks need
    from quantbench.recipe import load_recipe
    from quantbench.runner import run_recipe

    _setup_logging(verbose)
    try:
        ranks = distributed.init_from_environment()
        result = run_recipe(load_recipe(recipe), force=force, progress=verbose, resume=resume)
        distributed.finish()
    except QuantbenchError as exc:
        _fail(exc)
    if ranks.main:
        print_run_summary(result)


def _relaunch(ctx: typer.Context, nproc: int) -> None:
    """Run this command again under `torchrun --standalone --nproc-per-node nproc`, with the same arguments."""
    from quantbench import distributed

    arguments = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "nproc" or value is None:
            continue
        if param.param_type_name == "argument":
            arguments.append(str(value))
        elif param.is_flag:
            if param.secondary_opts:
                arguments.append(param.opts[0] if value else param.secondary_opts[0])
            elif value:
                arguments.append(param.opts[0])
        else:
            for item in (value if param.multiple else [value]):
                arguments += [param.opts[0], str(item)]
    raise typer.Exit(distributed.relaunch(nproc, [ctx.info_name, *arguments]))


@app.command()
def sensitivity(ctx: typer.Context, recipe: Path = typer.Argument(..., help="YAML recipe with an allocation section"),
                out: Optional[Path] = typer.Option(None, "--out", "-o",
                                                   help="folder for sensitivity.json/.csv (default <run dir>/sensitivity)"),
                measure: str = typer.Option("", help="comma-separated extra measures: trace, eigenvalue, kl, gradients, block_output"),
                force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
                verbose: bool = typer.Option(True, "--verbose/--quiet", help="log progress"),
                nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine: the candidates "
                                          "are measured across them (relaunches itself under torchrun)")) -> None:
    """Measure every allocated layer's sensitivity and each candidate's cost; write the table."""
    from quantbench import distributed

    if nproc > 1 and not distributed.launched():
        _relaunch(ctx, nproc)
    from quantbench.fsutil import atomic_directory, refuse_existing
    from quantbench.recipe import load_recipe
    from quantbench.runner import sensitivity_for_recipe

    _setup_logging(verbose)
    try:
        ranks = distributed.init_from_environment()
        parsed = _with_measures(load_recipe(recipe), measure)
        out = out or parsed.run_dir / "sensitivity"
        refuse_existing(out, force, "output folder")
        table = sensitivity_for_recipe(parsed, progress=verbose and ranks.main)
        if ranks.main:
            with atomic_directory(out, force, "output folder") as tmp:
                table.save(tmp)
        distributed.finish()
    except QuantbenchError as exc:
        _fail(exc)
    if ranks.main:
        print_sensitivity(table)
        console.print(f"wrote {out / 'sensitivity.json'} and {out / 'sensitivity.csv'}")


def _with_measures(parsed, measure: str):
    from quantbench.recipe import parse_recipe

    extra = [m for m in measure.replace(" ", "").split(",") if m]
    if not extra:
        return parsed
    data = parsed.canonical()
    if data.get("allocation") is None:
        raise QuantbenchError(f"recipe {parsed.name} has no allocation section")
    data["allocation"]["measure"] = sorted(set(data["allocation"]["measure"]) | set(extra))
    return parse_recipe(data, source=f"--measure {measure}")


def print_sensitivity(table, top: int = 12) -> None:
    metrics = table.available_metrics()
    view = Table(title=f"sensitivity: {len(table.layers)} layers × {len(table.candidates)} candidates "
                       f"(most sensitive by {metrics[-1]} at the smallest candidate)")
    smallest = min(table.candidates, key=lambda s: sum(e.storage_bits for (_, c), e in table.errors.items() if c == s))
    rows = sorted(table.layers, key=lambda layer: -table.cost(layer, smallest, metrics[-1])
                  if (layer, smallest) in table.errors else 0.0)[:top]
    view.add_column("layer")
    for metric in metrics:
        view.add_column(metric, justify="right")
    for layer in rows:
        if (layer, smallest) in table.errors:
            view.add_row(layer, *(f"{table.cost(layer, smallest, m):.3g}" for m in metrics))
    console.print(view)


@app.command()
def allocate(recipe: Path = typer.Argument(..., help="YAML recipe with an allocation section"),
             budget: Optional[float] = typer.Option(None, help="average bits per weight (scales counted)"),
             budget_bytes: Optional[int] = typer.Option(None, help="total bytes of the allocated layers"),
             sweep: Optional[str] = typer.Option(None, help="start:stop:step in bits per weight: write the "
                                                 "Pareto frontier instead of one allocation"),
             table: Optional[Path] = typer.Option(None, help="sensitivity.json to reuse (default: measure now)"),
             metric: Optional[str] = typer.Option(None, help="cost to minimise (default: the recipe's)"),
             solver: Optional[str] = typer.Option(None, help="ilp, greedy, knapsack_dp or random"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="allocation YAML (default "
                                                "<run dir>/allocation.yaml) or, with --sweep, a folder "
                                                "(default <run dir>/pareto)"),
             force: bool = typer.Option(False, "--force", help="replace an existing output"),
             verbose: bool = typer.Option(True, "--verbose/--quiet", help="log progress")) -> None:
    """Choose a scheme per layer under a budget (exact ILP), or sweep budgets for the Pareto frontier."""
    from quantbench.allocation import pareto
    from quantbench.allocation.search import allocate as solve_allocation
    from quantbench.allocation.search import sweep as solve_sweep
    from quantbench.allocation.table import SensitivityTable
    from quantbench.fsutil import atomic_directory, atomic_write_path, refuse_existing
    from quantbench.recipe import _budget_range, load_recipe
    from quantbench.runner import sensitivity_for_recipe

    _setup_logging(verbose)
    try:
        parsed = load_recipe(recipe)
        section = parsed.allocation
        if section is None:
            raise QuantbenchError(f"recipe {parsed.name} has no allocation section (see recipes/ilp-3bit.yaml)")
        if solver not in (None, "ilp", "greedy", "knapsack_dp", "random"):
            raise QuantbenchError(f"--solver {solver!r}: use ilp, greedy, knapsack_dp or random")
        _check_budgets(budget, budget_bytes, sweep)
        out = out or parsed.run_dir / ("pareto" if sweep else "allocation.yaml")
        refuse_existing(out, force, "output")
        try:
            budgets = _budget_range(sweep) if sweep else None
        except ValueError as exc:
            raise QuantbenchError(f"--sweep: {exc}") from None
        sensitivities = SensitivityTable.load(table) if table else sensitivity_for_recipe(parsed, progress=verbose)
        chosen_metric = metric or section.metric
        if budgets:
            points = pareto.frontier(budgets, solve_sweep(sensitivities, section, budgets, chosen_metric))
            with atomic_directory(out, force, "output") as tmp:
                pareto.write_frontier(tmp, chosen_metric, points, pareto.uniform_points(sensitivities, chosen_metric))
                if not table:
                    sensitivities.save(tmp)
            print_frontier(points)
            console.print(f"wrote {out / 'pareto.json'} and {out / 'pareto.png'}")
            return
        result = solve_allocation(sensitivities, section, budget, budget_bytes, solver, chosen_metric)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(out) as tmp:
            result.save(tmp)
    except QuantbenchError as exc:
        _fail(exc)
    print_allocation(result)
    console.print(f"wrote {out}")


def _check_budgets(budget: float | None, budget_bytes: int | None, sweep: str | None) -> None:
    given = [flag for flag, value in (("--budget", budget), ("--budget-bytes", budget_bytes), ("--sweep", sweep))
             if value is not None]
    if len(given) > 1:
        raise QuantbenchError(f"{' and '.join(given)} were both given; give one budget (bits per weight, bytes, "
                              "or a sweep)")
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise QuantbenchError(f"--budget {budget}: give a positive number of bits per weight, e.g. 3.5")
    if budget_bytes is not None and budget_bytes <= 0:
        raise QuantbenchError(f"--budget-bytes {budget_bytes}: give a positive number of bytes")


def print_allocation(result) -> None:
    summary = result.summary()
    view = Table(title=f"allocation ({summary['solver']}, {summary['status']}, metric {summary['metric']})")
    view.add_column("scheme")
    view.add_column("layers", justify="right")
    for scheme, count in result.scheme_counts().items():
        view.add_row(scheme, str(count))
    console.print(view)
    console.print(f"{summary['bits_per_weight']:.4f} bits per weight, {summary['bytes']:,} bytes, objective "
                  f"{summary['objective']:.5g}, solved in {summary['solve_seconds']:.3f} s")


def print_frontier(points: list[dict]) -> None:
    view = Table(title="Pareto frontier")
    for column in ("budget", "bits/weight", "predicted cost", "schemes"):
        view.add_column(column, justify="left" if column == "schemes" else "right")
    for p in points:
        if not p["feasible"]:
            view.add_row(f"{p['budget']:g}", "infeasible", "", "")
            continue
        view.add_row(f"{p['budget']:g}", f"{p['bits_per_weight']:.4f}", f"{p['objective']:.5g}",
                     ", ".join(f"{k} ×{v}" for k, v in p["schemes"].items()))
    console.print(view)


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="hub id, model directory, quantbench checkpoint, or run directory"),
    dataset: list[str] = typer.Option([], "--dataset", "-d",
                                      help="wikitext2, c4 or a text file (default wikitext2 unless --tasks)"),
    seqlen: int = typer.Option(2048, help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, help="score only the first N windows"),
    batch_size: int = typer.Option(1, help="windows per forward pass"),
    tasks: str = typer.Option("", "--tasks", "-t", help="comma-separated lm-eval tasks, or zero-shot for the paper suite"),
    limit: Optional[int] = typer.Option(None, help="documents per task"),
    num_fewshot: Optional[int] = typer.Option(None, help="few-shot examples per task"),
    task_batch_size: int = typer.Option(16, help="lm-eval batch size"),
    include_path: list[str] = typer.Option([], "--include-path",
                                           help="folder of task YAMLs (e.g. .assets/lm_eval_tasks)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write DIR/result.json, a row for quantbench report"),
    force: bool = typer.Option(False, "--force", help="replace an existing --output directory"),
    verbose: bool = typer.Option(True, "--verbose/--quiet", help="show progress bars"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine: perplexity windows and tasks "
                              "are split across them (relaunches itself under torchrun)"),
    kernels: bool = typer.Option(False, "--kernels", help="run a checkpoint's packed layers through the "
                                 "packed-weight kernels, as served (default: dequantized)"),
) -> None:
    """Perplexity and lm-eval tasks of a plain model, an exported checkpoint or a run's checkpoint."""
    from quantbench import distributed

    if nproc > 1 and not distributed.launched():
        _relaunch(ctx, nproc)
    from pydantic import ValidationError

    from quantbench.eval.harness import evaluate_target
    from quantbench.fsutil import atomic_directory, refuse_existing
    from quantbench.model_io import DTYPES, resolve_device, resolve_dtype
    from quantbench.recipe import EvalSection, describe_errors

    _setup_logging(False)
    try:
        ranks = distributed.init_from_environment()
        if dtype not in ("auto", *DTYPES):
            raise QuantbenchError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        if output is not None:
            refuse_existing(output, force, "output directory")
        task_names = "zero-shot" if tasks.strip() == "zero-shot" else [t for t in tasks.replace(" ", "").split(",") if t]
        try:
            settings = EvalSection(perplexity=dataset or ([] if task_names else ["wikitext2"]), seqlen=seqlen,
                                   max_windows=max_windows, batch_size=batch_size, tasks=task_names,
                                   lm_eval={"limit": limit, "num_fewshot": num_fewshot, "batch_size": task_batch_size,
                                            "include_path": include_path})
        except ValidationError as exc:
            raise QuantbenchError("\n".join(describe_errors(exc, EvalSection))) from None
        dev = resolve_device(device)
        record = evaluate_target(target, settings, dev, resolve_dtype(dtype, dev) if dtype != "auto" else None,
                                 verbose and ranks.main, kernels)
        distributed.finish()
        if not ranks.main:
            return
        print_eval_record(record)
        if output is not None:
            record["name"] = output.name
            with atomic_directory(output, force, "output directory") as tmp:
                (tmp / "result.json").write_text(json.dumps(record, indent=2) + "\n")
            console.print(f"wrote {output / 'result.json'}")
    except QuantbenchError as exc:
        _fail(exc)


@app.command()
def generate(
    target: str = typer.Argument(..., help="quantbench checkpoint, run directory, model directory or hub id"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="the text to continue; several -p: decoded "
                                     "together as one batch"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="more prompts, one a line (blank "
                                                "lines skipped), after those of -p"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="prompts decoded at once; with more, a "
                                   "prompt that stops hands its row to the next"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="tokens to generate at most "
                                       "(for each prompt)"),
    chat: bool = typer.Option(False, "--chat", help="wrap each prompt in the tokenizer's chat template (a user turn)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto (float16 on CUDA, the checkpoint's on the CPU), float32, float16 "
                              "or bfloat16"),
    kernels: bool = typer.Option(True, "--kernels/--dequantized", help="a checkpoint's packed layers through the "
                                 "packed-weight kernels, as served, or dequantized"),
    cuda_graph: bool = typer.Option(True, "--cuda-graph/--eager", help="on CUDA, replay the decode step as a graph"),
    compiled: bool = typer.Option(False, "--compile", help="compile the decode step (torch.compile; the first step "
                                  "takes the compile's time): the fastest decode"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; above 0: sample from the "
                                      "softmax of the logits over it"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens only (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="sample among the fewest most likely tokens whose "
                                "probabilities reach p only (1: all)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="the draws' seed (printed, so a text can be drawn "
                                       "again; default a fresh one, or that of the answers in --output)"),
    stream: bool = typer.Option(False, "--stream", help="print the text as it comes (the decode rate then "
                                "includes the printing)"),
    as_json: bool = typer.Option(False, "--json", help="print the text and the timings as JSON"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write each prompt's answer to this file "
                                          "as it stops, one JSON line; run again to skip the prompts it holds"),
) -> None:
    """Text from a checkpoint (or a plain model), greedy or sampled, with its prefill time and decode speed."""
    import torch

    from quantbench.answer_file import AnswerFile
    from quantbench.export.checkpoint import is_quantbench_checkpoint, resolve_checkpoint_dir
    from quantbench.sampling import Sampling
    from quantbench.generate import generate as generate_text
    from quantbench.model_io import DTYPES, load_target, resolve_device

    _setup_logging(False)
    try:
        if dtype not in ("auto", *DTYPES):
            raise QuantbenchError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        sampling = Sampling(temperature, top_k, top_p, seed)  # checked before the model loads
        if stream and as_json:
            raise QuantbenchError("--stream prints text as it comes, --json prints it whole at the end: choose one")
        prompt = [*prompt, *_prompts_in(prompts_file)]
        if not prompt:
            raise QuantbenchError("no prompt: give -p TEXT or --prompts-file FILE")
        if "" in prompt:
            raise QuantbenchError(f"prompt {prompt.index('') + 1} is empty: give it some text")
        if stream and len(prompt) > 1:
            raise QuantbenchError(f"--stream prints one prompt's text as it comes, not {len(prompt)}'s")
        local = resolve_checkpoint_dir(target)
        answers = AnswerFile(output, prompt) if output else None
        if answers:
            sampling = answers.resumed(str(local.resolve()) if local.exists() else target, sampling, max_new_tokens,
                                       chat)
        todo = answers.waiting() if answers else list(range(len(prompt)))
        if not todo:
            err_console.print(f"every prompt's answer is in {output} already")
            return
        if len(todo) < len(prompt):
            err_console.print(f"{len(prompt) - len(todo)} of {len(prompt)} prompts answered in {output} already")
        dev = resolve_device(device)
        chosen = DTYPES.get(dtype)
        if chosen is None and dev.type == "cuda":
            chosen = DTYPES["float16"]  # what the CUDA kernels take
        packed = kernels and is_quantbench_checkpoint(local)
        loaded = load_target(target, dev, chosen, packed)
        model = loaded.model.to(dev)
        if compiled and dev.type == "cuda":
            _launch_inductor_kernels_dependent()
        try:
            result = generate_text(model, loaded.tokenizer, [prompt[at] for at in todo], max_new_tokens, chat,
                                   cuda_graph=cuda_graph, compiled=compiled, sampling=sampling,
                                   on_text=_printed if stream else None, batch_size=batch_size,
                                   on_output=(lambda at, out: answers.write(todo[at], out)) if answers else None,
                                   numbers=todo)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. inductor's C++ on a machine it misjudges
            raise QuantbenchError(f"--compile: torch.compile failed here ({str(exc).splitlines()[0]}); run "
                                  "without --compile") from None
    except QuantbenchError as exc:
        _fail(exc)
    record = {"target": target, "device": str(dev), "dtype": str(model.dtype).removeprefix("torch."),
              "kernels": packed, **result.to_dict()}
    if answers:
        record |= {"output": str(output), "answered_before": len(prompt) - len(todo)}
    if as_json:
        print(json.dumps(record, indent=2))
        return
    outputs = result.outputs
    if stream:
        print(flush=True)
    elif len(outputs) == 1:
        console.print(result.text, soft_wrap=True)
    else:
        for at, answer in zip(todo, outputs):
            console.print(Text(f"[{at + 1}] ", style="bold") + Text(prompt[at], style="dim"), soft_wrap=True)
            console.print(answer.text, soft_wrap=True)
    rate = result.decode_tokens_per_s
    lengths = sorted(answer.prompt_tokens for answer in outputs)
    made = sum(len(answer.new_ids) for answer in outputs)
    prompts = (f"prompt {lengths[0]} tokens" if len(outputs) == 1 else
               f"{len(outputs)} prompts of {lengths[0]}–{lengths[-1]} tokens in {result.batch_size} rows"
               + (f" ({result.admitted} took a stopped prompt's row)" if result.admitted else ""))
    how = ("CUDA graph" if result.cuda_graph else "eager") + (", compiled" if result.compiled else "")
    drawn = result.sampling
    chosen_by = "greedy" if drawn.greedy else (
        f"sampled at temperature {drawn.temperature:g}" + (f", top-k {drawn.top_k}" if drawn.top_k else "")
        + (f", top-p {drawn.top_p:g}" if drawn.top_p < 1 else "") + f", seed {drawn.seed}")
    err_console.print(
        f"{record['dtype']} on {dev}, {'packed kernels' if packed else 'dense'}, {chosen_by}: {prompts}, "
        f"prefill {1e3 * result.prefill_s:.0f} ms; {made} new tokens, "
        + (f"decode {rate:.1f} tok/s ({how}, {result.steady_steps} steps after {result.warmup_steps} of warm-up, "
           f"{1e3 * result.warmup_s:.0f} ms)" if rate else "too few to time the decode")
        + (f"; {result.tokens_per_s:.1f} new tok/s in all" if len(outputs) > 1 else ""), soft_wrap=True)


def _prompts_in(path: Path | None) -> list[str]:
    """The prompts of a file, one a line, blank lines skipped."""
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantbenchError(f"--prompts-file {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return [line for line in lines if line.strip()]


def _printed(piece: str) -> None:
    print(piece, end="", flush=True)


def _launch_inductor_kernels_dependent() -> None:
    """inductor's Triton kernels start while the kernel before them finishes, where this torch can (and then
    the packed kernels too: cuda_build.dependent_launch)."""
    from torch._inductor import config

    if hasattr(config.triton, "enable_pdl"):
        config.triton.enable_pdl = True


def print_eval_record(record: dict) -> None:
    (side, ppl), = record["perplexity"].items()
    kind = ("full precision" if side != "quantized" else
            "quantized, packed kernels" if record.get("kernels") else "quantized")
    table = Table(title=f"{record['evaluated']} ({kind})")
    for column in ("eval", "setting", "value", "± stderr"):
        table.add_column(column, justify="left" if column in ("eval", "setting") else "right")
    for name, result in ppl.items():
        table.add_row(f"{name} ppl", f"{result['windows']}×{result['seqlen']} tokens", f"{result['ppl']:.3f}", "")
    tasks = (record.get("tasks") or {}).get(side)
    if tasks:
        for name, task in tasks["tasks"].items():
            metric, value = _headline(task)
            stderr = task["stderr"].get(metric)
            table.add_row(f"{name} {metric}", f"{task['samples']} docs, {task['num_fewshot']}-shot",
                          _figure(value), _figure(stderr))
        if tasks["average"] is not None:
            table.add_row("average", "", f"{tasks['average']:.4f}", "")
    console.print(table)


@app.command()
def report(runs_dir: Path = typer.Argument(..., help="folder searched recursively for result.json files"),
           out: Path = typer.Option(..., "--out", "-o", help="report folder to write"),
           force: bool = typer.Option(False, "--force", help="replace an existing report folder")) -> None:
    """Leaderboard of every run under RUNS_DIR: leaderboard.md, .json, a self-contained .html, PNG plots."""
    from quantbench.eval.report import write_report

    _setup_logging(False)
    try:
        board = write_report(runs_dir, out, force)
    except QuantbenchError as exc:
        _fail(exc)
    from quantbench.eval.report import columns

    for index, group in enumerate(board.groups):
        cols = [col for col in columns(group) if col.title not in ("method", "size MB", "device", "quantize s")]
        table = Table(title=f"group {index + 1}: {len(group.rows)} rows ({group.describe()})", title_justify="left")
        for col in cols:
            table.add_column(col.title, justify="left" if col.kind == "text" else "right")
        for row in group.rows:
            table.add_row(*(col.cell(row)[1] for col in cols), style="bold" if row.baseline else None)
        console.print(table)
    for path, reason in board.skipped:
        err_console.print(_labelled("skipped", "yellow", f"{path}: {reason}"))
    console.print(f"wrote {out / 'leaderboard.html'}, leaderboard.md, leaderboard.json")


@app.command()
def export(checkpoint: Path = typer.Argument(..., help="quantbench checkpoint (or run) directory"),
           to: str = typer.Option(..., "--to", help="gptq or compressed-tensors"),
           out: Path = typer.Option(..., "--out", help="directory to write"),
           force: bool = typer.Option(False, "--force", help="replace an existing directory")) -> None:
    """Write a checkpoint in an interop format (GPTQ, compressed-tensors) that other runtimes load."""
    from quantbench.export.checkpoint import resolve_checkpoint_dir
    from quantbench.export.targets import EXPORTERS, export_checkpoint

    if to not in EXPORTERS:
        _fail(QuantbenchError(f"--to must be one of {', '.join(EXPORTERS)}, not {to!r}"))
    try:
        written = export_checkpoint(to, resolve_checkpoint_dir(checkpoint), out, force)
    except QuantbenchError as exc:
        _fail(exc)
    console.print(f"wrote {written} ({to})")


@app.command()
def inspect(checkpoint: Path = typer.Argument(..., help="quantbench checkpoint (or run) directory"),
            as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Per-layer table of a checkpoint: scheme, shape, bits/weight, stored bytes."""
    from quantbench.export.checkpoint import checkpoint_layers, resolve_checkpoint_dir

    try:
        checkpoint = resolve_checkpoint_dir(checkpoint)
        layers = checkpoint_layers(checkpoint)
    except QuantbenchError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps([{"name": l.name, "scheme": l.scheme.name, "shape": l.shape,
                           "bits_per_weight": l.bits_per_weight, "bytes": l.stored_bytes} for l in layers], indent=2))
        return
    prefix = _common_prefix([layer.name for layer in layers])
    table = Table(title=f"{checkpoint}: {len(layers)} quantized layers" + (f" (names after {prefix})" if prefix else ""))
    table.add_column("layer", overflow="fold")
    table.add_column("scheme", overflow="fold")
    for column in ("shape", "bits/weight", "bytes"):
        table.add_column(column, justify="right", no_wrap=True)
    for layer in layers:
        table.add_row(layer.name.removeprefix(prefix), layer.scheme.name, f"{layer.shape[0]}×{layer.shape[1]}",
                      f"{layer.bits_per_weight:.3f}", f"{layer.stored_bytes:,}")
    total_bytes = sum(l.stored_bytes for l in layers)
    total_params = sum(l.shape[0] * l.shape[1] for l in layers)
    if total_params:
        table.add_section()
        table.add_row("total", "", "", f"{8 * total_bytes / total_params:.3f}", f"{total_bytes:,}")
        table.caption = f"{total_params:,} quantized weights"
    console.print(table)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every name shares (e.g. `model.layers.`), so narrow tables show what differs."""
    if len(names) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    shared = shared[:min(len(p) for p in parts) - 1]
    return ".".join(shared) + "." if shared else ""


def print_run_summary(result: dict) -> None:
    q = result["quantization"]
    table = Table(title=f"quantbench run {result['name']}: {result['model']}")
    table.add_column("", justify="left")
    table.add_column("full precision", justify="right")
    table.add_column("quantized", justify="right")
    size = q["weight_bytes"]
    dtype_bits = DTYPE_BITS.get(result["dtype"], 16)
    table.add_row("schemes", result["dtype"], ", ".join(f"{name} ×{n}" for name, n in q["schemes"].items()))
    if q["avg_bits_per_weight"]:
        table.add_row("bits/weight (quantized layers)", f"{dtype_bits:.3f}", f"{q['avg_bits_per_weight']:.3f}")
    table.add_row("quantized layers MB", f"{q['quantized_params'] * dtype_bits / 8 / 1e6:.2f}",
                  f"{size['quantized_layers'] / 1e6:.2f}")
    for dataset, quantized in result["perplexity"]["quantized"].items():
        base = result["perplexity"]["baseline"].get(dataset)
        label = f"{dataset} ppl ({quantized['windows']}×{quantized['seqlen']})"
        table.add_row(label, f"{base['ppl']:.3f}" if base else "—", f"{quantized['ppl']:.3f}")
    tasks = result.get("tasks") or {}
    quantized_tasks, baseline_tasks = tasks.get("quantized") or {}, tasks.get("baseline") or {}
    for name, task in (quantized_tasks.get("tasks") or {}).items():
        metric, value = _headline(task)
        base = (baseline_tasks.get("tasks") or {}).get(name)
        table.add_row(f"{name} {metric} ({task['samples']} docs)", _figure(base and base["metrics"].get(metric), "—"),
                      _figure(value))
    if quantized_tasks.get("average") is not None:
        table.add_row("task average", _figure(baseline_tasks.get("average"), "—"), _figure(quantized_tasks["average"]))
    timings = result["timings_s"]
    table.add_row("time s (quantize / total)", "", f"{timings.get('quantize', 0):.1f} / {timings['total']:.1f}")
    console.print(table)
    if result.get("checkpoint"):
        console.print(f"checkpoint: {result['checkpoint']}")


DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def _headline(task: dict) -> tuple[str, float | None]:
    """The task's score metric, or its first metric when it has no accuracy (e.g. a perplexity task)."""
    metric = task["score_metric"] or next(iter(task["metrics"]), "")
    return metric, task["metrics"].get(metric)


def _figure(value: float | None, missing: str = "") -> str:
    return missing if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
