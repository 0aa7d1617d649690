"""Reading raw records from object storage: JSONL (plain, .gz, .zst) and Parquet, streamed.

Memory stays bounded: files are read through a buffered stream (never downloaded whole), Parquet row group
by row group. Every problem is reported as `uri:line: reason` (Parquet rows count as lines, from 1).
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import io
import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from tuneplane.errors import DataError
from tuneplane.files import NotAllowed, open_local

# s3fs re-reads a block per readline on a raw binary file; a large block plus a BufferedReader streams at
# full speed (see shared stack notes). Peak memory per open file is a few blocks.
READ_BLOCK_SIZE = 4 * 1024 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024
PARQUET_BATCH_ROWS = 1024
MAX_FILES = 10_000  # files one source may name: each is listed, sharded and checked


class ReadBudgetSpent(Exception):
    """The read budget of this context ran out (`read_budget`): a bounded scan stops here, it is no data error."""


@dataclass
class ReadBudget:
    """Bytes (decompressed: what a reader really processes) and seconds a bounded scan may spend reading."""

    max_bytes: int | None
    deadline: float  # time.monotonic()
    spent: int = 0

    def charge(self, count: int) -> None:
        self.spent += count
        if self.max_bytes is not None and self.spent > self.max_bytes:
            raise ReadBudgetSpent(f"read {self.spent >> 20} MiB, over the {self.max_bytes >> 20} MiB budget")
        if time.monotonic() > self.deadline:
            raise ReadBudgetSpent("the time budget ran out")


_BUDGET: contextvars.ContextVar[ReadBudget | None] = contextvars.ContextVar("read_budget", default=None)


@contextlib.contextmanager
def read_budget(max_bytes: int | None, seconds: float | None) -> Iterator[ReadBudget]:
    """Bound every read in this context: past `max_bytes` decompressed bytes or `seconds`, the read in progress
    raises ReadBudgetSpent, inside a record too (a 10 GiB line of a gzip bomb is cut, not read through)."""
    budget = ReadBudget(max_bytes, time.monotonic() + seconds if seconds is not None else float("inf"))
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record, or the reason it could not be read (`data is None`)."""

    uri: str
    line: int
    data: dict[str, Any] | None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.uri}:{self.line}"


def expand(uri: str) -> list[str]:
    """All files a source URI (possibly a glob) names, in a stable order, as full URIs."""
    try:
        fs, path = url_to_fs(uri)
    except (ImportError, ValueError) as exc:  # unknown scheme, or its filesystem package is not installed
        raise DataError(uri, f"cannot open: {exc}") from None
    try:
        if fs.isdir(path):
            raise DataError(uri, "is a directory; name files or a glob such as dir/*.jsonl")
        paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path] if fs.exists(path) else []
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(uri, f"cannot list: {exc}") from None
    if not paths:
        raise DataError(uri, "no files match")
    if len(paths) > MAX_FILES:
        raise DataError(uri, f"matches {len(paths)} files, more than the {MAX_FILES} one source may have")
    files = [p for p in paths if not fs.isdir(p)]
    return [fs.unstrip_protocol(p) if "://" in uri else p for p in files]


def file_kind(uri: str) -> str:
    name = uri.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    for suffix in (".jsonl", ".json", ".ndjson"):
        for comp in ("", ".gz", ".zst", ".zstd"):
            if name.endswith(suffix + comp):
                return "jsonl" + (comp.replace(".zstd", ".zst") if comp else "")
    raise DataError(uri, "unknown file type; expected .jsonl, .jsonl.gz, .jsonl.zst or .parquet")


def read_records(
    uri: str, start_line: int = 0, required_columns: tuple[str, ...] = ()
) -> Iterator[RawRecord]:
    """Records of one file from line `start_line + 1` on. Bad records come back with `error` set.

    A failure that ends the file (truncated gzip, unreadable Parquet) is raised as DataError.
    """
    kind = file_kind(uri)
    if kind == "parquet":
        yield from _read_parquet(uri, start_line, required_columns)
    else:
        yield from _read_jsonl(uri, kind, start_line)


class _Read1Adapter(io.RawIOBase):
    """Lets a BufferedReader pull one decompressed chunk at a time (`read1`), so a truncated stream fails
    only when the missing bytes are needed: every complete line before the cut is still delivered."""

    def __init__(self, source: Any):
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._source.close()
        super().close()


def open_binary(uri: str) -> Any:
    """A file of a source opened for reading: a local one through `tuneplane.files` (a regular file inside the
    roots this process or request is confined to, checked on the open descriptor, never blocking), object
    storage through its fsspec filesystem with large blocks."""
    fs, path = url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        return open_local(path)
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE)


