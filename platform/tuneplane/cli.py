"""The `tuneplane` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tuneplane.spec import SpecError, json_schema, load_spec

if TYPE_CHECKING:
    from tuneplane.client import Client
    from tuneplane.data.preflight import PreflightReport

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


def _load_or_exit(what: str, load: Callable[[P], T], path: P) -> T:
    """Load a spec or config file; on a SpecError print every problem (each naming its field) and exit 2."""
    try:
        return load(path)
    except SpecError as exc:
        err_console.print(f"[bold red]invalid {what}[/]\n{exc}", highlight=False)
        raise typer.Exit(2) from None


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


@config_app.command("schema")
def config_schema() -> None:
    """Print the platform config's JSON Schema."""
    from tuneplane.config import PlatformConfig

    sys.stdout.write(json.dumps(PlatformConfig.model_json_schema(), indent=2) + "\n")


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(metavar="FILE", help="Platform config YAML.")]) -> None:
    """Check a platform config: every problem names its field."""
    from tuneplane.config import load_config

    cfg = _load_or_exit("config", load_config, path)
    teams = ", ".join(t.name for t in cfg.teams)
    console.print(f"[green]config ok[/]: backend {cfg.backend}, teams {teams}", highlight=False)


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
    spec = _load_or_exit("spec", load_spec, spec_path)
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
    except ImportError as exc:  # the API image has no training stack
        err_console.print(
            f"[bold red]the data preflight needs the training extra[/] ({exc.name} is missing): "
            "pip install 'tuneplane[train]', or check the spec alone with --spec-only",
            highlight=False,
        )
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


# -- the control plane ---------------------------------------------------------------------------------------

Url = Annotated[str | None, typer.Option(envvar="TUNEPLANE_URL", help="API address.")]


def _client(url: str | None) -> Client:
    from tuneplane.client import Client

    return Client(url)


def _fail(exc: Exception) -> typer.Exit:
    from tuneplane.client import ApiError

    if isinstance(exc, ApiError):
        err_console.print(f"[bold red]{exc.status} {exc.title}[/]", highlight=False)
        for e in exc.errors or []:
            err_console.print(
                f"  {e.get('field') or '(spec)'}: {e.get('message')}", highlight=False, markup=False
            )
        if not exc.errors and exc.detail:
            err_console.print(f"  {exc.detail}", highlight=False, markup=False)
        return typer.Exit(2 if exc.status in (400, 413, 422) else 1)
    err_console.print(f"[bold red]cannot reach the API[/]: {exc}", highlight=False)
    return typer.Exit(1)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8421,
    config: Annotated[
        Path | None, typer.Option(envvar="TUNEPLANE_CONFIG", help="Platform config YAML.")
    ] = None,
) -> None:
    """Run the API and its reconciler (embedded default: local backend, SQLite, local MLflow)."""
    import uvicorn

    from tuneplane.api import create_app
    from tuneplane.config import load_config

    cfg = _load_or_exit("config", load_config, config)
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info")


@app.command()
def submit(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="YAML or JSON tuning spec.")],
    wait: Annotated[bool, typer.Option(help="Follow the job to its end with a progress bar.")] = False,
    sample: Annotated[
        str | None, typer.Option(help="With --wait: generate from the registered model.")
    ] = None,
    url: Url = None,
) -> None:
    """Submit a tuning job."""
    spec = _load_or_exit("spec", load_spec, spec_path)
    with _client(url) as client:
        try:
            job = client.submit(spec)
        except Exception as exc:
            raise _fail(exc) from None
        console.print(f"submitted [bold]{job['id']}[/] ({job['state']})")
        if wait:
            _follow(client, job["id"], sample)


def _follow(client: Client, job_id: str, sample: str | None) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.fields[state]:<10}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.fields[max_steps]} steps"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=None, state="PENDING", loss="-", max_steps="?")

        def update(job: dict, metrics: dict) -> None:
            loss = metrics.get("latest", {}).get("loss")
            progress.update(
                task, total=metrics.get("max_steps") or None, completed=metrics.get("step") or 0,
                state=job["state"], loss=f"{loss:.4f}" if loss is not None else "-",
                max_steps=metrics.get("max_steps") or "?",
            )  # fmt: skip

        try:
            final = client.wait(job_id, on_progress=update)
        except Exception as exc:
            raise _fail(exc) from None
    style = "green" if final["state"] == "SUCCEEDED" else "red"
    console.print(f"[{style}]{final['state']}[/] {final['message']}", highlight=False)
    if final["state"] != "SUCCEEDED":
        raise typer.Exit(1)
    if final.get("model_uri"):
        console.print(f"registered model: [bold]{final['model_uri']}[/]")
        if sample:
            _sample(final["model_uri"], sample)


