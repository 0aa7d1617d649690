"""The committed reference docs (docs/reference) are exactly what the generator writes now, so they never go
stale: after changing the spec, the platform config or a route, run

    python -m tuneplane.devtools.refdocs docs/reference
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuneplane.devtools.refdocs import generate
from tuneplane.spec import json_schema, load_spec

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"
EXPECTED = [
    "api.md",
    "openapi.json",
    "platform-config.md",
    "platform-config.schema.json",
    "spec.md",
    "spec.schema.json",
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert [p.name for p in generate(out)] == EXPECTED
    return out


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_reference_matches_a_fresh_run(generated: Path, name: str) -> None:
    committed = REFERENCE / name
    assert committed.exists(), (
        f"{committed} is missing: run python -m tuneplane.devtools.refdocs docs/reference"
    )
    assert committed.read_bytes() == (generated / name).read_bytes(), (
        f"docs/reference/{name} is stale: run python -m tuneplane.devtools.refdocs docs/reference"
    )


def test_output_does_not_depend_on_the_machine(generated: Path, tmp_path: Path) -> None:
    """Another home folder changes no byte (the config's `home` default is written as ~/.cache/tuneplane)."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "TUNEPLANE_HOME": str(tmp_path / "tuneplane-home")}
    cmd = [sys.executable, "-m", "tuneplane.devtools.refdocs", str(tmp_path / "again")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    for name in EXPECTED:
        assert (tmp_path / "again" / name).read_bytes() == (generated / name).read_bytes(), name


def test_raw_schema_is_the_spec_schema() -> None:
    assert json.loads((REFERENCE / "spec.schema.json").read_text()) == json_schema()


def _leaf_paths(model: BaseModel, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf field a loaded spec has (`[]` for list items), as the reference writes them."""
    out: set[str] = set()
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = prefix + (field.alias or name)
        nested = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, BaseModel)]
        if not nested:
            out.add(key)
        for item in nested:
            out |= _leaf_paths(item, key + ("[]." if isinstance(value, list) else "."))
    return out


def test_spec_reference_mentions_every_leaf_field_of_the_example_job() -> None:
    spec = load_spec(REPO / "jobs" / "tiny-cpu.yaml")
    leaves = _leaf_paths(spec)
    assert {
        "apiVersion",
        "method.r",
        "data.sources[].templates[].prompt",
        "eval.zero_shot_sources[].uri",
    } <= leaves
    text = (REFERENCE / "spec.md").read_text()
    missing = sorted(path for path in leaves if f"| `{path}` |" not in text)
    assert not missing, f"docs/reference/spec.md has no row for {missing}"