def _open_text_stream(uri: str, kind: str) -> io.BufferedReader:
    raw = open_binary(uri)
    stream: Any = raw
    if kind == "jsonl.gz":
        stream = _Read1Adapter(gzip.GzipFile(fileobj=raw, mode="rb"))
    elif kind == "jsonl.zst":
        stream = _ZstdReader(raw)
    budget = _BUDGET.get()
    if budget is not None:
        stream = _Budgeted(stream, budget)
    return io.BufferedReader(stream, buffer_size=1024 * 1024)


class _Budgeted(io.RawIOBase):
    """Charges every (decompressed) chunk read to a ReadBudget."""

    def __init__(self, source: Any, budget: ReadBudget):
        self._source, self._budget = source, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count: int = self._source.readinto(buffer)
        self._budget.charge(count or 0)
        return count

    def close(self) -> None:
        self._source.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Streaming zstd (multi-frame) that, unlike zstandard's stream_reader, notices a truncated last frame."""

    def __init__(self, raw: Any, chunk: int = 1024 * 1024):
        import zstandard

        self._raw, self._chunk = raw, chunk
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._dobj = self._new()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            data = self._raw.read(self._chunk)
            if not data:
                if self._in_frame:
                    raise EOFError("zstd stream ended inside a frame")
                return 0
            while data:
                self._in_frame = True
                self._pending += self._dobj.decompress(data)
                data = b""
                if self._dobj.eof:  # frame complete; any bytes after it start the next frame
                    data, self._dobj, self._in_frame = self._dobj.unused_data, self._new(), False
        n = min(len(buffer), len(self._pending))
        buffer[:n], self._pending = self._pending[:n], self._pending[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_jsonl(uri: str, kind: str, start_line: int) -> Iterator[RawRecord]:
    import zstandard

    line_no = 0
    try:
        with _open_text_stream(uri, kind) as stream:
            while True:
                raw = stream.readline(MAX_RECORD_BYTES + 1)
                if not raw:
                    return
                line_no += 1
                if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                    while (rest := stream.readline(READ_BLOCK_SIZE)) and not rest.endswith(b"\n"):
                        pass
                    if line_no > start_line:
                        yield RawRecord(uri, line_no, None, f"record over {MAX_RECORD_BYTES // 2**20} MiB")
                    continue
                if line_no <= start_line or not raw.strip():
                    continue
                yield _parse_json_line(uri, line_no, raw)
    except (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError) as exc:
        raise DataError(uri, f"compressed stream is truncated or corrupt ({exc})", line_no + 1) from None
    except FileNotFoundError:
        raise DataError(uri, "file not found") from None
    except NotAllowed:
        raise DataError(uri, NotAllowed.REASON) from None
    except PermissionError as exc:
        raise DataError(uri, f"access denied: {exc}") from None


def _parse_json_line(uri: str, line_no: int, raw: bytes) -> RawRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(uri, line_no, None, f"not valid UTF-8 (byte {exc.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(uri, line_no, None, f"invalid JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(value, dict):
        return RawRecord(uri, line_no, None, f"expected a JSON object, got {type(value).__name__}")
    return RawRecord(uri, line_no, value)


def _read_parquet(uri: str, start_line: int, required_columns: tuple[str, ...]) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_binary(uri) as handle:
            try:
                parquet = pq.ParquetFile(handle)
            except (pa.ArrowInvalid, OSError) as exc:
                raise DataError(uri, f"not a readable Parquet file ({exc})") from None
            columns = parquet.schema_arrow.names
            missing = [c for c in required_columns if c not in columns]
            if missing:
                raise DataError(
                    uri, f"Parquet schema has no column {missing!r} (columns: {', '.join(columns)})"
                )
            row, budget = 0, _BUDGET.get()
            for group in range(parquet.num_row_groups):
                group_rows = parquet.metadata.row_group(group).num_rows
                if row + group_rows <= start_line:  # resume: skip whole row groups without reading them
                    row += group_rows
                    continue
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                    if budget is not None:  # what was really decompressed, not what the file says it holds
                        budget.charge(batch.nbytes)
                    for item in batch.to_pylist():
                        row += 1
                        if row > start_line:
                            yield RawRecord(uri, row, item)
    except FileNotFoundError:
        raise DataError(uri, "file not found") from None
    except NotAllowed:
        raise DataError(uri, NotAllowed.REASON) from None
    except pa.ArrowException as exc:
        raise DataError(uri, f"Parquet read failed: {exc}") from None
