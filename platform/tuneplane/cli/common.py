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
