"""The `tuneplane` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneplane.spec import SpecError, json_schema, load_spec

if TYPE_CHECKING:
    from tuneplane.data.preflight import PreflightReport

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Instruction tuning of LLMs on Kubernetes."
)
spec_app = typer.Typer(no_args_is_help=True, help="Tuning spec utilities.")
app.add_typer(spec_app, name="spec")

console = Console()
err_console = Console(stderr=True)


@spec_app.command("schema")
def spec_schema(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the tuning spec's JSON Schema."""
    text = json.dumps(json_schema(), indent=2) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def validate(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML or JSON tuning spec.")],
    max_records: Annotated[
        int | None, typer.Option(help="Scan at most this many records per source.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Rendered samples to show per source.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    spec_only: Annotated[bool, typer.Option(help="Check the spec, not the data.")] = False,
) -> None:
    """Check a spec and preflight its data: counts, bad records (uri:line), lengths, masking."""
    try:
        spec = load_spec(spec_path)
    except SpecError as exc:
        err_console.print(f"[bold red]invalid spec[/]\n{exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    if spec_only:
        console.print(f"[green]spec ok[/]: {spec.name}")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tuneplane.data import preflight
    from tuneplane.pretrained import PretrainedError, load_tokenizer

    try:
        with console.status("loading tokenizer"):
            tokenizer = load_tokenizer(spec.model)
    except PretrainedError as exc:
        err_console.print(f"[bold red]model.tokenizer[/]: {exc}", highlight=False)
        raise typer.Exit(2) from None
    with console.status("scanning data"):
        report = preflight(spec, tokenizer, max_records=max_records, samples=samples)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: PreflightReport) -> None:
    table = Table(title="Data preflight", title_justify="left")
    for column in ("source", "files", "records", "examples", "bad", "truncated", "tokens", "trained %"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for s in report.sources:
        st = s.stats
        share = f"{100 * st.trained_tokens / st.tokens:.1f}" if st.tokens else "-"
        bad = f"[red]{st.errors}[/]" if st.errors else "0"
        table.add_row(
            s.name,
            str(s.files),
            str(st.records),
            str(st.examples),
            bad,
            str(st.truncated),
            str(st.tokens),
            share,
        )
    console.print(table)
    console.print(
        f"trained tokens overall: {100 * report.trained_share:.1f}%  (max_seq_len {report.max_seq_len})"
    )
    for s in report.sources:
        if s.histogram():
            bars = "  ".join(f"{bucket}: {n}" for bucket, n in s.histogram())
            console.print(f"[bold]{s.name}[/] token lengths  {bars}", highlight=False)
        for line in s.stats.error_samples[:10]:
            console.print(f"  [red]bad record[/] {line}", highlight=False)
        for sample in s.samples:
            text = Text()
            for span in sample:
                text.append(span.text, style="bold green" if span.trained else "dim")
            console.print(
                Text(f"--- sample from {s.name} (trained in green, masked dimmed) ---", style="cyan")
            )
            console.print(text)
    for error in report.errors():
        err_console.print(f"[bold red]error[/] {error}", highlight=False)
    console.print("[green]data ok[/]" if report.ok else "[red]data has errors[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
