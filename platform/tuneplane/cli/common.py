"""What every command shares: the Typer app and its sub-apps, the consoles, and failing cleanly."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console

from tuneplane.errors import InputError

T = TypeVar("T")
P = TypeVar("P")

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Instruction tuning of LLMs on Kubernetes.",
)
spec_app = typer.Typer(no_args_is_help=True, help="Tuning spec utilities.")
app.add_typer(spec_app, name="spec")
config_app = typer.Typer(no_args_is_help=True, help="Platform config utilities.")
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)


def load_or_exit(what: str, load: Callable[[P], T], path: P) -> T:
    """Load a spec or config file; on an InputError print every problem (each naming its field) and exit 2."""
    try:
        return load(path)
    except InputError as exc:
        err_console.print(f"[bold red]invalid {what}[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None


@contextmanager
def api_errors() -> Iterator[None]:
    """An API answer or a connection failure inside becomes a message and an exit code: 2 when the request
    was refused as invalid (each problem printed with its field), 1 otherwise."""
    from tuneplane.client import ApiError

    try:
        yield
    except typer.Exit:
        raise
    except ApiError as exc:
        err_console.print(f"[bold red]{exc.status} {exc.title}[/]", highlight=False)
        for e in exc.errors:
            err_console.print(
                f"  {e.get('field') or '(spec)'}: {e.get('message')}", highlight=False, markup=False
            )
        if not exc.errors and exc.detail:
            err_console.print(f"  {exc.detail}", highlight=False, markup=False)
        raise typer.Exit(2 if exc.status in (400, 413, 422) else 1) from None
    except Exception as exc:
        err_console.print(f"[bold red]cannot reach the API[/]: {exc}", highlight=False)
        raise typer.Exit(1) from None


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside, the libraries a command calls print nothing of their own: no Python warnings (MLflow's type-hint
    notes, transformers' deprecations), no progress bars while weights load, no library log lines below
    errors. A job's own log keeps all of them; a user's terminal shows only the platform's lines."""
    import logging
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("mlflow", "transformers", "peft", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    transformers_bars, hub_bars = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Some libraries set their own filters inside (MLflow shows its type-hint note "once" whatever the
            # caller's filter): nothing is shown while the original display function is swapped out.
            warnings.showwarning = lambda *args, **kwargs: None
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if transformers_bars:  # each as it was before
            hf_logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()
