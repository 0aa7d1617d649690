"""`tuneplane validate` and `tuneplane spec schema`, and loading a tokenizer from object storage."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.support.config import REPO
from tuneplane.cli import app
from tuneplane.data import preflight
from tuneplane.pretrained import load_tokenizer, local_copy
from tuneplane.spec import ModelSpec, load_spec

runner = CliRunner()


def _tiny_job(tmp_path: Path, tiny_dir: Path) -> Path:
    text = (REPO / "jobs" / "tiny-cpu.yaml").read_text().replace("../build/tiny-llama", str(tiny_dir))
    text = text.replace("uri: data/", f"uri: {REPO}/jobs/data/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_validate_the_tiny_job_reports_every_source(tmp_path, tiny_dir) -> None:
    result = runner.invoke(app, ["validate", str(_tiny_job(tmp_path, tiny_dir)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name["tasks-alpaca"]["records"] == 2000
    assert by_name["tasks-alpaca"]["examples"] == 2000
    assert by_name["heldout-tasks"]["records"] == 200
    assert 0.05 < report["trained_token_share"] < 0.6
    assert sum(by_name["cot-arith"]["length_histogram"].values()) == 300


def test_validate_human_report_shows_masked_samples(tmp_path, tiny_dir) -> None:
    result = runner.invoke(app, ["validate", str(_tiny_job(tmp_path, tiny_dir)), "--max-records", "50"])
    assert result.exit_code == 0, result.output
    assert "Data preflight" in result.output
    assert "### Response:" in result.output
    assert "data ok" in result.output


def test_bad_spec_exits_2_naming_the_field(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: x\nmodel: {base: a}\ndata: {sources: [{uri: a.jsonl, format: alpaca, weight: -1}]}\n"
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "data.sources[0].weight" in result.output
    assert "Traceback" not in result.output


def test_preflight_counts_bad_records_with_skip(tmp_path, tokenizer) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 200 + "not json\n")
    spec_path = tmp_path / "j.yaml"
    spec_path.write_text(
        "name: j\nmodel: {base: ./m}\n"
        f"data: {{sources: [{{uri: {data}, format: alpaca, on_error: skip}}]}}\n"
    )
    report = preflight(load_spec(spec_path), tokenizer)
    assert report.ok
    assert report.sources[0].stats.errors == 1
    assert report.sources[0].stats.error_samples == [f"{data}:201: invalid JSON: Expecting value at column 1"]


def test_schema_command_prints_json_schema() -> None:
    result = runner.invoke(app, ["spec", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"].startswith("Tuneplane tuning spec")


def test_tokenizer_loads_from_an_s3_uri_once(tiny_dir, s3_bucket, tmp_path, monkeypatch) -> None:
    fs, base = s3_bucket
    fs.put(str(tiny_dir) + "/", f"{base}/models/tiny/", recursive=True)
    fs.invalidate_cache()
    monkeypatch.setenv("TUNEPLANE_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(ModelSpec(base=f"{base}/models/tiny"))
    assert tokenizer.decode(tokenizer("Reverse the word.")["input_ids"]) == "Reverse the word."
    copy = local_copy(f"{base}/models/tiny", ("tokenizer*",))
    assert not (copy / "model.safetensors").exists()  # only what was asked for is copied
    assert local_copy(f"{base}/models/tiny", ("tokenizer*",)) == copy
