"""``provenance.jsonl``: one JSON record per synthetic case of an augmented dataset (method, seed,
source case, edits, the deformation's draws, model checksum), written by the augment job beside its
manifest and read by evaluation and ``medsynth downstream``."""

from __future__ import annotations

import json
from pathlib import Path

from medsynth.data.manifest import Manifest
from medsynth.errors import DataError

__all__ = ["PROVENANCE_FILE", "read_provenance"]

PROVENANCE_FILE = "provenance.jsonl"


def read_provenance(manifest: Manifest) -> dict[str, dict[str, object]] | None:
    """The ``provenance.jsonl`` records beside an augmented dataset's manifest, by case id (None: no file)."""
    root = manifest.root if manifest.root is not None else Path(manifest.source or ".").parent
    path = Path(root) / PROVENANCE_FILE
    if not path.is_file():
        return None
    records: dict[str, dict[str, object]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read provenance ({exc})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("case_id"), str):
            raise DataError(f"{path}: line {n} has no \"case_id\"")
        records[rec["case_id"]] = rec
    return records
