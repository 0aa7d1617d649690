"""`python -m tuneplane.train --spec FILE`: the fixed entrypoint a RayJob or the local backend starts.

Run settings come from flags or the environment the platform sets (TUNEPLANE_JOB_ID, TUNEPLANE_STORAGE_PATH,
MLFLOW_TRACKING_URI, TUNEPLANE_ARTIFACT_ROOT, RAY_ADDRESS, and TUNEPLANE_READ_ROOTS: the local folders the
team's files may lie in); never from the spec.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from tuneplane.errors import SpecError, TuneplaneError
from tuneplane.files import Confinement
from tuneplane.home import Home, ensure_sqlite_folder
from tuneplane.raylocal import use_loopback
from tuneplane.spec import load_spec
from tuneplane.train.launcher import Cancelled, RunSettings, run


def main(argv: list[str] | None = None) -> int:
    # A sandboxed job starts with SIGTERM ignored (so that its sandbox survives a cancel): a cancel stops it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _plain_warnings()
    home = Home.default()
    parser = argparse.ArgumentParser(prog="python -m tuneplane.train", description=__doc__)
    parser.add_argument("--spec", required=True, help="tuning spec (YAML or JSON)")
    parser.add_argument("--job-id", default=os.environ.get("TUNEPLANE_JOB_ID"))
    parser.add_argument("--storage-path", default=os.environ.get("TUNEPLANE_STORAGE_PATH", str(home.runs)))
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", home.tracking_uri))
    parser.add_argument(
        "--artifact-root",
        default=os.environ.get("TUNEPLANE_ARTIFACT_ROOT"),
        help="MLflow artifact location for new experiments (default: next to a local tracking database)",
    )
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    parser.add_argument(
        "--team", default=os.environ.get("TUNEPLANE_TEAM"), help="the submitting team (owns the MLflow names)"
    )
    parser.add_argument("--accelerator-type", default=os.environ.get("TUNEPLANE_ACCELERATOR_TYPE"))
    parser.add_argument("--no-tracking", action="store_true")
    parser.add_argument(
        "--example-log-dir",
        default=None,
        help="log which records each rank trained on at every step (audits)",
    )
    parser.add_argument(
        "--sample", default=None, help="after training, generate from the registered model once"
    )
    args = parser.parse_args(argv)
    if args.ray_address in (None, "local"):  # this process starts its own Ray: loopback only, with a token
        use_loopback()
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"invalid spec\n{exc}", file=sys.stderr)
        return 2
    if "://" not in args.storage_path:
        Path(args.storage_path).expanduser().mkdir(parents=True, exist_ok=True)
    if not args.no_tracking:
        ensure_sqlite_folder(args.tracking_uri)
    settings = RunSettings(
        job_id=args.job_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=args.storage_path,
        tracking_uri=None if args.no_tracking else args.tracking_uri,
        artifact_root=args.artifact_root or _local_artifact_root(args.tracking_uri, home),
        ray_address=args.ray_address,
        accelerator_type=args.accelerator_type,
        example_log_dir=args.example_log_dir,
        team=args.team,
        confinement=Confinement.from_env(),
    )
    try:
        result = run(spec, settings)
    except Cancelled:  # an expected ending: the SIGTERM handler wrote its one line, no traceback follows
        return 128 + signal.SIGTERM
    except TuneplaneError as exc:  # a worker's error, a base model that cannot load, a bad checkpoint...
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    summary = {
        "job_id": result.job_id,
        "model_uri": result.model_uri,
        "gate": result.gate,
        "metrics": result.metrics,
    }
    print(json.dumps(summary, indent=2))
    if result.model_uri and settings.tracking_uri and args.sample:
        _show_sample(result.model_uri, settings.tracking_uri, args.sample)
    return 0


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain_warnings() -> None:
    """Warnings stay in the job's log, as plain text: MLflow colours the text of its own with terminal codes."""
    original = warnings.formatwarning

    def plain(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
    ) -> str:
        return _ANSI.sub("", original(message, category, filename, lineno, line))

    warnings.formatwarning = plain


def _local_artifact_root(tracking_uri: str, home: Home) -> str | None:
    """A local tracking database keeps artifacts in the platform's home; a tracking server decides itself."""
    return str(home.artifact_root) if tracking_uri.startswith(("sqlite:", "file:")) else None


def _show_sample(model_uri: str, tracking_uri: str, prompt: str) -> None:
    """Load the registered model the way a consumer does and generate once."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    print(f"registered model: {model_uri}")
    print(f"sample: {prompt!r} -> {model.predict([prompt])[0]!r}")


if __name__ == "__main__":
    sys.exit(main())
