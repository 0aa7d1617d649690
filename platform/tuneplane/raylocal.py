"""A Ray started on this machine (a local job, a test, a benchmark) listens on 127.0.0.1 only and asks for a
token: the one place that says how.

Ray binds its GCS, raylets and workers to the node's IP on every interface and turns `127.0.0.1` given as a node
address into the machine's own address (`ray.init(_node_ip_address=...)` and `ray start --node-ip-address` both
do). Its single-machine mode, named for the platforms it was made for (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`),
makes the node IP the loopback one, and every server then binds to it (seen with `ss -ltnp`). Ray reads the
switch when first imported, so it is set in the environment of a process before that process imports Ray.

Token authentication (`RAY_AUTH_MODE=token`) is on by default for a new local Ray since 2.52, with one token for
every cluster a user starts (`~/.ray/auth_token`); a local job gets a token of its own instead (`RAY_AUTH_TOKEN`),
so one team's job cannot reach another's Ray. The token lives only in that job's environment.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import MutableMapping

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def job_env() -> dict[str, str]:
    """The environment a local job's own Ray needs: loopback only, and a fresh token."""
    return {**LOOPBACK, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def use_loopback(environ: MutableMapping[str, str] | None = None) -> None:
    """Make the Ray this process starts listen on loopback only, with token authentication (a fresh token
    unless one is set). Call it before Ray is imported; a process that imported Ray already is told so."""
    environ = os.environ if environ is None else environ
    if "ray" in sys.modules and environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        raise RuntimeError("use_loopback() must run before `import ray`: Ray reads the switch on import")
    for key, value in job_env().items():
        environ.setdefault(key, value)
