"""Install the console's front-end libraries from the npm registry, as pinned in `console/vendor.json`.

    python platform/tuneplane/devtools/console_vendor.py [--check]

Each package's tarball is downloaded from the registry (`NPM_CONFIG_REGISTRY`, default registry.npmjs.org),
refused unless its sha512 equals the pinned npm integrity, and only the listed files are unpacked into
`console/vendor/<folder>/`. A folder already holding every listed file is left alone. Standard library only: the
images and the package build run it before anything is installed. `--check` installs nothing and exits 1 when a
file is missing.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

CONSOLE = Path(__file__).resolve().parents[1] / "console"
PINS = CONSOLE / "vendor.json"
VENDOR = CONSOLE / "vendor"
_MAX_TARBALL = 32 << 20


def packages() -> list[dict]:
    return list(json.loads(PINS.read_text())["packages"])


def missing(package: dict) -> list[str]:
    folder = VENDOR / package["folder"]
    return [name for name in package["files"].values() if not (folder / name).is_file()]


def integrity(data: bytes) -> str:
    """npm's integrity string of a tarball (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def install(package: dict) -> None:
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    name, version = package["name"], package["version"]
    url = f"{registry}/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = response.read(_MAX_TARBALL + 1)
    if len(data) > _MAX_TARBALL:
        raise SystemExit(f"{name}@{version}: tarball over {_MAX_TARBALL >> 20} MiB")
    found = integrity(data)
    if found != package["integrity"]:
        raise SystemExit(f"{name}@{version}: integrity {found} is not the pinned {package['integrity']}")
    folder = VENDOR / package["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member, target in package["files"].items():
            entry = tar.getmember(member)
            source = tar.extractfile(entry) if entry.isfile() else None
            if source is None:
                raise SystemExit(f"{name}@{version}: {member} is not a file in the tarball")
            (folder / target).write_bytes(source.read())


def main(argv: list[str]) -> int:
    check = "--check" in argv
    for package in packages():
        if not missing(package):
            continue
        if check:
            print(
                f"console/vendor/{package['folder']}: missing {', '.join(missing(package))}", file=sys.stderr
            )
            return 1
        install(package)
        print(
            f"console/vendor/{package['folder']}: {package['name']}@{package['version']} (integrity checked)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
