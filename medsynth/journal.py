"""Bookkeeping of a resumable job that writes files into an output folder.

- :class:`Journal`: an append-only, fsynced record (``OUT/.journal.jsonl``, one file per rank) of
  every file written and its sha256; :func:`verified_entry` trusts an entry only if every file it
  names is on disk with that content, so a resume checks content, not existence.
- :func:`check_output_state` / :func:`claim_output`: an output folder is new, resumed with the very
  same settings (stored in ``OUT/.medsynth_job.json``), or overwritten; an overwrite removes only
  the files the job's journal lists as made by it (unchanged since), never a file a user added.
- :func:`output_lock`: one job per output folder. An exclusive ``flock`` on ``OUT/.medsynth.lock``
  (holding the PID) for the job's life; the kernel releases it when the process dies, so a killed
  job never leaves a stale lock. Stray temp files of a killed job are removed only under the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

from medsynth.data.atomic import atomic_write_text, named_os_error
from medsynth.data.ledger import LOCK_FILE, check_out_path, sha256_file

# the lock's home is medsynth.data.ledger (the data layer's writers take it too); named here for the jobs
from medsynth.data.ledger import held_here as held_here
from medsynth.data.ledger import lock_holder as lock_holder
from medsynth.data.ledger import output_lock as output_lock
from medsynth.data.manifest import Manifest
from medsynth.errors import JobError, MedsynthError

JOB_FILE = ".medsynth_job.json"
JOURNAL_PREFIX = ".journal"
TEMP_GLOB = ".*.tmp-*"  # the temp names of medsynth.data.atomic.temp_path_for
#: the settings key of the job's input files and their sha256 (see check_output_state)
INPUTS_KEY = "inputs"
#: the names :func:`_journal_name` gives (and nothing else: a user's ``.journal-notes.jsonl`` is not one)
JOURNAL_RE = re.compile(r"^\.journal(\.rank\d{5})?\.jsonl$")


def _journal_name(rank: int) -> str:
    return f"{JOURNAL_PREFIX}.jsonl" if rank == 0 else f"{JOURNAL_PREFIX}.rank{rank:05d}.jsonl"


class Journal:
    """Append-only record of written files (``OUT/.journal.jsonl``; one file per rank).

    Each line: ``{"key": ..., "files": {relative path: sha256}, ...}``, flushed and fsynced."""

    def __init__(self, out: Path, rank: int = 0) -> None:
        self.path = Path(out) / _journal_name(rank)

    def append(self, entry: dict[str, Any]) -> None:
        """Append one entry (flushed and fsynced); an OSError names the journal file."""
        line = json.dumps(entry, sort_keys=True) + "\n"
        try:
            with open(self.path, "a+b") as fh:
                # a kill can leave a last line without its newline: end it, so this entry stays whole
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        fh.write(b"\n")
                fh.write(line.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            named = named_os_error(exc, self.path)
            if named is exc:
                raise
            raise named from exc


def journal_paths(out: Path) -> list[Path]:
    """The journal files of ``out`` (every rank's): only names :func:`_journal_name` gives."""
    return sorted(p for p in Path(out).glob(f"{JOURNAL_PREFIX}*.jsonl") if JOURNAL_RE.match(p.name))


def read_journals(out: Path) -> dict[str, list[dict[str, Any]]]:
    """All journal entries under ``out`` by key (every rank's file; a torn last line is skipped)."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for path in journal_paths(out):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("files"), dict):
                entries.setdefault(entry["key"], []).append(entry)
    return entries


def _files_verified(out: Path, files: dict[str, str]) -> bool:
    for rel, digest in files.items():
        path = out / rel
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def verified_entry(out: Path, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The newest journal entry whose files are all on disk with the recorded sha256, or None."""
    for entry in reversed(entries or []):
        if _files_verified(out, entry["files"]):
            return entry
    return None


# ------------------------------------------------------------------------------------ the output folder


def _settings_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    from medsynth.config import changed_settings

    changed = changed_settings(old, new)
    if not changed:
        return None
    key, a, b = changed[0]
    return f"{key} was {a!r}, now {b!r}"


def _is_empty_dir(path: Path) -> bool:
    """A folder with nothing in it but (at most) the lock file of the job that holds it."""
    return path.is_dir() and all(child.name == LOCK_FILE for child in path.iterdir())


# ------------------------------------------------------------------------------------ what a job made


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _read_job_file(out: Path, what: str) -> dict[str, Any]:
    """The settings stored in ``OUT/.medsynth_job.json``; JobError unless it is a readable, non-empty object."""
    job_file = out / JOB_FILE
    try:
        data = json.loads(job_file.read_text(encoding="utf-8"), parse_constant=_not_json)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise JobError(f"cannot {what} {out}: its job file {JOB_FILE} is unreadable ({exc}); medsynth cannot tell "
                       "which files it made there, so it touches nothing: remove them yourself, or use another --out") from None
    if not isinstance(data, dict) or not data:
        raise JobError(f"cannot {what} {out}: its job file {JOB_FILE} is empty or not one written by medsynth; "
                       "medsynth cannot tell which files it made there, so it touches nothing: remove them "
                       "yourself, or use another --out")
    return data


def _journaled_files(out: Path) -> dict[str, set[str]]:
    """Every file the journals of ``out`` record (path relative to ``out`` -> the sha256 digests recorded).

    JobError if an entry names a path outside ``out``."""
    made: dict[str, set[str]] = {}
    root = Path(os.path.realpath(out))
    for entries in read_journals(out).values():
        for entry in entries:
            for rel, digest in entry["files"].items():
                inside = isinstance(rel, str) and not os.path.isabs(rel)
                if not inside or root not in Path(os.path.realpath(out / rel)).parents:
                    raise JobError(f"cannot overwrite {out}: its journal names {rel!r}, outside the folder; "
                                   "it was not written by medsynth, so nothing was removed")
                made.setdefault(Path(rel).as_posix(), set()).add(str(digest))
    return made


def journaled_bytes(out: Path) -> int:
    """Bytes of the files the journals of ``out`` record that are still there (what an overwrite frees,
    at most); 0 for a folder without journals."""
    total = 0
    for rel in _journaled_files(out):
        with contextlib.suppress(OSError):
            total += (Path(out) / rel).stat().st_size
    return total


def _job_made_files(out: Path) -> list[Path]:
    """The files an overwrite of ``out`` removes: those the journals list (each unchanged since it was
    recorded, or a hard link whose content stays under another name), the journals and the job file.
    JobError, before anything is removed, if one was changed."""
    made = _journaled_files(out)
    remove: list[Path] = []
    for rel, digests in sorted(made.items()):
        path = out / rel
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
            remove.append(path)  # a hard link (a real case placed by link): its content lives on under its other name
            continue
        if path.is_symlink() or not path.is_file() or sha256_file(path) not in digests:
            raise JobError(f"cannot overwrite {out}: {rel} was changed after medsynth wrote it (its content is "
                           "not the one the journal records); move it away first. Nothing was removed")
        remove.append(path)
    remove += journal_paths(out)
    remove.append(out / JOB_FILE)
    return remove


def _remove_strays(out: Path, folders: set[Path]) -> None:
    """Temp files of a killed write in ``out`` and ``folders``; only while this process holds the lock
    (a running job's temp files are not strays, and without the lock another job may be running)."""
    if not held_here(out):
        return
    for folder in sorted({out, *folders}):
        if folder.is_dir():
            for stray in folder.glob(TEMP_GLOB):
                if stray.is_file() and not stray.is_symlink():
                    stray.unlink(missing_ok=True)


def _input_sha(path: Path) -> str | None:
    """sha256 of an input file; None for one that is missing or not a regular file (validation names
    its problem)."""
    try:
        return sha256_file(path)
    except (MedsynthError, OSError):
        return None


def dataset_inputs(manifest: Manifest) -> dict[str, dict[str, str | None]]:
    """sha256 of every file of a dataset: ``{"case ID": {path: sha256}, ..., "manifest": {path: sha256}}``
    (cases in manifest order): what a job records when it starts, so that a resume notices a changed
    input (:func:`changed_input`)."""
    from medsynth.data.formats import get_format

    inputs: dict[str, dict[str, str | None]] = {}
    for case in manifest.cases:
        paths = [*case.images, *([case.label] if case.label is not None else [])]
        inputs[f"case {case.case_id}"] = {str(Path(p)): _input_sha(Path(p)) for p in paths}
    source = get_format(manifest.format).manifest_file(Path(manifest.source or "."))
    inputs["manifest"] = {str(source): _input_sha(source)}
    return inputs


def changed_input(old: object, new: object) -> str | None:
    """The first input file whose sha256 differs between two ``inputs`` records (see
    :func:`check_output_state`), as ``"input case c1: /data/labelsTr/c1.nii.gz has changed"``."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    for name, files in new.items():
        before = old.get(name)
        if not isinstance(before, dict) or not isinstance(files, dict):
            return f"input {name} is new"
        for path, digest in files.items():
            if path not in before:
                return f"input {name}: {path} is new"
            if before[path] != digest:
                return f"input {name}: {path} has changed (sha256 {str(before[path])[:12]}..., now {str(digest)[:12]}...)"
        gone = sorted(set(before) - set(files))
        if gone:
            return f"input {name}: {gone[0]} is no longer used"
    gone_names = [name for name in old if name not in new]
    if gone_names:
        return f"input {gone_names[0]} is no longer in the dataset"
    return None


def check_output_state(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Read-only check of the output folder. Returns ``"new"``, ``"resume"`` or ``"overwrite"``.

    An overwrite needs a job file medsynth can read and journals that name only files inside ``out``.
    A resume needs the very same settings; ``settings["inputs"]`` (if present), ``{name: {path: sha256}}``
    for every input file of the job (``name``: ``"case ID"``, ``"manifest"``, ``"model"``), is compared
    first, so that a changed input is reported by its name and file."""
    out = Path(out)
    check_out_path(out)
    if not out.exists() or _is_empty_dir(out):
        return "new"
    job_file = out / JOB_FILE
    if not resume and not overwrite:
        raise JobError(
            f"--out {out} exists and is not empty; pass --resume to continue its job or --overwrite to replace it"
        )
    if not job_file.is_file():
        what = "resume" if resume else "overwrite"
        raise JobError(f"cannot {what} {out}: it was not written by medsynth augment (no {JOB_FILE})")
    if overwrite:
        _read_job_file(out, "overwrite")
        _journaled_files(out)
        return "overwrite"
    old = _read_job_file(out, "resume")
    changed = changed_input(old.get(INPUTS_KEY), settings.get(INPUTS_KEY))
    if changed is not None:
        raise JobError(f"cannot resume {out}: {changed} since the job started, so its files would mix old and new "
                       "inputs; restore the input, or pass --overwrite to start again from the new one")
    diff = _settings_difference(old, settings)
    if diff is not None:
        raise JobError(
            f"--resume with different settings: {diff} (stored in {job_file}); "
            "use the original options, or --overwrite to start again"
        )
    return "resume"


def layout_folders() -> set[str]:
    """The folders (relative to a dataset root) where the registered manifest formats put case files."""
    from medsynth.data.formats import LIST_OF_FORMATS

    folders = set()
    for fmt in LIST_OF_FORMATS:
        for split in ("train", "test"):
            for path in [*fmt.image_paths(Path(), "case", 2, ".nii.gz", split), fmt.label_path(Path(), "case", ".nii.gz", split)]:
                if path.parent != Path():
                    folders.add(path.parent.as_posix())
    return folders


def claim_output(out: Path, settings: dict[str, Any], state: str) -> None:
    """Create / clear the output folder and store the settings (rank 0 only; under :func:`output_lock`).

    ``"overwrite"`` removes the files the journals list (JobError, removing nothing, if one of them was
    changed since), the journals and the job file, and folders that this leaves empty; files a user
    added stay. ``"overwrite"`` and ``"resume"`` remove stray temp files of a killed write when this
    process holds :func:`output_lock` on ``out`` (never without it)."""
    out = Path(out)
    folders = {out / name for name in layout_folders()}
    if state == "overwrite":
        _read_job_file(out, "overwrite")
        removed = _job_made_files(out)
        for path in removed:
            path.unlink(missing_ok=True)
        parents = {path.parent for path in removed}
        _remove_strays(out, folders | parents)
        for folder in sorted(parents, key=lambda f: len(f.parts), reverse=True):
            while folder != out and out in folder.parents:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
                folder = folder.parent
    out.mkdir(parents=True, exist_ok=True)
    if state == "resume":
        _remove_strays(out, folders | {(out / rel).parent for rel in _journaled_files(out)})
    atomic_write_text(out / JOB_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
