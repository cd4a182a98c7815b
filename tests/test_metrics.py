"""Paired metrics against scikit-image, hand calculations and an independent MS-SSIM."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import medsynth
from medsynth.errors import DataError
from medsynth.evaluation import metrics as M
from medsynth.evaluation.metrics import MS_SSIM_WEIGHTS, MetricInputError, mae, ms_ssim, psnr, ssim, ssim_map

WANG = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}


def pair(shape, data_range, offset, seed, noise=0.05):
    """A smooth structured image plus noise, and a noisier copy, float32 in offset..offset+R."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    a = offset + data_range * np.clip(smooth + rng.normal(0, 0.02, shape), 0, 1)
    b = offset + data_range * np.clip(smooth + rng.normal(0, noise, shape), 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


CASES = [
    ((37, 52), 1.0, 0.0),
    ((64, 45), 3000.0, -1000.0),  # CT-like
    ((23, 31, 40), 3000.0, -1000.0),
    ((14, 26, 19), 255.0, 0.0),
    ((30, 24, 21), 2.0, -1.0),
]


@pytest.mark.parametrize("shape,R,offset", CASES)
def test_ssim_equals_skimage_float32(shape, R, offset):
    a, b = pair(shape, R, offset, seed=len(shape) * 7 + shape[0])
    ours = ssim(a, b, data_range=R)
    assert isinstance(ours, float)
    assert ours == pytest.approx(structural_similarity(a, b, data_range=R, **WANG), abs=1e-5)
    # skimage in float64 is the exact value: the centred float32 path is far closer than 1e-5
    exact = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=R, **WANG)
    assert ours == pytest.approx(exact, abs=2e-6)
    # float64 inputs are evaluated in float64
    assert ssim(a.astype(np.float64), b.astype(np.float64), data_range=R) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("shape,R,offset", CASES[:3])
def test_psnr_equals_hand_and_skimage(shape, R, offset):
    a, b = pair(shape, R, offset, seed=3)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    ours = psnr(a, b, data_range=R)
    assert ours == pytest.approx(10 * math.log10(R * R / mse), abs=1e-4)
    assert ours == pytest.approx(peak_signal_noise_ratio(a, b, data_range=R), abs=1e-4)


def test_large_offset_stays_exact():
    # values 1000..1100 with R = 100: uncentred float32 loses ~1e-4 here; ours must not
    a, b = pair((40, 35, 30), 100.0, 1000.0, seed=5, noise=0.002)
    exact = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=100.0, **WANG)
    assert ssim(a, b, data_range=100.0) == pytest.approx(exact, abs=2e-6)


def test_identical_images():
    a, _ = pair((20, 22), 1.0, 0.0, seed=1)
    assert ssim(a, a, data_range=1.0) == pytest.approx(1.0, abs=1e-6)
    assert psnr(a, a, data_range=1.0) == math.inf
    assert mae(a, a, data_range=1.0) == 0.0


def test_mae_by_hand():
    a, b = pair((25, 20, 15), 3000.0, -1000.0, seed=2)
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert mae(a, b, data_range=3000.0) == pytest.approx(diff.mean() / 3000.0, rel=1e-9)
    assert mae(a, b, data_range=1) == pytest.approx(diff.mean(), rel=1e-9)


def test_ssim_map_equals_skimage_full_map_cropped():
    a, b = pair((30, 28, 26), 3000.0, -1000.0, seed=4)
    _, full = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=3000.0, full=True, **WANG)
    ours = ssim_map(a, b, data_range=3000.0)
    assert ours.shape == (20, 18, 16)
    np.testing.assert_allclose(ours, full[5:-5, 5:-5, 5:-5], atol=1e-5)


# ------------------------------------------------------------------------------------ batches, torch


