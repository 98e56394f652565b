"""The YAML recipe, validated by pydantic. Every error names the field, the bad value and what is allowed."""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from quantbench.experts import StarvedExperts
from quantbench.errors import QuantbenchError
from quantbench.quantizers.autoround import AutoRoundOptions
from quantbench.scaling import ScalingOptions
from quantbench.scheme import FORMAT_ALIASES, ActivationFormat, Scheme
from quantbench.yamlio import load_yaml, read_allocation_layers

# the seven zero-shot tasks that quantization papers commonly report (`tasks: zero-shot`)
KEEP = "keep"  # an allocation's name for a layer left in full precision
ZERO_SHOT_SUITE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada_openai", "boolq")


def _scheme_from_yaml(value: Any) -> Any:
    """A scheme may be written as its canonical name (`int4-g128-rtn`) or as a mapping of fields."""
    if isinstance(value, str):
        try:
            return Scheme.parse(value)
        except QuantbenchError as exc:
            raise ValueError(str(exc)) from None
    return value


SchemeSpec = Annotated[Scheme, BeforeValidator(_scheme_from_yaml)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return pattern


class ModelSection(_Section):
    name: str = Field(description="hub id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or local directory")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    trust_remote_code: bool = False
    nonfinite_weights: Literal["error", "zero"] = Field("error", description="what a NaN or ±inf weight does: "
                                                        "stop the run naming the parameters, or become 0 "
                                                        "(recorded in result.json)")
    streaming: Literal["auto", "on", "off"] = Field(
        "auto", description="on: read each block's weights from disk when its turn comes and write the checkpoint "
        "block by block (host memory: one block, not the model; --resume continues a run that died); auto: "
        "on when the weights would fill more than half the available host memory and the recipe has no "
        "transforms or allocation")


class CalibrationSection(_Section):
    source: str = Field("c4", description="wikitext2 | c4 | hub dataset id | local .txt/.jsonl/.json/.parquet")
    split: str | None = None
    text_field: str = "text"
    n_samples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=16)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="calibration sequences per forward pass")


class Override(_Section):
    pattern: str = Field(description="regex searched in the full module name")
    scheme: SchemeSpec

    _regex = field_validator("pattern")(classmethod(lambda cls, v: _check_regex(v)))


class ExpertsSection(_Section):
    min_tokens: int = Field(128, ge=0, description="an expert routed fewer calibration tokens than this in a block "
                            "is starved")
    starved: Literal["all_tokens", "rtn"] = Field(
        "all_tokens", description="a starved expert's statistics come from every token of the batch (all_tokens), "
        "or GPTQ falls back to rtn for it; result.json lists each under starved_experts")

    def policy(self) -> StarvedExperts:
        return StarvedExperts(self.min_tokens, self.starved)


class ScalingSection(_Section):
    grid: int = Field(20, ge=2, description="AWQ tries α = 0, 1/grid, …, (grid − 1)/grid")
    strength: float = Field(0.5, gt=0, lt=1, description="SmoothQuant's migration strength α")
    search_tokens: int = Field(65536, ge=1, description="calibration tokens AWQ's search measures the block "
                               "output on (whole calibration batches, at least one)")
    clip: bool = Field(True, description="AWQ also clips each group's weight range (not q/k)")
    bf16: bool | None = Field(None, description="run AWQ's search forwards under bfloat16 autocast; null: on "
                              "a GPU when the model computes in float32")

    def options(self) -> ScalingOptions:
        return ScalingOptions(self.grid, self.strength, self.search_tokens, self.clip, self.bf16)


class AutoRoundSection(_Section):
    steps: int = Field(200, ge=1, description="signed-gradient steps per decoder block, one calibration batch each")
    lr: float = Field(5e-3, gt=0, description="step size at the start (it decays linearly to 0)")
    bf16: bool | None = Field(None, description="run the steps under bfloat16 autocast; null: on a GPU when "
                              "the model computes in float32")

    def options(self, seed: int = 0) -> AutoRoundOptions:
        return AutoRoundOptions(self.steps, self.lr, seed, self.bf16)


