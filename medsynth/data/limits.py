"""Bounded reads: regular files only, a memory ceiling per case, decompression with a cap.

A volume file states how much data it holds (shape x dtype). Readers trust that claim and allocate
it, so a 352-byte header can ask for gigabytes, a 1.6 MB gzip stream can inflate to 1.5 GB, and a
symlink to ``/dev/zero`` or a FIFO never ends. The readers of :mod:`medsynth.data.nifti` therefore

1. open only regular files (:func:`open_regular`: ``O_NONBLOCK``, so a FIFO cannot block the open,
   then ``fstat`` on the open descriptor, so a swap after the check cannot slip through);
2. compare the claimed size with the memory ceiling (:func:`check_claimed_size`) before anything
   of that size is allocated; the size counted is the *decoded* one (a NIfTI's ``scl_slope`` makes
   a uint8 volume decode to float64: 8 bytes a voxel; a DICOM series counts the pixel type GDCM
   reports after Rescale Slope/Intercept; MetaImage/NRRD decode as stored, checked against
   SimpleITK's own pixel type before it reads), since that is what reading allocates;
3. read compressed data through :class:`CappedInflater`, which never produces more than the
   header claims and tells a stream that ends early from one that goes on after the data.

The ceiling (:func:`default_memory_limit`) is a quarter of the memory this process may use (the
smallest of physical RAM, the cgroup limit and ``RLIMIT_AS``), at most 16 GiB. Every reader takes a
``memory_limit`` argument (bytes; ``None`` means this default), and ``medsynth validate
--memory-limit`` sets it for one run.
"""

from __future__ import annotations

import os
import re
import resource
import stat
import zlib
from pathlib import Path
from typing import BinaryIO

from medsynth.errors import DataError

__all__ = [
    "MEMORY_LIMIT_CAP",
    "MEMORY_LIMIT_FRACTION",
    "CappedInflater",
    "available_memory",
    "check_claimed_size",
    "default_memory_limit",
    "format_bytes",
    "open_regular",
    "parse_size",
]

GiB = 1 << 30
#: the default ceiling never exceeds this (a larger case needs an explicit ``memory_limit``)
MEMORY_LIMIT_CAP = 16 * GiB
#: the default ceiling is this fraction of the memory available to the process: a decoded case is
#: held about twice while it is read (bytes, then the array) and the job needs room besides
MEMORY_LIMIT_FRACTION = 0.25
_CHUNK = 1 << 20  # compressed bytes read per step
_CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _physical_memory() -> int | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _cgroup_memory() -> int | None:
    for name in _CGROUP_FILES:
        try:
            text = Path(name).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _address_space_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def available_memory() -> int:
    """Bytes this process may use: the smallest of physical RAM, the cgroup memory limit and the
    soft ``RLIMIT_AS`` (8 GiB when none of them can be read)."""
    known = [v for v in (_physical_memory(), _cgroup_memory(), _address_space_limit()) if v]
    return min(known) if known else 8 * GiB


def default_memory_limit() -> int:
    """The default ceiling on the decoded size of one case, in bytes:
    ``min(MEMORY_LIMIT_FRACTION x available_memory(), MEMORY_LIMIT_CAP)``."""
    return min(int(available_memory() * MEMORY_LIMIT_FRACTION), MEMORY_LIMIT_CAP)