def test_batched_numpy_and_torch():
    rng = np.random.default_rng(11)
    shape = (3, 2, 18, 21, 16)
    a = rng.random(shape).astype(np.float32) * 400.0
    b = (a + rng.normal(0, 30.0, shape)).astype(np.float32)
    ranges = [400.0, 500.0, 600.0]
    expected_ssim = [np.mean([structural_similarity(a[i, c], b[i, c], data_range=ranges[i], **WANG) for c in range(2)])
                     for i in range(3)]
    expected_psnr = [10 * np.log10(ranges[i] ** 2 / np.mean((a[i].astype(np.float64) - b[i]) ** 2)) for i in range(3)]

    out = ssim(a, b, data_range=ranges, spatial_dims=3)
    assert isinstance(out, np.ndarray) and out.shape == (3,) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected_ssim, atol=1e-5)
    np.testing.assert_allclose(psnr(a, b, data_range=ranges, spatial_dims=3), expected_psnr, atol=1e-4)

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tout = ssim(ta, tb, data_range=torch.tensor(ranges), spatial_dims=3)
    assert isinstance(tout, torch.Tensor) and tout.shape == (3,) and tout.dtype == torch.float64
    np.testing.assert_allclose(tout.numpy(), expected_ssim, atol=1e-5)
    tp = psnr(ta, tb, data_range=ranges, spatial_dims=3)
    assert isinstance(tp, torch.Tensor)
    np.testing.assert_allclose(tp.numpy(), expected_psnr, atol=1e-4)
    # unbatched torch input gives a float equal to the numpy one
    v = ssim(ta[0, 0], tb[0, 0], data_range=400.0)
    assert isinstance(v, float)
    assert v == pytest.approx(ssim(a[0, 0], b[0, 0], data_range=400.0), abs=1e-12)
    # 2D batch
    a2, b2 = a[:, :, 5], b[:, :, 5]  # (3, 2, 21, 16)
    exp2 = [np.mean([structural_similarity(a2[i, c], b2[i, c], data_range=400.0, **WANG) for c in range(2)]) for i in range(3)]
    np.testing.assert_allclose(ssim(a2, b2, data_range=400.0, spatial_dims=2), exp2, atol=1e-5)


def test_integer_and_mixed_inputs():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (32, 30)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8)
    expected = structural_similarity(a, b, data_range=255, **WANG)
    assert ssim(a, b, data_range=255) == pytest.approx(expected, abs=1e-5)
    assert ssim(torch.from_numpy(a), b, data_range=255) == pytest.approx(expected, abs=1e-5)


def test_gpu_filter_path_equals_cpu_path():
    # The GPU path (one grouped convolution per axis) must equal the CPU banded-matrix path, and
    # both equal scipy's Gaussian filter cropped to the valid region (long axes go in blocks).
    rng = np.random.default_rng(3)
    for shape in ((2, 10, 19, 23), (1, 5, 17, 14, 20), (1, 2, 300, 21)):
        t = torch.from_numpy(rng.random(shape))
        sd = len(shape) - 2
        cpu = M._filter_valid(t, sd).numpy()
        np.testing.assert_allclose(M._filter_conv(t, sd).numpy(), cpu, atol=1e-12)
        ref = ndimage.gaussian_filter(t[0, 1].numpy(), 1.5, truncate=3.5)[(slice(5, -5),) * sd]
        np.testing.assert_allclose(cpu[0, 1], ref, atol=1e-12)


def test_slabs_give_the_same_values(monkeypatch):
    # large volumes are processed slab by slab along the first axis; force tiny slabs here
    a, b = pair((41, 23, 19), 3000.0, -1000.0, seed=6)
    mask = np.zeros(a.shape, bool)
    mask[3:30, 4:20, 2:17] = True
    whole = (ssim(a, b, data_range=3000.0), ssim(a, b, data_range=3000.0, mask=mask))
    monkeypatch.setattr(M, "SLAB_BYTES", 5 * 23 * 19 * 4 * 17)  # 7 output planes per slab
    # float32 inputs: slab sums are added in another order (float64 accumulators), so agree to 1e-8
    assert ssim(a, b, data_range=3000.0) == pytest.approx(whole[0], abs=1e-8)
    assert ssim(a, b, data_range=3000.0, mask=mask) == pytest.approx(whole[1], abs=1e-8)
    monkeypatch.setattr(M, "SLAB_BYTES", 1)  # one output plane per slab
    exact = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=3000.0, **WANG)
    assert ssim(a.astype(np.float64), b.astype(np.float64), data_range=3000.0) == pytest.approx(exact, abs=1e-12)


