"""The API alone (no reconciler) on uvicorn, for tests that load it from another process:
`python -m tests.support.app_server CONFIG.yaml PORT`."""

from __future__ import annotations

import sys


def main(config_path: str, port: int) -> None:
    import uvicorn

    from tuneplane.api import create_app
    from tuneplane.config import load_config

    app = create_app(load_config(config_path), run_reconciler=False)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
