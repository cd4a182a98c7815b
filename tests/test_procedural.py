"""The training-free SynthSeg-style generator (medsynth.synthesis.procedural).

Values are checked against statistics computed directly with numpy on hand-made label maps."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from medsynth.synthesis.procedural import (
    IntensityStats,
    SynthSegConfig,
    _resample_matrix,
    fit_intensity_stats,
    synthseg_image,
)

LABELS = [0, 1, 2, 3]


def blocks(shape=(16, 18, 20)) -> np.ndarray:
    """Four slabs along axis 0 with labels 0..3 (uint8)."""
    label = np.zeros(shape, np.uint8)
    edges = np.linspace(0, shape[0], 5).astype(int)
    for v in range(4):
        label[edges[v] : edges[v + 1]] = v
    return label


STATS = IntensityStats(low=100.0, high=900.0, minimum=50.0, maximum=1000.0,
                       per_label={0: (120.0, 5.0), 1: (300.0, 20.0), 2: (600.0, 30.0), 3: (850.0, 10.0)})

PLAIN = dict(blur_sigma=(0.0, 0.0), bias_prob=0.0, resolution_prob=0.0, noise_std=(0.0, 0.0), gamma_std=0.0)


def test_intensity_stats_equal_numpy():
    rng = np.random.default_rng(0)
    label_a, label_b = blocks(), blocks()[::-1].copy()
    img_a = rng.normal(200, 10, label_a.shape) + 100 * label_a
    img_b = rng.normal(250, 10, label_b.shape) + 90 * label_b
    stats = fit_intensity_stats([(img_a, label_a), (img_b, label_b)])
    allimg = np.concatenate([img_a.ravel(), img_b.ravel()])
    alllab = np.concatenate([label_a.ravel(), label_b.ravel()])
    for v in LABELS:
        sel = allimg[alllab == v]
        assert stats.per_label[v][0] == pytest.approx(sel.mean(), rel=1e-9)
        assert stats.per_label[v][1] == pytest.approx(sel.std(), rel=1e-6)
    assert stats.minimum == allimg.min() and stats.maximum == allimg.max()
    lows = [np.percentile(img_a, 0.5), np.percentile(img_b, 0.5)]
    assert stats.low == pytest.approx(np.mean(lows))
    r = stats.maximum - stats.minimum
    assert stats.plausible(0.5) == pytest.approx((stats.minimum - 0.5 * r, stats.maximum + 0.5 * r))


def test_gaussian_model_per_label_without_corruptions():
    label = blocks()
    cfg = SynthSegConfig(std_range=(0.0, 0.0), **PLAIN)
    img = synthseg_image(label, rng=np.random.default_rng(1), config=cfg, stats=STATS, labels=LABELS)
    assert img.shape == label.shape and img.dtype == np.float32
    values = [np.unique(img[label == v]) for v in LABELS]
    assert all(v.size == 1 for v in values)  # one constant intensity per label
    # random mode rescales to the dataset's robust range: the extremes hit low and high
    flat = sorted(float(v[0]) for v in values)
    assert flat[0] == pytest.approx(STATS.low, abs=1e-3) and flat[-1] == pytest.approx(STATS.high, abs=1e-2)


def test_std_per_label_is_drawn_and_applied():
    label = blocks((40, 30, 30))
    cfg = SynthSegConfig(std_range=(0.05, 0.05), mean_range=(0.5, 0.5), **PLAIN)
    img = synthseg_image(label, rng=np.random.default_rng(2), config=cfg, stats=STATS, labels=LABELS)
    # every label drew mean 0.5 and std 0.05: the regions share one mean and one spread
    means = np.array([img[label == v].mean() for v in LABELS])
    stds = np.array([img[label == v].std() for v in LABELS])
    assert np.ptp(means) < 0.05 * stds.mean()
    assert np.ptp(stds) < 0.05 * stds.mean() and stds.min() > 0
    # and the per-voxel draws are Gaussian: about 68 % within one std of the mean
    z = (img - means.mean()) / stds.mean()
    assert np.mean(np.abs(z) < 1) == pytest.approx(0.683, abs=0.02)


def test_fitted_intensities_follow_the_real_data():
    label = blocks((40, 30, 30))
    cfg = SynthSegConfig(fit_intensities=True, fit_mean_jitter=0.0, fit_std_scale=(1.0, 1.0), **PLAIN)
    img = synthseg_image(label, rng=np.random.default_rng(3), config=cfg, stats=STATS, labels=LABELS)
    for v in LABELS:
        mu, sd = STATS.per_label[v]
        region = img[label == v]
        assert region.mean() == pytest.approx(mu, abs=0.02 * (STATS.high - STATS.low))
        if v != 0:  # label 0 sits at the clip floor (its mean is near `low`)
            assert region.std() == pytest.approx(sd, rel=0.1)
    lo, hi = STATS.plausible(0.0)
    assert img.min() >= lo - 1e-3 and img.max() <= hi + 1e-3


def test_full_chain_is_finite_in_range_and_seeded():
    label = blocks()
    cfg = SynthSegConfig(resolution_prob=1.0, bias_prob=1.0)
    a = synthseg_image(label, rng=np.random.default_rng(4), config=cfg, stats=STATS, labels=LABELS)
    b = synthseg_image(label, rng=np.random.default_rng(4), config=cfg, stats=STATS, labels=LABELS)
    c = synthseg_image(label, rng=np.random.default_rng(5), config=cfg, stats=STATS, labels=LABELS)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.isfinite(a)) and a.min() >= STATS.low - 1e-3 and a.max() <= STATS.high + 1e-3
    two_d = synthseg_image(label[:, :, 5], rng=np.random.default_rng(4), config=cfg, stats=STATS, labels=LABELS)
    assert two_d.shape == label.shape[:2] and np.all(np.isfinite(two_d))


def test_resolution_matrix_keeps_constants_and_removes_detail():
    m = _resample_matrix(30, 3.0)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(_resample_matrix(30, 1.0), np.eye(30, dtype=np.float32))
    stripes = np.tile([0.0, 1.0], 15)  # finest detail: gone after a 3x coarser acquisition
    assert np.ptp((m @ stripes)[3:-3]) < 0.1 * np.ptp(stripes)  # (edges see a one-sided window)


def test_config_rejects_bad_ranges():
    with pytest.raises(ValidationError):
        SynthSegConfig(mean_range=(0.8, 0.2))
    with pytest.raises(ValidationError):
        SynthSegConfig(bogus=1)
