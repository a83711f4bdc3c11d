"""Atomic files and directories: the one home for writing anything that must survive a crash.

A file is written to a temporary sibling, fsynced and renamed over its final name; a directory is
written whole into a temporary sibling and then swapped in. A crash or a kill at any instant leaves
either the old or the new version readable, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name next to `path`, for writers that take a name (safetensors, imageio).

    When the block ends without error the file is fsynced and renamed to `path`; otherwise it is
    removed. Either way a crash never leaves half a file at `path`. The temporary name keeps
    `path`'s suffix, so writers that pick a format by extension still do.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary directory next to `path` to write a whole directory into (a checkpoint, an
    adapter); swapped in for `path` by `replace_dir` when the block ends without error, removed
    otherwise, so a crash never leaves half a directory at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a crash never leaves half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def replace_dir(new: Path, final: Path) -> None:
    """Rename the finished directory `new` to `final`; an old `final` is set aside and restored on failure.

    A directory cannot be swapped atomically; this keeps the window without a directory at `final`
    to two renames, and never loses the old one.
    """
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