class QuantizeSection(_Section):
    _allocated: dict | None = PrivateAttr(None)
    default: SchemeSpec = Scheme()
    overrides: list[Override] = []
    ignore: list[str] = Field([], description="regexes of layers left in full precision")
    lm_head: SchemeSpec | None = Field(None, description="scheme for lm_head; null leaves it alone")
    true_sequential: bool = Field(True, description="calibrate each group of a block's linears on the "
                                  "outputs of the already-quantized groups before it")
    hessian: Literal["compensated", "fp32", "tensor_cores"] = Field(
        "compensated", description="how Σxᵀx of bf16/fp16 CUDA activations is accumulated: compensated "
        "(tensor cores, float32 accuracy), fp32 (no tensor cores), tensor_cores (one matmul per batch, least exact)")
    experts: ExpertsSection = ExpertsSection()
    scaling: ScalingSection = Field(ScalingSection(), description="options of the awq+ and smoothquant+ schemes")
    autoround: AutoRoundSection = Field(AutoRoundSection(), description="options of the autoround solver")
    from_allocation: str | None = Field(None, description="allocation YAML (quantbench allocate) whose layer → "
                                        "scheme map comes before overrides and default")
    activations: ActivationFormat | None = Field(None, description="quantize the input of every decoder-block "
                                                 "layer that gets a scheme to this format, unless its scheme "
                                                 "names one (`-a:<format>`)")

    @field_validator("activations", mode="before")
    @classmethod
    def _activation_alias(cls, value: Any) -> Any:
        return FORMAT_ALIASES.get(value, value) if isinstance(value, str) else value

    @field_validator("ignore")
    @classmethod
    def _regexes(cls, patterns: list[str]) -> list[str]:
        return [_check_regex(p) for p in patterns]

    @field_validator("lm_head")
    @classmethod
    def _head_unscaled(cls, scheme: Scheme | None) -> Scheme | None:
        if scheme is not None and scheme.scaling != "none":
            raise ValueError(f"{scheme.scaling} scaling folds into a decoder block's norms and projections; the LM "
                             f"head has no such site (use {scheme.model_copy(update={'scaling': 'none'}).name})")
        return scheme

    def scheme_for(self, layer: str) -> Scheme | None:
        """The scheme of a layer by full module name: None if ignored, else its entry in `from_allocation`,
        else the first matching override, else the default; with the section's `activations` when the
        scheme names none."""
        if any(re.search(p, layer) for p in self.ignore):
            return None
        allocated = self.allocated_schemes()
        if layer in allocated and allocated[layer] is None:  # the allocation keeps it in full precision
            return None
        scheme = allocated.get(layer) or next((o.scheme for o in self.overrides if re.search(o.pattern, layer)),
                                              self.default)
        if self.activations and scheme.activations is None:
            return scheme.model_copy(update={"activations": self.activations})
        return scheme

    def allocated_schemes(self) -> dict[str, Scheme | None]:
        """Layer → scheme from `from_allocation` (read once; None where it keeps the layer), or nothing."""
        if self.from_allocation is None:
            return {}
        if self._allocated is None:
            names = read_allocation_layers(self.from_allocation)
            self._allocated = {layer: None if name == KEEP else Scheme.parse(name) for layer, name in names.items()}
        return self._allocated


class TaskSpec(_Section):
    name: str = Field(min_length=1, description="lm-eval task name (e.g. piqa)")
    num_fewshot: int | None = Field(None, ge=0, description="default: eval.lm_eval.num_fewshot")
    limit: int | None = Field(None, ge=1, description="default: eval.lm_eval.limit")


def _task_from_yaml(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _tasks_from_yaml(value: Any) -> Any:
    """`tasks: zero-shot` is the paper suite; otherwise a list of names or {name, num_fewshot, limit}."""
    if value == "zero-shot":
        return list(ZERO_SHOT_SUITE)
    if isinstance(value, str):
        raise ValueError("give a list of lm-eval task names, or 'zero-shot' for the paper suite")
    return value


class LmEvalSection(_Section):
    limit: int | None = Field(None, ge=1, description="documents per task (default: all)")
    num_fewshot: int | None = Field(None, ge=0, description="default: each task's own (0 for the local tasks)")
    batch_size: int = Field(16, ge=1)
    include_path: list[str] = Field(default_factory=list,
                                    description="folders of extra task YAMLs; <name>_local found there replaces <name>")
    seed: int = 1234


class EvalSection(_Section):
    perplexity: list[str] = Field(["wikitext2"], description="wikitext2 | c4 | local text file")
    seqlen: int = Field(2048, ge=16)
    max_windows: int | None = Field(None, ge=1, description="score only the first N windows")
    batch_size: int = Field(1, ge=1)
    baseline: bool = Field(True, description="also evaluate the full-precision model")
    tasks: Annotated[list[Annotated[TaskSpec, BeforeValidator(_task_from_yaml)]],
                     BeforeValidator(_tasks_from_yaml)] = Field(default_factory=list,
                                                                 description="lm-eval tasks, or 'zero-shot'")
    lm_eval: LmEvalSection = LmEvalSection()

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"each task once: {', '.join(sorted({n for n in names if names.count(n) > 1}))} repeated")
        return tasks

    def task_requests(self):
        from quantbench.eval.lm_eval_bridge import TaskRequest

        return [TaskRequest(task.name, task.num_fewshot if task.num_fewshot is not None else self.lm_eval.num_fewshot,
                            task.limit or self.lm_eval.limit) for task in self.tasks]


