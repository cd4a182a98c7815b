"""Mask deformation, per-structure edits and the classic chain (medsynth.data.transforms).

Checked against independent computations: numpy flips/rotations, scipy map_coordinates,
scikit-image morphology, hand-built label maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from medsynth.data import transforms as T
from medsynth.errors import ConfigError


def nested_balls(shape=(20, 20, 20), radii=(8, 5, 2)) -> np.ndarray:
    """Concentric balls: label 1 outer shell, 2 middle, 3 core (uint8)."""
    grid = np.indices(shape, dtype=np.float64)
    r = np.sqrt(sum((g - (s - 1) / 2) ** 2 for g, s in zip(grid, shape)))
    label = np.zeros(shape, np.uint8)
    for value, radius in enumerate(radii, start=1):
        label[r <= radius] = value
    return label


def strong() -> T.DeformConfig:
    return T.DeformConfig(rotate_deg=25, scale=0.2, translate_mm=3, elastic_mm=3, control_points=5)


# ------------------------------------------------------------------------------------ smooth fields


def test_smooth_field_is_a_partition_of_unity_and_smooth():
    const = T.smooth_field(np.full((5, 5, 5), 2.5), (17, 23, 11))
    assert const.shape == (17, 23, 11) and const.dtype == np.float32
    np.testing.assert_allclose(const, 2.5, rtol=1e-6)
    rng = np.random.default_rng(0)
    f = T.smooth_field(rng.normal(size=(4, 4)), (64, 64))
    # cubic B-spline of 4 points over 64 voxels: neighbouring voxels differ little
    assert np.abs(np.diff(f, axis=0)).max() < 0.25 * (f.max() - f.min())


# ------------------------------------------------------------------------------------ spatial


@pytest.mark.parametrize("shape", [(9, 12), (7, 8, 10)])
def test_flip_equals_numpy_flip(shape):
    rng = np.random.default_rng(1)
    label = rng.integers(0, 5, size=shape).astype(np.uint8)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    for axes in [(0,), (1,), (0, 1)] + ([(2,), (0, 2)] if len(shape) == 3 else []):
        out_label, out_image = T.apply_spatial(T.flip_only(shape, axes), label, image)
        np.testing.assert_array_equal(out_label, np.flip(label, axes))
        np.testing.assert_allclose(out_image, np.flip(image, tuple(a + 1 for a in axes)), atol=1e-5)


def test_rotation_by_90_degrees_equals_rot90():
    label = np.random.default_rng(2).integers(0, 7, size=(11, 11, 5)).astype(np.uint8)
    # np.rot90(a)[i, j] = a[j, n-1-i]: about the centre, output (p0, p1) takes source (p1, -p0)
    m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    params = T.SpatialParams(label.shape, m, np.zeros(3))
    out, _ = T.apply_spatial(params, label)
    np.testing.assert_array_equal(out, np.rot90(label, k=1, axes=(0, 1)))


def test_warps_match_scipy_map_coordinates():
    rng = np.random.default_rng(3)
    shape = (14, 16, 12)
    label = rng.integers(0, 6, size=shape).astype(np.uint8)
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    params = T.draw_spatial(shape, (1.0, 1.2, 0.8), strong(), rng)
    coords = T.source_coordinates(params)
    clipped = np.stack([np.clip(coords[a], 0, shape[a] - 1) for a in range(3)])
    want_img = map_coordinates(image[0].astype(np.float64), clipped, order=1)
    np.testing.assert_allclose(T.warp_image(image, coords)[0], want_img, atol=2e-4)
    want_lab = map_coordinates(label, clipped, order=0)
    same = T.warp_label(label, coords) == want_lab
    assert same.mean() > 0.999  # only exact .5 ties may round differently


def test_deformed_masks_keep_exactly_the_label_set():
    # non-consecutive values: any blending (e.g. rounded linear interpolation) would invent 1, 3, 4, 6
    label = np.array([0, 7, 2, 5], np.uint8)[nested_balls()]
    values = set(np.unique(label).tolist())
    for seed in range(12):
        rng = np.random.default_rng(seed)
        params = T.draw_spatial(label.shape, (1.0, 1.0, 1.0), strong(), rng)
        assert params.control is not None and not params.is_identity
        out, _ = T.apply_spatial(params, label)
        assert out.dtype == label.dtype and out.shape == label.shape
        assert set(np.unique(out).tolist()) == values  # no new values, none lost
        assert not np.array_equal(out, label)


def test_label_and_image_share_one_coordinate_field():
    label = nested_balls()
    image = (100.0 * label)[None].astype(np.float32)
    params = T.draw_spatial(label.shape, (1.0, 1.0, 1.0), strong(), np.random.default_rng(7))
    out_label, out_image = T.apply_spatial(params, label, image)
    # where all 8 source voxels around a position share one label, linear and nearest sampling at
    # that position must both give it exactly
    coords = T.source_coordinates(params)
    lo = [np.clip(np.floor(coords[a]).astype(int), 0, label.shape[a] - 1) for a in range(3)]
    hi = [np.clip(lo[a] + 1, 0, label.shape[a] - 1) for a in range(3)]
    corners = [label[(i0, i1, i2)] for i0 in (lo[0], hi[0]) for i1 in (lo[1], hi[1]) for i2 in (lo[2], hi[2])]
    uniform = np.all([c == corners[0] for c in corners], axis=0)
    assert uniform.mean() > 0.5
    np.testing.assert_array_equal(out_label[uniform], corners[0][uniform])
    np.testing.assert_allclose(out_image[0][uniform], 100.0 * corners[0][uniform], atol=1e-3)
    # and elsewhere the interpolated image lies within half a label step of the nearest label
    assert np.mean(np.abs(out_image[0] - 100.0 * out_label) <= 50.0) > 0.95


def test_flips_only_when_allowed():
    never = T.DeformConfig()  # default: no flip axes
    assert never.flip_axes == []
    sometimes = T.DeformConfig(flip_axes=[0], flip_prob=0.5)
    seen_never, seen_sometimes = set(), set()
    for seed in range(200):
        seen_never.add(T.draw_spatial((8, 8, 8), (1, 1, 1), never, np.random.default_rng(seed)).flips)
        seen_sometimes.add(T.draw_spatial((8, 8, 8), (1, 1, 1), sometimes, np.random.default_rng(seed)).flips)
    assert seen_never == {()}
    assert seen_sometimes == {(), (0,)}
    with pytest.raises(ValueError):
        T.DeformConfig(flip_axes=[3])


def test_same_generator_same_transform():
    a = T.draw_spatial((10, 10, 10), (1, 1, 1), strong(), np.random.default_rng(5))
    b = T.draw_spatial((10, 10, 10), (1, 1, 1), strong(), np.random.default_rng(5))
    np.testing.assert_array_equal(T.source_coordinates(a), T.source_coordinates(b))


# ------------------------------------------------------------------------------------ edits


def _octahedron(r: int):
    from skimage.morphology import octahedron

    return octahedron(r)


def test_grow_matches_skimage_dilation_within_foreground():
    from skimage.morphology import dilation

    label = nested_balls()
    out = T.grow_structure(label, 3, radius=2)
    want = dilation(label == 3, _octahedron(2)) & (label != 0)
    np.testing.assert_array_equal(out == 3, want)
    # voxels that did not become 3 keep their label; background is never touched
    keep = out != 3
    np.testing.assert_array_equal(out[keep], label[keep])
    np.testing.assert_array_equal(out == 0, label == 0)


def test_shrink_matches_skimage_erosion_and_fills_from_neighbours():
    from skimage.morphology import erosion

    label = nested_balls()
    out = T.shrink_structure(label, 2, radius=1)
    want_core = erosion(np.pad(label == 2, 1), _octahedron(1))[1:-1, 1:-1, 1:-1]
    np.testing.assert_array_equal(out == 2, want_core)
    lost = (label == 2) & (out != 2)
    assert lost.any()
    # the shell of 2 lies between 1 (outside) and 3 (inside): lost voxels become one of those
    assert set(np.unique(out[lost]).tolist()) <= {1, 3}
    np.testing.assert_array_equal(out[~lost], label[~lost])


def test_remove_structure_gives_its_voxels_to_the_surrounding_label():
    label = nested_balls()
    out = T.remove_structure(label, 3)
    assert not np.any(out == 3)
    np.testing.assert_array_equal(out[label == 3], 2)  # the core sat inside label 2
    np.testing.assert_array_equal(out[label != 3], label[label != 3])


def test_paste_lesion_only_over_hosts():
    label = nested_balls()
    donor = np.zeros((20, 20, 20), np.uint8)
    donor[3:6, 3:6, 3:6] = 6  # a 27-voxel lesion
    out, record = T.paste_lesion(label, donor, 6, np.random.default_rng(0), hosts=[1, 2])
    assert record is not None and record["op"] == "paste"
    pasted = out == 6
    assert 14 <= pasted.sum() <= 27 and pasted.sum() == record["voxels"]
    assert set(np.unique(label[pasted]).tolist()) <= {1, 2}
    np.testing.assert_array_equal(out[~pasted], label[~pasted])
    none, rec = T.paste_lesion(label, np.zeros_like(donor), 6, np.random.default_rng(0))
    assert rec is None and np.array_equal(none, label)


def test_random_edits_off_by_default_and_recorded_when_on():
    label = nested_balls()
    off = T.random_edits(label, T.EditConfig(), np.random.default_rng(0), [0, 1, 2, 3])
    assert off.edits == [] and np.array_equal(off.label, label)
    cfg = T.EditConfig(grow_prob=0.5, shrink_prob=0.5, removable=[3], remove_prob=1.0)
    res = T.random_edits(label, cfg, np.random.default_rng(1), [0, 1, 2, 3])
    ops = [e["op"] for e in res.edits]
    assert ops[0] == "remove" and not np.any(res.label == 3)
    assert set(np.unique(res.label).tolist()) <= {0, 1, 2}
    with pytest.raises(ConfigError, match="edits.removable"):
        T.check_edit_labels(T.EditConfig(removable=[9]), [0, 1, 2, 3])
    with pytest.raises(ConfigError, match="lesion_label"):
        T.check_edit_labels(T.EditConfig(paste_prob=0.5), [0, 1])


# ------------------------------------------------------------------------------------ classic


def test_classic_pair_is_aligned_and_seeded():
    label = nested_balls((16, 16, 16), (7, 4, 2))
    image = (100.0 * label + 10.0)[None].astype(np.float32)
    no_intensity = T.ClassicConfig(bias_prob=0, gamma_prob=0, scale_prob=0, noise_prob=0)
    img, lab, rec = T.classic_pair(
        image, label, (1, 1, 1), deform=strong(), intensity=no_intensity, ranges=[(10.0, 310.0)],
        rng=np.random.default_rng(0),
    )
    assert img.shape == image.shape and lab.shape == label.shape and lab.dtype == label.dtype
    aligned = np.mean(np.abs(img[0] - (100.0 * lab + 10.0)) <= 50.0)
    undeformed = np.mean(np.abs(img[0] - (100.0 * label + 10.0)) <= 50.0)
    assert aligned > 0.95 and undeformed < 0.9  # the pair moved, and moved together
    assert rec["spatial"]["elastic_max_vox"] > 0
    # with MONAI intensity transforms on: finite, seeded (same generator state, same result)
    on = T.ClassicConfig(bias_prob=1, gamma_prob=1, scale_prob=1, noise_prob=1)
    runs = [
        T.classic_pair(image, label, (1, 1, 1), deform=strong(), intensity=on, ranges=[(10.0, 310.0)],
                       rng=np.random.default_rng(4))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    assert np.all(np.isfinite(runs[0][0])) and not np.allclose(runs[0][0], img)


def test_reused_classic_chain_gives_what_a_new_chain_gives():
    """The MONAI intensity chain is built once per process and reseeded per call: a call after other
    calls (the cached chain's draws moved on) equals the same call on a newly built chain."""
    label = nested_balls((12, 12, 12), (5, 3, 1))
    image = (50.0 * label + 10.0)[None].astype(np.float32)
    on = T.ClassicConfig(bias_prob=1, gamma_prob=1, scale_prob=1, shift_prob=1, smooth_prob=1, noise_prob=1)

    def draw(seed: int) -> np.ndarray:
        return T.classic_pair(image, label, (1, 1, 1), deform=strong(), intensity=on, ranges=[(10.0, 160.0)],
                              rng=np.random.default_rng(seed))[0]

    T._CHAINS.clear()
    fresh = draw(7)
    assert len(T._CHAINS) == 1
    for other in (1, 2, 3):
        assert not np.array_equal(draw(other), fresh)
    np.testing.assert_array_equal(draw(7), fresh)
