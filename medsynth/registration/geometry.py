"""Geometry between medsynth arrays (index order, RAS affine) and SimpleITK images (LPS, reversed axes).

medsynth holds a volume as a numpy array in file index order ``(i, j[, k])`` with a ``(4, 4)`` affine
from voxel index to RAS millimetres. SimpleITK holds the same data with the axes reversed
(``GetImageFromArray`` takes ``(k, j, i)``) and its world in LPS: the first two world axes have the
opposite sign. This module is the one place that converts between the two:

- 3D: ITK world ``= F @ RAS`` with ``F = diag(-1, -1, 1)``; origin, spacing and direction come from
  the affine (spacing = the norms of its columns, direction = ``F @ columns / spacing``).
- 2D ``(H, W)``: the in-plane ``2 x 2`` block of the affine (its first two rows and columns) and the
  first two entries of its translation make a 2D ITK image in the world plane of the first two RAS
  axes (``F = diag(-1, -1)``). The slice position (third row and column) is ignored, so slices at
  different levels register in plane; a slice whose in-plane block is singular (not in the first
  two world axes) is refused.

Displacements convert with the same ``F`` (it is its own inverse).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from medsynth.registration.settings import RegistrationError

__all__ = [
    "field_from_itk",
    "grid_points",
    "in_plane_affine",
    "itk_flip",
    "to_itk_image",
    "world_to_index",
]


def itk_flip(ndim: int) -> np.ndarray:
    """``F``: RAS <-> LPS on the first two world axes, ``(ndim, ndim)``."""
    return np.diag([-1.0, -1.0, 1.0][:ndim])


def in_plane_affine(affine: np.ndarray, ndim: int, *, name: str = "affine") -> tuple[np.ndarray, np.ndarray]:
    """The linear part ``(ndim, ndim)`` and translation ``(ndim,)`` of a voxel -> RAS affine.

    For ``ndim == 2`` the in-plane block (first two rows and columns). Raises :class:`RegistrationError`
    naming ``name`` for an affine that is not ``(4, 4)``, not finite or singular."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise RegistrationError(f"{name} must be a (4, 4) voxel -> RAS matrix, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise RegistrationError(f"{name} has non-finite entries")
    linear, offset = affine[:ndim, :ndim], affine[:ndim, 3]
    if abs(np.linalg.det(linear)) < 1e-12:
        where = "its in-plane block (first two rows and columns)" if ndim == 2 else "its linear part"
        raise RegistrationError(
            f"{name}: {where} is singular; a 2D slice must lie in the plane of the first two world axes"
            if ndim == 2
            else f"{name}: {where} is singular"
        )
    return linear.copy(), offset.copy()


def to_itk_image(array: np.ndarray, affine: np.ndarray, *, name: str = "image", dtype: type = np.float32) -> sitk.Image:
    """A SimpleITK image with ``array``'s voxels at the world positions ``affine`` gives them.

    array: ``(H, W)`` or ``(X, Y, Z)`` in file index order; affine: ``(4, 4)`` voxel -> RAS mm."""
    ndim = array.ndim
    linear, offset = in_plane_affine(affine, ndim, name=f"{name} affine")
    flip = itk_flip(ndim)
    spacing = np.linalg.norm(linear, axis=0)
    direction = flip @ linear / spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=dtype).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in flip @ offset])
    image.SetDirection([float(d) for d in direction.ravel()])
    return image


def field_from_itk(field: sitk.Image) -> np.ndarray:
    """A SimpleITK displacement field (LPS components) -> ``(*shape, ndim)`` float32, RAS mm components."""
    data = sitk.GetArrayFromImage(field)  # (k, j, i, ndim) or (j, i, ndim)
    ndim = data.shape[-1]
    data = np.transpose(data, (*reversed(range(ndim)), ndim))
    return np.ascontiguousarray((data * np.diag(itk_flip(ndim))).astype(np.float32))


def world_to_index(points: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """RAS mm points ``(..., ndim)`` -> continuous voxel indices ``(..., ndim)`` of ``affine``'s grid."""
    ndim = points.shape[-1]
    linear, offset = in_plane_affine(affine, ndim)
    return (points - offset) @ np.linalg.inv(linear).T


def grid_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The RAS mm position of every voxel of a grid, ``(*shape, ndim)`` float64."""
    ndim = len(shape)
    linear, offset = in_plane_affine(affine, ndim)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ linear.T + offset
