"""Quiet model libraries: no progress bars unless a person watches a terminal, messages through logging.

Under Airflow every line a task writes to stderr is logged at error level, so a tqdm bar ("Loading
weights: 100%") or transformers' own stderr handler (its load report: `classifier.weight | MISSING`)
trips log-based alerting in a healthy run. Routed through `logging`, they keep their real level.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


def quiet_model_libraries(stream: TextIO | None = None) -> None:
    """Call before loading a model or training; idempotent and cheap."""
    target = stream or sys.stderr
    interactive = bool(getattr(target, "isatty", lambda: False)())
    if not interactive:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import transformers.utils.logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if not interactive:
        hf_logging.disable_progress_bar()
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:
            pass
