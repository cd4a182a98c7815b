"""Phantom datasets: determinism, anatomy, T1 contrast, formats, output-folder rules, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume
from medsynth.data.phantoms import LABELS, case_rng, make_phantom, make_phantom_dataset
from medsynth.errors import ConfigError, JobError


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _neighbour_values(label: np.ndarray, value: int) -> set[int]:
    """Label values found in the face neighbours of voxels equal to ``value`` (by array shifts)."""
    found: set[int] = set()
    mask = label == value
    for axis in range(label.ndim):
        for shift in (1, -1):
            rolled = np.roll(label, shift, axis=axis)
            valid = np.ones_like(mask)
            edge = [slice(None)] * label.ndim
            edge[axis] = 0 if shift == 1 else -1  # np.roll wraps: ignore the wrapped face
            valid[tuple(edge)] = False
            found |= set(np.unique(rolled[mask & valid]).tolist())
    return found - {value}


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_case_independent_of_count(tmp_path):
    a = make_phantom_dataset(tmp_path / "a", dim=3, cases=2, seed=7, size=16)
    b = make_phantom_dataset(tmp_path / "b", dim=3, cases=2, seed=7, size=16)
    fa, fb = _files(a.parent), _files(b.parent)
    assert sorted(fa) == [".medsynth-owner.jsonl", "dataset.json", "imagesTr/phantom_000.nii.gz", "imagesTr/phantom_001.nii.gz",
                          "labelsTr/phantom_000.nii.gz", "labelsTr/phantom_001.nii.gz"]  # fmt: skip
    assert fa == fb
    # case 0 does not depend on how many cases were asked for
    one = make_phantom_dataset(tmp_path / "one", dim=3, cases=1, seed=7, size=16).parent
    assert (one / "imagesTr/phantom_000.nii.gz").read_bytes() == fa["imagesTr/phantom_000.nii.gz"]
    # another seed, other data (both image and label)
    c = _files(make_phantom_dataset(tmp_path / "c", dim=3, cases=2, seed=8, size=16).parent)
    for name in ("imagesTr/phantom_000.nii.gz", "labelsTr/phantom_000.nii.gz"):
        assert c[name] != fa[name]
    # cases of one dataset differ from each other
    assert fa["labelsTr/phantom_000.nii.gz"] != fa["labelsTr/phantom_001.nii.gz"]


def test_make_phantom_is_pure():
    p1 = make_phantom(3, 16, case_rng(3, 1))
    p2 = make_phantom(3, 16, case_rng(3, 1))
    assert np.array_equal(p1.image, p2.image) and np.array_equal(p1.label, p2.label)
    assert np.array_equal(p1.affine, p2.affine)
    image, label, affine = p1  # also a plain tuple
    assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.shape == (4, 4)


# ------------------------------------------------------------------------------- anatomy


@pytest.mark.parametrize("dim,size", [(3, 40), (2, 48)])
def test_labels_are_anatomy(dim, size):
    for k in range(4):
        ph = make_phantom(dim, size, case_rng(0, k))
        label = ph.label
        assert label.shape == (size,) * dim
        values = set(np.unique(label).tolist())
        assert {0, 1, 2, 3, 4, 5} <= values <= set(LABELS)
        frac = {v: float(np.mean(label == v)) for v in range(7)}
        head = 1.0 - frac[0]
        brain = frac[3] + frac[4] + frac[5] + frac[6]
        assert 0.2 < head < 0.7, frac  # a head in a field of view, not filling it
        assert 0.35 < brain / head < 0.85, frac  # brain is most of the head, scalp/skull/CSF the rest
        assert 0.3 < frac[3] / frac[4] < 2.5, frac  # GM and WM of similar volume (a slice varies more)
        assert 0.03 < frac[2] / head < 0.35, frac
        assert 0.002 < frac[5] / brain < 0.15, frac  # ventricles: a small part of the brain
        # nesting: background touches only scalp/skull; the ventricles sit inside the brain
        assert _neighbour_values(label, 0) <= {1}
        assert _neighbour_values(label, 5) <= {2, 3, 4, 6}
        assert _neighbour_values(label, 4) <= {2, 3, 5, 6}  # WM never touches skull or air
        if 6 in values:
            assert _neighbour_values(label, 6) <= {3, 4, 5}


def test_lesion_in_about_half_the_cases():
    with_lesion = [6 in make_phantom(2, 32, case_rng(11, k)).label for k in range(24)]
    assert 5 <= sum(with_lesion) <= 19


def test_t1_contrast_and_noise():
    for k in range(3):
        ph = make_phantom(3, 32, case_rng(1, k))
        image, label = ph.image.astype(np.float64), ph.label
        inner = {v: label == v for v in range(7)}
        mean = {v: image[m].mean() for v, m in inner.items() if m.any()}
        assert mean[4] > mean[3] > mean[2]  # T1: white > grey > CSF
        assert mean[4] > mean[5]  # ventricles dark
        assert 500 < mean[4] < 1100 and mean[0] < 0.1 * mean[4]
        assert np.all(np.isfinite(image)) and image.min() >= 0  # Rician magnitude
        # noise: background is not constant, and blur makes tissue edges gradual (partial volume)
        assert image[label == 0].std() > 1.0
        wm_core = label == 4
        assert np.percentile(image[wm_core], 10) > mean[3] * 0.9


# ------------------------------------------------------------------------------- formats


def test_msd_3d_files_and_geometry(tmp_path):
    path = make_phantom_dataset(tmp_path / "msd", dim=3, cases=2, seed=0, size=16)
    assert path == tmp_path / "msd" / "dataset.json"
    data = json.loads(path.read_text())
    assert data["modality"] == {"0": "T1"} and data["numTraining"] == 2
    m = read_manifest(path)
    assert m.format == "msd" and len(m.cases) == 2 and m.labels == LABELS and m.channels == ["T1"]
    for case in m.cases:
        img = read_volume(case.images[0])
        lab = read_volume(case.label, kind="label")
        assert img.shape == lab.shape == (16, 16, 16)
        assert img.header["disk_dtype"] == "float32" and lab.header["disk_dtype"] == "uint8"
        assert np.allclose(img.spacing, (1.0, 1.0, 1.2)) and np.allclose(img.affine, lab.affine)
        # RAS, no rotation, origin away from zero
        assert np.allclose(img.affine[:3, :3], np.diag([1.0, 1.0, 1.2]))
        assert not np.allclose(img.affine[:3, 3], 0)


def test_2d_dataset_is_2d_nnunet(tmp_path):
    path = make_phantom_dataset(tmp_path / "nn", dim=2, cases=3, seed=0, size=24, format="nnunet")
    assert path == tmp_path / "nn"
    data = json.loads((path / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "T1"}
    assert data["labels"] == {name: value for value, name in LABELS.items()}
    assert data["numTraining"] == 3 and data["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (path / "imagesTr").iterdir()) == [f"phantom_00{i}_0000.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (path / "labelsTr").iterdir()) == [f"phantom_00{i}.nii.gz" for i in range(3)]
    m = read_manifest(path)
    assert m.format == "nnunet" and len(m.cases) == 3 and m.labels == LABELS
    for case in m.cases:
        assert nib.load(str(case.images[0])).shape == (24, 24)  # stored (H, W), not (H, W, 1)
        assert nib.load(str(case.label)).shape == (24, 24)
        assert read_volume(case.images[0]).spacing == (1.0, 1.0)


def test_csv_dataset(tmp_path):
    path = make_phantom_dataset(tmp_path / "c", dim=2, cases=2, seed=0, size=16, format="csv")
    assert path == tmp_path / "c" / "dataset.csv"
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["case_id", "image", "label"]
    assert lines[1].startswith("phantom_000,imagesTr/phantom_000.nii.gz,labelsTr/phantom_000.nii.gz")
    m = read_manifest(path)
    assert m.format == "csv" and [c.case_id for c in m.cases] == ["phantom_000", "phantom_001"]
    assert all(c.images[0].exists() and c.label.exists() for c in m.cases)


# ------------------------------------------------------------------------------- output folder and arguments


def test_output_folder_rules(tmp_path):
    out = tmp_path / "d"
    make_phantom_dataset(out, dim=2, cases=3, size=16)
    with pytest.raises(JobError, match="not empty"):
        make_phantom_dataset(out, dim=2, cases=2, size=16)
    make_phantom_dataset(out, dim=2, cases=2, size=16, overwrite=True)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert len(read_manifest(out / "dataset.json").cases) == 2
    # overwrite never deletes a user's own files
    (out / "imagesTr" / "patient1.nii.gz").write_bytes(b"x")
    with pytest.raises(JobError, match="not phantoms"):
        make_phantom_dataset(out, dim=2, cases=2, size=16, overwrite=True)
    assert (out / "imagesTr" / "patient1.nii.gz").exists()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(JobError, match="not a folder"):
        make_phantom_dataset(afile, dim=2, cases=1, size=16, overwrite=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 4}, "dim must be 2 or 3, got 4"),
        ({"cases": 0}, "cases must be a whole number from 1 to 100000, got 0"),
        ({"cases": 100_001}, "cases must be a whole number from 1 to 100000, got 100001"),
        ({"size": 8}, "size must be between 16 and 512 voxels, got 8"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"format": "nifti"}, "format must be one of nnunet, csv, msd, got 'nifti'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_phantom_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()  # nothing written


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["phantoms", str(out), "--dim", "2", "--cases", "2", "--size", "16", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "wrote 2 2D phantom cases" in res.output
    direct = make_phantom_dataset(tmp_path / "api", dim=2, cases=2, size=16, seed=3)
    assert _files(out) == _files(direct.parent)
    res = runner.invoke(app, ["phantoms", str(out), "--dim", "2", "--cases", "2", "--size", "16"])
    assert res.exit_code == 1 and "error: output folder" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["phantoms", str(tmp_path / "bad"), "--dim", "5"])
    assert res.exit_code == 1 and "error: dim must be 2 or 3, got 5" in res.output


@pytest.mark.parametrize("dim,fmt", [(3, "msd"), (2, "nnunet"), (2, "csv")])
def test_phantoms_validate(tmp_path, dim, fmt):
    from medsynth.data.validate import validate_dataset

    path = make_phantom_dataset(tmp_path / "v", dim=dim, cases=2, size=16, format=fmt)
    report = validate_dataset(path, progress=False)
    assert report.ok and report.problems == [], report.problems  # no errors, not even warnings
