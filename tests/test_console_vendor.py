"""The console's npm libraries: pinned in the repository, never copied into it, installed integrity-checked."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys

import pytest

from tests.support.config import REPO
from tuneplane.devtools import console_vendor


def test_the_repository_keeps_pins_not_copies() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "platform/tuneplane/console/vendor"], cwd=REPO, capture_output=True, text=True
    )
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout == "", f"files of npm packages are committed: {tracked.stdout}"
    for package in console_vendor.packages():
        assert package["integrity"].startswith("sha512-") and package["license"]
        assert (
            package["folder"] == f"{package['name']}-{package['version']}"
        )  # the folder name is the cache key


def test_setup_installed_every_pinned_file() -> None:
    done = subprocess.run(
        [sys.executable, console_vendor.__file__, "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_a_tarball_that_is_not_the_pinned_one_is_refused(monkeypatch, tmp_path) -> None:
    """A registry answering with other bytes (here a local one, over HTTP) gets nothing unpacked."""
    import http.server
    import threading

    payload = b"not the package"

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(console_vendor, "VENDOR", tmp_path)
    pin = dict(console_vendor.packages()[0], folder="elsewhere")
    try:
        with pytest.raises(
            SystemExit, match=re.escape(f"integrity {console_vendor.integrity(payload)} is not the pinned")
        ):
            console_vendor.install(pin)
    finally:
        server.shutdown()
    assert not (tmp_path / "elsewhere").exists()
    assert (
        console_vendor.integrity(payload)
        == "sha512-" + base64.b64encode(hashlib.sha512(payload).digest()).decode()
    )