class TransformSpec(_Section):
    name: Literal["rotate"] = Field(description="rotate: QuaRot-style residual-stream rotation (Llama family, "
                                    "Phi-3/4, Qwen2/3-MoE, Mixtral)")
    seed: int = Field(0, ge=0, description="seed of the rotations' random signs")
    online_down_proj: bool = Field(True, description="also rotate down_proj's input online")


def _transform_from_yaml(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class AllocationRule(_Section):
    pattern: str = Field(description="regex searched in the full module name")
    schemes: list[SchemeSpec] | None = Field(None, description="the only candidates these layers may take")
    min_bits: float | None = Field(None, ge=0, description="least bits per weight (scales counted)")
    max_bits: float | None = Field(None, ge=0, description="most bits per weight (scales counted)")

    _regex = field_validator("pattern")(classmethod(lambda cls, v: _check_regex(v)))


class LatencySection(_Section):
    table: dict[str, float] | None = Field(None, description="regex searched in a scheme name → µs per million "
                                           "weights; the first match prices the candidate")
    table_file: str | None = Field(None, description="a latency table measured by bench/kernel_latency.py "
                                   "(JSON with a `table` like the above), instead of `table`")
    budget_us: float = Field(gt=0, description="the allocated layers' summed latency may not exceed this")

    @field_validator("table")
    @classmethod
    def _regex_keys(cls, table: dict[str, float] | None) -> dict[str, float] | None:
        for key in table or {}:
            _check_regex(key)
        return table

    @model_validator(mode="after")
    def _one_table(self) -> "LatencySection":
        if (self.table is None) == (self.table_file is None):
            raise ValueError("give the latency table inline (table) or as a measured file (table_file), one of them")
        return self

    def resolved_table(self) -> dict[str, float]:
        """The table, read from `table_file` when given."""
        if self.table is not None:
            return self.table
        path = Path(self.table_file)
        try:
            data = json.loads(path.read_text())
            table = {str(k): float(v) for k, v in data["table"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QuantbenchError(f"allocation.latency.table_file {path}: not a latency table ({exc}); write one "
                                  "with bench/kernel_latency.py") from None
        for key in table:
            try:
                _check_regex(key)
            except ValueError as exc:
                raise QuantbenchError(f"allocation.latency.table_file {path}: {exc}") from None
        return table


class HessianSection(_Section):
    samples: int = Field(8, ge=1, description="calibration sequences the loss Hessian is probed on")
    seqlen: int = Field(512, ge=16, description="tokens kept of each of them")
    batch_size: int = Field(4, ge=1, description="sequences per double backward")
    rel_stderr: float = Field(0.05, gt=0, description="Hutchinson stops at this relative standard error")
    min_probes: int = Field(8, ge=2)
    max_probes: int = Field(64, ge=2)
    scope: Literal["block", "model"] = Field("block", description="probe one decoder block's layers at a time, "
                                             "or all layers with each probe (cheaper, noisier)")
    power_iters: int = Field(20, ge=1, description="most power iterations per layer")
    power_tol: float = Field(1e-3, gt=0)


def _budget_range(value: Any) -> Any:
    """`2.5:8:0.25` → [2.5, 2.75, …, 8.0] (inclusive); a list stays a list."""
    if not isinstance(value, str):
        return value
    try:
        start, stop, step = (float(part) for part in value.split(":"))
    except ValueError:
        raise ValueError(f"write the sweep as start:stop:step in bits per weight, e.g. 2.5:8:0.25 (got {value!r})")
    if not all(math.isfinite(x) for x in (start, stop, step)) or start <= 0:
        raise ValueError(f"sweep {value!r}: start, stop and step must be finite and start positive")
    if step <= 0 or stop < start:
        raise ValueError(f"sweep {value!r}: step must be positive and stop ≥ start")
    count = int(round((stop - start) / step)) + 1
    return [round(start + i * step, 6) for i in range(count)]


BudgetList = Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(_budget_range)]


class SweepSection(_Section):
    budgets: BudgetList = Field(description="bits per weight to solve for: start:stop:step or a list")
    evaluate: list[Annotated[float, Field(gt=0)]] = Field([], description="budgets whose allocation `run` also "
                                                          "applies and scores on the perplexity sets")


class AllocationSection(_Section):
    candidates: list[SchemeSpec] = Field(min_length=2, description="schemes a layer can take")
    metric: Literal["hutchinson", "eigenvalue", "xtx_trace", "xtx_eig", "output_error", "kfac", "kl",
                    "first_order", "fisher", "output_fisher", "block_output"] = Field(
        "kfac", description="the cost the allocation minimises (see allocation/table.py METRICS)")
    measure: list[Literal["trace", "eigenvalue", "kl", "gradients", "block_output"]] = Field(
        [], description="costly measures taken besides the metric's own (for comparing metrics)")
    budget: float | None = Field(None, gt=0, description="average bits per weight over the allocated layers")
    budget_bytes: int | None = Field(None, gt=0, description="total bytes of the allocated layers")
    solver: Literal["ilp", "greedy", "knapsack_dp", "random"] = "ilp"
    ties: list[list[str]] = Field([["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
                                  description="layer names of one module that must share a scheme; a set "
                                  "holding `experts` ties the experts of a block, one scheme per projection")
    rules: list[AllocationRule] = []
    latency: LatencySection | None = None
    hessian: HessianSection = HessianSection()
    kl_samples: int = Field(4, ge=1, description="calibration sequences (cut to hessian.seqlen) for measured KL")
    time_limit_s: float = Field(60, gt=0, description="ILP solver time limit")
    rounds: int = Field(2, ge=0, description="in-context rounds: re-measure the candidates on the inputs the "
                        "quantized upstream blocks give, re-allocate, until the allocation is stable (0: costs "
                        "from full-precision inputs only)")
    remeasure: Literal["frontier", "neighbours", "all"] = Field(
        "frontier", description="candidates re-measured in a round: those not beaten in both size and cost, the "
        "chosen one and its frontier neighbours by size (about a third of the pairs), or all")
    gradient_samples: int = Field(16, ge=1, description="calibration sequences of the backward pass behind the "
                                  "gradient measures (first_order, fisher, output_fisher, block_output)")
    block_tokens: int = Field(16384, ge=1, description="calibration tokens on which block_output runs the block "
                              "once per candidate")
    keep_full_precision: bool = Field(False, description="also offer every layer the option of staying in full "
                                      "precision (costs nothing, counts its stored bytes)")
    family_per_block: bool = Field(False, description="one format family (int, mx, nvfp4, ternary, dense) per "
                                   "decoder block, as some serving engines need")
    requantize: bool = Field(True, description="quantize again block by block with the chosen schemes (inputs "
                             "from the quantized earlier blocks); false reuses the codes the sensitivity pass "
                             "made on full-precision inputs (faster, worse at 3 bits and below)")
    sweep: SweepSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "AllocationSection":
        if self.budget is not None and self.budget_bytes is not None:
            raise ValueError("give budget (bits per weight) or budget_bytes, not both")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidates repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        if not self.requantize and (scaled := [c.name for c in self.candidates if c.scaling != "none"]):
            raise ValueError(f"{', '.join(scaled)} quantize a basis scaled for the whole site; an allocation of "
                             "them is quantized again block by block (requantize: true), not from cached codes")
        if any(c.activations for c in self.candidates):
            raise ValueError("candidates are weight-only schemes (the costs measure weight error); drop -a:<format>")
        return self

    @property
    def measures(self) -> set[str]:
        """The costly measures to take: those asked for and the one the metric needs."""
        needs = {"hutchinson": {"trace"}, "kfac": {"trace"}, "eigenvalue": {"eigenvalue"}, "kl": {"kl"},
                 "first_order": {"gradients"}, "fisher": {"gradients"}, "output_fisher": {"gradients"},
                 "block_output": {"gradients", "block_output"}}
        wanted = set(self.measure) | needs.get(self.metric, set())
        return wanted | ({"gradients"} if "block_output" in wanted else set())


class ExportSection(_Section):
    enabled: bool = True
    dir: str | None = Field(None, description="default: <output.dir>/checkpoint")
    format: Literal["quantbench", "gptq", "compressed-tensors"] = Field(
        "quantbench", description="gptq / compressed-tensors: also write <run dir>/checkpoint-<format>")


class OutputSection(_Section):
    dir: str | None = Field(None, description="run directory; default: runs/<name>")
    journal_every_s: float = Field(60.0, ge=0, description="streamed runs: seconds between saves of the hidden "
                                   "states a --resume starts from (0: after every block)")


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelSection
    calibration: CalibrationSection = CalibrationSection()
    transforms: list[Annotated[TransformSpec, BeforeValidator(_transform_from_yaml)]] = Field(
        default_factory=list, description="model transforms applied before quantization, in order")
    quantize: QuantizeSection = QuantizeSection()
    allocation: AllocationSection | None = Field(None, description="search a scheme per layer: sensitivity → "
                                                 "allocation under a budget → quantization")
    eval: EvalSection = EvalSection()
    export: ExportSection = ExportSection()
    output: OutputSection = OutputSection()

    @model_validator(mode="after")
    def _lm_head_needs_no_calibration(self) -> "Recipe":
        from quantbench.quantizers import needs_stats

        if self.quantize.lm_head is not None and needs_stats(self.quantize.lm_head):
            raise ValueError("quantize.lm_head: only solvers without calibration statistics (rtn) are supported")
        return self

    @model_validator(mode="after")
    def _one_source_of_schemes(self) -> "Recipe":
        if self.allocation is not None and self.quantize.from_allocation is not None:
            raise ValueError("an allocation section searches the schemes; quantize.from_allocation reads them "
                             "from a file: keep one")
        if self.allocation is not None and self.quantize.activations:
            raise ValueError("allocation candidates are weight-only; drop quantize.activations")
        return self

    @field_validator("transforms")
    @classmethod
    def _rotate_once(cls, transforms: list[TransformSpec]) -> list[TransformSpec]:
        if sum(t.name == "rotate" for t in transforms) > 1:
            raise ValueError("rotate the model once")
        return transforms

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")

    @property
    def export_dir(self) -> Path:
        from quantbench.export.checkpoint import RUN_CHECKPOINT_DIR

        return Path(self.export.dir) if self.export.dir else self.run_dir / RUN_CHECKPOINT_DIR

    def canonical(self) -> dict:
        return self.model_dump(mode="json")

    def block_methods(self) -> dict:
        """The options of the schemes that scale or learn a whole block (AWQ/SmoothQuant, AutoRound), as the
        quantize and sensitivity stages take them."""
        return {"scaling": self.quantize.scaling.options(),
                "autoround": self.quantize.autoround.options(self.calibration.seed)}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QuantbenchError(f"recipe {path} not found; give the path of a YAML recipe (see recipes/)")
    data = load_yaml(path, "recipe")
    if not isinstance(data, dict):
        raise QuantbenchError(f"{path}: a recipe is a YAML mapping with sections model, calibration, quantize, ...")
    data.setdefault("name", path.stem)
    return parse_recipe(data, source=str(path))


def parse_recipe(data: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise QuantbenchError("\n".join(f"{source}: {line}" for line in describe_errors(exc, Recipe))) from None


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = [part for part in error["loc"] if not _is_internal_loc(part)]
        field = ".".join(str(part) for part in loc) or "(top level)"
        if error["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in loc[:-1]) or "the top level"
            allowed = ", ".join(_allowed_keys(root, loc[:-1])) or "none"
            lines.append(f"{field}: unknown key {loc[-1]!r} in {parent}; allowed keys: {allowed}")
        elif error["type"] == "missing":
            lines.append(f"{field}: required but missing; add it")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{field}: {message} (got {error.get('input')!r})")
    return lines


def _is_internal_loc(part) -> bool:
    # pydantic names union members and validator wrappers in the location; users never wrote those
    return isinstance(part, str) and (part.startswith(("function-", "lax-", "json-")) or part in ("Scheme", "str"))


def _allowed_keys(root: type[BaseModel], loc: list) -> list[str]:
    model = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None
