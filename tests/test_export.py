"""Self-contained outputs and ``medsynth export``: an augmented dataset that can be moved, an nnU-Net
v2 raw dataset that nnU-Net's own dataset checks accept, and written headers that keep the input's
sform/qform codes.

nnU-Net's checks (``verify_dataset_integrity`` of nnU-Net v2) are restated here from its source:
``dataset.json`` has ``labels`` (name -> int), ``channel_names``, ``numTraining`` and ``file_ending``;
``imagesTr`` holds ``CASE_XXXX<ending>`` for each channel and ``labelsTr`` ``CASE<ending>``;
``numTraining`` is the number of cases found; label 0 is called ``background`` and the values are
0, 1, 2, ... without gaps; every label map holds only declared values; images and labels share shape
and spacing. Files are re-read from disk with nibabel."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.augment import AugmentOptions, run_augment
from medsynth.cli import app
from medsynth.data.export import export_dataset
from medsynth.data.formats import register_format, unregister_format
from medsynth.data.formats.csv import CsvFormat
from medsynth.data.manifest import read_manifest
from medsynth.data.validate import validate_dataset
from medsynth.errors import ConfigError, DataError, JobError


def codes(path: Path) -> tuple[int, int]:
    hdr = nib.load(str(path)).header
    return int(hdr["sform_code"]), int(hdr["qform_code"])


def set_codes(folder: Path, sform: int, qform: int) -> None:
    """Rewrite every NIfTI file under ``folder`` with these header codes (data and affine kept)."""
    for f in sorted(folder.rglob("*.nii.gz")):
        img = nib.load(str(f))
        data, affine = np.asarray(img.dataobj), img.affine
        out = nib.Nifti1Image(data, affine, img.header)
        out.set_sform(affine, code=sform)
        out.set_qform(affine, code=qform)
        nib.save(out, str(f))


@pytest.fixture(scope="module")
def msd(tmp_path_factory) -> Path:
    """A 3D phantom MSD dataset whose files say sform_code 2 (aligned), qform_code 0."""
    from medsynth.data.phantoms import make_phantom_dataset

    path = make_phantom_dataset(tmp_path_factory.mktemp("exp") / "data", dim=3, cases=3, size=16, seed=4)
    set_codes(path.parent, 2, 0)
    return path


@pytest.fixture(scope="module")
def augmented(msd, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aug") / "plus"
    run_augment(AugmentOptions(input=msd, out=out, method="synthseg", num=2, seed=0))
    return out


def nnunet_problems(folder: Path) -> list[str]:
    """nnU-Net v2's dataset checks (see the module docstring); [] when the folder passes them."""
    problems = []
    data = json.loads((folder / "dataset.json").read_text())
    missing = [k for k in ("labels", "channel_names", "numTraining", "file_ending") if k not in data]
    if missing:
        return [f"dataset.json lacks {missing}"]
    ending, channels = data["file_ending"], len(data["channel_names"])
    ids = sorted({f.name[: -len(ending) - 5] for f in (folder / "imagesTr").iterdir() if f.name.endswith(ending)})
    if len(ids) != data["numTraining"]:
        problems.append(f"numTraining {data['numTraining']} but {len(ids)} cases")
    values = sorted(data["labels"].values())
    if data["labels"].get("background") != 0 or values != list(range(len(values))):
        problems.append(f"labels {data['labels']}")
    for cid in ids:
        files = [folder / "imagesTr" / f"{cid}_{c:04d}{ending}" for c in range(channels)]
        label = folder / "labelsTr" / f"{cid}{ending}"
        if not all(f.is_file() for f in files) or not label.is_file():
            problems.append(f"{cid}: missing files")
            continue
        seg = nib.load(str(label))
        if not set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(values):
            problems.append(f"{cid}: undeclared label values")
        for f in files:
            img = nib.load(str(f))
            if img.shape != seg.shape or not np.allclose(img.header.get_zooms(), seg.header.get_zooms()):
                problems.append(f"{f.name}: shape/spacing differ from the label's")
            if np.isnan(np.asarray(img.dataobj, dtype=np.float64)).any():
                problems.append(f"{f.name}: NaN")
    return problems


# ------------------------------------------------------------------------------------ augment --real


