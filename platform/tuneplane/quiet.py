"""Library noise kept off a user's terminal: the platform prints its own lines; libraries' notes, warnings and
progress bars stay in the job's log, not in the commands' and the API's output."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_loggers(names: tuple[str, ...], level: int) -> Iterator[None]:
    """Inside, the named loggers pass on only records of `level` or above; each gets its own level back after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, before in zip(loggers, levels, strict=True):
            logger.setLevel(before)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside, the libraries a command calls print nothing of their own: no Python warnings (MLflow's type-hint
    notes, transformers' deprecations), no progress bars while weights load, no library log lines below
    errors. A job's own log keeps all of them; a user's terminal shows only the platform's lines."""
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_bars, hub_bars = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Some libraries set their own filters inside (MLflow shows its type-hint note "once" whatever the
            # caller's filter): nothing is shown while the original display function is swapped out.
            warnings.showwarning = lambda *args, **kwargs: None
            with quiet_loggers(("mlflow", "transformers", "peft", "huggingface_hub"), logging.ERROR):
                yield
    finally:
        if transformers_bars:  # each as it was before
            hf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()