def test_top_level_exports():
    assert medsynth.ssim is ssim and medsynth.psnr is psnr and medsynth.ms_ssim is ms_ssim and medsynth.mae is mae


# ------------------------------------------------------------------------------------ masks


def test_masked_psnr_and_mae_by_hand():
    a, b = pair((30, 26, 22), 3000.0, -1000.0, seed=8)
    mask = np.zeros(a.shape, bool)
    mask[4:20, 3:18, 6:15] = True
    d = a.astype(np.float64)[mask] - b.astype(np.float64)[mask]
    assert psnr(a, b, data_range=3000.0, mask=mask) == pytest.approx(10 * np.log10(3000.0**2 / np.mean(d * d)), abs=1e-4)
    assert mae(a, b, data_range=3000.0, mask=mask.astype(np.uint8)) == pytest.approx(np.abs(d).mean() / 3000.0, rel=1e-9)


def test_masked_ssim_is_mean_of_skimage_map_in_valid_region():
    a, b = pair((32, 28, 26), 1000.0, 0.0, seed=9)
    mask = np.zeros(a.shape, bool)
    mask[2:20, 8:27, 3:24] = True  # partly inside the 5-voxel border
    _, full = structural_similarity(a, b, data_range=1000.0, full=True, **WANG)
    crop = (slice(5, -5),) * 3
    expected = full[crop][mask[crop]].mean()
    assert ssim(a, b, data_range=1000.0, mask=mask) == pytest.approx(expected, abs=1e-5)
    # a full mask is the unmasked value
    assert ssim(a, b, data_range=1000.0, mask=np.ones(a.shape)) == pytest.approx(ssim(a, b, data_range=1000.0), abs=1e-12)


def test_batched_mask_broadcast():
    rng = np.random.default_rng(4)
    a = rng.random((2, 1, 24, 20)).astype(np.float32)
    b = (a + rng.normal(0, 0.1, a.shape)).astype(np.float32)
    mask = np.zeros((24, 20), bool)
    mask[6:18, 4:16] = True
    batched = psnr(a, b, data_range=1.0, spatial_dims=2, mask=mask)
    singles = [psnr(a[i, 0], b[i, 0], data_range=1.0, mask=mask) for i in range(2)]
    np.testing.assert_allclose(batched, singles, atol=1e-9)
    per_item = np.stack([mask, np.ones_like(mask)])[:, None]
    out = ssim(a, b, data_range=1.0, spatial_dims=2, mask=per_item)
    assert out[1] == pytest.approx(ssim(a[1, 0], b[1, 0], data_range=1.0), abs=1e-12)


# ------------------------------------------------------------------------------------ MS-SSIM


