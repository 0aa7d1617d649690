"""Data pipeline benchmark: packing efficiency, single-core throughput, S3 (moto) vs local reads, and the
cost of the duplicate and contamination checks.

Prints one table of side-by-side figures measured in this run. Goals (issue #2): packed efficiency >= 0.98,
full pipeline >= 200k tokens/s on one core, S3/local read throughput >= 0.5; (issue #12) the preflight with
quality checks keeps >= 0.5 of the throughput without them.

    python bench/data_pipeline.py [--records 20000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One core, one tokenizer thread: the figure is per core.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ALL_CORES = set(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else set()
BENCH_CORE = min(ALL_CORES) if ALL_CORES else 0
if ALL_CORES:
    os.sched_setaffinity(0, {BENCH_CORE})

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tuneplane.data import InstructionStream, preflight  # noqa: E402
from tuneplane.data.quality import build_filter  # noqa: E402
from tuneplane.data.records import read_records  # noqa: E402
from tuneplane.spec import DataSpec, SourceSpec, TuningSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import make_dataset, make_tokenizer  # noqa: E402

MAX_SEQ_LEN = 2048


def run_stream(spec: DataSpec, tokenizer, desc: str, micro_batch: int = 8) -> dict[str, float]:
    stream = InstructionStream(spec, tokenizer, micro_batch_size=micro_batch)
    real = slots = trained = 0
    start = time.perf_counter()
    with tqdm(desc=desc, unit="tok", unit_scale=True, leave=False, disable=None) as bar:
        for batch in stream:
            real += batch.num_tokens
            slots += batch.num_slots
            trained += batch.num_trained_tokens
            bar.update(batch.num_tokens)
    seconds = time.perf_counter() - start
    return {"efficiency": real / slots, "tokens_per_s": real / seconds, "tokens": real, "seconds": seconds}


def read_throughput(uri: str, nbytes: int, desc: str) -> float:
    """File bytes per second through the record reader (read + split lines + parse JSON)."""
    start = time.perf_counter()
    for _ in tqdm(read_records(uri), desc=desc, unit="rec", leave=False, disable=None):
        pass
    return nbytes / (time.perf_counter() - start)


def quality_rates(train: Path, heldout: Path, tokenizer) -> dict[str, float]:
    """Records/s of the preflight (training set + an eval set) without and with the quality checks (best of
    two runs each: the machine is shared), and of the training drop-set pass (near dedup + decontamination)."""
    sources = {"sources": [{"uri": str(train), "format": "alpaca"}]}
    spec = TuningSpec.model_validate(
        {
            "name": "bench",
            "model": {"base": "unused"},
            "data": {**sources, "eval_sources": [{"uri": str(heldout), "format": "alpaca"}]},
        }
    )
    rates: dict[str, float] = {}
    for label, quality in (("plain", False), ("quality", True)) * 2:
        start = time.perf_counter()
        report = preflight(spec, tokenizer, samples=0, quality=quality)
        records = sum(s.stats.records for s in report.sources)
        rates[label] = max(rates.get(label, 0.0), records / (time.perf_counter() - start))
    checks = spec.model_copy(
        update={"data": spec.data.model_copy(update={"dedup": "near", "decontaminate": True})}
    )
    start = time.perf_counter()
    built = build_filter(checks, seed=0)
    rates["filter"] = built.figures["records"] / (time.perf_counter() - start)
    return rates


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    # The server stands in for remote storage: it gets the other cores, not the one being measured.
    cores = ALL_CORES - {BENCH_CORE} or ALL_CORES
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if hasattr(os, "sched_setaffinity") else None,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return proc, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--quick", action="store_true", help="2,000 records: a smoke run, not a measurement")
    args = parser.parse_args()
    records = 2000 if args.quick else args.records
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="tuneplane-bench-"))
    try:
        with console.status("generating data and tokenizer"):
            data = make_dataset(work, records)
            tokenizer = make_tokenizer(work, data)
        source = SourceSpec(uri=str(data), format="alpaca")
        packed = run_stream(
            DataSpec(sources=[source], max_seq_len=MAX_SEQ_LEN, pack_buffer=512), tokenizer, "packed"
        )
        padded = run_stream(
            DataSpec(sources=[source], max_seq_len=MAX_SEQ_LEN, packing=False), tokenizer, "padded"
        )
        full_pad = padded["tokens"] / (np.ceil(records / 8) * 8 * MAX_SEQ_LEN)
        (work / "heldout").mkdir()
        heldout = make_dataset(work / "heldout", max(records // 10, 200), seed=1)
        quality = quality_rates(data, heldout, tokenizer)

        proc, _ = start_moto()
        try:
            import s3fs

            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put_file(str(data), "bench/mix.jsonl")
            size = data.stat().st_size
            local_bps = read_throughput(str(data), size, "read local")
            s3_bps = read_throughput("s3://bench/mix.jsonl", size, "read s3")
            s3_stream = run_stream(
                DataSpec(
                    sources=[SourceSpec(uri="s3://bench/mix.jsonl", format="alpaca")], max_seq_len=MAX_SEQ_LEN
                ),
                tokenizer,
                "packed from s3",
            )
        finally:
            proc.terminate()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"Data pipeline ({records:,} alpaca records, max_seq_len {MAX_SEQ_LEN}, one core)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("vs", justify="right")
    table.add_column("goal", justify="right")
    table.add_row(
        "packing efficiency, packed (real tokens / slots)", f"{packed['efficiency']:.3f}", "", ">= 0.98"
    )
    table.add_row(
        "  padded to longest in batch (8 rows)",
        f"{padded['efficiency']:.3f}",
        f"packed x{packed['efficiency'] / padded['efficiency']:.2f}",
        "",
    )
    table.add_row(
        "  padded to max_seq_len", f"{full_pad:.3f}", f"packed x{packed['efficiency'] / full_pad:.2f}", ""
    )
    table.add_row(
        "pipeline tokens/s, local, packed (read+parse+render+tokenize+pack)",
        f"{packed['tokens_per_s']:,.0f}",
        "",
        ">= 200,000",
    )
    table.add_row(
        "pipeline tokens/s, S3 (moto), packed",
        f"{s3_stream['tokens_per_s']:,.0f}",
        f"{s3_stream['tokens_per_s'] / packed['tokens_per_s']:.2f} of local",
        "",
    )
    table.add_row("record read MB/s, local (read + parse)", f"{local_bps / 1e6:.1f}", "", "")
    table.add_row(
        "record read MB/s, S3 (moto on loopback)",
        f"{s3_bps / 1e6:.1f}",
        f"{s3_bps / local_bps:.2f} of local",
        ">= 0.5",
    )
    table.add_row(
        "preflight records/s, no quality checks (read+render+tokenize)", f"{quality['plain']:,.0f}", "", ""
    )
    table.add_row(
        "  with quality checks (exact + near dups, contamination)",
        f"{quality['quality']:,.0f}",
        f"{quality['quality'] / quality['plain']:.2f} of without",
        ">= 0.5",
    )
    table.add_row(
        "drop-set pass records/s (near dedup + decontaminate, no tokenizing)",
        f"{quality['filter']:,.0f}",
        "",
        "",
    )
    console.print(table)


if __name__ == "__main__":
    main()
