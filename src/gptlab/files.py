"""Files that several processes share: whole-or-nothing writes, locks between processes on
this machine, and checking that a folder can be written."""

from __future__ import annotations

import contextlib
import os
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
