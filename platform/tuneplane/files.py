"""Opening a local file a team named: a regular file, inside the team's roots, never blocking.

Check at open, not before. A path checked first and opened later can be swapped for a symlink in between, so a
file is opened first (`O_NONBLOCK`: a FIFO or a device never holds the caller; `O_NOCTTY`), then the open
descriptor itself is asked what it is (`fstat`: a regular file) and where it really lies (`/proc/self/fd/N`,
with every symlink and `..` already resolved by the kernel), and everything is read through that descriptor.
A folder (a model, a tokenizer) is *pinned* the same way: each file opened and checked, and the loader given a
private view whose entries lead to those open descriptors (`/proc/<pid>/fd/N` reopens the very file that was
checked, whatever its name points to by then).

Which roots apply is the process's or the context's: a job process is confined once, from what its backend gave
it (`confine_process`); the API confines each check to the calling team (`confined_to`). With no confinement a
file must still be a regular file, but may lie anywhere (a developer's own `tuneplane run`).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fnmatch
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# Environment variables through which a backend hands a job process its confinement (os.pathsep-separated).
ROOTS_ENV = "TUNEPLANE_READ_ROOTS"
DENIED_ENV = "TUNEPLANE_DENIED_ROOTS"


class NotAllowed(PermissionError):
    """A local file the caller may not read: outside its roots, inside a denied folder, or not a regular file.
    One message for all of these and for a missing file outside the roots, so a refusal tells nothing about
    what exists on the host."""

    REASON = "no readable file here (missing, not a regular file, or outside the data roots)"

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(errno.EACCES, self.REASON)
        self.filename = str(path)

    def __str__(self) -> str:
        return f"{self.filename}: {self.REASON}"


@dataclass(frozen=True)
class Confinement:
    """Folders whose files may be read (`roots`), and folders inside them that may not (`denied`); all real
    paths (symlinks resolved)."""

    roots: tuple[Path, ...]
    denied: tuple[Path, ...] = ()

    @classmethod
    def of(
        cls, roots: Sequence[str | os.PathLike[str]], denied: Sequence[str | os.PathLike[str]] = ()
    ) -> Confinement:
        return cls(tuple(map(resolved, roots)), tuple(map(resolved, denied)))

    def allows(self, real: Path) -> bool:
        """The one rule: `real` (a resolved path) lies inside a root and outside every denied folder."""
        if any(real == d or d in real.parents for d in self.denied):
            return False
        return any(real == r or r in real.parents for r in self.roots)

    def allows_path(self, path: str | os.PathLike[str]) -> bool:
        """Whether `path`, resolved now, lies inside; not when it cannot be resolved (a link changing under
        the resolution, a loop)."""
        try:
            return self.allows(resolved(path))
        except OSError:
            return False

    def to_env(self) -> dict[str, str]:
        return {
            ROOTS_ENV: os.pathsep.join(map(str, self.roots)),
            DENIED_ENV: os.pathsep.join(map(str, self.denied)),
        }

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Confinement | None:
        env = dict(os.environ) if env is None else env
        if ROOTS_ENV not in env:
            return None
        split = lambda key: [p for p in env.get(key, "").split(os.pathsep) if p]  # noqa: E731
        return cls.of(split(ROOTS_ENV), split(DENIED_ENV))


def resolved(path: str | os.PathLike[str]) -> Path:
    """`path` with '~', '..' and every symlink resolved, as it is now."""
    return Path(os.path.realpath(os.path.expanduser(path)))


_PROCESS: Confinement | None = None
_CONTEXT: contextvars.ContextVar[Confinement | None] = contextvars.ContextVar(
    "tuneplane_confinement", default=None
)


def confine_process(confinement: Confinement | None) -> None:
    """Confine every later open of this process (a job's driver or worker) that no context overrides."""
    global _PROCESS
    _PROCESS = confinement


@contextlib.contextmanager
def confined_to(confinement: Confinement | None) -> Iterator[None]:
    """Confine the opens made in this context (this thread, or a task and what it copies its context to)."""
    token = _CONTEXT.set(confinement)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current() -> Confinement | None:
    return _CONTEXT.get() or _PROCESS


def may_read(path: str | os.PathLike[str]) -> bool:
    """Whether `path`, resolved now, lies where the current confinement allows (True with none). An early
    answer for messages and listings; the open itself (`open_local`) is what enforces it."""
    found = current()
    return found is None or found.allows_path(path)


_HAS_PROC = os.path.isdir("/proc/self/fd")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
# Linux: a descriptor that names a file without opening it (no device driver runs, no FIFO is joined).
_O_PATH = getattr(os, "O_PATH", 0) if _HAS_PROC else 0
_NOT_A_FILE = (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.ENXIO, errno.ENODEV)


def open_fd(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor of the regular file at `path`, checked where it really lies (see the module doc).
    NotAllowed when the current confinement refuses it, FileNotFoundError for a missing file inside it. On
    Linux the file is first only named (O_PATH) and checked, then opened through that name: nothing that is
    not an allowed regular file is ever opened."""
    named = _open(path, (_O_PATH | getattr(os, "O_CLOEXEC", 0)) if _O_PATH else _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(named).st_mode):
            raise NotAllowed(path)
        found = current()
        if found is not None and not found.allows(_fd_path(named, path)):
            raise NotAllowed(path)
        if not _O_PATH:
            os.set_blocking(named, True)
            return named
        fd = os.open(f"/proc/self/fd/{named}", _OPEN_FLAGS)  # the very file checked above
    except BaseException:
        os.close(named)
        raise
    os.close(named)
    os.set_blocking(fd, True)
    return fd


def _open(path: str | os.PathLike[str], flags: int) -> int:
    try:
        return os.open(os.path.expanduser(path), flags)
    except FileNotFoundError:
        if not may_read(path):
            raise NotAllowed(path) from None
        raise
    except OSError as exc:
        # A symlink loop, a folder, a path through a file, a device without a driver: not a readable file. Any
        # other failure (too many open files, an I/O error) is what it says.
        if exc.errno in _NOT_A_FILE:
            raise NotAllowed(path) from exc
        raise


def open_local(path: str | os.PathLike[str]) -> BinaryIO:
    """`open_fd` as a buffered binary file object."""
    return os.fdopen(open_fd(path), "rb")


def _fd_path(fd: int, shown: str | os.PathLike[str]) -> Path:
    """Where the open file `fd` really lies. Linux names it in /proc; elsewhere the path is resolved and
    accepted only if it still is the same file (device and inode) as the descriptor."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        real = resolved(shown)
        try:
            same = os.path.samestat(os.stat(real), os.fstat(fd))
        except OSError:
            same = False
        if not same:
            raise NotAllowed(shown) from None
        return real


@contextlib.contextmanager
def pinned_folder(folder: str | os.PathLike[str], patterns: Sequence[str] = ("*",)) -> Iterator[Path]:
    """A private view of the local `folder` for a loader that opens files by name (transformers, PEFT): each
    file whose name matches `patterns` is opened and checked (`open_fd`), and the view holds one symlink per
    file to its open descriptor. A file swapped after the check changes nothing in what the loader reads; a
    symlink out of the roots, a FIFO or a device in the folder is refused (NotAllowed). Subfolders are walked
    without following symlinked ones. The descriptors stay open until the block ends."""
    top = Path(os.path.expanduser(folder))
    if not may_read(top):
        raise NotAllowed(top)
    if not top.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(top))
    fds: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="tuneplane-pinned-") as view:
            for dirpath, _, names in os.walk(top, followlinks=False):
                for name in names:
                    if not any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                        continue
                    source = Path(dirpath) / name
                    fd = open_fd(source)
                    fds.append(fd)
                    entry = Path(view) / source.relative_to(top)
                    entry.parent.mkdir(parents=True, exist_ok=True)
                    if _HAS_PROC:
                        entry.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
                    else:  # no /proc to name the descriptor: copy what it reads
                        with open(entry, "wb") as out, os.fdopen(os.dup(fd), "rb") as src:
                            shutil.copyfileobj(src, out)
            yield Path(view)
    finally:
        for fd in fds:
            os.close(fd)
