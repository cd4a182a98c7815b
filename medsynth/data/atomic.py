"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``; and how a file name
that is not UTF-8 is written into text.

A reader (or a resumed job) never sees a half-written file under its final name.

A file system may hold names that are not UTF-8 (byte ``0xff``); Python reads them with surrogate
escapes (``os.fsdecode(b"c\xff") == "c\udcff"``), which UTF-8 cannot encode. Such a name is
written *as the file system has it* where it is a file name to be opened again (the file itself; a
manifest: :func:`atomic_write_text` with ``names="as_stored"``), and *shown escaped* (``c\udcff``, the
six characters: :func:`shown`) in every text meant to be read: reports, tables, JSON summaries,
pictures (:mod:`medsynth.plots`) and messages (``medsynth.cli``). In a JSON string the escaped form is
the JSON escape of the same name, so ``json.loads`` gives the name back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

#: the longest file name (bytes) most file systems hold; a temp name is cut to fit it
NAME_MAX = 255


def temp_path_for(path: Path) -> Path:
    """A unique temp name beside ``path`` that keeps its extension (``.nii.gz`` included), at most
    :data:`NAME_MAX` bytes (the stem is cut: a 255-byte final name still gets a temp name)."""
    path = Path(path)
    name = path.name
    suffix = "".join(path.suffixes[-2:]) if name.endswith(".nii.gz") else path.suffix
    stem = name[: len(name) - len(suffix)] if suffix else name
    tail = f".tmp-{uuid.uuid4().hex[:12]}{suffix}"
    room = max(NAME_MAX - 1 - len(os.fsencode(tail)), 0)
    # cut in bytes; fsdecode turns a split character into surrogate escapes, which re-encode to the same bytes
    stem = os.fsdecode(os.fsencode(stem)[:room])
    return path.with_name(f".{stem}{tail}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_FILE_KINDS = (
    (stat.S_ISREG, "a file"),
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """``"a file"``, ``"a folder"``, ``"a FIFO (named pipe)"``, ... for an ``st_mode``."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def link_problem(path: str | os.PathLike[str] | os.PathLike[bytes] | bytes) -> str | None:
    """Why the symbolic link ``path`` cannot be followed: ``"is a symbolic link loop ..."`` or ``"is a
    symbolic link to a missing target"``; None for anything that is not a broken link."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symbolic link loop (following it leads back to itself)"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "is a symbolic link to a missing target"
    return None


def named_os_error(exc: OSError, path: Path, temp: Path | None = None) -> OSError:
    """``exc`` if it names a file, else the same error naming ``path``: a write that fails for lack of
    space (ENOSPC), on a read-only file system (EROFS) or for a quota (EDQUOT) raises an OSError
    without a file name, and the message must say which file could not be written. An error naming
    ``temp`` (the temp file written in ``path``'s place) names ``path`` instead."""
    if exc.errno is None or (exc.filename is not None and (temp is None or os.fsdecode(exc.filename) != str(temp))):
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on error it is removed.

    An OSError without a file name (a full disk, a read-only file system) is raised naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        named = named_os_error(exc, path, tmp)
        if named is exc:
            raise
        raise named from exc
    finally:
        with contextlib.suppress(OSError):  # missing, or a read-only file system: nothing to remove
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def shown(text: object) -> str:
    """``text`` (``str()`` of it) with each byte of a file name that is not UTF-8 (a surrogate escape,
    ``\udcff``) shown as the six characters ``\udcff``: printable on any terminal, writable as UTF-8."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def atomic_write_text(path: Path, text: str, *, names: Literal["shown", "as_stored"] = "shown") -> Path:
    """Write ``text`` as UTF-8, atomically.

    names: how a file name that is not UTF-8 in ``text`` is written: ``"shown"`` escaped (:func:`shown`;
    reports, tables, JSON), ``"as_stored"`` byte for byte as the file system has it (a manifest, whose
    file names are opened again)."""
    return atomic_write_bytes(path, text.encode("utf-8", "backslashreplace" if names == "shown" else "surrogateescape"))


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
