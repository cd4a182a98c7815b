"""DICOM series in (medsynth.data.dicom through read_volume): a folder of one series, written here by
SimpleITK from a phantom, reads back as the phantom's array and RAS affine; a manifest may name such a
folder as an image; outputs are NIfTI; a folder that is not one clean series is one ``error:`` line."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.dicom import keep_locale
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume, write_volume
from medsynth.data.phantoms import LABELS, make_phantom
from medsynth.errors import DataError

SIZE = 16
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, computed by hand here, not by the reader


def write_series(folder: Path, array: np.ndarray, affine: np.ndarray, uid: str = "1.2.826.0.1.3680043.2.1125.7",
                 tags: tuple[tuple[str, str], ...] = ()) -> Path:
    """Write ``array`` ``(X, Y, Z)`` int16 with the RAS ``affine`` as one DICOM file per slice; ``tags``:
    more ``(tag, value)`` pairs for every slice."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in lps[:3, 3]])
    image.SetDirection([float(d) for d in direction.ravel()])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    with keep_locale():  # GDCM's writer sets the C locale too
        _write_slices(writer, image, folder, array.shape[2], uid, direction, tags)
    return folder


def _write_slices(writer: sitk.ImageFileWriter, image: sitk.Image, folder: Path, slices: int, uid: str,
                  direction: np.ndarray, tags: tuple[tuple[str, str], ...]) -> None:
    for z in range(slices):
        s = image[:, :, z]
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", uid + ".1"),
            ("0020|000e", uid),
            ("0008|0018", f"{uid}.{100 + z}"),
            ("0020|0013", str(z + 1)),
            ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z)))),
            ("0020|0037", "\\".join(f"{v:.6f}" for v in [*direction[:, 0], *direction[:, 1]])),
            *tags,
        ):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(s)


def rotated(affine: np.ndarray, degrees: float) -> np.ndarray:
    """``affine`` turned about the z axis (an oblique acquisition)."""
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


@pytest.fixture()
def phantom():
    p = make_phantom(3, SIZE, 0)
    return np.round(p.image).astype(np.int16), p.label, p.affine


@pytest.mark.parametrize("degrees", [0.0, 30.0])
def test_series_reads_back_as_the_phantom(tmp_path, phantom, degrees):
    array, _, affine = phantom
    affine = rotated(affine, degrees)
    vol = read_volume(write_series(tmp_path / "series", array, affine))
    assert vol.header["kind"] == "image" and read_volume(tmp_path / "series", kind="label").header["kind"] == "label"
    assert vol.array.shape == (SIZE, SIZE, SIZE)
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)
    np.testing.assert_allclose(vol.spacing, (1.0, 1.0, 1.2), atol=1e-5)
    with pytest.raises(DataError, match="16 files hold .* above the memory limit of 1000 bytes"):
        read_volume(tmp_path / "series", memory_limit=1000)


def msd_with_dicom_image(root: Path, phantom, label_as: str) -> Path:
    """An MSD dataset of one case whose image is a DICOM series folder; its label a NIfTI file or a series too."""
    array, label, affine = phantom
    write_series(root / "imagesTr" / "c0", array, affine)
    if label_as == "dicom":
        write_series(root / "labelsTr" / "c0", label.astype(np.int16), affine, uid="1.2.826.0.1.3680043.2.1125.8")
        label_file = "labelsTr/c0"
    else:
        label_file = write_volume(root / "labelsTr" / "c0.nii.gz", label, affine, kind="label").relative_to(root).as_posix()
    manifest = {"name": "dicom", "modality": {"0": "T1"}, "labels": {str(v): n for v, n in LABELS.items()},
                "numTraining": 1, "training": [{"image": "imagesTr/c0", "label": label_file}]}
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root / "dataset.json"


@pytest.mark.parametrize("label_as", ["nifti", "dicom"])
def test_manifest_with_dicom_folder_validates_and_augments_to_nifti(tmp_path, phantom, label_as):
    data = msd_with_dicom_image(tmp_path / "data", phantom, label_as)
    (case,) = read_manifest(data).cases
    assert case.images == [tmp_path / "data" / "imagesTr" / "c0"]
    result = CliRunner().invoke(app, ["validate", str(data), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "OK: 0 error(s)" in result.output
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["augment", str(data), "--method", "synthseg", "--num", "2", "--out", str(out),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    synthetic = [c for c in read_manifest(out / "dataset.json").cases if c.extra.get("synthetic")]
    assert len(synthetic) == 2
    for c in synthetic:
        for path, kind in [(c.images[0], "image"), (c.label, "label")]:
            assert path is not None and path.name.endswith(".nii.gz") and path.is_file()
            vol = read_volume(path, kind=kind)
            assert vol.array.shape == (SIZE, SIZE, SIZE)
            np.testing.assert_allclose(vol.affine, phantom[2], atol=1e-4)


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def bad_folders(root: Path, phantom) -> dict[str, tuple[Path, str]]:
    array, _, affine = phantom
    two = write_series(root / "two", array, affine, uid="1.2.3.4.1")
    for f in write_series(root / "second", array[:, :, :4], affine, uid="1.2.3.4.2").iterdir():
        f.rename(two / f"b_{f.name}")
    empty = root / "empty"
    empty.mkdir()
    fifo = write_series(root / "fifo", array, affine)
    (fifo / "slice003.dcm").unlink()
    os.mkfifo(fifo / "slice003.dcm")
    link = write_series(root / "link", array, affine)
    outside = root / "outside.dcm"
    (link / "slice004.dcm").rename(outside)
    (link / "slice004.dcm").symlink_to(outside)
    return {"two_series": (two, "holds 2 DICOM series"), "empty": (empty, "no DICOM series"),
            "fifo": (fifo, "slice003.dcm: is a FIFO"), "symlink": (link, "slice004.dcm: is a symbolic link to .* outside")}


def test_bad_series_folders_are_one_error_line(tmp_path, phantom):
    for name, (folder, message) in bad_folders(tmp_path / "series", phantom).items():
        with pytest.raises(DataError, match=message):
            read_volume(folder)
        data = tmp_path / f"data_{name}"
        data.mkdir()
        label = write_volume(data / "c0.nii.gz", phantom[1], phantom[2], kind="label")
        (data / "dataset.csv").write_text(f"case_id,image,label\nc0,{folder},{label}\n")
        checked = CliRunner().invoke(app, ["validate", str(data / "dataset.csv"), "--no-progress"])
        assert checked.exit_code == 1 and "FAILED: 1 error(s)" in checked.output
        assert re.search(f"error +{re.escape(str(folder))}: .*{message}", checked.output), checked.output
        out = tmp_path / f"out_{name}"
        result = CliRunner().invoke(app, ["augment", str(data / "dataset.csv"), "--method", "synthseg", "--num", "1",
                                          "--out", str(out), "--no-progress"])
        assert result.exit_code == 1 and not out.exists()
        one_error_line(result.output)  # the CLI's one error line, the problem named beneath it
        assert re.search(f"{re.escape(str(folder))}: .*{message}", result.output), result.output
