"""medsynth.registration: geometry convention, warping, Jacobians, fusion, bounds and determinism.

Expected values are computed by hand: a moving image that is the fixed one moved by a known number of
millimetres along a world axis must give a field of that shift (sign and axis) under oblique and
flipped affines, in 2D and 3D; a field that is linear in world coordinates has a known Jacobian.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medsynth.errors import ConfigError
from medsynth.registration import (
    MAX_ONE_HOT_LABELS,
    Registration,
    RegistrationError,
    RegistrationSettings,
    folding_fraction,
    fuse_labels,
    jacobian_determinant,
    local_weights,
    register,
    scale_field,
    warp_image,
    warp_labels,
)

FAST = RegistrationSettings(threads=1, levels=2, iterations=30, affine_iterations=60)


def phantom(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random image with structure at a few scales (registers well, no symmetry)."""
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 4
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    blob = sum((g - 0.2 * (k + 1) / len(shape)) ** 2 / (0.4 + 0.1 * k) ** 2 for k, g in enumerate(grid))
    return (image + 3.0 * (blob < 1)).astype(np.float32)


def rotation(angle_deg: float, axis: int = 2) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_of(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = origin
    return out


# ---- geometry: a known shift comes back as that field, with sign and axis ----

AFFINES_3D = {
    "identity": affine_of(np.eye(3), (0.0, 0.0, 0.0)),
    "oblique": affine_of(rotation(20.0, axis=2) @ np.diag([1.5, 2.0, 2.5]), (-10.0, 30.0, 5.0)),
    "flipped": affine_of(np.diag([-2.0, 1.5, 2.0]), (40.0, -20.0, 7.0)),
}


@pytest.mark.parametrize("name", sorted(AFFINES_3D))
def test_3d_shift_of_the_affine_comes_back_as_the_field(name: str) -> None:
    fixed = phantom((16, 16, 16))
    affine = AFFINES_3D[name]
    shift = np.array([3.0, 0.0, 0.0])  # the moving grid sits 3 mm further right: same content at p + 3 mm R
    moved = affine.copy()
    moved[:3, 3] += shift
    reg = register(fixed, affine, fixed, moved, RegistrationSettings(transform="affine", threads=1))
    assert reg.field.shape == (16, 16, 16, 3) and reg.field.dtype == np.float32
    np.testing.assert_allclose(reg.field[4:-4, 4:-4, 4:-4].mean(axis=(0, 1, 2)), shift, atol=0.25)
    assert np.abs(reg.field[4:-4, 4:-4, 4:-4] - shift).max() < 0.6
    assert reg.similarity_after > reg.similarity_before
    np.testing.assert_allclose(reg.fixed_affine, affine)


@pytest.mark.parametrize("name", ["oblique", "flipped"])
def test_3d_content_rolled_along_an_index_axis_gives_that_column_of_the_affine(name: str) -> None:
    affine = AFFINES_3D[name]
    fixed = phantom((16, 16, 16), seed=1)
    moving = np.roll(fixed, 2, axis=1)  # fixed voxel (i, j, k) appears at moving voxel (i, j + 2, k)
    expected = 2 * affine[:3, 1]  # world displacement of two steps along j
    reg = register(fixed, affine, moving, affine, RegistrationSettings(transform="affine", threads=1))
    np.testing.assert_allclose(reg.field[4:-4, 4:-4, 4:-4].mean(axis=(0, 1, 2)), expected, atol=0.35)


def slice_affine(linear2: np.ndarray, origin2: tuple[float, float], z: float) -> np.ndarray:
    out = np.eye(4)
    out[:2, :2] = linear2
    out[:2, 3] = origin2
    out[2, 2], out[2, 3] = 2.0, z
    return out


@pytest.mark.parametrize(
    "linear2",
    [np.diag([1.0, 1.0]), rotation(30.0)[:2, :2] @ np.diag([2.0, 1.5]), np.diag([1.5, -2.0])],
    ids=["identity", "oblique", "flipped"],
)
def test_2d_shift_along_a_world_axis_with_slices_at_other_levels(linear2: np.ndarray) -> None:
    fixed = phantom((32, 32), seed=2)
    affine = slice_affine(linear2, (5.0, -3.0), z=10.0)
    moved = slice_affine(linear2, (5.0, -3.0 - 4.0), z=-6.0)  # 4 mm posterior; another level (ignored in 2D)
    reg = register(fixed, affine, fixed, moved, RegistrationSettings(transform="affine", threads=1))
    assert reg.field.shape == (32, 32, 2)
    np.testing.assert_allclose(reg.field[8:-8, 8:-8].mean(axis=(0, 1)), [0.0, -4.0], atol=0.25)


def test_2d_deformable_undoes_a_smooth_warp_better_than_affine() -> None:
    affine = slice_affine(np.diag([1.0, 1.0]), (0.0, 0.0), z=0.0)
    fixed = phantom((48, 48), seed=3)
    labels = (fixed > np.percentile(fixed, 60)).astype(np.uint8) + (fixed > np.percentile(fixed, 85))
    # moving: fixed pulled through a smooth bump; labels moved with it
    grid = np.meshgrid(np.arange(48.0), np.arange(48.0), indexing="ij")
    bump = 3.0 * np.exp(-((grid[0] - 24) ** 2 + (grid[1] - 20) ** 2) / (2 * 8.0**2))
    coords = np.stack([grid[0] + bump, grid[1] - bump])
    moving = ndimage.map_coordinates(fixed, coords, order=1, mode="nearest")
    moving_labels = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    for deformable in ("demons", "bspline"):
        settings = RegistrationSettings(deformable=deformable, threads=1, levels=2, iterations=40, grid_spacing_mm=8.0)
        reg = register(fixed, affine, moving, affine, settings)
        affine_only = register(fixed, affine, moving, affine, RegistrationSettings(transform="affine", threads=1))
        err = np.abs(warp_labels(moving_labels, affine, reg) != labels).mean()
        err_affine = np.abs(warp_labels(moving_labels, affine, affine_only) != labels).mean()
        assert err < 0.6 * err_affine, (deformable, err, err_affine)
        assert reg.folding_fraction < 0.005 and reg.similarity_after > reg.similarity_before
        assert reg.stages == ("affine", deformable)


@pytest.mark.parametrize("deformable", ["demons", "bspline"])
def test_mutual_information_registers_an_intensity_inverted_copy(deformable: str) -> None:
    affine = slice_affine(np.diag([1.0, 1.0]), (0.0, 0.0), z=0.0)
    fixed = phantom((32, 32), seed=4)
    moved = affine.copy()
    moved[0, 3] += 3.0
    settings = RegistrationSettings(deformable=deformable, threads=1, levels=2, iterations=30)
    reg = register(fixed, affine, fixed.max() - fixed, moved, settings)
    np.testing.assert_allclose(reg.field[8:-8, 8:-8].mean(axis=(0, 1)), [3.0, 0.0], atol=0.4)
    assert reg.similarity_after > reg.similarity_before


def test_same_seed_gives_the_same_bytes_with_random_sampling() -> None:
    affine = AFFINES_3D["oblique"]
    fixed = phantom((16, 16, 16), seed=5)
    moving = ndimage.shift(fixed, (1.3, -0.7, 0.5), order=1, mode="nearest") + 0.1 * phantom((16, 16, 16), seed=6)
    for deformable in ("demons", "bspline"):
        settings = RegistrationSettings(deformable=deformable, sampling_fraction=0.3, seed=7, threads=2, levels=2, iterations=10)
        a = register(fixed, affine, moving, affine, settings)
        b = register(fixed, affine, moving, affine, settings)
        assert a.field.tobytes() == b.field.tobytes()
        assert a.similarity_after == b.similarity_after


# ---- bounds and failures ----


def test_time_limit_is_named_in_the_error() -> None:
    fixed = phantom((16, 16, 16))
    with pytest.raises(RegistrationError, match="time_limit_s=0.001"):
        register(fixed, np.eye(4), fixed, np.eye(4), RegistrationSettings(time_limit_s=0.001, threads=1))


def test_images_above_the_voxel_bound_are_refused_before_any_work() -> None:
    with pytest.raises(RegistrationError, match="max_voxels=100"):
        register(np.zeros((32, 32)), np.eye(4), np.zeros((8, 8)), np.eye(4), RegistrationSettings(max_voxels=100))


def test_bad_inputs_raise_registration_errors() -> None:
    image = phantom((16, 16))
    bad = image.copy()
    bad[3, 3] = np.nan
    with pytest.raises(RegistrationError, match="non-finite"):
        register(image, np.eye(4), bad, np.eye(4), FAST)
    with pytest.raises(RegistrationError, match="2D"):
        register(image, np.eye(4), phantom((16, 16, 16)), np.eye(4), FAST)
    coronal = np.eye(4)[:, [0, 2, 1, 3]]  # a slice in the x-z plane: not in the first two world axes
    with pytest.raises(RegistrationError, match="singular"):
        register(image, coronal, image, np.eye(4), FAST)
    with pytest.raises(RegistrationError, match="fixed_mask"):
        register(image, np.eye(4), image, np.eye(4), FAST, fixed_mask=np.zeros((16, 16)))


def test_a_constant_moving_image_is_refused() -> None:
    image = phantom((16, 16))
    with pytest.raises(RegistrationError, match="moving image is constant"):
        register(image, np.eye(4), np.ones((16, 16)), np.eye(4), FAST)


def test_folding_above_the_bound_is_an_error() -> None:
    affine = slice_affine(np.diag([1.0, 1.0]), (0.0, 0.0), z=0.0)
    fixed = phantom((32, 32), seed=8)
    moving = ndimage.shift(fixed, (2.5, -1.5), order=1, mode="nearest")
    with pytest.raises(RegistrationError, match="max_folding_fraction=0"):
        # demons on noise-like detail with no smoothing folds somewhere; a zero bound refuses any fold
        register(fixed, affine, moving + phantom((32, 32), seed=9), affine,
                 RegistrationSettings(threads=1, demons_sigma_vox=0.05, iterations=200, max_folding_fraction=0.0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"transform": "rigid"}, "transform"), ({"levels": 0}, "levels"), ({"seed": -1}, "seed"),
     ({"sampling_fraction": 0.0}, "sampling_fraction"), ({"time_limit_s": float("nan")}, "time_limit_s")],
)
def test_settings_name_the_bad_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RegistrationSettings(**kwargs)


