"""Data preflight: scan (or sample) every source of a spec the way training will read it, and report.

Counts per source, malformed records as `uri:line: reason`, token-length histogram, truncation, the share
of tokens trained on, and a few rendered samples with masked and trained spans told apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tuneplane.data.records import RawRecord
from tuneplane.data.stream import InstructionStream, SourceStats
from tuneplane.data.templates import IGNORE_INDEX
from tuneplane.errors import DataError
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec

SAMPLE_TOKENS = 2048  # a sample shows its first tokens: enough to check the masking, bounded in size
HISTOGRAM_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 1 << 40)


@dataclass
class SampleSpan:
    text: str
    trained: bool


@dataclass
class SourceReport:
    name: str
    uri: str
    files: int
    stats: SourceStats
    lengths: list[int] = field(default_factory=list)
    samples: list[list[SampleSpan]] = field(default_factory=list)
    fatal: str | None = None  # the error that stopped the scan (on_error: fail, or too many bad records)
    time_limited: bool = False  # the preflight's time budget ran out before this source was read through

    @property
    def ok(self) -> bool:
        return self.fatal is None and (self.stats.examples > 0 or self.time_limited)

    def histogram(self) -> list[tuple[str, int]]:
        if not self.lengths:
            return []
        counts, _ = np.histogram(self.lengths, bins=HISTOGRAM_EDGES)
        out = []
        for lo, hi, n in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], counts, strict=True):
            if n:
                out.append((f"{lo}-{hi - 1}" if hi < 1 << 40 else f">={lo}", int(n)))
        return out


@dataclass
class PreflightReport:
    sources: list[SourceReport]
    max_seq_len: int

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sources)

    @property
    def trained_share(self) -> float:
        tokens = sum(s.stats.tokens for s in self.sources)
        return sum(s.stats.trained_tokens for s in self.sources) / tokens if tokens else 0.0

    def errors(self) -> list[str]:
        out = []
        for s in self.sources:
            if s.fatal:
                out.append(s.fatal)
            elif s.stats.examples == 0:
                out.append(f"{s.uri}: no usable examples")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "max_seq_len": self.max_seq_len,
            "trained_token_share": round(self.trained_share, 4),
            "errors": self.errors(),
            "sources": [
                {
                    "name": s.name,
                    "uri": s.uri,
                    "files": s.files,
                    "records": s.stats.records,
                    "examples": s.stats.examples,
                    "bad_records": s.stats.errors,
                    "bad_record_samples": s.stats.error_samples,
                    "truncated": s.stats.truncated,
                    "dropped_no_response": s.stats.dropped_no_response,
                    "tokens": s.stats.tokens,
                    "trained_tokens": s.stats.trained_tokens,
                    "length_histogram": dict(s.histogram()),
                    "fatal": s.fatal,
                    "time_limited": s.time_limited,
                }
                for s in self.sources
            ],
        }


def preflight(
    spec: TuningSpec,
    tokenizer: Any,
    max_records: int | None = None,
    samples: int = 2,
    time_budget_s: float | None = None,
) -> PreflightReport:
    """Scan each training and eval source (up to `max_records` records each) through the real pipeline; with a
    time budget, sources not read through in time are reported as such (`time_limited`), not as errors."""
    deadline = time.monotonic() + time_budget_s if time_budget_s is not None else float("inf")
    all_sources = list(spec.data.sources) + list(spec.data.eval_sources) + list(spec.eval.zero_shot_sources)
    reports = [
        _scan_source(spec.data, source, tokenizer, spec.hyperparameters.seed, max_records, samples, deadline)
        for source in all_sources
    ]
    return PreflightReport(reports, spec.data.max_seq_len)


def _scan_source(
    data: DataSpec,
    source: SourceSpec,
    tokenizer: Any,
    seed: int,
    max_records: int | None,
    samples: int,
    deadline: float,
) -> SourceReport:
    # One source alone through the stream machinery (same reader, renderer, tokenizer, limits as training).
    single = data.model_copy(update={"sources": [source], "eval_sources": [], "holdout_fraction": 0.0})
    try:
        stream = InstructionStream(single, tokenizer, seed=seed)
    except DataError as exc:
        return SourceReport(
            source.display_name, source.uri, 0, SourceStats(source.display_name), fatal=str(exc)
        )
    reader = stream.readers[0]
    report = SourceReport(source.display_name, source.uri, len(reader.files), stream.stats[0])
    try:
        while not reader.cursor.done_in_epoch and (max_records is None or report.stats.records < max_records):
            if time.monotonic() > deadline:
                report.time_limited = True
                break
            chunk: list[tuple[int, RawRecord]] = []
            while len(chunk) < 256 and (
                max_records is None or report.stats.records + len(chunk) < max_records
            ):
                record = reader.next()
                if record is None:  # one full pass read
                    break
                chunk.append((0, record))
            for example in stream.tokenize_records(chunk):
                report.lengths.append(len(example))
                if len(report.samples) < samples:
                    report.samples.append(_spans(example.input_ids, example.labels, tokenizer))
    except DataError as exc:
        report.fatal = str(exc)
    return report


def _spans(ids: np.ndarray, labels: np.ndarray, tokenizer: Any) -> list[SampleSpan]:
    """A rendered example as masked and trained spans, shown up to SAMPLE_TOKENS tokens."""
    spans: list[SampleSpan] = []
    start = 0
    ids, labels = ids[:SAMPLE_TOKENS], labels[:SAMPLE_TOKENS]
    trained = labels != IGNORE_INDEX
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            spans.append(SampleSpan(tokenizer.decode(ids[start:i].tolist()), bool(trained[start])))
            start = i
    return spans
