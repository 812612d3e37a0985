"""Files that several processes share: whole-or-nothing writes, locks between processes on
this machine, and checking that a folder can be written."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from gptlab.errors import GptlabError, first_line


@contextlib.contextmanager
def replaced_whole(path: Path) -> Iterator[Path]:
    """A temporary name of this process's own beside `path`, renamed to `path` once the
    block has written it: another process never reads half a file, two writers never mix,
    and a failure leaves the old file (or none) in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all."""
    with replaced_whole(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_private(path: Path, text: str) -> None:
    """Write a text file whole, readable by its owner alone (mode 0600) from its first byte:
    secrets and URLs with passwords."""
    with replaced_whole(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)


@contextlib.contextmanager
def file_lock(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive lock between processes on this machine (an flock, released when the
    holder ends, however it ends). `waiting` is called once where another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting is not None:
            waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def try_lock(path: Path) -> FileLock | None:
    """The lock at `path`, held, or None where another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def check_writable(folder: Path, what: str) -> None:
    """Make the folder and write and remove a file in it: permissions alone do not tell
    (root, read-only mounts). `what` names the folder in the error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gptlab-probe-"):
            pass
    except OSError as e:
        raise GptlabError(f"{what} {folder} cannot be written: "
                          f"{e.strerror or first_line(e)}") from None


def read_text(path: str) -> str:
    """A UTF-8 text file's whole text; `-` reads standard input."""
    if path == "-":
        data, where = sys.stdin.buffer.read(), "standard input"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise GptlabError(f"text file not found: {p}")
        data, where = p.read_bytes(), str(p)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start})") from None
