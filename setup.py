"""Only a build hook; the project's metadata is pyproject.toml.

The console's front-end libraries are not in the repository: building the package (a wheel, the images' pip
install) first installs them from npm at the pins in platform/tuneplane/console/vendor.json, integrity checked,
so that they ship as package data."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConsoleLibraries(build_py):
    def run(self) -> None:
        script = Path(__file__).parent / "platform" / "tuneplane" / "devtools" / "console_vendor.py"
        subprocess.check_call([sys.executable, str(script)])
        super().run()


setup(cmdclass={"build_py": BuildWithConsoleLibraries})
