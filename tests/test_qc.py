"""QC of a generated image against its mask: per-label statistics, contrast and edges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.ndimage import gaussian_filter

from medsynth.config import load_config
from medsynth.data.loader import DataInfo, Normalization, build_training_data, fit_fill_sigma, label_mean_fill
from medsynth.data.manifest import read_manifest
from medsynth.data.phantoms import case_rng, make_phantom, make_phantom_dataset
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


def phantoms(seed: int, cases: int) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """2D phantoms (64^2); in every third case with a lesion, the lesion is brighter than every tissue
    (x2.8: ~1100 against white matter ~800, scalp ~700). (image, label, bright lesion?)"""
    out = []
    for k in range(cases):
        p = make_phantom(2, 64, case_rng(seed, k))
        bright = bool((p.label == 6).any()) and k % 3 == 0
        image = np.where(p.label == 6, p.image * 2.8, p.image) if bright else p.image.astype(np.float64)
        out.append((image, p.label.astype(np.int64), bright))
    return out


def test_held_out_real_images_pass_and_label_mean_fills_are_rejected() -> None:
    """Per-case reference statistics of 20 training phantoms; 200 held-out phantoms (a third of those
    with a lesion have it brighter than every tissue) pass at least 99 % of the time, and the
    label-mean fill of their masks (plain, and blurred by the fitted partial-volume width) standing in
    for ``gan`` output is rejected at least 99 % of the time, for being flat inside its labels."""
    train, test = phantoms(0, 20), phantoms(1, 200)
    images, labels = [t[0] for t in train], [t[1] for t in train]
    pooled = LabelIntensityStats.from_pairs(images, labels, range(7))
    sigma = fit_fill_sigma([(i[None], lab) for i, lab in zip(images, labels)], pooled.means.tolist(), (0, 1))
    ref = LabelIntensityStats.from_pairs(images, labels, range(7), fill_sigma=sigma)
    assert ref.case_means is not None and ref.case_means.shape == (20, 1, 7)
    # the pooled lesion mean is darker than white matter, yet some training cases have brighter lesions
    assert ref.means[0, 6] < ref.means[0, 4] < np.nanmax(ref.case_means[:, 0, 6])
    results = [check_label_agreement(image, lab, ref) for image, lab, _ in test]
    rejected = [r.reasons for r in results if not r.passed]
    assert len(rejected) <= 0.01 * len(test), rejected
    bright = [r for r, (_, _, b) in zip(results, test) if b]
    assert len(bright) >= 10 and all(r.passed for r in bright)
    fills = [(label_mean_fill(ref.means, lab, s, (0, 1))[0], lab) for _, lab, _ in test for s in (0.0, sigma)]
    verdicts = [check_label_agreement(f, lab, ref) for f, lab in fills]
    assert sum(not v.passed for v in verdicts) >= 0.99 * len(fills)
    assert all(any("untextured" in r for r in v.reasons) for v in verdicts)
    # flat images (synthseg's, the fill) are meant to be flat: without the texture check these pass
    flat_ok = QcSettings(texture=False)
    assert sum(check_label_agreement(f, lab, ref, flat_ok).passed for f, lab in fills[:20]) >= 18


def test_texture_and_contrast_follow_the_training_cases() -> None:
    """The texture is the Laplacian's std over the label's interior (here recomputed with a binary
    erosion); a contrast sign is checked only where >= 90 % of the training cases agree."""
    train = phantoms(0, 6)
    ref = LabelIntensityStats.from_pairs([t[0] for t in train], [t[1] for t in train], range(7), fill_sigma=0.5)
    assert ref.texture_depth == 2 and ref.case_texture is not None
    image, lab, _ = train[2]
    lap = ndimage.laplace(image, mode="nearest")
    for v in (0, 3, 4):
        inner = ndimage.binary_erosion(lab == v, iterations=2, border_value=1)
        assert ref.case_texture[2, 0, v] == pytest.approx(lap[inner].std(), rel=1e-9)
    # lesion vs white matter: brighter in some cases, darker in others -> never checked
    means = np.array([[0.0, 10, 20, 30, 40, 50, 60]])
    case_means = np.repeat(means[None], 10, axis=0)
    case_means[:5, 0, 6] = 100.0  # half the cases: a lesion brighter than every tissue, half darker than WM
    case_means[5:, 0, 6] = 20.0
    mixed = LabelIntensityStats((0, 1, 2, 3, 4, 5, 6), means, np.full((1, 7), 5.0), case_means, None)
    lab = np.zeros((40, 40), np.int64)
    lab[5:35, 5:35] = 4
    lab[15:25, 15:25] = 6
    img = np.where(lab == 4, 40.0, np.where(lab == 6, 20.0, 0.0))  # a lesion darker than white matter
    assert not any(r.startswith("labels 4/6") for r in check_label_agreement(img, lab, mixed).reasons)
    case_means[0, 0, 6] = 100.0
    case_means[1:, 0, 6] = 60.0  # every case: brighter than white matter -> a darker lesion fails
    agreed = LabelIntensityStats((0, 1, 2, 3, 4, 5, 6), means, np.full((1, 7), 5.0), case_means, None)
    assert any(r.startswith("labels 4/6: contrast") for r in check_label_agreement(img, lab, agreed).reasons)


def test_a_sign_seen_in_a_few_cases_is_a_rule_only_when_its_size_is_consistent() -> None:
    """Three training cases of three with a brighter lesion, by 47 to 1056 (the 3D phantom split): chance,
    not a rule (t = 2.10 against the one-sided 99.5 % point 9.92 for 2 degrees of freedom), so a darker lesion
    passes; three of three by 50, 55 and 52 (t = 36.0) is a rule, and the darker lesion fails."""
    means = np.array([[0.0, 10, 20, 30, 40, 50, 60]])
    lab = np.zeros((40, 40), np.int64)
    lab[5:35, 5:35] = 4
    lab[15:25, 15:25] = 6
    img = np.where(lab == 4, 40.0, np.where(lab == 6, 20.0, 0.0))  # a lesion darker than white matter
    for wm_to_lesion, is_rule in (([1056.0, 47.0, 823.0], False), ([50.0, 55.0, 52.0], True)):
        case_means = np.repeat(means[None], 3, axis=0)
        case_means[:, 0, 6] = 40.0 + np.array(wm_to_lesion)
        ref = LabelIntensityStats((0, 1, 2, 3, 4, 5, 6), means, np.full((1, 7), 5.0), case_means, None)
        reasons = check_label_agreement(img, lab, ref, QcSettings(range_margin=100.0)).reasons
        assert any(r.startswith("labels 4/6: contrast") for r in reasons) == is_rule, reasons
    d = np.array([1056.0, 47.0, 823.0])
    assert np.mean(d) / (np.std(d, ddof=1) / np.sqrt(3)) == pytest.approx(2.10, abs=0.01)


def test_the_run_records_per_case_statistics_and_old_cards_still_load(tmp_path: Path) -> None:
    """build_training_data stores each case's label means in [0, 1] units (recomputed here from the
    files), fits the MRI percentiles on the foreground (label > 0), and a run card written before
    either (no ``case_stats``, no ``region``) loads with the pooled checks only."""
    from medsynth.data.nifti import read_volume

    manifest = make_phantom_dataset(tmp_path / "p", dim=2, cases=3, size=32, seed=4)
    cfg = load_config(None, ["data.dim=2", "data.size=[32, 32]", "data.mri_percentiles=[1, 99]"]).data
    info = build_training_data(read_manifest(manifest), cfg, seed=0).info
    cases = read_manifest(manifest).cases
    raw = [(read_volume(c.images[0]).array.astype(np.float64), read_volume(c.label, kind="label").array) for c in cases]
    fg = np.concatenate([img[lab > 0] for img, lab in raw])
    lo = np.percentile(np.concatenate([img.ravel() for img, _ in raw]), 1)  # every voxel: background stays darkest
    hi = np.percentile(fg, 99)  # the foreground: air does not pull the bright tail down
    assert info.normalization.lo[0] == pytest.approx(lo) and info.normalization.hi[0] == pytest.approx(hi)
    assert info.normalization.region == "foreground"
    assert hi > np.percentile(np.concatenate([img.ravel() for img, _ in raw]), 99)  # air no longer pulls it down
    assert info.case_stats is not None
    for k, (img, lab) in enumerate(raw):
        unit = np.clip((img - lo) / (hi - lo), 0, 1)
        for j, v in enumerate(info.labels):
            expect = unit[lab == v].mean() if (lab == v).any() else np.nan
            np.testing.assert_allclose(info.case_stats.means[k, 0, j], expect, rtol=1e-5)
    again = DataInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again.case_stats is not None
    np.testing.assert_allclose(again.case_stats.means, info.case_stats.means, rtol=1e-5, atol=1e-6)
    ref = LabelIntensityStats.from_info(again)
    assert ref.case_means is not None
    np.testing.assert_allclose(ref.case_means[:, 0], lo + info.case_stats.means[:, 0] * (hi - lo), rtol=1e-5)
    old = info.to_dict()
    del old["case_stats"], old["normalization"]["region"]
    legacy = DataInfo.from_dict(old)
    assert legacy.case_stats is None and legacy.normalization.region == "all"
    legacy_ref = LabelIntensityStats.from_info(legacy)
    assert legacy_ref.case_means is None and legacy_ref.case_texture is None
    img, lab = raw[0]
    flat = label_mean_fill(legacy_ref.means, np.searchsorted(legacy_ref.labels, lab))[0]
    assert check_label_agreement(flat, lab, legacy_ref).passed  # no texture check without per-case records
    assert not check_label_agreement(flat, lab, ref).passed