# ---- warping, Jacobians, scaling: numpy only, checked by hand ----


def constant_field_reg(shape: tuple[int, ...], affine: np.ndarray, shift: np.ndarray) -> Registration:
    field = np.broadcast_to(np.asarray(shift, dtype=np.float32), (*shape, len(shape))).copy()
    return Registration(field, affine, 0.0, 0.0, 0.0, True, 0.0)


def test_warp_image_and_labels_by_whole_voxels_equal_a_roll() -> None:
    affine = affine_of(np.diag([-2.0, 1.0, 3.0]), (1.0, 2.0, 3.0))
    image = phantom((12, 12, 12))
    labels = np.zeros((12, 12, 12), dtype=np.uint16)
    labels[3:8, 2:9, 4:10] = 7
    labels[5:7, 4:6, 5:8] = 300
    reg = constant_field_reg(labels.shape, affine, np.array([-4.0, 0.0, 0.0]))  # +2 voxels along i (x flipped)
    warped = warp_image(image, affine, reg)
    np.testing.assert_allclose(warped[:-2], image[2:], atol=1e-5)
    out = warp_labels(labels, affine, reg)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[:-2], labels[2:])
    zero = constant_field_reg(labels.shape, affine, np.zeros(3))
    np.testing.assert_array_equal(warp_labels(labels, affine, zero), labels)


