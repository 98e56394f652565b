"""Calibration data and the statistics measured on it."""

from quantbench.calibration.batches import calibration_batches
from quantbench.calibration.stats import LayerStats, collect_stats

__all__ = ["LayerStats", "calibration_batches", "collect_stats"]
