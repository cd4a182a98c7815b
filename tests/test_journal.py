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


def test_layout_folders_come_from_the_format_registry(tmp_path: Path) -> None:
    """A registered format's case folders are where claim_output looks for stray temp files."""
    from medsynth.data.atomic import temp_path_for
    from medsynth.data.formats import register_format, unregister_format
    from medsynth.data.formats.msd import MsdFormat
    from medsynth.journal import claim_output, layout_folders, output_lock

    class ScansFormat(MsdFormat):
        name = "scans-test"

        def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
            return [Path(root) / "scans" / f"{case_id}_{c}{ending}" for c in range(channels)]

        def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
            return Path(root) / "masks" / f"{case_id}{ending}"

    assert layout_folders() == {"imagesTr", "labelsTr", "imagesTs", "labelsTs"}
    register_format(ScansFormat())
    try:
        assert layout_folders() == {"imagesTr", "labelsTr", "imagesTs", "labelsTs", "scans", "masks"}
        out = tmp_path / "out"
        claim_output(out, {"seed": 0}, "new")
        stray = temp_path_for(out / "masks" / "c.nii.gz")
        stray.parent.mkdir()
        stray.write_text("half-written")
        with output_lock(out):
            claim_output(out, {"seed": 0}, "resume")
        assert not stray.exists()
    finally:
        unregister_format("scans-test")
    assert "scans" not in layout_folders()
