"""Atomic files and directories: the one home for writing anything that must survive a crash.

A file is written to a temporary sibling, fsynced and renamed over its final name. A directory is
written whole into a temporary sibling, fsynced, and then swapped in by `replace_dir`:

- on Linux, `renameat2(RENAME_EXCHANGE)` swaps the two names in one atomic step, so the final
  path holds the whole old or the whole new directory at every instant;
- where the kernel or filesystem cannot exchange, a journal file `.NAME.replace.json` is written
  first, naming the copy the old directory is moved aside to; `recover_dir(path)`, which every
  opener calls, finishes or rolls back an interrupted swap (and logs that it did).

Temporary names carry the writer's host and process id (`.NAME.<pid>-<host>.XXXX`), so leftovers
of a killed writer are recognised and removed once that process is gone, and never while it runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_JOURNAL = ".{name}.replace.json"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _after_rename(step: str) -> None:
    """Called after every rename `replace_dir` and `atomic_path` make; tests replace it to kill
    the process at exactly that instant."""


# ------------------------------------------------------------------------------------------------
# Durability
# ------------------------------------------------------------------------------------------------

def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory `path` durable (a rename or a new file in it survives power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file under `path`, then every directory bottom-up, so a renamed-in tree is whole on disk."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(root)


# ------------------------------------------------------------------------------------------------
# Temporary names and their cleanup
# ------------------------------------------------------------------------------------------------

def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}-{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _writer_of(temp_name: str, name: str) -> tuple[int, str] | None:
    """(pid, host id) of the process that made the temporary sibling `temp_name` of `name`."""
    match = re.match(rf"^\.{re.escape(name)}\.(\d+)-([0-9a-f]{{8}})\.", temp_name)
    return (int(match.group(1)), match.group(2)) if match else None


def _writer_alive(temp_name: str, name: str) -> bool:
    """Whether that writer may still be running: this process, a live process of this host, or
    any process of another host (which cannot be checked from here)."""
    writer = _writer_of(temp_name, name)
    if writer is None:
        return False
    pid, host = writer
    return host != _HOST or pid == os.getpid() or _pid_alive(pid)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove temporary siblings of `path` (`.NAME.<pid>-<host>.*` directories and files) whose
    writer, a process of this host, has ended. Returns what was removed."""
    path = Path(path)
    removed = []
    try:
        entries = [e for e in path.parent.iterdir() if _writer_of(e.name, path.name) is not None]
    except FileNotFoundError:
        return removed
    for entry in entries:
        if _writer_alive(entry.name, path.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    if removed:
        log.info("Removed %d leftover(s) of interrupted writes next to %s.", len(removed), path)
    return removed


def interrupted_writes(directory: str | os.PathLike) -> list[Path]:
    """The paths in `directory` that have temporary siblings (`.NAME.<pid>-<host>.*`) or a
    replacement journal, e.g. checkpoint steps a killed writer never finished; pass each to
    `recover_dir` (or `remove_leftovers`). For directories whose entries' names vary (checkpoints
    of steps that may never be saved again), where no opener would name them."""
    directory = Path(directory)
    try:
        entries = [entry.name for entry in directory.iterdir()]
    except FileNotFoundError:
        return []
    names = set()
    for entry in entries:
        # greedy: NAME may hold dots; the writer's `.<pid>-<host>.` is the last such group
        match = re.match(r"^\.(.+)\.\d+-[0-9a-f]{8}\.", entry) or re.match(r"^\.(.+)\.replace\.json$", entry)
        if match:
            names.add(match.group(1))
    return [directory / name for name in sorted(names)]


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name next to `path`, for writers that take a name (safetensors, imageio).

    When the block ends without error the file is fsynced and renamed to `path`; otherwise it is
    removed. Either way a crash never leaves half a file at `path`. The temporary name keeps
    `path`'s suffix, so writers that pick a format by extension still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; give it an ordinary file's mode
        os.replace(tmp, path)
        _after_rename("file")
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    remove_leftovers(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename, so a crash never leaves half of it."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------------------------------------
# Directories
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary directory next to `path` to write a whole directory into (a checkpoint, an
    adapter); fsynced and swapped in for `path` by `replace_dir` when the block ends without
    error, removed otherwise, so a crash never leaves half a directory at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name)))
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_dir_for(path: str | os.PathLike) -> Path:
    """A new empty temporary directory next to `path` (same filesystem, so it can be renamed
    into place), named so that `remove_leftovers(path)` removes it if its writer dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name)))


def _load_renameat2() -> Callable[..., int] | None:
    # The Python standard library has no renameat2; glibc >= 2.28 exports it.
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (both exist); False where this system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, f"{os.strerror(err)}: exchanging {str(a)!r} and {str(b)!r}")


def replace_dir(new: Path, final: Path) -> None:
    """Put the finished directory `new` (a sibling of `final`) at `final`, replacing any old one.

    Crash-safe at every instant: `final` holds the whole old or the whole new directory (atomic
    exchange), or, where exchange is unavailable, the journal lets `recover_dir(final)` put one
    back. The files of `new` are fsynced first; the old directory is removed afterwards.
    """
    new, final = Path(new), Path(final)
    recover_dir(final)  # an earlier interrupted swap is settled before this one starts
    fsync_tree(new)
    if not final.exists():
        os.rename(new, final)
        _after_rename("rename")
    elif _exchange(new, final):
        _after_rename("exchange")
        fsync_dir(final.parent)
        shutil.rmtree(new)  # now the old directory
    else:
        _replace_with_journal(new, final)
    fsync_dir(final.parent)
    remove_leftovers(final)


def _replace_with_journal(new: Path, final: Path) -> None:
    aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final.name) + "old-"))
    os.rmdir(aside)  # only its unique name is wanted: the old directory is renamed to it
    journal = final.parent / _JOURNAL.format(name=final.name)
    write_text_atomic(journal, json.dumps({"aside": aside.name, "new": new.name}))
    os.rename(final, aside)
    _after_rename("aside")
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(aside, final)
        journal.unlink()
        raise
    _after_rename("swap")
    fsync_dir(final.parent)
    journal.unlink()
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> bool:
    """Settle a directory replacement that a crash interrupted; every opener of a replaceable
    directory calls this first. Returns True when the old directory had to be put back.

    - journal and `path` present: the new directory is in place; the aside copy is removed;
    - journal, no `path`: the old directory is renamed back from its aside copy (logged);
    - no journal, no `path`, but an old-style `.NAME.old-XXXX` aside (written by eva-rl 0.1's
      two-rename swap): that copy is put back (logged).
    Leftover temporary siblings of dead writers are removed.
    """
    path = Path(path)
    journal = path.parent / _JOURNAL.format(name=path.name)
    restored = False
    if journal.exists():
        try:
            aside = path.parent / json.loads(journal.read_text())["aside"]
        except (ValueError, KeyError):  # the journal itself is written atomically; be safe anyway
            aside = None
        writer = _writer_of(aside.name, path.name) if aside is not None else None
        if writer is not None and writer[0] != os.getpid() and _writer_alive(aside.name, path.name):
            return False  # a swap in progress, not an interrupted one
        if not path.exists() and aside is not None and aside.is_dir():
            os.rename(aside, path)
            restored = True
        elif aside is not None and aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        journal.unlink()
        fsync_dir(path.parent)
    elif not path.exists():
        legacy = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        if legacy:
            os.rename(legacy[-1], path)
            fsync_dir(path.parent)
            restored = True
    if restored:
        log.warning("%s: a replacement was interrupted by a crash; restored the previous version.", path)
    remove_leftovers(path)
    return restored
