"""Keep third-party chatter (offline-cache notices, weight-loading bars) out of quantbench's output."""

from __future__ import annotations


def quiet_libraries() -> None:
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
