"""QC of a generated image against its mask: per-label statistics, contrast and edges."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medsynth.data.loader import DataInfo, Normalization
from medsynth.synthesis.qc import LabelIntensityStats, QcSettings, check_label_agreement

MEANS = {0: 0.0, 1: 60.0, 2: 150.0, 3: 210.0}


def phantom_pair(seed: int, centre: tuple[float, float] = (24.0, 24.0)) -> tuple[np.ndarray, np.ndarray]:
    """A 48x48 label map (background, a ring of 1 around a disc of 3 inside a square of 2) and an
    image following it: label means, partial-volume blur, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:48, :48].astype(float)
    r = np.hypot(y - centre[0], x - centre[1])
    lab = np.zeros((48, 48), np.int64)
    lab[6:42, 6:42] = 2
    lab[r < 12] = 1
    lab[r < 8] = 3
    lut = np.array([MEANS[v] for v in range(4)])
    image = gaussian_filter(lut[lab], 0.7) + rng.normal(0, 4.0, lab.shape)
    return image, lab


@pytest.fixture(scope="module")
def reference() -> LabelIntensityStats:
    pairs = [phantom_pair(s) for s in range(4)]
    return LabelIntensityStats.from_pairs([p[0] for p in pairs], [p[1] for p in pairs])


def test_statistics_from_pairs_and_from_a_runs_data_facts() -> None:
    images = [np.array([[1.0, 2.0], [3.0, 10.0]]), np.array([[5.0, 7.0], [0.0, 0.0]])]
    labels = [np.array([[0, 0], [1, 2]]), np.array([[1, 1], [0, 0]])]
    ref = LabelIntensityStats.from_pairs(images, labels)
    assert ref.labels == (0, 1, 2)
    # hand: label 0 = {1, 2, 0, 0}, label 1 = {3, 5, 7}, label 2 = {10}
    np.testing.assert_allclose(ref.means[0], [0.75, 5.0, 10.0])
    np.testing.assert_allclose(ref.stds[0], [np.std([1, 2, 0, 0]), np.std([3, 5, 7]), 0.0])
    info = DataInfo(dim=2, slice_axis=2, volume_ndim=2, size=[8, 8], labels=[0, 4], label_names={}, channels=["ct"],
                    classes=[], spacing=None, normalization=Normalization("ct_window", [-1000.0], [1000.0]),
                    label_means=[[0.25, 0.75]], label_stds=[[0.01, 0.1]])
    mapped = LabelIntensityStats.from_info(info)
    assert mapped.labels == (0, 4)
    np.testing.assert_allclose(mapped.means, [[-500.0, 500.0]])  # -1000 + u * 2000
    np.testing.assert_allclose(mapped.stds, [[20.0, 200.0]])
    np.testing.assert_allclose(LabelIntensityStats.from_info(info, units="unit").means, [[0.25, 0.75]])


def test_a_real_image_of_the_mask_passes(reference: LabelIntensityStats) -> None:
    image, lab = phantom_pair(11)
    result = check_label_agreement(image, lab, reference)
    assert result.passed, result.reasons
    for v in range(4):  # the reported means are the image's own, per label
        assert result.label_means[v] == [pytest.approx(round(float(image[lab == v].mean()), 4))]
    # the edge ratio: mean |grad| on voxels next to a border / elsewhere, recomputed here
    band = np.zeros(lab.shape, bool)
    band[:-1, :] |= lab[:-1, :] != lab[1:, :]
    band[1:, :] |= lab[:-1, :] != lab[1:, :]
    band[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    band[:, 1:] |= lab[:, :-1] != lab[:, 1:]
    gy, gx = np.gradient(image)
    mag = np.hypot(gy, gx)
    assert result.edge_ratio[0] == pytest.approx(mag[band].mean() / mag[~band].mean(), rel=1e-3)
    assert result.edge_ratio[0] > 3


def test_images_that_ignore_the_mask_are_rejected_with_reasons(reference: LabelIntensityStats) -> None:
    image, lab = phantom_pair(11)
    # the anatomy of another mask: the disc moved by 10 voxels
    moved, _ = phantom_pair(12, centre=(34.0, 20.0))
    bad = check_label_agreement(moved, lab, reference)
    assert not bad.passed
    assert any(r.startswith("label 3: mean") for r in bad.reasons), bad.reasons
    # a smooth blob with the right range but no relation to the labels
    rng = np.random.default_rng(0)
    blob = gaussian_filter(rng.normal(size=lab.shape), 6)
    blob = (blob - blob.min()) / np.ptp(blob) * 210
    result = check_label_agreement(blob, lab, reference)
    assert not result.passed
    assert any(r.startswith("edges:") for r in result.reasons), result.reasons
    # contrast with the wrong sign: labels 1 and 3 swapped
    swapped = np.where(lab == 1, 3, np.where(lab == 3, 1, lab))
    result = check_label_agreement(image, swapped, reference)
    assert any(r.startswith("labels 1/3: contrast") or r.startswith("labels 2/3: contrast") for r in result.reasons)
    # a constant image: no contrast anywhere
    flat = check_label_agreement(np.full(lab.shape, 120.0), lab, reference)
    assert not flat.passed and flat.edge_ratio == [0.0]


def test_settings_shape_and_label_errors(reference: LabelIntensityStats) -> None:
    image, lab = phantom_pair(11)
    noisy = image + np.random.default_rng(1).normal(0, 30, image.shape)
    assert not check_label_agreement(noisy, lab, reference).passed  # spread inside labels
    loose = QcSettings(std_factor=20, mean_tolerance=20, min_edge_ratio=0.0)
    assert check_label_agreement(noisy, lab, reference, loose).passed
    assert check_label_agreement(image[None], lab, reference).passed  # (C, *spatial) works too
    wrong = check_label_agreement(image[:40], lab, reference)
    assert not wrong.passed and "does not fit" in wrong.reasons[0]
    unknown = lab.copy()
    unknown[0, 0] = 9
    result = check_label_agreement(image, unknown, reference)
    assert not result.passed and result.reasons == ["mask label values [9] have no training statistics"]