def _sample(model_uri: str, prompt: str) -> None:
    """Load the registered model the way a consumer does and generate once."""
    import mlflow

    from tuneplane.config import load_config

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or load_config().tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    console.print(f"sample: {prompt!r} -> {model.predict([prompt])[0]!r}", highlight=False, markup=False)


@app.command()
def jobs(
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 50,
    url: Url = None,
) -> None:
    """List your jobs, newest first."""
    with _client(url) as client:
        try:
            page = client.jobs(state=state, limit=limit)
        except Exception as exc:
            raise _fail(exc) from None
    table = Table("ID", "TEAM", "STATE", "CREATED", "MESSAGE")
    for job in page["items"]:
        table.add_row(job["id"], job["team"], job["state"], job["created_at"][:19], job["message"][:60])
    console.print(table)


@app.command()
def status(job_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None) -> None:
    """A job's state, progress and event history."""
    with _client(url) as client:
        try:
            job, events, metrics = client.job(job_id), client.events(job_id), client.metrics(job_id)
        except Exception as exc:
            raise _fail(exc) from None
    console.print(
        f"[bold]{job['id']}[/] team={job['team']} state={job['state']} {job['message']}", highlight=False
    )
    if metrics.get("step") is not None:
        console.print(
            f"step {metrics['step']}/{metrics.get('max_steps')}  loss {metrics['latest'].get('loss')}"
        )
    if job.get("model_uri"):
        console.print(f"model: {job['model_uri']}")
    for e in events:
        change = f"{e['from_state'] or ''} -> {e['to_state']}" if e["to_state"] else e["kind"]
        console.print(
            f"  {e['at'][:19]}  {change:<24} {e['actor']}  {e['message']}", highlight=False, markup=False
        )


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N lines.")] = None,
    url: Url = None,
) -> None:
    """A job's training log."""
    with _client(url) as client:
        try:
            for line in client.logs(job_id, follow=follow, tail=tail):
                sys.stdout.write(line + "\n")
        except Exception as exc:
            raise _fail(exc) from None


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None) -> None:
    """Cancel a job: a waiting one at once, a running one is stopped (its MLflow run marked KILLED)."""
    with _client(url) as client:
        try:
            job = client.cancel(job_id)
        except Exception as exc:
            raise _fail(exc) from None
    console.print(f"{job['id']}: {job['state']}" + (" (stopping)" if job["cancel_requested"] else ""))


@app.command()
def models(url: Url = None) -> None:
    """Adapters your jobs registered in MLflow (load with mlflow.pyfunc.load_model(URI))."""
    with _client(url) as client:
        try:
            versions = client.models()
        except Exception as exc:
            raise _fail(exc) from None
    table = Table("URI", "JOB", "BASE MODEL")
    for v in versions:
        table.add_row(v["uri"], v["job_id"], v.get("base_model") or "")
    console.print(table)


@app.command()
def demo(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC")] = Path("jobs/tiny-cpu.yaml"),
    sample: Annotated[str | None, typer.Option(help="Prompt for the registered model.")] = None,
    port: Annotated[int, typer.Option(help="Port of the embedded API.")] = 8421,
) -> None:
    """The main job on the embedded default: start the API (local backend), submit SPEC, follow it, sample."""
    import threading

    import uvicorn

    from tuneplane.api import create_app
    from tuneplane.config import load_config

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(_load_or_exit("config", load_config, None)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.1)
    if not thread.is_alive():
        err_console.print(f"[bold red]the API could not start on port {port}[/]")
        raise typer.Exit(1)
    console.print(f"API on http://127.0.0.1:{port} (local backend)")
    try:
        submit(spec_path, wait=True, sample=sample, url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@app.command("token")
def token_new(
    team: Annotated[str, typer.Option(help="Team the token acts for.")],
    admin: Annotated[bool, typer.Option(help="Admins see every team's jobs.")] = False,
) -> None:
    """Make an API token: prints the token once, and the entry (its SHA-256) for the platform config."""
    import secrets

    from tuneplane.config import hash_token

    token = secrets.token_urlsafe(32)
    role = "admin" if admin else "member"
    typer.echo(f"token (give it to the team; it is not stored): {token}")  # plain: never wrapped
    typer.echo(f"config entry: {{sha256: {hash_token(token)}, team: {team}, role: {role}}}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
