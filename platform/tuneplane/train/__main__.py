"""`python -m tuneplane.train --spec FILE`: the fixed entrypoint a RayJob or the local backend starts.

Run settings come from flags or the environment the platform sets (TUNEPLANE_JOB_ID, TUNEPLANE_STORAGE_PATH,
MLFLOW_TRACKING_URI, TUNEPLANE_ARTIFACT_ROOT, RAY_ADDRESS); never from the spec.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tuneplane.spec import SpecError, load_spec
from tuneplane.train.launcher import RunSettings, run

DEFAULT_HOME = Path(os.environ.get("TUNEPLANE_HOME", Path.home() / ".cache" / "tuneplane"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneplane.train", description=__doc__)
    parser.add_argument("--spec", required=True, help="tuning spec (YAML or JSON)")
    parser.add_argument("--job-id", default=os.environ.get("TUNEPLANE_JOB_ID"))
    parser.add_argument(
        "--storage-path", default=os.environ.get("TUNEPLANE_STORAGE_PATH", str(DEFAULT_HOME / "runs"))
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{DEFAULT_HOME / 'mlflow.db'}"),
    )
    parser.add_argument(
        "--artifact-root",
        default=os.environ.get("TUNEPLANE_ARTIFACT_ROOT", str(DEFAULT_HOME / "mlartifacts")),
    )
    parser.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"))
    parser.add_argument("--no-tracking", action="store_true")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"invalid spec\n{exc}", file=sys.stderr)
        return 2
    Path(args.storage_path).expanduser().mkdir(
        parents=True, exist_ok=True
    ) if "://" not in args.storage_path else None
    settings = RunSettings(
        job_id=args.job_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=args.storage_path,
        tracking_uri=None if args.no_tracking else args.tracking_uri,
        artifact_root=args.artifact_root,
        ray_address=args.ray_address,
    )
    result = run(spec, settings)
    print(
        json.dumps(
            {"job_id": result.job_id, "model_uri": result.model_uri, "metrics": result.metrics}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
