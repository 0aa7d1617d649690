"""Commands that talk to the job API through the SDK (`tuneplane.client`): submit and follow, list, inspect,
cancel, models; `demo` runs the main job against an API it starts itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tuneplane.cli.common import api_errors, app, console, err_console, load_or_exit
from tuneplane.quiet import quiet_libraries
from tuneplane.spec import load_spec

if TYPE_CHECKING:
    from tuneplane.client import Client
    from tuneplane.config import PlatformConfig


Url = Annotated[str | None, typer.Option(envvar="TUNEPLANE_URL", help="API address.")]


def _client(url: str | None) -> Client:
    from tuneplane.client import Client

    return Client(url)


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
    spec = load_or_exit("spec", load_spec, spec_path)
    with _client(url) as client:
        with api_errors():
            job = client.submit(spec)
        console.print(f"submitted [bold]{job['id']}[/] ({job['state']})")
        if wait:
            _follow(client, job["id"], sample)


def _follow(client: Client, job_id: str, sample: str | None) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.fields[state]:<10}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.fields[max_steps]} steps"),
        TextColumn("{task.fields[figures]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=None, state="PENDING", figures="loss -", max_steps="?")

        def update(job: dict, metrics: dict) -> None:
            progress.update(
                task, total=metrics.get("max_steps") or None, completed=metrics.get("step") or 0,
                state=job["state"], figures=step_figures(metrics.get("latest", {})),
                max_steps=metrics.get("max_steps") or "?",
            )  # fmt: skip

        with api_errors():
            final = client.wait(job_id, on_progress=update)
            outcome = _outcome(client, final) if final["state"] == "SUCCEEDED" else []
    style = "green" if final["state"] == "SUCCEEDED" else "red"
    console.print(f"[{style}]{final['state']}[/] {escape(final['message'])}", highlight=False)
    if final["state"] != "SUCCEEDED":
        raise typer.Exit(1)
    for line in outcome:
        console.print(line, highlight=False)
    if final.get("model_uri"):
        console.print(f"registered model: [bold]{final['model_uri']}[/]")
        if sample:
            _sample(final["model_uri"], sample)


# The progress line's figures after the loss: preference tuning's reward accuracy and margin (TRL's names).
_STEP_FIGURES = (("rewards/accuracy", "reward acc", ".2f"), ("rewards/margin", "margin", ".3f"))


def step_figures(latest: dict[str, float]) -> str:
    """'loss 0.6931' (and for DPO/ORPO '  reward acc 0.75  margin 0.120') from a job's latest metrics."""
    loss = latest.get("loss")
    parts = [f"loss {loss:.4f}" if loss is not None else "loss -"]
    parts += [f"{label} {latest[key]:{fmt}}" for key, label, fmt in _STEP_FIGURES if key in latest]
    return "  ".join(parts)


def _outcome(client: Client, job: dict) -> list[str]:
    """What the data filter dropped, and the gate's verdict with the scores behind it."""
    latest = client.metrics(job["id"]).get("latest", {})
    lines = []
    if latest.get("data/records"):
        lines.append(
            f"data filter: {latest.get('data/dropped', 0):.0f} of {latest['data/records']:.0f} training records "
            f"dropped ({latest.get('data/exact_duplicates', 0):.0f} exact duplicates, "
            f"{latest.get('data/near_duplicates', 0):.0f} near duplicates, "
            f"{latest.get('data/contaminated', 0):.0f} overlapping eval data)"
        )
    version = next((v for v in client.models() if v["uri"] == job.get("model_uri")), None)
    if version is not None and version.get("gate") not in (None, "none"):
        scores = _scores(version.get("scores") or {}).replace("\n", ", ")
        lines.append(f"gate {version['gate']}: {escape(scores)}")
    return lines


def _sample(model_uri: str, prompt: str) -> None:
    """Load the registered model the way a consumer does and generate once."""
    import mlflow

    from tuneplane.config import load_config

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or load_config().tracking_uri)
    with quiet_libraries():
        model = mlflow.pyfunc.load_model(model_uri)
        answer = model.predict([prompt])[0]
    console.print(f"sample: {prompt!r} -> {answer!r}", highlight=False, markup=False)


@app.command()
def jobs(
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="How many.")] = 50,
    url: Url = None,
) -> None:
    """List your jobs, newest first."""
    with _client(url) as client, api_errors():
        page = client.jobs(state=state, limit=limit)
    table = Table("ID", "TEAM", "STATE", "CREATED", "MESSAGE")
    for job in page["items"]:
        table.add_row(job["id"], job["team"], job["state"], job["created_at"][:19], job["message"][:60])
    console.print(table)


@app.command()
def status(job_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None) -> None:
    """A job's state, progress and event history."""
    with _client(url) as client, api_errors():
        job, events, metrics = client.job(job_id), client.events(job_id), client.metrics(job_id)
    console.print(
        f"[bold]{job['id']}[/] team={job['team']} state={job['state']} {job['message']}", highlight=False
    )
    if metrics.get("step") is not None:
        console.print(f"step {metrics['step']}/{metrics.get('max_steps')}  {step_figures(metrics['latest'])}")
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
    with _client(url) as client, api_errors():
        for line in client.logs(job_id, follow=follow, tail=tail):
            sys.stdout.write(line + "\n")


@app.command()
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID")], url: Url = None) -> None:
    """Cancel a job: a waiting one at once, a running one is stopped (its MLflow run marked KILLED)."""
    with _client(url) as client, api_errors():
        job = client.cancel(job_id)
    console.print(f"{job['id']}: {job['state']}" + (" (stopping)" if job["cancel_requested"] else ""))


@app.command()
def models(url: Url = None) -> None:
    """Adapters your jobs registered in MLflow (load with mlflow.pyfunc.load_model(URI))."""
    with _client(url) as client, api_errors():
        versions = client.models()
    table = Table("URI", "JOB", "BASE MODEL", "GATE", "SCORES")
    for v in versions:
        table.add_row(
            v["uri"],
            v["job_id"],
            v.get("base_model") or "",
            v.get("gate") or "-",
            _scores(v.get("scores") or {}),
        )
    console.print(table)


def _scores(scores: dict[str, float]) -> str:
    """Eval loss and the zero-shot mean first, then every task; four significant digits."""
    first = [k for k in ("eval_loss", "zero_shot/mean") if k in scores]
    keys = first + sorted(k for k in scores if k not in first)
    return "\n".join(f"{k} {scores[k]:.4g}" for k in keys) or "-"


def console_hint(config: PlatformConfig, url: str) -> str:
    """Where the web console is and how to sign in to it (the embedded default's admin token file)."""
    from tuneplane.backends.capabilities import capabilities
    from tuneplane.home import Home

    line = f"web console: {url}/console/"
    if capabilities(config).local_admin_token and not (config.auth.tokens or config.auth.tokens_file):
        token = Home(config.home).token
        line += f" (sign in with the local admin token: cat {token}; `tuneplane serve` keeps it up after the demo)"
    return line


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

    config = load_or_exit("config", load_config, None)
    # The sample loads the job's model from the embedded API's MLflow, whatever MLflow the shell names.
    os.environ["MLFLOW_TRACKING_URI"] = config.tracking_uri
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
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
    console.print(console_hint(config, f"http://127.0.0.1:{port}"), highlight=False)
    try:
        submit(spec_path, wait=True, sample=sample, url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