def _ms_ssim_reference(a: np.ndarray, b: np.ndarray, R: float, weights) -> float:
    """Independent MS-SSIM: scipy Gaussian filter in float64, crop 5, 2x2 mean pooling."""
    c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
    values = []
    for j in range(len(weights)):
        f = lambda x: ndimage.gaussian_filter(x, 1.5, truncate=3.5)[(slice(5, -5),) * x.ndim]  # noqa: E731
        ux, uy = f(a), f(b)
        vx, vy, vxy = f(a * a) - ux**2, f(b * b) - uy**2, f(a * b) - ux * uy
        cs = (2 * vxy + c2) / (vx + vy + c2)
        s = (2 * ux * uy + c1) / (ux**2 + uy**2 + c1) * cs
        values.append(max((s if j == len(weights) - 1 else cs).mean(), 0.0))
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        b = b[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return float(np.prod([v**w for v, w in zip(values, weights)]))


def test_ms_ssim_equals_independent_implementation():
    a, b = pair((181, 190), 255.0, 0.0, seed=12)
    expected = _ms_ssim_reference(a.astype(np.float64), b.astype(np.float64), 255.0, MS_SSIM_WEIGHTS)
    assert ms_ssim(a, b, data_range=255.0) == pytest.approx(expected, abs=1e-5)
    w3 = MS_SSIM_WEIGHTS[:3]
    small_a, small_b = a[:50, :47], b[:50, :47]
    expected3 = _ms_ssim_reference(small_a.astype(np.float64), small_b.astype(np.float64), 255.0, w3)
    assert ms_ssim(small_a, small_b, data_range=255.0, weights=w3) == pytest.approx(expected3, abs=1e-5)
    assert M.max_scales(small_a.shape) == 3
    assert ms_ssim(a, a, data_range=255.0) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_too_small_names_the_minimum():
    a, b = pair((100, 180), 1.0, 0.0, seed=1)
    with pytest.raises(MetricInputError, match="176"):
        ms_ssim(a, b, data_range=1.0)


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("metric", [ssim, psnr, mae, functools.partial(ms_ssim, weights=(1.0,))])
def test_errors_are_data_and_value_errors(metric):
    a, b = pair((20, 20), 1.0, 0.0, seed=0)
    bad = a.copy()
    bad[3, 4] = np.nan
    cases = [
        (dict(x=bad, y=b, data_range=1.0), "NaN"),
        (dict(x=a, y=np.where(b > 0.5, np.inf, b), data_range=1.0), "NaN or Inf"),
        (dict(x=a, y=b[:, :19], data_range=1.0), "different shapes"),
        (dict(x=a, y=b, data_range=0.0), "data_range"),
        (dict(x=a, y=b, data_range=-2.0), "data_range"),
        (dict(x=a, y=b, data_range=float("nan")), "data_range"),
        (dict(x=a, y=b, data_range=None), "data_range"),
        (dict(x=a[None], y=b[None], data_range=1.0, spatial_dims=2), "dims"),
        (dict(x=a[None, None, None], y=b[None, None, None], data_range=1.0), "spatial_dims"),
        (dict(x=a, y=b, data_range=1.0, spatial_dims=4), "spatial_dims"),
        (dict(x=a.tolist(), y=b, data_range=1.0), "numpy array or a torch tensor"),
        (dict(x=a.astype(np.complex64), y=b, data_range=1.0), "real"),
        (dict(x=a, y=b, data_range=1.0, mask=np.ones((20, 19))), "mask"),
        (dict(x=a, y=b, data_range=1.0, mask=np.zeros((20, 20))), "mask"),
        (dict(x=a[None, None], y=b[None, None], data_range=[1.0, 2.0], spatial_dims=2), "2 values"),
    ]
    for kwargs, message in cases:
        x, y = kwargs.pop("x"), kwargs.pop("y")
        with pytest.raises(MetricInputError, match=message) as info:
            metric(x, y, **kwargs)
        assert isinstance(info.value, DataError) and isinstance(info.value, ValueError)


def test_data_range_is_required_keyword():
    a, b = pair((20, 20), 1.0, 0.0, seed=0)
    with pytest.raises(TypeError):
        ssim(a, b)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        psnr(a, b, 1.0)  # type: ignore[misc]


def test_too_small_for_window():
    a, b = pair((10, 30), 1.0, 0.0, seed=0)
    with pytest.raises(MetricInputError, match="11-voxel"):
        ssim(a, b, data_range=1.0)
    a3, b3 = pair((12, 30, 10), 1.0, 0.0, seed=0)
    with pytest.raises(MetricInputError, match="11-voxel"):
        ssim(a3, b3, data_range=1.0)
    # PSNR has no window: small images are fine
    assert math.isfinite(psnr(a, b, data_range=1.0))


def test_mask_outside_valid_region_is_an_error():
    a, b = pair((24, 24), 1.0, 0.0, seed=0)
    mask = np.zeros(a.shape, bool)
    mask[:4, :] = True  # only in the border SSIM leaves out
    with pytest.raises(MetricInputError, match="valid region"):
        ssim(a, b, data_range=1.0, mask=mask)
    assert math.isfinite(psnr(a, b, data_range=1.0, mask=mask))
