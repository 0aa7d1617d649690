"""Reading records from local files and a real S3 endpoint (moto_server), and clear errors for bad input."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tuneplane.data.records import MAX_RECORD_BYTES, expand, read_records
from tuneplane.errors import DataError

ROWS = [{"instruction": f"Reverse {i}", "input": "", "output": str(i)[::-1]} for i in range(2500)]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _write_all_kinds(put, rows=ROWS) -> dict[str, str]:
    """Write the same rows as .jsonl, .jsonl.gz, .jsonl.zst and .parquet (small row groups) via `put`."""
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=700)
    blobs = {
        "a.jsonl": _jsonl(rows),
        "a.jsonl.gz": gzip.compress(_jsonl(rows)),
        "a.jsonl.zst": zstandard.ZstdCompressor().compress(_jsonl(rows)),
        "a.parquet": sink.getvalue().to_pybytes(),
    }
    return {name: put(name, blob) for name, blob in blobs.items()}


def _local_put(tmp_path: Path):
    def put(name: str, blob: bytes) -> str:
        (tmp_path / name).write_bytes(blob)
        return str(tmp_path / name)

    return put


def _s3_put(fs, base: str):
    def put(name: str, blob: bytes) -> str:
        fs.pipe(f"{base}/{name}", blob)
        return f"{base}/{name}"

    return put


@pytest.mark.parametrize("store", ["local", "s3"])
def test_every_file_kind_reads_the_same_records(store, tmp_path, request) -> None:
    if store == "s3":
        fs, base = request.getfixturevalue("s3_bucket")
        uris = _write_all_kinds(_s3_put(fs, base))
    else:
        uris = _write_all_kinds(_local_put(tmp_path))
    for name, uri in uris.items():
        records = list(read_records(uri, required_columns=("instruction", "output")))
        assert [r.data for r in records] == ROWS, name
        assert [r.line for r in records] == list(range(1, len(ROWS) + 1)), name
        assert records[0].key == f"{uri}:1"


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"])
def test_resume_from_a_line_continues_exactly_there(tmp_path, name) -> None:
    uri = _write_all_kinds(_local_put(tmp_path))[name]
    tail = list(read_records(uri, start_line=1234))
    assert [r.line for r in tail] == list(range(1235, len(ROWS) + 1))
    assert tail[0].data == ROWS[1234]


def test_globs_expand_sorted_and_s3_uris_keep_their_scheme(s3_bucket) -> None:
    fs, base = s3_bucket
    for i in (2, 0, 1):
        fs.pipe(f"{base}/shards/part-{i}.jsonl", _jsonl(ROWS[:3]))
    fs.pipe(f"{base}/shards/readme.txt", b"x")
    assert expand(f"{base}/shards/*.jsonl") == [f"{base}/shards/part-{i}.jsonl" for i in range(3)]
    with pytest.raises(DataError, match="no files match"):
        expand(f"{base}/nothing/*.jsonl")


def test_malformed_lines_are_reported_with_uri_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"instruction": "a", "output": "b"}\n'
        b'{"instruction": "a", "output": \n'  # bad JSON
        b"\n"  # blank lines are skipped, but still counted
        b'["a list"]\n'
        b'{"instruction": "caf\xe9"}\n'  # latin-1 byte: not UTF-8
        b'{"instruction": "ok", "output": "fine"}\n'
    )
    records = list(read_records(str(path)))
    errors = {r.line: r.error for r in records if r.error}
    assert [r.line for r in records if r.data] == [1, 6]
    assert errors[2].startswith("invalid JSON")
    assert errors[4] == "expected a JSON object, got list"
    assert errors[5].startswith("not valid UTF-8")


def test_huge_line_is_reported_and_skipped_without_reading_it_whole(tmp_path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(b'{"a": "' + b"x" * (MAX_RECORD_BYTES + 10) + b'"}\n')
        fh.write(b'{"instruction": "after", "output": "ok"}\n')
    records = list(read_records(str(path)))
    assert records[0].error and "over" in records[0].error and records[0].line == 1
    assert records[1].data == {"instruction": "after", "output": "ok"} and records[1].line == 2


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_compressed_file_names_the_file_and_line(tmp_path, suffix) -> None:
    # Incompressible content spread over several compressed blocks, so some decode completely before the cut.
    rows = [
        {"instruction": f"Echo {i}", "output": random.Random(i).randbytes(24).hex()} for i in range(20000)
    ]
    raw = _jsonl(rows)
    blob = gzip.compress(raw) if suffix == ".gz" else zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    delivered = []
    with pytest.raises(DataError) as info:
        for record in read_records(str(path)):
            delivered.append(record)
    assert str(info.value).startswith(f"{path}:")
    assert "truncated or corrupt" in str(info.value)
    # Every complete record before the cut was delivered, and the error names the line after them.
    assert len(delivered) > 100
    assert [r.data for r in delivered] == rows[: len(delivered)]
    assert info.value.line == len(delivered) + 1


def test_corrupt_zstd_and_not_gzip(tmp_path) -> None:
    (tmp_path / "x.jsonl.zst").write_bytes(b"not zstd at all" * 10)
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip at all" * 10)
    for name in ("x.jsonl.zst", "x.jsonl.gz"):
        with pytest.raises(DataError, match="truncated or corrupt"):
            list(read_records(str(tmp_path / name)))


def test_empty_file_gives_no_records(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(read_records(str(tmp_path / "empty.jsonl"))) == []


def test_wrong_parquet_schema_names_the_missing_column(tmp_path) -> None:
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "a"}]), tmp_path / "w.parquet")
    with pytest.raises(DataError) as info:
        list(read_records(str(tmp_path / "w.parquet"), required_columns=("instruction", "output")))
    assert "no column ['instruction', 'output']" in str(info.value)
    assert "question, answer" in str(info.value)


def test_not_a_parquet_file(tmp_path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_records(str(tmp_path / "bad.parquet")))


def test_unknown_extension_and_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown file type"):
        list(read_records(str(tmp_path / "a.csv")))
    with pytest.raises(DataError, match="file not found"):
        list(read_records(str(tmp_path / "missing.jsonl")))


def test_s3_streaming_memory_stays_bounded(s3_bucket) -> None:
    """A 64 MiB shard is streamed record by record: peak Python memory stays far below the object size."""
    fs, base = s3_bucket
    line = json.dumps({"instruction": "x" * 900, "output": "y"}).encode() + b"\n"
    blob = line * (64 * 2**20 // len(line))
    fs.pipe(f"{base}/big.jsonl", blob)
    tracemalloc.start()
    count = 0
    for record in read_records(f"{base}/big.jsonl"):
        count += record.data is not None
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == blob.count(b"\n")
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_cli_reports_bad_data_without_a_traceback(tmp_path, tiny_dir) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"name: bad\nmodel: {{base: {tiny_dir}}}\ndata: {{sources: [{{uri: {data}, format: alpaca}}]}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "tuneplane.cli", "validate", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert f"{data}:2:" in " ".join((out.stderr + out.stdout).split())
