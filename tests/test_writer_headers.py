"""Every writer keeps the shape and header of the file its data came from.

A slice stored ``(X, Y, 1)`` is read as ``(X, Y)`` but written back as ``(X, Y, 1)``; ``(X, Y)`` and
``(X, Y, Z)`` stay as they are. The sform/qform codes (here 4 = MNI and 2 = aligned), the sform and
qform matrices (a rotated, mirrored grid: qfac -1), pixdim, xyzt units (mm, msec), description and
intent are the source's: for ``augment`` (synthseg, classic, gan), ``sample`` (whose image does not
claim its mask's label intent) and the files ``export`` rewrites. Every output is re-read with
nibabel and compared with its source file, also read with nibabel.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.augment import AugmentOptions, run_augment
from medsynth.cli import app
from medsynth.data.export import export_dataset
from medsynth.data.manifest import read_manifest
from medsynth.data.phantoms import LABELS, case_rng, make_phantom

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = ("2d", "2d1", "3d")
DESCRIP = b"medsynth writer test"


def grid() -> np.ndarray:
    """A rotated, mirrored, anisotropic voxel -> RAS affine (negative determinant: qfac -1)."""
    c, s = np.cos(0.5), np.sin(0.5)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-0.9, 1.1, 2.5])
    affine[:3, 3] = [12.0, -30.5, 7.25]
    return affine


def save(path: Path, data: np.ndarray, intent: str) -> Path:
    img = nib.Nifti1Image(data, grid())
    img.set_sform(grid(), code=4)
    img.set_qform(grid(), code=2)
    img.header["descrip"] = DESCRIP
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_intent(intent)
    nib.save(img, str(path))
    return path


def on_disk(array: np.ndarray, layout: str) -> np.ndarray:
    return array[..., None] if layout == "2d1" else array


def make_dataset(folder: Path, layout: str, *, cases: int = 2, channels: int = 1, mixed: bool = False) -> Path:
    """An MSD dataset of 16-voxel phantoms stored as ``layout``, with the header above (labels carry the
    label intent, images the estimate intent). channels 2: one multi-channel image file a case
    (``(X, Y, 1, 2)`` in 2D, ``(X, Y, Z, 2)`` in 3D).
    mixed: case k's image is ``.nii`` for even k and its label for odd k, the rest ``.nii.gz``."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for k in range(cases):
        phantom = make_phantom(3 if layout == "3d" else 2, 16, case_rng(7, k))
        image = on_disk(phantom.image.astype(np.float32), layout)
        if channels == 2:  # a 2D file holds (X, Y, 1, C)
            image = np.stack([image, 1000.0 - image], axis=-1)
            image = image[:, :, None, :] if layout == "2d" else image
        img_end = ".nii" if mixed and k % 2 == 0 else ".nii.gz"
        lab_end = ".nii" if mixed and k % 2 == 1 else ".nii.gz"
        save(folder / "imagesTr" / f"c{k}{img_end}", image, "estimate")
        save(folder / "labelsTr" / f"c{k}{lab_end}", on_disk(phantom.label.astype(np.uint8), layout), "label")
        training.append({"image": f"imagesTr/c{k}{img_end}", "label": f"labelsTr/c{k}{lab_end}"})
    modality = {"0": "T1", "1": "T2"} if channels == 2 else {"0": "T1"}
    (folder / "dataset.json").write_text(json.dumps({
        "name": "writer", "modality": modality, "labels": {str(v): n for v, n in LABELS.items()},
        "training": training,
    }))
    return folder / "dataset.json"


def facts(path: Path) -> dict[str, object]:
    img = nib.load(str(path))
    hdr = img.header
    code, params, name = hdr.get_intent()
    return {
        "shape": tuple(img.shape), "codes": (int(hdr["sform_code"]), int(hdr["qform_code"])),
        "sform": hdr.get_sform(), "qform": hdr.get_qform(), "pixdim": hdr["pixdim"].copy(),
        "units": hdr.get_xyzt_units(), "descrip": bytes(hdr["descrip"]).rstrip(b"\0"), "intent": (code, params, name),
    }


def assert_like(out: Path, src: Path, *, shape: tuple[int, ...] | None = None, intent: object = "source") -> None:
    """``out``'s shape (``src``'s, or ``shape``) and header fields are ``src``'s (intent: the source's,
    or the one given)."""
    got, want = facts(out), facts(src)
    assert got["shape"] == (want["shape"] if shape is None else shape), out
    assert got["codes"] == want["codes"] == (4, 2), out
    np.testing.assert_allclose(got["sform"], want["sform"], atol=1e-6)
    np.testing.assert_allclose(got["qform"], want["qform"], atol=1e-6)
    np.testing.assert_allclose(got["pixdim"], want["pixdim"], atol=1e-6)
    assert want["pixdim"][0] == -1.0  # the mirrored grid: qfac kept
    assert got["units"] == want["units"] == ("mm", "msec"), out
    assert got["descrip"] == want["descrip"] == DESCRIP, out
    assert got["intent"] == (want["intent"] if intent == "source" else intent), out


