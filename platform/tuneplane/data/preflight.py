"""Data preflight: scan (or sample) every source of a spec the way training will read it, and report.

Counts per source, malformed records as `uri:line: reason`, token-length histogram, truncation, the share
of tokens trained on, and a few rendered samples with masked and trained spans told apart. For a `preference`
source, `lengths` are the chosen sides' token lengths, `rejected_lengths` the rejected ones', and the samples
are `pair_samples` (prompt, chosen, rejected). In the same pass,
the quality section (data/quality.py): exact and near duplicates within and across training sources, and the
eval sets' overlap with training data. Eval sets are scanned first so training records are only streamed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tuneplane.data.preference import PairExample, PreferenceStream
from tuneplane.data.quality import Item, QualityScan
from tuneplane.data.records import RawRecord, ReadBudgetSpent, read_budget
from tuneplane.data.stream import InstructionStream, SourceStats
from tuneplane.data.templates import IGNORE_INDEX
from tuneplane.errors import DataError
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec

SAMPLE_TOKENS = 2048  # a sample shows its first tokens: enough to check the masking, bounded in size
HISTOGRAM_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 1 << 40)
Feed = Callable[[Sequence[Item]], object]  # where a source's conversations go for the quality figures


@dataclass
class SampleSpan:
    text: str
    trained: bool


@dataclass
class PairSample:
    prompt: list[SampleSpan]  # shared by both sides, all masked
    chosen: list[SampleSpan]
    rejected: list[SampleSpan]


@dataclass
class SourceReport:
    name: str
    uri: str
    files: int
    stats: SourceStats
    lengths: list[int] = field(default_factory=list)
    samples: list[list[SampleSpan]] = field(default_factory=list)
    fatal: str | None = None  # the error that stopped the scan (on_error: fail, or too many bad records)
    time_limited: bool = (
        False  # the preflight's budget (time or bytes) ran out before this source was read through
    )
    preference: bool = False  # a `preference` source: pairs, counted as examples
    rejected_lengths: list[int] = field(default_factory=list)
    pair_samples: list[PairSample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fatal is None and (self.stats.examples > 0 or self.time_limited)

    def histogram(self, lengths: list[int] | None = None) -> list[tuple[str, int]]:
        """Token lengths (default `lengths`: the examples, or the chosen sides) in HISTOGRAM_EDGES buckets."""
        lengths = self.lengths if lengths is None else lengths
        if not lengths:
            return []
        counts, _ = np.histogram(lengths, bins=HISTOGRAM_EDGES)
        out = []
        for lo, hi, n in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:], counts, strict=True):
            if n:
                out.append((f"{lo}-{hi - 1}" if hi < 1 << 40 else f">={lo}", int(n)))
        return out


@dataclass
class PreflightReport:
    sources: list[SourceReport]
    max_seq_len: int
    quality: dict[str, Any] = field(default_factory=dict)  # see preflight(): dedup, contamination, summary

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
                    # Rendered examples as spans of text, `trained` where the loss counts (what the CLI colours).
                    "samples": [[asdict(span) for span in sample] for sample in s.samples],
                    **_pair_figures(s),
                }
                for s in self.sources
            ],
            "quality": self.quality,
        }


def _pair_figures(s: SourceReport) -> dict[str, Any]:
    """What a preference source adds to its entry: the rejected sides' lengths beside the chosen ones'."""
    if not s.preference:
        return {}
    mean = {
        k: round(float(np.mean(v)), 1) if v else 0.0
        for k, v in (("chosen", s.lengths), ("rejected", s.rejected_lengths))
    }
    return {
        "pairs": s.stats.examples,
        "chosen_length_mean": mean["chosen"],
        "rejected_length_mean": mean["rejected"],
        "rejected_length_histogram": dict(s.histogram(s.rejected_lengths)),
        "pair_samples": [asdict(pair) for pair in s.pair_samples],
    }


def preflight(
    spec: TuningSpec,
    tokenizer: Any,
    max_records: int | None = None,
    samples: int = 2,
    time_budget_s: float | None = None,
    quality: bool = True,
    max_read_bytes: int | None = None,
) -> PreflightReport:
    """Scan each training and eval source (up to `max_records` records each) through the real pipeline; with a
    time budget (and a budget of decompressed bytes read, `max_read_bytes`), sources not read through within
    it are reported as such (`time_limited`), not as errors; the budget holds inside a record too.
    `quality=False` leaves out the duplicate and contamination figures (the benchmark's baseline)."""
    with read_budget(max_read_bytes, time_budget_s) as budget:
        return _preflight(spec, tokenizer, max_records, samples, budget.deadline, quality)


def _preflight(
    spec: TuningSpec, tokenizer: Any, max_records: int | None, samples: int, deadline: float, quality: bool
) -> PreflightReport:
    data, seed = spec.data, spec.hyperparameters.seed
    evals = [*data.eval_sources, *spec.eval.zero_shot_sources]
    scan = QualityScan(data) if quality else None
    try:
        # Eval sets first: training records are then checked against them as they stream by.
        scanned = [
            _scan_source(data, source, tokenizer, seed, max_records, samples, deadline, feed)
            for source, feed in _feeds(scan, evals, data.sources)
        ]
        reports = scanned[len(evals) :] + scanned[: len(evals)]  # reported in spec order: training first
        return PreflightReport(
            reports, data.max_seq_len, _quality(scan, reports, max_records) if scan else {}
        )
    finally:
        if scan is not None:
            scan.close()


def _feeds(
    scan: QualityScan | None, evals: list[SourceSpec], train: list[SourceSpec]
) -> list[tuple[SourceSpec, Feed]]:
    """Each source with where its conversations go: eval sets first, then training sources."""
    if scan is None:
        return [(s, lambda items: None) for s in [*evals, *train]]
    feeds: list[tuple[SourceSpec, Feed]] = [
        (s, functools.partial(scan.add_eval, scan.add_eval_set(s.display_name))) for s in evals
    ]
    return feeds + [(s, functools.partial(scan.add_train, scan.add_source(s.display_name))) for s in train]


def _quality(scan: QualityScan, reports: list[SourceReport], max_records: int | None) -> dict[str, Any]:
    covers = _coverage(reports, max_records)
    summary = scan.summary() if covers == "every record" else f"{scan.summary()} [{covers}]"
    return {
        "dedup": scan.dedup(),
        "contamination": scan.contamination(),
        "covers": covers,
        "summary": summary,
    }


def _coverage(reports: list[SourceReport], max_records: int | None) -> str:
    """What the quality figures are computed over: everything, or only what the scan read."""
    limits = []
    if max_records is not None and any(r.stats.records >= max_records for r in reports):
        limits.append(f"at most {max_records} records per source")
    if any(r.time_limited for r in reports):
        limits.append("read budget ran out")
    if any(r.fatal for r in reports):
        limits.append("a source stopped early")
    return f"records scanned only: {', '.join(limits)}" if limits else "every record"


def _scan_source(
    data: DataSpec,
    source: SourceSpec,
    tokenizer: Any,
    seed: int,
    max_records: int | None,
    samples: int,
    deadline: float,
    feed: Feed,
) -> SourceReport:
    # One source alone through the stream machinery (same reader, renderer, tokenizer, limits as training).
    single = data.model_copy(update={"sources": [source], "eval_sources": [], "holdout_fraction": 0.0})
    preference = source.format == "preference"
    stream: InstructionStream | PreferenceStream
    try:
        stream = (PreferenceStream if preference else InstructionStream)(single, tokenizer, seed=seed)
    except DataError as exc:
        return SourceReport(
            source.display_name, source.uri, 0, SourceStats(source.display_name), fatal=str(exc)
        )
    reader = stream.readers[0]
    report = SourceReport(
        source.display_name, source.uri, len(reader.files), stream.stats[0], preference=preference
    )
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
            if isinstance(stream, PreferenceStream):
                _scan_pairs(stream, chunk, report, samples, feed)
            else:
                _scan_examples(stream, chunk, report, samples, feed)
    except ReadBudgetSpent:
        report.time_limited = True
    except DataError as exc:
        report.fatal = str(exc)
    return report


def _scan_examples(
    stream: InstructionStream,
    chunk: list[tuple[int, RawRecord]],
    report: SourceReport,
    samples: int,
    feed: Feed,
) -> None:
    conversations = stream.conversations(chunk)
    feed([(key, conversation) for _, key, conversation in conversations])
    for example in stream.tokenize_conversations(conversations):
        report.lengths.append(len(example))
        if len(report.samples) < samples:
            report.samples.append(_spans(example.input_ids, example.labels, stream.tokenizer))


def _scan_pairs(
    stream: PreferenceStream,
    chunk: list[tuple[int, RawRecord]],
    report: SourceReport,
    samples: int,
    feed: Feed,
) -> None:
    pairs = stream.pairs(chunk)
    # Duplicates and contamination are judged on the chosen side (what to_conversation makes of a pair).
    feed([(key, pair.conversation("chosen")) for _, key, pair in pairs])
    for example in stream.tokenize_pairs(pairs):
        report.lengths.append(len(example.chosen))
        report.rejected_lengths.append(len(example.rejected))
        if len(report.pair_samples) < samples:
            report.pair_samples.append(_pair_sample(example, stream.tokenizer))


def _pair_sample(example: PairExample, tokenizer: Any) -> PairSample:
    cut = example.prompt_len
    prompt = example.chosen.input_ids[:cut]
    return PairSample(
        _spans(prompt, np.full(len(prompt), IGNORE_INDEX), tokenizer),
        *(_spans(e.input_ids[cut:], e.labels[cut:], tokenizer) for e in (example.chosen, example.rejected)),
    )


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
