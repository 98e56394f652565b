"""Evaluation: perplexity (and, later, lm-eval benchmarks and leaderboards)."""

from quantbench.eval.perplexity import PerplexityResult, dataset_perplexity, perplexity_of_ids

__all__ = ["PerplexityResult", "dataset_perplexity", "perplexity_of_ids"]
