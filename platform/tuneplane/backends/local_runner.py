"""Runs one local job's training process and records its exit code:
`python -m tuneplane.backends.local_runner DIR [bwrap ... --]`.

It outlives the API that started it, so the exit code is never lost. SIGTERM (a cancel) reaches the whole
process group; the runner ignores it and waits for the training process, which marks its run KILLED.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


def main(folder: Path, sandbox: list[str]) -> int:
    """Run the job in `folder`, inside `sandbox` (bubblewrap's command line, ending in `--`) if given."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cmd = [*sandbox, sys.executable, "-m", "tuneplane.train", "--spec", str(folder / "spec.yaml")]
    # Unsandboxed, the training process gets SIGTERM's default back. A sandbox keeps ignoring it (a cancel must
    # not kill bubblewrap, which would kill the job at once) and the training process restores it itself.
    restore = None if sandbox else (lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    code = subprocess.call(cmd, cwd=folder, preexec_fn=restore)
    tmp = folder / "exit_code.tmp"
    tmp.write_text(str(code))
    tmp.rename(folder / "exit_code")  # atomic: a reader never sees a half-written code
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