def format_bytes(n: int) -> str:
    """``1610612736`` -> ``"1.5 GiB"`` (binary units; bytes below 1 KiB)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{n} bytes"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """``"16GiB"``, ``"512M"``, ``"1.5g"`` or a plain number of bytes -> bytes (binary units: K = 1024).

    Raises :class:`DataError` naming ``what`` for anything else, or for zero."""
    m = _SIZE_RE.match(text)
    if not m:
        raise DataError(f"{what} {text!r}: expected a size such as 512MiB, 16GiB or a number of bytes")
    scale = 1024 ** "_kmgt".index(m[2].lower() or "_")
    value = int(float(m[1]) * scale)
    if value <= 0:
        raise DataError(f"{what} {text!r}: must be more than 0 bytes")
    return value


def check_claimed_size(path: Path, claimed: int, description: str, memory_limit: int | None) -> None:
    """Refuse a file whose header claims more decoded bytes than the ceiling.

    claimed: bytes the decoded data would take; description: what the header says
    (``"shape (2000, 1000, 1000) uint8"``); memory_limit: bytes, ``None`` for :func:`default_memory_limit`.
    """
    limit = default_memory_limit() if memory_limit is None else memory_limit
    if claimed > limit:
        raise DataError(
            f"{path}: header claims {description} = {format_bytes(claimed)} ({claimed} bytes) to decode, "
            f"above the memory limit of {format_bytes(limit)} ({limit} bytes) per case; if the file is genuine, raise "
            "the limit (medsynth validate --memory-limit, or memory_limit= in Python)"
        )


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(path: Path, mode: int) -> DataError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    via = " (through a symbolic link)" if path.is_symlink() else ""
    return DataError(f"{path}: is {kind}{via}, not a regular file; volumes are read from regular files only")


def regular_file_size(path: Path) -> int:
    """Size in bytes of the regular file at ``path`` (symlinks followed); DataError for anything else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found" + (" (dangling symbolic link)" if path.is_symlink() else "")) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        raise DataError(f"{path}: cannot read file ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    return st.st_size


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file; return the file and its size in bytes.

    Checked with ``os.stat`` first (nothing is opened for a FIFO or a device), opened with
    ``O_NONBLOCK`` (a FIFO swapped in after the check cannot block), and checked again on the
    open descriptor. DataError naming the file otherwise."""
    path = Path(path)
    regular_file_size(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return fh, st.st_size


class CappedInflater:
    """Decompress a zlib or gzip stream from ``fh``, never producing more than asked for.

    wbits: ``31`` gzip (several members and trailing zero padding allowed, as ``gzip.decompress``),
    ``47`` zlib or gzip, detected from the header (MetaImage and NRRD data).
    Errors name ``path`` and say whether the stream is corrupt, ends early or goes on past the data.
    """

    def __init__(self, fh: BinaryIO, path: Path, *, wbits: int = 31) -> None:
        self._kind = "gzip" if wbits == 31 else "compressed"
        self._fh = fh
        self._path = path
        self._wbits = wbits
        self._d = zlib.decompressobj(wbits)
        self._input = b""  # compressed bytes read from fh, not yet given to the decompressor
        self._file_done = False
        self.produced = 0  # decompressed bytes returned so far

    def _more_input(self) -> bool:
        if self._file_done:
            return False
        chunk = self._fh.read(_CHUNK)
        if not chunk:
            self._file_done = True
            return False
        self._input += chunk
        return True

    def _next_member(self) -> bool:
        """After the end of a stream: start the next gzip member, or False at the true end."""
        rest = self._d.unused_data + self._input
        self._input = b""
        while True:
            rest = rest.lstrip(b"\x00")  # gzip allows zero padding after the last member
            if rest or not self._more_input():
                break
            rest, self._input = self._input, b""
        if not rest:
            return False
        if self._wbits != 31 or rest[:2] != b"\x1f\x8b":
            raise DataError(f"{self._path}: {len(rest)}+ bytes of unexpected data after the end of the compressed stream")
        self._d = zlib.decompressobj(self._wbits)
        self._input = rest
        return True

    def read(self, n: int) -> bytes:
        """Up to ``n`` decompressed bytes (fewer only at the end of the data)."""
        parts: list[bytes] = []
        want = n
        while want > 0:
            if self._d.eof and not self._next_member():
                break
            if not self._input and not self._d.unconsumed_tail and not self._more_input():
                # no compressed input left: whatever zlib still holds, then the stream must have ended
                out = self._decompress(b"", want)
                parts.append(out)
                want -= len(out)
                if not out and not self._d.eof:
                    raise DataError(f"{self._path}: truncated or corrupt {self._kind} data (the stream ends before "
                                    f"its end marker, after {self.produced + n - want} decompressed bytes)")
                continue
            data = self._d.unconsumed_tail or self._input
            if not self._d.unconsumed_tail:
                self._input = b""
            out = self._decompress(data, want)
            parts.append(out)
            want -= len(out)
        result = b"".join(parts)
        self.produced += len(result)
        return result

    def _decompress(self, data: bytes, max_length: int) -> bytes:
        try:
            return self._d.decompress(data, max_length)
        except zlib.error as exc:
            raise DataError(f"{self._path}: truncated or corrupt {self._kind} data ({exc})") from None

    def read_exact(self, n: int, what: str) -> bytes:
        """Exactly ``n`` bytes, or DataError: ``what`` says what the header claims."""
        data = self.read(n)
        if len(data) < n:
            raise DataError(f"{self._path}: truncated: {what}, but the decompressed data ends after "
                            f"{self.produced} bytes")
        return data

    def expect_end(self, what: str) -> None:
        """DataError unless the stream (and every member and its checksum) ends exactly here."""
        extra = self.read(1)
        if extra:
            more = len(self.read(_CHUNK))  # a bounded look at how much more there is
            shown = f"{1 + more}+" if more == _CHUNK else f"{1 + more}"
            raise DataError(f"{self._path}: the decompressed data goes on after what the header claims ({what}): "
                            f"{shown} more bytes; the header does not describe this file")
