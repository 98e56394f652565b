"""Keep third-party chatter (offline-cache notices, weight-loading bars) out of quantbench's output."""

from __future__ import annotations

import importlib.util


def quiet_libraries() -> None:
    if importlib.util.find_spec("transformers"):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if importlib.util.find_spec("datasets"):
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
