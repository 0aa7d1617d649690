"""Commands that need no API: validate a spec and its data, print schemas, check a config, make a token,
serve the API."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tuneplane.cli.common import app, config_app, console, err_console, load_or_exit, spec_app
from tuneplane.spec import json_schema, load_spec

if TYPE_CHECKING:
    from tuneplane.data.preflight import PreflightReport, SampleSpan
    from tuneplane.memory import MemoryCheck
    from tuneplane.spec import TuningSpec


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

    cfg = load_or_exit("config", load_config, path)
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
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="TUNEPLANE_CONFIG", help="Platform config YAML: the GPU memory of the spec's pool."
        ),
    ] = None,
) -> None:
    """Check a spec, estimate its memory per GPU, and preflight its data: counts, bad records (uri:line),
    lengths, masking."""
    spec = load_or_exit("spec", _load_checked_spec, spec_path)
    memory = _memory(spec, config)
    if spec_only:
        console.print(f"[green]spec ok[/]: {spec.name}")
        _print_memory(spec, memory)
        _exit_unless_fits(memory)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tuneplane.data import preflight
    from tuneplane.errors import PretrainedError
    from tuneplane.pretrained import load_tokenizer

    try:
        with console.status("loading tokenizer"):
            tokenizer = load_tokenizer(spec.model)
    except PretrainedError as exc:
        err_console.print(f"[bold red]cannot load the tokenizer[/]: {escape(str(exc))}", highlight=False)
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
        sys.stdout.write(json.dumps({**report.to_dict(), "memory": memory.to_dict()}, indent=2) + "\n")
    else:
        _print_report(report)
        _print_memory(spec, memory)
    _exit_unless_fits(memory)
    if not report.ok:
        raise typer.Exit(1)


def _load_checked_spec(path: Path) -> TuningSpec:
    """The spec, refused (SpecError) as the API refuses it at submit where its model cannot do what it asks
    (tuneplane.families), from the model's config.json wherever it is (the user's own files and credentials)."""
    from tuneplane.errors import SpecError
    from tuneplane.families import spec_problems
    from tuneplane.memory import read_model_config

    spec = load_spec(path)
    try:
        model_config = read_model_config(spec.model.base)
    except (OSError, ValueError):
        return spec  # a hub id, or unreadable: loading the tokenizer below says why
    problems = spec_problems(spec, model_config)
    if problems:
        raise SpecError(problems)
    return spec


def _memory(spec: TuningSpec, config_path: Path | None) -> MemoryCheck:
    """The estimate per GPU against the spec's pool in the platform config (the user's own files and storage
    credentials: the model's config.json is read wherever it is)."""
    from tuneplane.config import load_config
    from tuneplane.memory import check_memory, pool_gpu_memory

    platform = load_or_exit("config", load_config, config_path)
    return check_memory(spec, pool_gpu_memory(spec, platform))


def _print_memory(spec: TuningSpec, memory: MemoryCheck) -> None:
    from tuneplane.memory import fits, gib

    found, device = memory.estimate, memory.device_bytes
    per = "GPU" if spec.distributed.gpus_per_worker else "worker"
    if found is None:
        console.print(f"memory per {per}: not estimated ({escape(memory.source)})", highlight=False)
    elif device is None:
        ckpt = "on" if found.checkpointing else "off"
        console.print(
            f"memory per {per} (estimate): {gib(found.total)}, activation checkpointing {ckpt}",
            highlight=False,
        )
    else:
        verdict = "[green]fits[/]" if fits(found.total, device) else "[red]does not fit[/]"
        console.print(
            f"memory per GPU (estimate): {found.summary()} of {gib(device)}: {verdict}; activation "
            f"checkpointing {'on' if found.checkpointing else 'off'}, ZeRO-{found.zero_stage} over "
            f"{found.world_size} ranks; shape from {escape(memory.source)}",
            highlight=False,
        )