def test_an_augmented_folder_can_be_moved_and_still_validates(augmented, msd, tmp_path):
    moved = tmp_path / "elsewhere" / "plus"
    shutil.copytree(augmented, moved)
    m = read_manifest(moved / "dataset.json")
    assert len(m.cases) == 5 and all(moved in p.parents for c in m.cases for p in [*c.images, c.label])
    assert validate_dataset(moved / "dataset.json").ok
    text = (moved / "dataset.json").read_text()
    assert ".." not in text and str(msd.parent) not in text
    # the real files are the input's bytes (hard links here: same file system)
    src = read_manifest(msd).cases[0]
    assert (augmented / "imagesTr" / src.images[0].name).read_bytes() == src.images[0].read_bytes()
    assert os.stat(augmented / "imagesTr" / src.images[0].name).st_ino == os.stat(src.images[0]).st_ino


def test_real_copy_and_reference(msd, tmp_path):
    run_augment(AugmentOptions(input=msd, out=tmp_path / "c", method="synthseg", num=1, real="copy"))
    first = read_manifest(msd).cases[0].images[0]
    copied = tmp_path / "c" / "imagesTr" / first.name
    assert copied.read_bytes() == first.read_bytes() and os.stat(copied).st_ino != os.stat(first).st_ino
    run_augment(AugmentOptions(input=msd, out=tmp_path / "r", method="synthseg", num=1, real="reference"))
    m = read_manifest(tmp_path / "r" / "dataset.json")
    assert m.cases[0].images == [first] and not (tmp_path / "r" / "imagesTr" / first.name).exists()
    with pytest.raises(ConfigError, match="--real must be one of link, copy, reference"):
        run_augment(AugmentOptions(input=msd, out=tmp_path / "x", method="synthseg", num=1, real="move"))


def test_written_headers_keep_the_input_sform_and_qform_codes(augmented):
    prov = [json.loads(x) for x in (augmented / "provenance.jsonl").read_text().splitlines()]
    for p in prov:
        assert codes(augmented / p["label"]) == (2, 0)
        assert codes(augmented / p["images"][0]) == (2, 0)
    from medsynth.data.nifti import read_volume, write_volume

    src = read_manifest(augmented / "dataset.json").cases[0]
    vol = read_volume(src.label, kind="label")
    for pair in ((0, 1), (1, 1), (4, 2)):
        out = write_volume(augmented.parent / f"codes_{pair[0]}{pair[1]}.nii.gz", vol.array, vol.affine, kind="label",
                           codes=pair)
        assert codes(out) == pair
        np.testing.assert_allclose(nib.load(str(out)).affine, vol.affine, atol=1e-5)


# ------------------------------------------------------------------------------------ export


def test_export_to_nnunet_passes_validate_and_nnunets_checks(augmented, tmp_path):
    out = tmp_path / "nnUNet_raw" / "Dataset002_Phantom"
    s = export_dataset(augmented / "dataset.json", out, "nnunet")
    assert (s.cases, s.name, s.rewritten) == (5, "Dataset002_Phantom", 0)
    data = json.loads((out / "dataset.json").read_text())
    assert data["name"] == "Dataset002_Phantom" and data["numTraining"] == 5 and data["file_ending"] == ".nii.gz"
    assert data["channel_names"] == {"0": "T1"} and data["labels"]["background"] == 0
    assert sorted(f.name for f in (out / "imagesTr").iterdir())[:2] == ["phantom_000_0000.nii.gz",
                                                                       "phantom_001_0000.nii.gz"]
    assert nnunet_problems(out) == []
    report = validate_dataset(out)
    assert report.ok, report
    # bytes unchanged (linked), so the header codes stay the input's
    assert codes(out / "imagesTr" / "syn_00000_0000.nii.gz") == (2, 0)
    assert (out / "labelsTr" / "syn_00001.nii.gz").read_bytes() == (augmented / "labelsTr" / "syn_00001.nii.gz").read_bytes()


