"""Every benchmark still runs: each script in bench/ in its `--quick` mode, as a user would start it, printing
its table. The figures are not asserted here (a smoke run measures nothing worth quoting); bench/README-style
numbers come from full runs. A new bench is picked up by its file alone, so none can rot unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Helpers the benches import, not benches themselves.
HELPERS = {"synthetic.py"}
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name not in HELPERS)
# Rich draws a table's header rule with this character whatever the terminal.
TABLE_RULE = "━"


def test_every_bench_has_a_quick_mode() -> None:
    assert BENCHES, "no benches found"
    for name in BENCHES:
        text = (REPO / "bench" / name).read_text()
        assert '"--quick"' in text and '__name__ == "__main__"' in text, f"bench/{name}: no --quick mode"


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_bench_runs_quick(name: str, tiny_dir: Path, request: pytest.FixtureRequest) -> None:
    args = ["--quick"]
    if name == "api_load.py":
        args += ["--db", "both" if _postgres_runs(request) else "sqlite"]
    if name == "preference_step.py":
        args += ["--model", str(tiny_dir)]
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"bench/{name} --quick failed:\n{output[-4000:]}"
    assert TABLE_RULE in done.stdout, f"bench/{name} --quick printed no table:\n{output[-4000:]}"


def _postgres_runs(request: pytest.FixtureRequest) -> bool:
    try:
        request.getfixturevalue("postgres_url")
    except pytest.skip.Exception:
        return False
    return True
