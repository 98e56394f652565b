"""The `quantbench` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from quantbench.errors import QuantbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization workbench for LLMs: quantize, evaluate, export.")
console = Console()
err_console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    from quantbench.quiet import quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


def _fail(exc: QuantbenchError) -> None:
    for line in str(exc).splitlines():
        err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="YAML recipe")) -> None:
    """Check a recipe without running it."""
    from quantbench.recipe import load_recipe

    _setup_logging(False)
    try:
        parsed = load_recipe(recipe)
    except QuantbenchError as exc:
        _fail(exc)
    console.print(f"[green]ok[/]: {recipe} (recipe {parsed.name}, hash {parsed.hash()[:12]}, "
                  f"default scheme {parsed.quantize.default.name}, run dir {parsed.run_dir})")


@app.command()
def run(recipe: Path = typer.Argument(..., help="YAML recipe"),
        force: bool = typer.Option(False, "--force", help="replace an existing run / export directory"),
        verbose: bool = typer.Option(True, "--verbose/--quiet", help="log progress")) -> None:
    """Run a recipe end to end: calibrate, quantize, evaluate, export, write result.json."""
    from quantbench.recipe import load_recipe
    from quantbench.runner import run_recipe

    _setup_logging(verbose)
    try:
        result = run_recipe(load_recipe(recipe), force=force, progress=verbose)
    except QuantbenchError as exc:
        _fail(exc)
    print_run_summary(result)


@app.command("eval")
def eval_command(
    target: str = typer.Argument(..., help="hub id, model directory, quantbench checkpoint, or run directory"),
    dataset: list[str] = typer.Option(["wikitext2"], "--dataset", "-d", help="wikitext2, c4 or a text file"),
    seqlen: int = typer.Option(2048, help="tokens per window"),
    max_windows: Optional[int] = typer.Option(None, help="score only the first N windows"),
    batch_size: int = typer.Option(1, help="windows per forward pass"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16"),
) -> None:
    """Perplexity of a plain model, an exported checkpoint or a run's checkpoint."""
    from quantbench.eval.perplexity import dataset_perplexity
    from quantbench.export.checkpoint import is_quantbench_checkpoint, load_quantized, resolve_checkpoint_dir
    from quantbench.model_io import DTYPES, load_model, load_tokenizer, resolve_device, resolve_dtype

    _setup_logging(False)
    try:
        if dtype not in ("auto", *DTYPES):
            raise QuantbenchError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev) if dtype != "auto" else None
        path = resolve_checkpoint_dir(target)
        if is_quantbench_checkpoint(path):
            model, tokenizer = load_quantized(path, dev, torch_dtype), load_tokenizer(str(path))
        else:
            model, tokenizer = load_model(target, torch_dtype or resolve_dtype("auto", dev))
            model.to(dev)
        table = Table(title=f"perplexity of {target}")
        for column in ("dataset", "seqlen", "windows", "ppl"):
            table.add_column(column, justify="right" if column != "dataset" else "left")
        for name in dataset:
            result = dataset_perplexity(model, tokenizer, name, seqlen, max_windows, batch_size)
            table.add_row(name, str(seqlen), str(result.windows), f"{result.ppl:.3f}")
        console.print(table)
    except QuantbenchError as exc:
        _fail(exc)


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
    table = Table(title=f"{checkpoint}: {len(layers)} quantized layers")
    for column in ("layer", "scheme", "shape", "bits/weight", "bytes"):
        table.add_column(column, justify="left" if column in ("layer", "scheme") else "right")
    for layer in layers:
        table.add_row(layer.name, layer.scheme.name, f"{layer.shape[0]}×{layer.shape[1]}",
                      f"{layer.bits_per_weight:.3f}", f"{layer.stored_bytes:,}")
    total_bytes = sum(l.stored_bytes for l in layers)
    total_params = sum(l.shape[0] * l.shape[1] for l in layers)
    if total_params:
        table.add_section()
        table.add_row("total", "", f"{total_params:,} weights", f"{8 * total_bytes / total_params:.3f}",
                      f"{total_bytes:,}")
    console.print(table)


def print_run_summary(result: dict) -> None:
    q = result["quantization"]
    table = Table(title=f"quantbench run {result['name']}: {result['model']}")
    table.add_column("", justify="left")
    table.add_column("full precision", justify="right")
    table.add_column("quantized", justify="right")
    size = q["weight_bytes"]
    table.add_row("schemes", result["dtype"], ", ".join(f"{name} ×{n}" for name, n in q["schemes"].items()))
    if q["avg_bits_per_weight"]:
        table.add_row("bits/weight (quantized layers)", "16.000*", f"{q['avg_bits_per_weight']:.3f}")
    table.add_row("quantized layers MB", f"{size['quantized_layers_fp16'] / 1e6:.2f}*",
                  f"{size['quantized_layers'] / 1e6:.2f}")
    for dataset, quantized in result["perplexity"]["quantized"].items():
        base = result["perplexity"]["baseline"].get(dataset)
        label = f"{dataset} ppl ({quantized['windows']}×{quantized['seqlen']})"
        table.add_row(label, f"{base['ppl']:.3f}" if base else "—", f"{quantized['ppl']:.3f}")
    timings = result["timings_s"]
    table.add_row("time s (quantize / total)", "", f"{timings.get('quantize', 0):.1f} / {timings['total']:.1f}")
    console.print(table)
    console.print("* as float16", style="dim")
    if result.get("checkpoint"):
        console.print(f"checkpoint: {result['checkpoint']}")


if __name__ == "__main__":
    app()
