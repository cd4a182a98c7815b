"""Bookkeeping of a resumable job that writes files into an output folder.

- :class:`Journal`: an append-only, fsynced record (``OUT/.journal.jsonl``, one file per rank) of
  every file written and its sha256; :func:`verified_entry` trusts an entry only if every file it
  names is on disk with that content, so a resume checks content, not existence.
- :func:`check_output_state` / :func:`claim_output`: an output folder is new, resumed with the very
  same settings (stored in ``OUT/.medsynth_job.json``), or overwritten only if a job made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from medsynth.data.atomic import atomic_write_text
from medsynth.errors import JobError

JOB_FILE = ".medsynth_job.json"
JOURNAL_PREFIX = ".journal"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _journal_name(rank: int) -> str:
    return f"{JOURNAL_PREFIX}.jsonl" if rank == 0 else f"{JOURNAL_PREFIX}.rank{rank:05d}.jsonl"


class Journal:
    """Append-only record of written files (``OUT/.journal.jsonl``; one file per rank).

    Each line: ``{"key": ..., "files": {relative path: sha256}, ...}``, flushed and fsynced."""

    def __init__(self, out: Path, rank: int = 0) -> None:
        self.path = Path(out) / _journal_name(rank)

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, sort_keys=True) + "\n"
        with open(self.path, "a+b") as fh:
            # a kill can leave a last line without its newline: end it, so this entry stays whole
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())


def read_journals(out: Path) -> dict[str, list[dict[str, Any]]]:
    """All journal entries under ``out`` by key (every rank's file; a torn last line is skipped)."""
    entries: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(out).glob(f"{JOURNAL_PREFIX}*.jsonl")):
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
    return path.is_dir() and not any(path.iterdir())


def check_output_state(out: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> str:
    """Read-only check of the output folder. Returns ``"new"``, ``"resume"`` or ``"overwrite"``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} exists and is not a folder")
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
        return "overwrite"
    try:
        old = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise JobError(f"{job_file}: unreadable ({exc}); use --overwrite to start again") from None
    diff = _settings_difference(old, settings)
    if diff is not None:
        raise JobError(
            f"--resume with different settings: {diff} (stored in {job_file}); "
            "use the original options, or --overwrite to start again"
        )
    return "resume"


def claim_output(out: Path, settings: dict[str, Any], state: str) -> None:
    """Create / clear the output folder and store the settings (rank 0 only)."""
    out = Path(out)
    if state == "overwrite":
        for child in sorted(out.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if state == "resume":
        for folder in (out, out / "imagesTr", out / "labelsTr", out / "imagesTs", out / "labelsTs"):
            if folder.is_dir():
                for stray in folder.glob(".*.tmp-*"):  # temp files of a killed write
                    stray.unlink(missing_ok=True)
    atomic_write_text(out / JOB_FILE, json.dumps(settings, indent=2, sort_keys=True) + "\n")