def test_warped_labels_are_input_labels_never_blends() -> None:
    rng = np.random.default_rng(0)
    affine = slice_affine(np.diag([1.0, 1.0]), (0.0, 0.0), 0.0)
    few = rng.choice(np.array([0, 3, 9], dtype=np.int16), size=(20, 20))
    many = rng.integers(0, 1000, size=(20, 20)).astype(np.int32)
    assert len(np.unique(many)) > MAX_ONE_HOT_LABELS
    reg = constant_field_reg((20, 20), affine, np.array([0.37, -0.61]))
    for labels in (few, many):
        out = warp_labels(labels, affine, reg)
        assert out.dtype == labels.dtype and set(np.unique(out)) <= set(np.unique(labels))
    # one-hot linear then argmax: a half-voxel shift of a step edge keeps the edge, never a middle value
    step = np.zeros((20, 20), dtype=np.uint8)
    step[10:] = 4
    out = warp_labels(step, affine, constant_field_reg((20, 20), affine, np.array([0.4, 0.0])))
    np.testing.assert_array_equal(out, step)


def test_jacobian_of_a_linear_field_is_its_determinant_under_an_oblique_affine() -> None:
    affine = AFFINES_3D["oblique"]
    shape = (8, 9, 10)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    m = np.array([[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.1]])  # u(x) = M x: J = I + M
    det = jacobian_determinant((world @ m.T).astype(np.float32), affine)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + m), rtol=1e-4)
    fold = np.zeros((*shape, 3), dtype=np.float32)
    fold[..., 0] = -2 * world[..., 0]  # x -> -x: determinant -1 everywhere
    assert folding_fraction(fold, affine) == 1.0


