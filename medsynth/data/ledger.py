"""The record of which files in an output folder a medsynth command made: ``OUT/.medsynth-owner.jsonl``.

One JSON object a line: ``{"command": "demo", "medsynth": "0.x"}`` when a command claims the folder,
then ``{"command": "demo", "files": {relative path: sha256}}`` as it writes. Lines of other commands
(an evaluate report beside a demo's files) are kept when one command replaces its own.
:func:`claim_folder` applies the rule of :mod:`medsynth.ownership` (a command removes or replaces only
files this record proves it made, unchanged since); :func:`output_lock` is the folder's lock (one job a
folder), and :func:`own_output` the one helper that checks, locks and claims an output folder for a
command (the data layer's writers, phantoms and export, use it as the jobs do).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from medsynth.data.atomic import atomic_write_text, file_kind, link_problem, named_os_error
from medsynth.data.limits import open_regular
from medsynth.data.manifest import read_manifest
from medsynth.errors import JobError

LEDGER = ".medsynth-owner.jsonl"
#: the lock file of :func:`output_lock` (never a command's output)
LOCK_FILE = ".medsynth.lock"

__all__ = ["LEDGER", "LOCK_FILE", "OwnedFolder", "check_out_path", "check_outside_inputs", "claim_folder",
           "dataset_folders", "held_here", "lock_holder", "made_by", "output_lock", "own_output", "sha256_file"]


def sha256_file(path: Path) -> str:
    """sha256 (hex) of the regular file at ``path`` (DataError for a FIFO, a device, a folder)."""
    h = hashlib.sha256()
    fh, _ = open_regular(Path(path))
    with fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_out_path(out: Path, option: str = "--out") -> None:
    """JobError unless ``out`` is a folder or can be made one: not a broken symbolic link (missing
    target, loop), not a file, FIFO or device, and no file where one of its parent folders should be."""
    out = Path(out)
    problem = link_problem(out)
    if problem is not None:
        raise JobError(f"{option} {out} {problem}")
    if out.exists():
        if not out.is_dir():
            raise JobError(f"{option} {out} exists and is not a folder (it is {file_kind(out.stat().st_mode)})")
        return
    here = out.absolute().parent
    while not here.exists() and not here.is_symlink() and here != here.parent:
        here = here.parent
    problem = link_problem(here)
    if problem is not None:
        raise JobError(f"{option} {out}: {here} {problem}")
    if here.exists() and not here.is_dir():
        raise JobError(f"{option} {out}: {here} is {file_kind(here.stat().st_mode)} where a folder should be")


# ------------------------------------------------------------------------------------ the ledger


def _ledger_lines(out: Path) -> list[dict[str, object]]:
    """The ledger's well-formed lines (a torn or foreign line is skipped); [] without a ledger, or for
    one that is a symbolic link or not a regular file."""
    path = Path(out) / LEDGER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as fh:
        if not os.path.isfile(path) or os.path.islink(path):
            return []
        text = fh.read().decode("utf-8", errors="replace")
    lines = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("command"), str):
            lines.append(entry)
    return lines


def made_by(out: Path, command: str) -> bool:
    """Whether ``command`` claimed the folder ``out`` (its ledger has a line of that command)."""
    return any(line["command"] == command for line in _ledger_lines(out))


def _relative(out: Path, rel: object) -> str:
    """``rel`` as a path inside ``out`` (posix); JobError for one that leaves it."""
    inside = isinstance(rel, str) and rel and not os.path.isabs(rel) and ".." not in Path(rel).parts
    if not inside:
        raise JobError(f"{out}: its {LEDGER} names {rel!r}, outside the folder; it was not written by medsynth, "
                       "so nothing was removed")
    return Path(str(rel)).as_posix()


def _recorded(out: Path, command: str) -> dict[str, set[str]]:
    """Every file the ledger lists for ``command``: relative path -> the sha256 digests recorded."""
    made: dict[str, set[str]] = {}
    for line in _ledger_lines(out):
        files = line.get("files")
        if line["command"] == command and isinstance(files, dict):
            for rel, digest in files.items():
                made.setdefault(_relative(out, rel), set()).add(str(digest))
    return made


def _append(out: Path, entry: dict[str, object]) -> None:
    with open(Path(out) / LEDGER, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True, ensure_ascii=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class OwnedFolder:
    """An output folder one command holds: it records each file it writes, so that a later run of the
    same command can prove which files it may replace."""

    def __init__(self, out: Path, command: str, before: Sequence[str] = ()) -> None:
        self.out = Path(out)
        self.command = command
        #: the files (relative paths) that were there when the command started: a user's, never recorded
        self.before = frozenset(before)
        self._seen: dict[str, tuple[int, int]] = {}

    def record(self, *paths: Path) -> None:
        """Add ``paths`` (files inside the folder, just written) with their sha256 to the ledger."""
        files = {}
        for path in paths:
            path = Path(path)
            # a path under the folder as given (relative or absolute), else one relative to it
            rel = path.relative_to(self.out).as_posix() if path.is_relative_to(self.out) else path.as_posix()
            files[rel] = sha256_file(self.out / rel)
            st = (self.out / rel).stat()
            self._seen[rel] = (st.st_size, st.st_mtime_ns)
        if files:
            _append(self.out, {"command": self.command, "files": files})

    def withdraw(self) -> None:
        """Take back the claim of a command that failed before writing anything: the ledger goes when
        it holds only this claim (so that a folder the command created and left empty goes too)."""
        lines = _ledger_lines(self.out)
        if not self._seen and len(lines) == 1 and lines[0]["command"] == self.command and "files" not in lines[0]:
            (self.out / LEDGER).unlink(missing_ok=True)

    def record_new(self) -> None:
        """Record every file under the folder that is new or changed since the last record, except
        those that were there when the command started (:attr:`before`) and the ledger and lock files."""
        keep = self.before
        new = []
        for path in sorted(self.out.rglob("*")):
            rel = path.relative_to(self.out).as_posix()
            if path.name in (LOCK_FILE,) or rel == LEDGER or rel in keep or path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
            if self._seen.get(rel) != (st.st_size, st.st_mtime_ns):
                new.append(path)
        self.record(*new)


def _files_under(out: Path) -> list[str]:
    return [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()]


def claim_folder(out: Path, command: str, *, overwrite: bool, writes: Sequence[str] | None = None,
                 option: str = "--out") -> OwnedFolder:
    """Check and clear the folder ``out`` (created if needed) for ``command``, then record the claim.

    A folder that is new or empty is claimed as it is. Otherwise JobError (nothing touched) unless
    ``overwrite``; with it, unless the files ``command`` would replace are provably its own: every file
    its ledger lines list must be unchanged (they are removed, and folders that leaves empty), and no
    name in ``writes`` (the relative paths it is about to write) may be a file it did not make.
    ``writes=None`` (a command whose names are not known in advance) needs a folder whose ledger names
    ``command``. Files a user added stay (:attr:`OwnedFolder.before`)."""
    out = Path(out)
    check_out_path(out, option)
    out.mkdir(parents=True, exist_ok=True)
    before = _clear(out, command, overwrite, writes, option)
    from medsynth import __version__

    _append(out, {"command": command, "medsynth": str(__version__)})
    return OwnedFolder(out, command, before)


def _clear(out: Path, command: str, overwrite: bool, writes: Sequence[str] | None, option: str) -> list[str]:
    present = [c for c in out.iterdir() if c.name != LOCK_FILE]
    if not present:
        return []
    if not overwrite:
        raise JobError(f"{option} {out} exists and is not empty; pass --overwrite to replace the files "
                       f"`medsynth {command}` wrote there (other files stay), or choose another folder")
    if writes is None and not made_by(out, command):
        raise JobError(f"{option} {out} was not made by `medsynth {command}` (it has no {LEDGER} naming it); "
                       "medsynth replaces only files it made, so it touches nothing there: choose another folder")
    # 1. what this command made, each file unchanged since (else stop before removing anything)
    recorded = _recorded(out, command)
    root = out.resolve()
    mine: list[Path] = []
    for rel, digests in sorted(recorded.items()):
        path = out / rel
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file() or root not in path.resolve().parents \
                or sha256_file(path) not in digests:
            raise JobError(f"{option} {out}: {rel} was changed after `medsynth {command}` wrote it; move it away "
                           "first (nothing was removed)")
        mine.append(path)
    # 2. a file it would write over that it did not make
    clash = [w for w in (writes or ()) if ((out / w).exists() or (out / w).is_symlink()) and w not in recorded]
    if clash:
        raise JobError(f"{option} {out}: {clash[0]} was not written by `medsynth {command}`; it is never "
                       "replaced: move it away, or choose another folder")
    # 3. remove, then the folders that leaves empty, then this command's ledger lines
    for path in mine:
        path.unlink()
    for folder in sorted({p.parent for p in mine}, key=lambda f: len(f.parts), reverse=True):
        while folder != out and out in folder.parents:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
            folder = folder.parent
    others = [line for line in _ledger_lines(out) if line["command"] != command]
    if others:
        atomic_write_text(out / LEDGER, "".join(json.dumps(x, sort_keys=True) + "\n" for x in others))
    else:
        (out / LEDGER).unlink(missing_ok=True)
    return [rel for rel in _files_under(out) if rel != LEDGER and Path(rel).name != LOCK_FILE]


# ------------------------------------------------------------------------------------ input datasets


def dataset_folders(path: Path) -> set[Path]:
    """The folders of the dataset at ``path`` (its root and every folder holding one of its files),
    symbolic links resolved; none for a single volume file."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() not in (".json", ".csv"):  # one volume, not a manifest
        return set()
    manifest = read_manifest(path)
    source = Path(manifest.source or path).resolve()
    folders = {Path(manifest.root).resolve() if manifest.root else (source if source.is_dir() else source.parent)}
    for case in manifest.cases:
        for f in [*case.images, *([case.label] if case.label is not None else [])]:
            folders.add(Path(f).resolve().parent)
    return folders


