"""The `tuneplane` command line.

common.py  the Typer app, consoles, and the two ways a command fails (bad input file, API error)
local.py   commands that need no API: validate, spec/config schema, config check, token, serve
jobs.py    commands that talk to the API through the SDK: submit, jobs, status, logs, cancel, models, demo
"""

from tuneplane.cli import jobs, local  # noqa: F401  (importing them registers their commands)
from tuneplane.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
