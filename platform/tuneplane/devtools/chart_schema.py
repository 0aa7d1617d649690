"""The `config` part of the Helm chart's values.schema.json, generated from the platform config model.

    python -m tuneplane.devtools.chart_schema            # rewrite it (make chart-docs)
    python -m tuneplane.devtools.chart_schema --check    # exit 1 when it is stale (tests/test_chart.py)

The chart passes its `config` values through to the platform config file the API reads (templates/_config.tpl
only adds what the chart itself owns), so `config` accepts what `tuneplane.config.PlatformConfig` accepts, with
the same keys: a field is written once, in the model, and `helm install` checks values against it before
anything is created. Three differences, all here:

- the keys the chart writes from its other values are left out (`CHART_OWNED`, `BACKEND_CHART_OWNED`): the
  database URL comes from a Secret, MLflow from `mlflow.*`, the tokens file from `auth.*`, the image from
  `runtimeImage`, and in a cluster the API talks to Kubernetes as its service account;
- the backend is always KubeRay's (`backend.type` may be left out);
- a team may say `create_namespace` (the chart creates its namespace), which the platform never sees.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from tuneplane.config import PlatformConfig
from tuneplane.config.kuberay import KubeRayBackend

Schema = dict[str, Any]
CHART = Path(__file__).resolve().parents[3] / "charts" / "tuneplane"
CHART_OWNED = ("database_url", "tracking_uri", "tracking_auth", "auth")
BACKEND_CHART_OWNED = ("image", "image_pull_policy", "tracking_uri", "kubeconfig", "api_server")
CREATE_NAMESPACE: Schema = {
    "type": "boolean",
    "default": False,
    "description": "Chart only: create the team's namespace, with Pod Security `restricted` enforced (kept on "
    "uninstall).",
}


def _inline(node: Any, defs: dict[str, Schema]) -> Any:
    """`node` with every `$ref` replaced by its definition (a `description` beside the ref wins), and without
    pydantic's titles and its `path` format (which JSON Schema validators do not know)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        merged = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]]) | {k: v for k, v in node.items() if k != "$ref"}
        return _inline(merged, defs)
    out = {}
    for key, value in node.items():
        if key == "title" and isinstance(value, str):
            continue
        if key == "format" and value == "path":
            continue
        out[key] = value if key in ("default", "examples") else _inline(value, defs)
    if "patternProperties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # as the model: a key matching no pattern is refused
    return out


def config_values_schema() -> Schema:
    """JSON Schema (draft-07, self-contained) of the chart's `config` values."""
    full = PlatformConfig.model_json_schema()
    defs = full.pop("$defs")
    backend = defs[KubeRayBackend.__name__]
    for key in BACKEND_CHART_OWNED:
        backend["properties"].pop(key)
    full["properties"]["backend"] = {
        "$ref": f"#/$defs/{KubeRayBackend.__name__}",
        "description": "The KubeRay backend's settings (the chart's backend is always KubeRay).",
    }
    team = defs["Team"]["properties"]
    team["create_namespace"] = CREATE_NAMESPACE
    for key in CHART_OWNED:
        full["properties"].pop(key)
    schema: Schema = _inline(full, defs)
    schema["description"] = (
        "The platform config (docs/reference/platform-config.md), passed through to the API's ConfigMap; "
        "generated from tuneplane.config.PlatformConfig by tuneplane.devtools.chart_schema."
    )
    return schema


def render(chart: Path = CHART) -> str:
    """values.schema.json as it should be: the committed file with its `config` property regenerated."""
    values_schema = json.loads((chart / "values.schema.json").read_text())
    values_schema["properties"]["config"] = config_values_schema()
    return json.dumps(values_schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART, help="chart directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the schema is stale, write nothing")
    args = parser.parse_args(argv)
    path, text = args.chart / "values.schema.json", render(args.chart)
    if args.check:
        stale = path.read_text() != text
        print(f"{path}: {'stale, run make chart-docs' if stale else 'up to date'}")
        return int(stale)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