def test_multichannel_files_are_split_into_channel_files(msd, tmp_path):
    """An MSD case whose image is one (X, Y, Z, 2) file becomes CASE_0000 and CASE_0001."""
    src = read_manifest(msd)
    folder = tmp_path / "mc"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for c in src.cases:
        img = nib.load(str(c.images[0]))
        t1 = np.asarray(img.dataobj, dtype=np.float32)
        both = np.stack([t1, 2.0 * t1 + 5.0], axis=-1)
        out = nib.Nifti1Image(both, img.affine)
        out.set_sform(img.affine, code=2)
        out.set_qform(img.affine, code=0)
        nib.save(out, str(folder / "imagesTr" / c.images[0].name))
        shutil.copy(c.label, folder / "labelsTr" / c.label.name)
        training.append({"image": f"imagesTr/{c.images[0].name}", "label": f"labelsTr/{c.label.name}"})
    labels = json.loads(msd.read_text())["labels"]
    (folder / "dataset.json").write_text(json.dumps({"name": "mc", "modality": {"0": "T1", "1": "T2"},
                                                     "labels": labels, "training": training}))
    out = tmp_path / "Dataset007_Two"
    s = export_dataset(folder / "dataset.json", out, "nnunet")
    assert s.rewritten == 2 * 3 and json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "T1", "1": "T2"}
    assert nnunet_problems(out) == []
    first = src.cases[0].case_id
    t1 = np.asarray(nib.load(str(src.cases[0].images[0])).dataobj, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "imagesTr" / f"{first}_0000.nii.gz")).dataobj), t1)
    np.testing.assert_array_equal(np.asarray(nib.load(str(out / "imagesTr" / f"{first}_0001.nii.gz")).dataobj),
                                  2.0 * t1 + 5.0)
    assert codes(out / "imagesTr" / f"{first}_0001.nii.gz") == (2, 0)
    assert validate_dataset(out).ok
    back = export_dataset(out, tmp_path / "msd_again", "msd", copy=True)  # and back to MSD, copied
    m = read_manifest(back.manifest)
    assert len(m.cases) == 3 and m.num_channels == 2 and validate_dataset(back.manifest).ok
    assert back.copied == 3 * 3 and os.stat(m.cases[0].images[0]).st_nlink == 1


def test_export_to_csv_and_msd_keep_the_cases(augmented, tmp_path):
    for fmt, name in (("csv", "dataset.csv"), ("msd", "dataset.json")):
        s = export_dataset(augmented / "dataset.json", tmp_path / fmt, fmt)
        assert s.manifest == tmp_path / fmt / name
        m = read_manifest(s.manifest)
        assert [c.case_id for c in m.cases] == [c.case_id for c in read_manifest(augmented / "dataset.json").cases]
        assert validate_dataset(s.manifest).ok


def test_nnunet_rules_and_output_folder_are_checked_first(augmented, msd, tmp_path):
    with pytest.raises(ConfigError, match="DatasetNNN_Name"):
        export_dataset(augmented / "dataset.json", tmp_path / "plain_name", "nnunet")
    assert not (tmp_path / "plain_name").exists()
    (tmp_path / "Dataset003_Full").mkdir()
    (tmp_path / "Dataset003_Full" / "x.txt").write_text("mine")
    with pytest.raises(JobError, match="not an empty folder"):
        export_dataset(augmented / "dataset.json", tmp_path / "Dataset003_Full", "nnunet")
    with pytest.raises(ConfigError, match="manifest format 'nifti' is unknown"):
        export_dataset(augmented / "dataset.json", tmp_path / "y", "nifti")
    # label values with a gap: nnU-Net needs 0, 1, 2, ...
    gap = tmp_path / "gap"
    shutil.copytree(msd.parent, gap)
    data = json.loads((gap / "dataset.json").read_text())
    data["labels"]["9"] = "extra"
    (gap / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"without gaps.*missing \[7, 8\]"):
        export_dataset(gap / "dataset.json", tmp_path / "Dataset004_Gap", "nnunet")
    result = CliRunner().invoke(app, ["export", str(augmented / "dataset.json"), "--format", "nnunet", "--out",
                                      str(tmp_path / "bad")])
    assert result.exit_code == 1 and "DatasetNNN_Name" in result.output and "Traceback" not in result.output


def test_cli_export_and_name_option(augmented, tmp_path):
    out = tmp_path / "Dataset012_Brain"
    result = CliRunner().invoke(app, ["export", str(augmented / "dataset.json"), "--format", "nnunet", "--out", str(out),
                                      "--name", "Dataset012_Brain_v2", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["cases"] == 5 and summary["linked"] == 10
    assert json.loads((out / "dataset.json").read_text())["name"] == "Dataset012_Brain_v2"


class TsvFormat(CsvFormat):
    """A new format: the CSV layout under another name (a registered format needs no change to export)."""

    name = "tsvish"
    manifest_name = "cases.csv"


def test_a_newly_registered_format_exports_without_changes(augmented, tmp_path):
    register_format(TsvFormat(), before="csv")
    try:
        s = export_dataset(augmented / "dataset.json", tmp_path / "t", "tsvish")
        assert s.manifest == tmp_path / "t" / "cases.csv" and s.format == "tsvish"
        m = read_manifest(s.manifest)
        assert m.format == "tsvish" and len(m.cases) == 5
        assert all(re.fullmatch(r"imagesTr/\w+\.nii\.gz", p.relative_to(tmp_path / "t").as_posix())
                   for c in m.cases for p in c.images)
    finally:
        unregister_format("tsvish")
