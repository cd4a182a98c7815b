"""Apply, scale and measure displacement fields: images, labels, Jacobian determinants.

A field is ``(*fixed_shape, ndim)`` float32 millimetres in RAS world axes on the fixed grid: the fixed
voxel at RAS position ``p`` takes its value from the moving image at ``p + field[idx]``. Everything
here is numpy/scipy on those arrays (no ITK), so it checks the ITK side independently.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from medsynth.registration.geometry import grid_points, in_plane_affine, world_to_index
from medsynth.registration.result import Registration
from medsynth.registration.settings import RegistrationError

__all__ = [
    "MAX_ONE_HOT_LABELS",
    "folding_fraction",
    "jacobian_determinant",
    "scale_field",
    "warp_image",
    "warp_labels",
]

#: label maps with more distinct labels than this are warped by nearest neighbour (one-hot linear
#: interpolation costs one interpolation per label)
MAX_ONE_HOT_LABELS = 32


def _moving_coordinates(moving_shape: tuple[int, ...], moving_affine: np.ndarray, reg: Registration) -> np.ndarray:
    """Continuous moving voxel indices of every fixed voxel, ``(ndim, *fixed_shape)``."""
    ndim = reg.field.shape[-1]
    if len(moving_shape) != ndim:
        raise RegistrationError(
            f"moving array has {len(moving_shape)} dimensions, the registration's field has {ndim}"
        )
    points = grid_points(reg.field.shape[:-1], reg.fixed_affine) + reg.field
    return np.moveaxis(world_to_index(points, moving_affine), -1, 0)


def warp_image(moving: np.ndarray, moving_affine: np.ndarray, reg: Registration, *, order: int = 1) -> np.ndarray:
    """``moving`` resampled on the fixed grid through ``reg.field``.

    moving: ``(H, W)`` or ``(X, Y, Z)`` in file index order; moving_affine: ``(4, 4)`` voxel -> RAS mm.
    order: spline order (0 nearest, 1 linear, 3 cubic). Points outside the moving image take the
    nearest edge value. Returns float32 of shape ``reg.field.shape[:-1]``.
    """
    coords = _moving_coordinates(moving.shape, moving_affine, reg)
    out = ndimage.map_coordinates(np.asarray(moving, dtype=np.float32), coords, order=order, mode="nearest")
    return out.astype(np.float32)


def warp_labels(labels: np.ndarray, moving_affine: np.ndarray, reg: Registration) -> np.ndarray:
    """An integer label map warped onto the fixed grid, same dtype, without blending.

    Up to :data:`MAX_ONE_HOT_LABELS` distinct labels: each label's indicator is interpolated
    linearly and every voxel takes the label with the largest value (ties: the smaller label). That
    gives smoother boundaries than nearest neighbour (a boundary moves by sub-voxel amounts instead of
    in whole voxels) and never a value that is not one of the input labels, as interpolating the
    label values themselves would. With more labels, nearest neighbour (same guarantee, one pass).
    Points outside the moving image take the nearest edge label.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise RegistrationError(f"labels must be an integer array, got dtype {labels.dtype}")
    coords = _moving_coordinates(labels.shape, moving_affine, reg)
    values = np.unique(labels)
    if len(values) > MAX_ONE_HOT_LABELS:
        out = ndimage.map_coordinates(labels.astype(np.float64), coords, order=0, mode="nearest")
        return np.rint(out).astype(labels.dtype)
    best = np.full(coords.shape[1:], -1.0, dtype=np.float32)
    winner = np.zeros(coords.shape[1:], dtype=labels.dtype)
    for value in values:  # ascending, so a tie keeps the smaller label
        weight = ndimage.map_coordinates((labels == value).astype(np.float32), coords, order=1, mode="nearest")
        better = weight > best
        best[better] = weight[better]
        winner[better] = value
    return winner


def jacobian_determinant(field: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Determinant of the Jacobian of ``x -> x + u(x)`` at every voxel, ``field.shape[:-1]`` float32.

    field: ``(*shape, ndim)`` displacement in RAS mm on the grid of ``affine`` (``(4, 4)`` voxel -> RAS;
    in 2D its in-plane block). Derivatives are central differences in voxel index (one-sided at the
    edges), turned into world derivatives with the inverse of the affine's linear part.
    """
    field = np.asarray(field, dtype=np.float64)
    ndim = field.shape[-1]
    if field.ndim != ndim + 1:
        raise RegistrationError(f"field must have shape (*spatial, {ndim}), got {field.shape}")
    linear, _ = in_plane_affine(affine, ndim)
    grads = np.zeros((*field.shape[:-1], ndim, ndim))
    for axis in range(ndim):
        if field.shape[axis] > 1:
            grads[..., :, axis] = np.gradient(field, axis=axis)
    jac = np.eye(ndim) + grads @ np.linalg.inv(linear)
    return np.linalg.det(jac).astype(np.float32)


def folding_fraction(field: np.ndarray, affine: np.ndarray) -> float:
    """Fraction of voxels whose Jacobian determinant is <= 0 (the map folds there)."""
    return float(np.mean(jacobian_determinant(field, affine) <= 0))


def scale_field(reg: Registration, alpha: float) -> Registration:
    """The registration with its displacement multiplied by ``alpha`` in [0, 1] (an in-between anatomy).

    The folding fraction is recomputed; ``similarity_after`` is kept for ``alpha == 1``, is
    ``similarity_before`` for ``alpha == 0`` and NaN (not measured) in between."""
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise RegistrationError(f"scale_field alpha must be a number in [0, 1], got {alpha!r}")
    field = (reg.field * np.float32(alpha)).astype(np.float32)
    after = reg.similarity_after if alpha == 1 else reg.similarity_before if alpha == 0 else math.nan
    return dataclasses.replace(
        reg, field=field, folding_fraction=folding_fraction(field, reg.fixed_affine), similarity_after=after
    )