def check_outside_inputs(out: Path, inputs: Iterable[Path], option: str = "--out") -> None:
    """JobError when ``out`` is, lies inside, or contains a folder of an input dataset (``inputs``:
    dataset paths, see :func:`dataset_folders`; symbolic links resolved): a command never writes into
    its inputs."""
    target = Path(out).expanduser().resolve()
    for path in inputs:
        for folder in sorted(dataset_folders(Path(path))):
            if target == folder or folder in target.parents:
                raise JobError(f"{option} {out} lies inside the folder {folder} of the input dataset {path}; "
                               "medsynth never writes into an input: choose another folder")
            if target in folder.parents:
                raise JobError(f"{option} {out} contains the folder {folder} of the input dataset {path}; "
                               "medsynth never writes around an input: choose another folder")


# ------------------------------------------------------------------------------------ the lock


def _lock_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _acquire(out: Path) -> int:
    """An open descriptor of ``OUT/.medsynth.lock`` holding an exclusive flock and this PID."""
    import fcntl

    path = out / LOCK_FILE
    while True:
        try:  # O_NONBLOCK: a FIFO put there opens without waiting for a writer, then is refused below
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise JobError(f"{path} is a symbolic link; remove it (medsynth keeps its lock file there)") from None
            if exc.errno == errno.EISDIR:
                raise JobError(f"{path} is a folder, not a regular file; remove it (medsynth keeps its lock file "
                               "there)") from None
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise JobError(f"{path} is {file_kind(mode)}, not a regular file; remove it (medsynth keeps its lock "
                           "file there)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _lock_pid(fd)
            os.close(fd)
            mine = " (this process)" if pid == str(os.getpid()) else ""
            raise JobError(f"{out} is in use by another medsynth job (PID {pid}{mine}); wait for it to finish, "
                           "or stop it first") from None
        except BaseException:
            os.close(fd)
            raise
        # the previous holder removes the file as it lets go: lock the file that is there now
        try:
            here = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        held = os.fstat(fd)
        if here is not None and (here.st_ino, here.st_dev) == (held.st_ino, held.st_dev):
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            except OSError as exc:  # a full disk: name the lock file
                os.close(fd)
                raise named_os_error(exc, path) from exc
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold the output folder ``out`` for one job: ``with output_lock(out): check, claim, write``.

    Creates ``out`` if needed and takes an exclusive, non-blocking ``flock`` on
    ``out/.medsynth.lock``, which holds this process's PID. A second job (any process, or this one
    again) gets a :class:`JobError` ``"OUT is in use by another medsynth job (PID n)"``. The lock lives
    as long as the ``with`` block, or until the process dies (the kernel releases it; a killed job
    leaves a lock file nobody holds, which the next job takes over). On exit the lock file is removed,
    and so is ``out`` if this call created it and it is still empty.
    Take it before :func:`check_output_state`, so that no other job can change the folder between the
    check and the writes. Under torchrun only rank 0 takes it (the other ranks write under rank 0's).
    """
    out = Path(out)
    check_out_path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(out)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    try:
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / LOCK_FILE)  # while still held: a waiting job re-checks the file it locked
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a job that failed before writing leaves nothing behind


def _holder(out: Path) -> str | None:
    """The PID (as text, ``"unknown"`` when unreadable) written by whichever process holds
    :func:`output_lock` on ``out``, this one included; None when nobody holds it."""
    import fcntl

    try:
        fd = os.open(Path(out) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _lock_pid(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody held it
        return None
    finally:
        os.close(fd)


def lock_holder(out: Path) -> str | None:
    """The PID (as text) of another process holding :func:`output_lock` on ``out``; None if the lock
    is free or held by this process."""
    pid = _holder(out)
    return None if pid == str(os.getpid()) else pid


def held_here(out: Path) -> bool:
    """Whether this process holds :func:`output_lock` on ``out``."""
    return _holder(out) == str(os.getpid())


# ------------------------------------------------------------------------------------ the one helper


@contextlib.contextmanager
def own_output(out: Path, command: str, *, overwrite: bool = False, writes: Sequence[str] | None = None,
               inputs: Iterable[Path] = (), option: str = "--out") -> Iterator[OwnedFolder]:
    """Hold the output folder ``out`` for ``command`` (``"demo"``, ``"evaluate"``, ...) while it writes.

    Refused (JobError, nothing touched) when ``out`` is a broken link, a file, or lies inside, on or
    around a folder of ``inputs`` (dataset paths: :func:`dataset_folders`); when another job holds it;
    when it is not empty and not ``overwrite``; with ``overwrite``, when the files it would replace are
    not provably this command's (:func:`claim_folder`). The yielded
    :class:`OwnedFolder` records the files the command writes."""
    out = Path(out)
    check_out_path(out, option)
    check_outside_inputs(out, inputs, option)
    with output_lock(out):
        owned = claim_folder(out, command, overwrite=overwrite, writes=writes, option=option)
        try:
            yield owned
        except BaseException:
            owned.withdraw()  # failed before writing: a folder this call created is left as it was, absent
            raise
