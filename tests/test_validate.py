"""``medsynth validate``: every bad input of BAD_INPUTS.md, built here with nibabel, is rejected
with a message naming the file and the problem, a non-zero exit and no traceback; all problems of a
dataset come out together; the fingerprint equals values computed directly from the files."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.nifti import write_volume
from medsynth.data.validate import load_valid_dataset, validate_dataset
from medsynth.errors import DataError

SHAPE = (8, 8, 6)
AFFINE = np.array([[1.0, 0, 0, -4.0], [0, 1.5, 0, 2.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]])
LABELS = {"0": "background", "1": "organ", "2": "tumour"}


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def _label(seed: int, shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2:6] = 1
    lab[3:5, 3:5, : 2 + seed % 3] = 2
    return lab


def make_msd(root: Path, n: int = 3, shape=SHAPE, channels: int = 1) -> Path:
    """A valid MSD dataset: root/dataset.json, imagesTr/case_k.nii.gz (+ _chN), labelsTr/case_k.nii.gz."""
    training = []
    for k in range(n):
        imgs = []
        for c in range(channels):
            name = f"imagesTr/case_{k}.nii.gz" if channels == 1 else f"imagesTr/case_{k}_ch{c}.nii.gz"
            write_volume(root / name, _image(10 * k + c, shape), AFFINE, kind="image")
            imgs.append(name)
        write_volume(root / f"labelsTr/case_{k}.nii.gz", _label(k, shape), AFFINE, kind="label")
        training.append({"image": imgs[0] if channels == 1 else imgs, "label": f"labelsTr/case_{k}.nii.gz"})
    data = {
        "name": "tiny",
        "modality": {str(c): f"mr{c}" for c in range(channels)},
        "labels": LABELS,
        "numTraining": n,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(data, indent=1))
    return root / "dataset.json"


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def invoke(*args: str):
    result = CliRunner().invoke(app, ["validate", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def ds(tmp_path: Path) -> Path:
    return make_msd(tmp_path)


# ---------------------------------------------------------------- the bad inputs, one per test


def _save(img: nib.Nifti1Image, path: Path) -> None:
    nib.save(img, str(path))


def bad_qform_sform(root: Path) -> str:  # 1
    img = nib.Nifti1Image(_image(0), AFFINE)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [7.0, 0, 0]
    img.set_qform(shifted, code=1)
    img.set_sform(AFFINE, code=1)
    _save(img, root / "imagesTr/case_1.nii.gz")
    return "imagesTr/case_1.nii.gz"


def bad_label_slope(root: Path) -> str:  # 2
    img = nib.Nifti1Image(_label(0).astype(np.int16), AFFINE)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(0.5, 0.0)
    _save(img, root / "labelsTr/case_0.nii.gz")
    return "labelsTr/case_0.nii.gz"


def bad_float_label(root: Path) -> str:  # 3
    lab = _label(2).astype(np.float32)
    lab[lab == 1] = 0.9999
    _save(nib.Nifti1Image(lab, AFFINE), root / "labelsTr/case_2.nii.gz")
    return "labelsTr/case_2.nii.gz"


def bad_mirrored_label(root: Path) -> str:  # 5
    mirrored = AFFINE.copy()
    mirrored[0, 0] = -1.0
    mirrored[0, 3] = 3.0
    _save(nib.Nifti1Image(_label(1), mirrored), root / "labelsTr/case_1.nii.gz")
    return "labelsTr/case_1.nii.gz"


def bad_shifted_label(root: Path) -> str:  # 5
    shifted = AFFINE.copy()
    shifted[:3, 3] += [0, 0, 4.0]
    _save(nib.Nifti1Image(_label(0), shifted), root / "labelsTr/case_0.nii.gz")
    return "labelsTr/case_0.nii.gz"


def bad_4d(root: Path) -> str:  # 6
    _save(nib.Nifti1Image(_image(0, (*SHAPE, 3)), AFFINE), root / "imagesTr/case_0.nii.gz")
    return "imagesTr/case_0.nii.gz"


def bad_nan(root: Path) -> str:  # 7
    a = _image(1)
    a[1, 2, 3] = np.nan
    a[0, 0, 0] = np.inf
    _save(nib.Nifti1Image(a, AFFINE), root / "imagesTr/case_1.nii.gz")
    return "imagesTr/case_1.nii.gz"


def bad_zero_size(root: Path) -> str:  # 8
    _save(nib.Nifti1Image(np.zeros((0, 8, 6), np.float32), AFFINE), root / "imagesTr/case_2.nii.gz")
    return "imagesTr/case_2.nii.gz"


def bad_truncated_gz(root: Path) -> str:  # 9
    p = root / "imagesTr/case_0.nii.gz"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 6])  # cuts only the gzip trailer: nibabel alone reads it fine
    return "imagesTr/case_0.nii.gz"


def bad_short_nii(root: Path) -> str:  # 10
    p = root / "imagesTr/case_1.nii"
    write_volume(p, _image(1), AFFINE, kind="image")
    p.write_bytes(p.read_bytes()[:-50])
    (root / "imagesTr/case_1.nii.gz").unlink()
    edit_json(root / "dataset.json", lambda d: d["training"][1].update(image="imagesTr/case_1.nii"))
    return "imagesTr/case_1.nii"


def bad_shear(root: Path) -> str:  # 11
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.4
    for p in ("imagesTr/case_2.nii.gz", "labelsTr/case_2.nii.gz"):
        data = nib.load(str(root / p)).get_fdata().astype(np.float32)
        _save(nib.Nifti1Image(data, sheared), root / p)
    return "imagesTr/case_2.nii.gz"


def bad_zero_pixdim(root: Path) -> str:  # 12
    p = root / "imagesTr/case_0.nii.gz"
    raw = bytearray(gzip.decompress(p.read_bytes()))
    raw[80:84] = struct.pack("<f", 0.0)  # pixdim[1]; nibabel would read it back as 1
    p.write_bytes(gzip.compress(bytes(raw)))
    return "imagesTr/case_0.nii.gz"


def bad_plain_as_gz(root: Path) -> str:  # 13
    p = root / "labelsTr/case_1.nii.gz"
    p.write_bytes(gzip.decompress(p.read_bytes()))
    return "labelsTr/case_1.nii.gz"


def bad_shape(root: Path) -> str:  # 14
    write_volume(root / "labelsTr/case_2.nii.gz", _label(2, (8, 8, 5)), AFFINE, kind="label")
    return "labelsTr/case_2.nii.gz"


def bad_label_value(root: Path) -> str:  # 15
    lab = _label(0)
    lab[0, 0, 0] = 7
    write_volume(root / "labelsTr/case_0.nii.gz", lab, AFFINE, kind="label")
    return "labelsTr/case_0.nii.gz"


def bad_missing(root: Path) -> str:  # 16 (one; several in test_missing_files_all_listed)
    (root / "labelsTr/case_2.nii.gz").unlink()
    return "labelsTr/case_2.nii.gz"


BAD = [
    ("01-qform-sform", bad_qform_sform, "qform and sform"),
    ("02-label-slope", bad_label_slope, "scaling"),
    ("03-float-label", bad_float_label, "non-integer"),
    ("05-mirrored-label", bad_mirrored_label, "flipped"),
    ("05-shifted-label", bad_shifted_label, "origin"),
    ("06-4d", bad_4d, "4D"),
    ("07-nan", bad_nan, "1 NaN and 1 Inf"),
    ("08-zero-size", bad_zero_size, "zero-size"),
    ("09-truncated-gz", bad_truncated_gz, "truncated"),
    ("10-short-nii", bad_short_nii, "truncated or corrupt"),
    ("11-shear", bad_shear, "sheared"),
    ("12-zero-pixdim", bad_zero_pixdim, "pixdim[1] = 0"),
    ("13-plain-as-gz", bad_plain_as_gz, "not gzip-compressed"),
    ("14-shape", bad_shape, "shape (8, 8, 5) differs"),
    ("15-label-value", bad_label_value, "label value 7 not in dataset.json labels {0, 1, 2}"),
    ("16-missing", bad_missing, "file not found"),
]


@pytest.mark.parametrize("make_bad,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_rejected(ds: Path, make_bad, expected: str) -> None:
    bad_file = make_bad(ds.parent)
    result = invoke(ds)
    assert result.exit_code == 1, result.output
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("error") and bad_file in ln), None)
    assert line is not None, result.output
    assert expected in line, result.output
    assert "FAILED" in result.stdout


def test_several_problems_reported_together(ds: Path) -> None:
    root = ds.parent
    files = [bad_nan(root), bad_label_value(root), bad_missing(root), bad_zero_pixdim(root)]
    result = invoke(ds, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["fingerprint"] is None
    errors = [p for p in report["problems"] if p["severity"] == "error"]
    for f in files:
        assert any(p["file"] == str(root / f) for p in errors), (f, errors)
    assert report["errors"] == len(errors) >= 4
    with pytest.raises(DataError) as info:
        load_valid_dataset(ds)
    for f in files:
        assert f in str(info.value)
    assert len(str(info.value).splitlines()) == 1 + report["errors"]


def test_missing_files_all_listed(ds: Path) -> None:
    root = ds.parent
    gone = ["imagesTr/case_0.nii.gz", "labelsTr/case_1.nii.gz", "labelsTr/case_2.nii.gz"]
    for f in gone:
        (root / f).unlink()
    result = invoke(ds)
    assert result.exit_code == 1
    for f in gone:
        assert f"{f}: file not found" in result.stdout


def test_unreadable_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"training": [')
    result = invoke(bad)
    assert result.exit_code == 1 and "broken.json" in result.stdout and "not valid JSON" in result.stdout
    assert "manifest not found" in invoke(tmp_path / "nope.json").stdout


def test_4d_with_declared_channels_and_trailing_singleton_ok(tmp_path: Path) -> None:
    # MSD BrainTumour style: one 4D file per case holding the declared channels.
    ds = make_msd(tmp_path)
    for k in range(3):
        four = np.stack([_image(k), _image(k + 5)], axis=-1)
        nib.save(nib.Nifti1Image(four, AFFINE), str(tmp_path / f"imagesTr/case_{k}.nii.gz"))
    edit_json(ds, lambda d: d.update(modality={"0": "T1", "1": "T2"}))
    nib.save(nib.Nifti1Image(_label(0)[..., None], AFFINE), str(tmp_path / "labelsTr/case_0.nii.gz"))
    result = invoke(ds, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, report["problems"]
    assert report["fingerprint"]["channels"] == ["T1", "T2"]
    assert report["fingerprint"]["shapes"]["median"] == list(SHAPE)
    # the same 4D file with 3 channels declared is an error naming both counts
    edit_json(ds, lambda d: d.update(modality={"0": "a", "1": "b", "2": "c"}))
    out = invoke(ds).stdout
    assert "holds 2 channels on its 4th axis" in out and "declares 3" in out


def test_channels_must_agree(tmp_path: Path) -> None:
    ds = make_msd(tmp_path, n=2, channels=2)
    assert invoke(ds).exit_code == 0
    moved = AFFINE.copy()
    moved[1, 3] += 3.0
    write_volume(tmp_path / "imagesTr/case_1_ch1.nii.gz", _image(0), moved, kind="image")
    result = invoke(ds)
    assert result.exit_code == 1
    assert "case_1_ch1.nii.gz: channel 1 (mr1) geometry differs from imagesTr/case_1_ch0.nii.gz: origin" in result.stdout


def test_duplicate_ids_and_mixed_dimensions(tmp_path: Path) -> None:
    ds = make_msd(tmp_path)
    edit_json(ds, lambda d: [e.update(case_id="same") for e in d["training"][:2]])
    result = invoke(ds)
    assert result.exit_code == 1 and "duplicate case ids ['same']" in result.stdout
    ds = make_msd(tmp_path)  # rewrite the manifest, then make case 2 a 2D slice
    write_volume(tmp_path / "imagesTr/case_2.nii.gz", _image(2)[..., 0], AFFINE, kind="image")
    write_volume(tmp_path / "labelsTr/case_2.nii.gz", _label(2)[..., 0], AFFINE, kind="label")
    result = invoke(ds)
    assert result.exit_code == 0, result.stdout  # a warning: volumes plus slices is a valid dataset
    assert "dataset.json: cases mix 2D and 3D volumes: 1 2D (case_2); 2 3D (case_0, case_1)" in result.stdout


def test_nnunet_num_training_and_orphan_label(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_Tiny"
    for k in range(2):
        write_volume(root / f"imagesTr/c{k}_0000.nii.gz", _image(k), AFFINE, kind="image")
        write_volume(root / f"labelsTr/c{k}.nii.gz", _label(k), AFFINE, kind="label")
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "tumour": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    assert invoke(root).exit_code == 0
    meta["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(meta))
    write_volume(root / "labelsTr/c9.nii.gz", _label(0), AFFINE, kind="label")
    result = invoke(root)
    assert result.exit_code == 1
    assert "dataset.json: numTraining is 5 but imagesTr/ holds 2 cases" in result.stdout
    assert "labelsTr/c9.nii.gz: label file has no image in imagesTr/" in result.stdout


def test_all_background_is_only_a_warning(ds: Path) -> None:
    write_volume(ds.parent / "labelsTr/case_1.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE, kind="label")
    result = invoke(ds)
    assert result.exit_code == 0, result.output
    assert "labelsTr/case_1.nii.gz: label map is all background (0)" in result.stdout
    assert "warning" in result.stdout and "OK" in result.stdout


def test_json_fingerprint_matches_direct_computation(ds: Path) -> None:
    result = invoke(ds, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == 0 and report["path"] == str(ds.resolve())
    fp = report["fingerprint"]
    root = ds.parent
    labels = [np.asarray(nib.load(str(root / f"labelsTr/case_{k}.nii.gz")).dataobj) for k in range(3)]
    images = [nib.load(str(root / f"imagesTr/case_{k}.nii.gz")).get_fdata() for k in range(3)]
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]))
    assert fp["cases"] == 3 and fp["dimensionality"] == 3 and fp["channels"] == ["mr0"]
    assert fp["label_voxels"]["by_value"] == {str(v): int(c) for v, c in enumerate(counts)}
    assert fp["label_voxels"]["by_name"]["tumour"] == int(counts[2])
    assert fp["spacings"]["median"] == pytest.approx([1.0, 1.5, 2.0])
    fg = np.concatenate([img[lab > 0] for img, lab in zip(images, labels)])
    inten = fp["intensity_foreground"]["mr0"]
    assert inten["voxels"] == fg.size
    assert inten["mean"] == pytest.approx(fg.mean()) and inten["std"] == pytest.approx(fg.std())
    assert inten["percentile_00_5"] == pytest.approx(np.percentile(fg, 0.5))
    assert inten["percentile_99_5"] == pytest.approx(np.percentile(fg, 99.5))
    assert inten["median"] == pytest.approx(np.median(fg))
    text = invoke(ds).stdout  # the human form prints the same numbers
    assert "Fingerprint" in text and f"{np.median(fg):.4g}" in text


def test_csv_and_2d_dataset_validate(tmp_path: Path) -> None:
    rows = ["image,label"]
    for k in range(2):
        write_volume(tmp_path / f"s{k}.nii.gz", _image(k)[..., 0], AFFINE, kind="image")
        write_volume(tmp_path / f"s{k}_seg.nii.gz", _label(k)[..., 0], AFFINE, kind="label")
        rows.append(f"s{k}.nii.gz,s{k}_seg.nii.gz")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    report = validate_dataset(tmp_path / "list.csv", progress=True)
    assert report.ok, report.problems
    assert report.fingerprint["dimensionality"] == 2 and report.fingerprint["shapes"]["median"] == [8, 8]
    manifest = load_valid_dataset(tmp_path / "list.csv")
    assert [c.case_id for c in manifest.cases] == ["s0", "s1"]


def test_phantom_datasets_validate(tmp_path: Path) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    for dim, size in ((2, 32), (3, 16)):
        path = make_phantom_dataset(tmp_path / f"p{dim}", dim=dim, cases=2, seed=1, size=size)
        report = validate_dataset(path)
        assert report.ok, report.problems
        assert report.fingerprint["dimensionality"] == dim
        assert len(report.fingerprint["label_voxels"]["by_value"]) >= 5


def test_subprocess_exit_code_and_no_traceback(ds: Path) -> None:
    root = ds.parent
    bad_truncated_gz(root)
    bad_label_value(root)
    shutil.copy(root / "imagesTr/case_1.nii.gz", root / "labelsTr/case_1.nii.gz")  # image as label
    proc = subprocess.run([sys.executable, "-m", "medsynth", "validate", str(ds), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "imagesTr/case_0.nii.gz: truncated" in proc.stdout
    assert "labelsTr/case_0.nii.gz: label value 7" in proc.stdout
    assert "labelsTr/case_1.nii.gz: label has" in proc.stdout  # float data with residue
