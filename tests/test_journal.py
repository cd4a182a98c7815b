"""The job journal: what it records is what a resume trusts."""

from __future__ import annotations

import json
from pathlib import Path

from medsynth.journal import Journal, read_journals, sha256_file, verified_entry


def test_entry_after_a_torn_line_is_kept_whole(tmp_path: Path) -> None:
    """A kill can leave a last line without its newline; the next entry must not be glued to it."""
    journal = Journal(tmp_path)
    (tmp_path / "a.txt").write_text("a")
    journal.append({"key": "syn:a", "files": {"a.txt": sha256_file(tmp_path / "a.txt")}})
    with open(journal.path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "syn:b", "files": {"b.tx')  # the torn write of a killed job
    (tmp_path / "c.txt").write_text("c")
    journal.append({"key": "syn:c", "files": {"c.txt": sha256_file(tmp_path / "c.txt")}})
    entries = read_journals(tmp_path)
    assert set(entries) == {"syn:a", "syn:c"}
    assert verified_entry(tmp_path, entries["syn:c"]) is not None


def test_verified_entry_checks_content_not_existence(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    (tmp_path / "x.nii.gz").write_bytes(b"good")
    journal.append({"key": "syn:x", "files": {"x.nii.gz": sha256_file(tmp_path / "x.nii.gz")}})
    assert verified_entry(tmp_path, read_journals(tmp_path)["syn:x"]) is not None
    (tmp_path / "x.nii.gz").write_bytes(b"bad!")  # same size, other content
    assert verified_entry(tmp_path, read_journals(tmp_path)["syn:x"]) is None
    assert json.loads(journal.path.read_text().splitlines()[0])["key"] == "syn:x"