def check_augmented(out: Path, data: Path) -> int:
    """Compare every synthetic file with its source case's file; the number of cases checked."""
    sources = {c.case_id: c for c in read_manifest(data).cases}
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    for p in prov:
        src = sources[p["source"]]
        assert_like(out / p["label"], src.label)
        for rel, image in zip(p["images"], src.images, strict=True):
            assert_like(out / rel, image)
    return len(prov)


# ------------------------------------------------------------------------------------ augment


@pytest.mark.parametrize("method", ["synthseg", "classic"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_augment_keeps_each_source_files_shape_and_header(tmp_path, layout, method):
    data = make_dataset(tmp_path / "data", layout)
    run_augment(AugmentOptions(input=data, out=tmp_path / "out", method=method, num=2, seed=0))
    assert check_augmented(tmp_path / "out", data) == 2
    assert {facts(f)["shape"] for f in (tmp_path / "out" / "labelsTr").iterdir()} == {
        {"2d": (16, 16), "2d1": (16, 16, 1), "3d": (16, 16, 16)}[layout]}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_augment_channels_of_a_multichannel_file_have_the_label_files_shape(tmp_path, layout):
    data = make_dataset(tmp_path / "data", layout, channels=2)
    run_augment(AugmentOptions(input=data, out=tmp_path / "out", method="synthseg", num=1, seed=0))
    source = read_manifest(data).cases
    prov = json.loads((tmp_path / "out" / "provenance.jsonl").read_text())
    (src,) = [c for c in source if c.case_id == prov["source"]]
    assert_like(tmp_path / "out" / prov["label"], src.label)
    assert len(prov["images"]) == 2
    for rel in prov["images"]:
        assert_like(tmp_path / "out" / rel, src.images[0], shape=facts(src.label)["shape"])


# ------------------------------------------------------------------------------------ gan: augment and sample


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    """A tiny 2D GAN trained for two steps on 2D phantoms (the labels of every dataset here)."""
    from medsynth.config import load_config
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.training import run_training

    base = tmp_path_factory.mktemp("writer_gan")
    manifest = make_phantom_dataset(base / "p", dim=2, cases=2, size=16, seed=1)
    cfg = load_config(REPO / "configs" / "tiny" / "gan2d.yaml",
                      [f"data.manifest={manifest}", "training.max_steps=2", "training.batch_size=2",
                       "training.amp=false", "training.preview_every=0"])
    with pytest.warns(UserWarning, match="does NOT beat the label-mean fill"):
        run_training(cfg, base / "run", progress=False)
    return base / "run"


@pytest.mark.filterwarnings("ignore:.*2D run given a 3D mask", "ignore:.*never beat the label-mean fill")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gan_augment_and_sample_keep_the_source_files_shape_and_header(tmp_path, gan_run, layout):
    data = make_dataset(tmp_path / "data", layout, cases=1)
    run_augment(AugmentOptions(input=data, out=tmp_path / "out", method="gan", model=gan_run, num=1, seed=0))
    assert check_augmented(tmp_path / "out", data) == 1
    # sample: the image has the mask's shape and header, but not its label intent
    mask = read_manifest(data).cases[0].label
    result = CliRunner().invoke(app, ["sample", str(gan_run), "--mask", str(mask), "--out", str(tmp_path / "gen.nii.gz"),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    assert facts(mask)["intent"] == ("label", (), "")
    assert_like(tmp_path / "gen.nii.gz", mask, intent=("none", (), ""))


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_rewrites_keep_the_source_files_shape_and_header(tmp_path, layout):
    """``.nii`` files beside ``.nii.gz`` ones are rewritten to nnU-Net's one ending; the others are linked."""
    data = make_dataset(tmp_path / "data", layout, mixed=True)
    s = export_dataset(data, tmp_path / "Dataset005_Writer", "nnunet")
    assert (s.rewritten, s.linked + s.copied) == (2, 2)
    out = tmp_path / "Dataset005_Writer"
    for case in read_manifest(data).cases:
        assert_like(out / "imagesTr" / f"{case.case_id}_0000.nii.gz", case.images[0])
        assert_like(out / "labelsTr" / f"{case.case_id}.nii.gz", case.label)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_split_channels_have_their_label_files_shape(tmp_path, layout):
    """A ``(*shape, 2)`` image file becomes two files of its label file's on-disk shape, header kept."""
    data = make_dataset(tmp_path / "data", layout, channels=2)
    s = export_dataset(data, tmp_path / "Dataset006_Split", "nnunet")
    assert s.rewritten == 2 * 2
    out = tmp_path / "Dataset006_Split"
    for case in read_manifest(data).cases:
        for c in (0, 1):
            assert_like(out / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz", case.images[0],
                        shape=facts(case.label)["shape"])
