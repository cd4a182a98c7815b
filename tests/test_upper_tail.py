"""The soft upper tail (``data.upper_tail: soft``): a lesion brighter than the upper percentile keeps its
intensity through training data and back, where ``clip`` flattens it; checked against hand formulas and
the files re-read from disk."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.config import load_config
from medsynth.data.loader import DataInfo, build_training_data
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.synthesis.qc import LabelIntensityStats


def _with_bright_lesion(root: Path) -> tuple[Path, Path]:
    """A 2D phantom set whose first case gets a 6x6 lesion (label 6) at twice the brightest tissue."""
    manifest = make_phantom_dataset(root, dim=2, cases=3, size=32, seed=4)
    case = read_manifest(manifest).cases[0]
    img, lab = nib.load(case.images[0]), nib.load(case.label)
    image = np.asarray(img.dataobj, np.float32).copy()
    label = np.asarray(lab.dataobj).copy()
    label[12:18, 12:18] = 6
    image[12:18, 12:18] = 2.0 * float(image.max())
    nib.save(nib.Nifti1Image(image, img.affine, img.header), case.images[0])
    nib.save(nib.Nifti1Image(label, lab.affine, lab.header), case.label)
    return manifest, Path(case.images[0])


@pytest.mark.parametrize("tail", ["clip", "soft"])
def test_a_lesion_above_the_percentile_survives_only_with_the_soft_tail(tmp_path: Path, tail: str) -> None:
    manifest, image_path = _with_bright_lesion(tmp_path / "p")
    cfg = load_config(None, ["data.dim=2", "data.size=[32, 32]", "data.mri_percentiles=[1, 95]", f"data.upper_tail={tail}"]).data
    data = build_training_data(read_manifest(manifest), cfg, seed=0)
    norm = data.info.normalization
    assert norm.tail == tail
    real = read_volume(image_path).array.astype(np.float64)
    lesion = real[12:18, 12:18]
    lo, hi = norm.lo[0], norm.hi[0]
    assert lesion.min() > hi  # the lesion lies above the upper percentile
    unit = data.cases[0].image[0]
    back = norm.from_unit(data.cases[0].image)[0]
    inside = (real >= lo) & (real <= hi)
    if tail == "clip":
        np.testing.assert_allclose(unit[inside], (real[inside] - lo) / (hi - lo), atol=1e-6)
        np.testing.assert_allclose(back[12:18, 12:18], hi, rtol=1e-5)  # flattened to the percentile
    else:
        v = (real - lo) / (hi - lo)
        np.testing.assert_allclose(unit[inside], 0.8 * v[inside], atol=1e-6)  # linear up to the knee
        expect = 0.8 + 0.2 * (1.0 - np.exp(-(v[12:18, 12:18] - 1.0) * 4.0))  # the tail, by hand
        np.testing.assert_allclose(unit[12:18, 12:18], expect, atol=1e-6)
        np.testing.assert_allclose(back[12:18, 12:18], lesion, rtol=2e-3)  # the lesion's own value
        np.testing.assert_allclose(back[inside], real[inside], rtol=1e-4, atol=1e-3 * (hi - lo))
    # the run card keeps the tail, and QC's statistics in dataset units are the files' own label means
    again = DataInfo.from_dict(json.loads(json.dumps(data.info.to_dict())))
    assert again.normalization.tail == tail
    ref = LabelIntensityStats.from_info(again)
    assert ref.case_means is not None
    j = list(again.labels).index(6)
    if tail == "soft":
        assert ref.case_means[0, 0, j] == pytest.approx(lesion.mean(), rel=2e-3)
    else:
        assert ref.case_means[0, 0, j] == pytest.approx(hi, rel=1e-5)


def test_a_run_card_without_a_tail_reads_as_clip() -> None:
    d = {"mode": "mri_percentiles", "lo": [0.0], "hi": [1.0], "percentiles": [0.5, 99.5], "region": "foreground"}
    from medsynth.data.loader import Normalization

    assert Normalization.from_dict(d).tail == "clip"
