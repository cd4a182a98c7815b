"""The manifest-format registry: a new format is one ManifestFormat subclass and one registration,
and then phantoms, read/write, validate and augment all speak it."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsynth.augment import AugmentOptions, run_augment
from medsynth.data.formats import (
    Case,
    Manifest,
    ManifestFormat,
    detect_format,
    format_names,
    get_format,
    register_format,
    unregister_format,
)
from medsynth.data.formats.base import relative, resolve
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.data.validate import validate_dataset
from medsynth.errors import ConfigError, DataError


class TsvFormat(ManifestFormat):
    """A toy format: ``cases.tsv`` with columns case_id, image, label; files in ``img/`` and ``seg/``."""

    name = "tsv"
    manifest_name = "cases.tsv"
    declares_labels = False

    def sniff(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".tsv"

    def read(self, path: Path) -> Manifest:
        root = path.parent.resolve()
        rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
        cases = [Case(r["case_id"], [resolve(root, r["image"])], resolve(root, r["label"])) for r in rows]
        return Manifest(format=self.name, cases=cases, source=path.resolve(), root=root, name=path.stem)

    def text(self, manifest: Manifest, root: Path) -> str:
        lines = ["case_id\timage\tlabel"]
        lines += [f"{c.case_id}\t{relative(c.images[0], root)}\t{relative(c.label, root)}" for c in manifest.cases]
        return "\n".join(lines) + "\n"

    def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
        return [Path(root) / "img" / f"{case_id}_{c}{ending}" for c in range(channels)]

    def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
        return Path(root) / "seg" / f"{case_id}{ending}"


@pytest.fixture
def tsv() -> Iterator[TsvFormat]:
    fmt = TsvFormat()
    register_format(fmt, before="msd")
    yield fmt
    unregister_format("tsv")


def test_a_registered_format_works_end_to_end(tsv: TsvFormat, tmp_path: Path) -> None:
    assert "tsv" in format_names() and get_format("tsv") is tsv
    # phantoms write it, the reader detects it, validation passes
    data = make_phantom_dataset(tmp_path / "d", dim=2, cases=2, size=16, format="tsv")
    assert data == tmp_path / "d" / "cases.tsv" and (tmp_path / "d" / "img" / "phantom_000_0.nii.gz").is_file()
    assert detect_format(data) is tsv
    m = read_manifest(data)
    assert m.format == "tsv" and [c.case_id for c in m.cases] == ["phantom_000", "phantom_001"]
    assert validate_dataset(data).ok
    # augment writes its output in the same format and layout
    s = run_augment(AugmentOptions(input=data, out=tmp_path / "aug", method="synthseg", num=1, seed=0))
    assert s.manifest == tmp_path / "aug" / "cases.tsv"
    out = read_manifest(s.manifest)
    assert [c.case_id for c in out.cases] == ["phantom_000", "phantom_001", "syn_00000"]
    syn = out.cases[-1]
    assert syn.images == [tmp_path / "aug" / "img" / "syn_00000_0.nii.gz"]
    assert syn.label == tmp_path / "aug" / "seg" / "syn_00000.nii.gz"
    assert read_volume(syn.images[0]).shape == read_volume(syn.label, kind="label").shape == (16, 16)


def test_unknown_format_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: nnunet, csv, msd"):
        get_format("nifti")
    odd = tmp_path / "cases.tsv"
    odd.write_text("case_id\n")
    with pytest.raises(DataError, match="unknown manifest type"):
        detect_format(odd)  # not registered here