def _exit_unless_fits(memory: MemoryCheck) -> None:
    from tuneplane.memory import fits

    if memory.estimate and memory.device_bytes and not fits(memory.estimate.total, memory.device_bytes):
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
        sides = (
            [("chosen ", s.lengths), ("rejected ", s.rejected_lengths)] if s.preference else [("", s.lengths)]
        )
        for side, lengths in sides:
            if s.histogram(lengths):
                bars = "  ".join(f"{bucket}: {n}" for bucket, n in s.histogram(lengths))
                console.print(f"[bold]{s.name}[/] {side}token lengths  {bars}", highlight=False)
        for line in s.stats.error_samples[:10]:
            console.print(f"  [red]bad record[/] {line}", highlight=False)
        for sample in s.samples:
            console.print(
                Text(f"--- sample from {s.name} (trained in green, masked dimmed) ---", style="cyan")
            )
            console.print(_spans_text(sample))
        for pair in s.pair_samples:
            console.print(
                Text(f"--- preference pair from {s.name} (trained in green, masked dimmed) ---", style="cyan")
            )
            for label, spans in (
                ("prompt", pair.prompt),
                ("chosen", pair.chosen),
                ("rejected", pair.rejected),
            ):
                console.print(Text(f"[{label}]", style="bold cyan"), _spans_text(spans))
    _print_quality(report.quality)
    for error in report.errors():
        err_console.print(f"[bold red]error[/] {error}", highlight=False)
    console.print("[green]data ok[/]" if report.ok else "[red]data has errors[/]")


def _spans_text(spans: list[SampleSpan]) -> Text:
    text = Text()
    for span in spans:
        text.append(span.text, style="bold green" if span.trained else "dim")
    return text


def _print_quality(quality: dict[str, Any]) -> None:
    """The duplicate and contamination summary, and its example pairs as `uri:line ~ uri:line` (unwrapped:
    the keys must stay copyable)."""
    if not quality:
        return
    console.print(f"[bold]quality[/] {escape(quality['summary'])}", highlight=False, soft_wrap=True)
    for name, figures in quality["dedup"].items():
        for pair in figures["pairs"]:
            console.print(
                f"  {pair['kind']} duplicate in {escape(name)}: {escape(pair['first'])} ~ "
                f"{escape(pair['duplicate'])}",
                highlight=False,
                soft_wrap=True,
            )
    for name, figures in quality["contamination"].items():
        for pair in figures["pairs"]:
            console.print(
                f"  [yellow]contaminated[/] {escape(name)} ({pair['kind']}): {escape(pair['eval'])} ~ "
                f"{escape(pair['train'])}",
                highlight=False,
                soft_wrap=True,
            )


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
    from tuneplane.cli.jobs import console_hint
    from tuneplane.config import load_config

    cfg = load_or_exit("config", load_config, config)
    app = create_app(cfg)  # makes the local admin token on first use, which the hint names
    typer.echo(console_hint(cfg, f"http://{host}:{port}"))
    uvicorn.run(app, host=host, port=port, log_level="info")


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


@app.command("mlflow-credentials")
def mlflow_credentials(
    team: Annotated[str, typer.Option(help="Team whose MLflow user to print.")],
) -> None:
    """With `tracking_auth` on a cluster: the team's MLflow user as a Secret manifest for its namespace (the
    `backend.tracking_secret` its jobs read). Needs the MLflow admin's MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, from which the team's password is derived."""
    import yaml

    from tuneplane.config import load_config
    from tuneplane.tracking import auth as mlflow_auth

    cfg = load_or_exit("config", load_config, None)
    found = cfg.team(team)
    if found is None:
        raise typer.BadParameter(f"team {team} is not configured", param_hint="--team")
    try:
        env = mlflow_auth.job_env(team)
    except mlflow_auth.TrackingAuthError as exc:
        raise typer.BadParameter(str(exc), param_hint="MLFLOW_TRACKING_USERNAME") from None
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": (cfg.kuberay.tracking_secret if cfg.kuberay else None) or "tuneplane-mlflow-team",
            "namespace": found.namespace,
        },
        "type": "Opaque",
        "stringData": {
            "username": env["MLFLOW_TRACKING_USERNAME"],
            "password": env["MLFLOW_TRACKING_PASSWORD"],
        },
    }
    typer.echo(yaml.safe_dump(secret, sort_keys=False), nl=False)