def test_scale_field_gives_in_between_anatomies() -> None:
    affine = slice_affine(np.diag([2.0, 2.0]), (0.0, 0.0), 0.0)
    reg = constant_field_reg((10, 10), affine, np.array([4.0, -2.0]))
    reg.similarity_before, reg.similarity_after = 0.1, 0.9
    half = scale_field(reg, 0.5)
    np.testing.assert_allclose(half.field[3, 3], [2.0, -1.0])
    assert np.isnan(half.similarity_after) and scale_field(reg, 1.0).similarity_after == 0.9
    assert scale_field(reg, 0.0).similarity_after == 0.1 and not scale_field(reg, 0.0).field.any()
    with pytest.raises(RegistrationError, match="alpha"):
        scale_field(reg, 1.5)


# ---- fusion ----


def test_majority_vote_with_ties_and_weights() -> None:
    a = np.array([[1, 2, 3, 0]], dtype=np.uint8)
    b = np.array([[1, 2, 2, 5]], dtype=np.uint8)
    c = np.array([[1, 3, 3, 6]], dtype=np.uint8)
    labels, agreement = fuse_labels([a, b, c])
    np.testing.assert_array_equal(labels, [[1, 2, 3, 0]])  # last voxel: a three-way tie -> smallest label
    np.testing.assert_allclose(agreement, [[1.0, 2 / 3, 2 / 3, 1 / 3]], rtol=1e-6)
    assert labels.dtype == np.uint8
    w = [np.full((1, 4), 1.0), np.full((1, 4), 1.0), np.array([[1.0, 5.0, 1.0, 0.0]])]
    labels, agreement = fuse_labels([a, b, c], weights=w)
    np.testing.assert_array_equal(labels, [[1, 3, 3, 0]])
    np.testing.assert_allclose(agreement, [[1.0, 5 / 7, 2 / 3, 0.5]], rtol=1e-6)
    with pytest.raises(RegistrationError):
        fuse_labels([])


def test_local_weights_prefer_the_locally_similar_atlas() -> None:
    target = phantom((24, 24), seed=10)
    other = phantom((24, 24), seed=11)
    same, different = local_weights(target, [target, other])
    np.testing.assert_allclose(same, 1.0)
    assert different.max() <= 1.0 and different.mean() < 0.5
