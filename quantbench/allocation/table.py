"""The sensitivity table: per layer the sensitivity measures, per (layer, candidate) the quantization error,
and from both the predicted cost Ω of every candidate under each metric. Saved as JSON (whole) and CSV
(one row per layer × candidate)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantbench.errors import QuantbenchError
from quantbench.recipe import KEEP

# metric → what it needs measured; Ω = s_l · ‖Q(W) − W‖² (HAWQ style) unless said otherwise
METRICS = {
    "hutchinson": "HAWQ-V2: mean diagonal of the loss Hessian, tr(H_l)/n_l (Hutchinson), × ‖ΔW‖²",
    "eigenvalue": "HAWQ-V1: top eigenvalue of the loss Hessian block (power iteration), × ‖ΔW‖²",
    "xtx_trace": "layer-local: tr(XᵀX)/(tokens·in) × ‖ΔW‖² (output error under isotropic inputs)",
    "xtx_eig": "layer-local: λ_max(XᵀX)/tokens × ‖ΔW‖² (bound on the output error)",
    "output_error": "GPTQ objective: tr(ΔW XᵀX ΔWᵀ)/tokens, from actually quantizing the layer",
    "kfac": "output_error × tr(H_l)/(tr(XᵀX/tokens)·out): the GPTQ objective scaled by the loss curvature "
            "per output (Kronecker-factored Hessian, tr H ≈ tr A · tr G)",
    "kl": "measured: KL divergence of the next-token distribution with only this layer quantized",
    "first_order": "Σ |g ⊙ ΔW|: the gradient of the calibration loss against the weight change (AutoScheme)",
    "fisher": "½ Σ F ⊙ ΔW²: the diagonal of the Fisher information (per-token gradients squared)",
    "output_fisher": "½ Σ_i E[g_i²]·(ΔW A ΔWᵀ)_ii: each output's GPTQ error weighted by its squared loss "
                     "gradient (a Kronecker-factored Fisher with the output factor's diagonal)",
    "block_output": "½ Σ_d E[g_d²]·E[Δy_d²]: the change of the block's output with only this layer quantized, "
                    "weighted by the squared loss gradient of each output unit",
}
GRADIENT_METRICS = ("first_order", "fisher", "output_fisher", "block_output")


@dataclass
class LayerSensitivity:
    """What was measured for one linear: its shape, layer-local proxies from its input statistics, and
    (when computed) the loss-Hessian trace per weight with its standard error and the top eigenvalue."""

    name: str
    out_features: int
    in_features: int
    xtx_trace: float  # tr(XᵀX) per token
    xtx_top_eig: float  # λ_max(XᵀX) per token
    hessian_trace: float | None = None  # tr(H_l) / n_l
    hessian_trace_stderr: float | None = None
    hessian_probes: int | None = None
    top_eigenvalue: float | None = None
    eigenvalue_converged: bool | None = None

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


@dataclass
class CandidateError:
    """One layer quantized with one candidate scheme: its exact storage and its errors."""

    layer: str
    scheme: str
    storage_bits: int
    weight_error: float  # ‖Q(W) − W‖²_F
    output_error: float  # tr(ΔW XᵀX ΔWᵀ) per token
    kl: float | None = None
    first_order: float | None = None  # Σ |∂L/∂W ⊙ ΔW| (mean loss per token)
    fisher: float | None = None  # ½ Σ F ⊙ ΔW², F the per-token diagonal Fisher
    output_fisher: float | None = None  # ½ Σ_i E[g_i²] (ΔW A ΔWᵀ)_ii
    block_output: float | None = None  # ½ Σ_d E[g_d²] E[Δy_d²] at the block's output


@dataclass
class SensitivityTable:
    layers: dict[str, LayerSensitivity]
    errors: dict[tuple[str, str], CandidateError]
    candidates: list[str]
    meta: dict = field(default_factory=dict)

    def updated(self, layers: dict[str, LayerSensitivity], errors: dict[tuple[str, str], CandidateError],
                round: int) -> "SensitivityTable":
        """This table with re-measured layers and candidates in place of the old entries; `meta["rounds"]`
        counts the pairs each round measured."""
        meta = {**self.meta, "rounds": {**self.meta.get("rounds", {}), str(round): len(errors)}}
        return SensitivityTable({**self.layers, **layers}, {**self.errors, **errors}, self.candidates, meta)

    def with_keep(self, stored_bits: dict[str, int]) -> "SensitivityTable":
        """This table with the option of keeping each layer in full precision: no error, and the bits it is
        stored with per weight (`stored_bits[layer]`)."""
        kept = {(layer, KEEP): CandidateError(layer, KEEP, self.layers[layer].numel * bits, 0.0, 0.0, kl=0.0,
                                               first_order=0.0, fisher=0.0, output_fisher=0.0, block_output=0.0)
                for layer, bits in stored_bits.items()}
        return SensitivityTable(self.layers, {**self.errors, **kept}, [*self.candidates, KEEP], self.meta)

    def schemes_of(self, layer: str) -> list[str]:
        return [c for c in self.candidates if (layer, c) in self.errors]

    def available_metrics(self) -> list[str]:
        layer = next(iter(self.layers.values()))
        have = {"xtx_trace", "xtx_eig", "output_error"}
        if layer.hessian_trace is not None:
            have |= {"hutchinson", "kfac"}
        if layer.top_eigenvalue is not None:
            have.add("eigenvalue")
        for metric in ("kl", *GRADIENT_METRICS):
            if all(getattr(e, metric) is not None for e in self.errors.values()):
                have.add(metric)
        return [m for m in METRICS if m in have]

    def cost(self, layer: str, scheme: str, metric: str) -> float:
        """Ω of quantizing `layer` with `scheme` under `metric`. A Hutchinson trace is floored at its standard
        error (a trace indistinguishable from zero must not make the layer free); eigenvalues at zero."""
        info, error = self.layers[layer], self.errors[(layer, scheme)]
        needed = {"hutchinson": info.hessian_trace, "kfac": info.hessian_trace, "eigenvalue": info.top_eigenvalue,
                  "kl": error.kl, **{m: getattr(error, m) for m in GRADIENT_METRICS}}
        if metric in needed and needed[metric] is None:  # this cell only: the whole-table scan is quadratic
            raise QuantbenchError(f"metric {metric!r} was not measured in this sensitivity table; measured: "
                                  f"{', '.join(self.available_metrics())} (add it to allocation.measure)")
        if metric == "hutchinson":
            return self.curvature(info) * error.weight_error
        if metric == "eigenvalue":
            return max(info.top_eigenvalue, 0.0) * error.weight_error
        if metric == "xtx_trace":
            return info.xtx_trace / info.in_features * error.weight_error
        if metric == "xtx_eig":
            return info.xtx_top_eig * error.weight_error
        if metric == "output_error":
            return error.output_error
        if metric == "kfac":
            curvature_per_output = self.curvature(info) * info.numel / (info.xtx_trace * info.out_features)
            return curvature_per_output * error.output_error if info.xtx_trace > 0 else 0.0
        if metric == "kl":
            return max(error.kl, 0.0)
        if metric in GRADIENT_METRICS:
            return getattr(error, metric)
        raise QuantbenchError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")

    @staticmethod
    def curvature(info: LayerSensitivity) -> float:
        """tr(H_l)/n_l, at least its standard error."""
        return max(info.hessian_trace, info.hessian_trace_stderr or 0.0, 0.0)

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write `sensitivity.json` (everything) and `sensitivity.csv` (layer × candidate with Ω per metric)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "candidates": self.candidates,
                "layers": [asdict(info) for info in self.layers.values()],
                "errors": [asdict(error) for error in self.errors.values()]}
        json_path, csv_path = directory / "sensitivity.json", directory / "sensitivity.csv"
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        metrics = self.available_metrics()
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["layer", "scheme", "numel", "storage_bits", "bits_per_weight", "weight_error",
                             "output_error", *(f"cost_{m}" for m in metrics)])
            for (layer, scheme), error in self.errors.items():
                numel = self.layers[layer].numel
                writer.writerow([layer, scheme, numel, error.storage_bits, f"{error.storage_bits / numel:.5f}",
                                 f"{error.weight_error:.6g}", f"{error.output_error:.6g}",
                                 *(f"{self.cost(layer, scheme, m):.6g}" for m in metrics)])
        return json_path, csv_path

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        path = Path(path)
        if path.is_dir():
            path = path / "sensitivity.json"
        if not path.is_file():
            raise QuantbenchError(f"sensitivity table {path} not found; write one with `quantbench sensitivity RECIPE`")
        data = json.loads(path.read_text())
        layers = {entry["name"]: LayerSensitivity(**entry) for entry in data["layers"]}
        errors = {(e["layer"], e["scheme"]): CandidateError(**e) for e in data["errors"]}
        return cls(layers, errors, data["candidates"], data.get("meta", {}))

