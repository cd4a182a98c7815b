"""A mask's grid fitted to a bundle's size and spacing limits, and the way back.

MAISI generates volumes in RAS axis order whose in-plane size is one of 256, 384, 512 (both equal) and
whose axial size is one of 128 ... 768, at an in-plane spacing of 0.5-3.0 mm and an axial one of
0.5-5.0 mm (``check_input`` of the bundle's ``scripts/sample.py``): :data:`MAISI_LIMITS`.

:func:`fit_grid` keeps the mask's physical scale (its own spacing, clamped to the limits; the finer
in-plane one for both in-plane axes) and picks the smallest allowed size that covers its field of view,
centred on it; only when the view is too wide for the largest size is the spacing coarsened. The work
grid shares the mask's voxel axes (their order and signs put into RAS by the nearest orientation), so
both directions are separable per-axis resamplings: labels by nearest neighbour (:meth:`WorkGrid.to_work`),
images linearly (:meth:`WorkGrid.to_mask`), and the result lies on the mask's own grid, whatever its
affine (oblique included), spacing or size.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from medsynth.errors import ConfigError, DataError

__all__ = ["MAISI_LIMITS", "FitLimits", "WorkGrid", "fit_grid"]


@dataclass(frozen=True)
class FitLimits:
    """Sizes and spacings (mm) a bundle generates at; every size a multiple of ``multiple``."""

    xy_sizes: tuple[int, ...] = (256, 384, 512)
    z_sizes: tuple[int, ...] = (128, 256, 384, 512, 640, 768)
    xy_spacing: tuple[float, float] = (0.5, 3.0)
    z_spacing: tuple[float, float] = (0.5, 5.0)

    def check(self, multiple: int) -> None:
        bad = [s for s in (*self.xy_sizes, *self.z_sizes) if s % multiple]
        if bad:
            raise ConfigError(f"size {bad[0]} is not a multiple of {multiple}, the networks' downsampling")


#: the published MAISI limits
MAISI_LIMITS = FitLimits()


def _axis_size(extent: float, spacing: float, sizes: tuple[int, ...], bounds: tuple[float, float],
               what: str) -> tuple[int, float]:
    """(size, spacing) for one axis of physical ``extent`` mm wanted at ``spacing`` mm."""
    lo, hi = bounds
    s = float(np.clip(spacing, lo, hi))
    for n in sorted(sizes):
        if n * s >= extent - 1e-6:
            return n, s
    n = max(sizes)
    s = extent / n
    if s > hi + 1e-9:
        raise DataError(f"the mask's {what} field of view is {extent:.0f} mm, more than the bundle covers "
                        f"({n} voxels of at most {hi} mm)")
    return n, s


@dataclass(frozen=True)
class WorkGrid:
    """The grid a mask is generated on.

    order[b]: the mask voxel axis along RAS axis b; flip[b]: whether it runs against it; shape and
    spacing: the work grid's, in RAS order (x, y, z); mask_shape/mask_spacing: the mask's, voxel order.
    """

    order: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    mask_shape: tuple[int, int, int]
    mask_spacing: tuple[float, float, float]

    def _mask_index(self, b: int) -> np.ndarray:
        """Mask voxel coordinate (along axis ``order[b]``) of each work voxel along RAS axis ``b``."""
        a = self.order[b]
        n, na = self.shape[b], self.mask_shape[a]
        j = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sign = -1.0 if self.flip[b] else 1.0
        return (na - 1) / 2 + sign * j * self.spacing[b] / self.mask_spacing[a]

    def affine(self, mask_affine: np.ndarray) -> np.ndarray:
        """The work grid's voxel (RAS order) -> RAS mm affine, given the mask's."""
        m = np.eye(4)
        m[:3, :] = 0.0
        for b in range(3):
            a = self.order[b]
            sign = -1.0 if self.flip[b] else 1.0
            m[a, b] = sign * self.spacing[b] / self.mask_spacing[a]
            m[a, 3] = (self.mask_shape[a] - 1) / 2 - sign * (self.shape[b] - 1) / 2 * self.spacing[b] / self.mask_spacing[a]
        m[3, 3] = 1.0
        return np.asarray(mask_affine, np.float64) @ m

    def to_work(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` (mask voxel order) on the work grid (RAS order), nearest neighbour; 0 outside."""
        idx = [np.rint(self._mask_index(b)).astype(np.int64) for b in range(3)]
        inside = [(i >= 0) & (i < self.mask_shape[self.order[b]]) for b, i in enumerate(idx)]
        ras = np.transpose(labels, self.order)
        out = ras[np.ix_(*[np.clip(i, 0, self.mask_shape[self.order[b]] - 1) for b, i in enumerate(idx)])]
        keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        return np.where(keep, out, 0).astype(labels.dtype)

    def to_mask(self, image: np.ndarray) -> np.ndarray:
        """``image`` (work grid, RAS order) on the mask's grid (voxel order), linear per axis."""
        out = np.asarray(image, np.float32)
        for b in range(3):
            a = self.order[b]
            n, na = self.shape[b], self.mask_shape[a]
            sign = -1.0 if self.flip[b] else 1.0
            i = np.arange(na, dtype=np.float64) - (na - 1) / 2
            j = np.clip((n - 1) / 2 + sign * i * self.mask_spacing[a] / self.spacing[b], 0, n - 1)
            j0 = np.minimum(np.floor(j).astype(np.int64), n - 2) if n > 1 else np.zeros(na, np.int64)
            w = (j - j0).astype(np.float32)
            shape = [1, 1, 1]
            shape[b] = na
            w = w.reshape(shape)
            lo = np.take(out, j0, axis=b)
            hi = np.take(out, np.minimum(j0 + 1, n - 1), axis=b)
            out = lo * (1 - w) + hi * w
        inverse = np.argsort(self.order)
        return np.ascontiguousarray(np.transpose(out, inverse))


def fit_grid(shape: tuple[int, ...], affine: np.ndarray, limits: FitLimits = MAISI_LIMITS) -> WorkGrid:
    """The work grid for a 3D mask of ``shape`` and ``affine`` (voxel -> RAS mm) within ``limits``."""
    if len(shape) != 3:
        raise DataError(f"a bundle generates 3D volumes; the mask has shape {tuple(shape)}")
    affine = np.asarray(affine, np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)  # per voxel axis: (RAS axis, +1/-1)
    order = [0, 0, 0]
    flip = [False, False, False]
    for a, (b, sign) in enumerate(ornt):
        order[int(b)] = a
        flip[int(b)] = bool(sign < 0)
    extent = [shape[order[b]] * spacing[order[b]] for b in range(3)]
    sp = [spacing[order[b]] for b in range(3)]
    nxy, sxy = _axis_size(max(extent[0], extent[1]), min(sp[0], sp[1]), limits.xy_sizes, limits.xy_spacing,
                          "in-plane")
    nz, sz = _axis_size(extent[2], sp[2], limits.z_sizes, limits.z_spacing, "axial")
    return WorkGrid(order=(order[0], order[1], order[2]), flip=(flip[0], flip[1], flip[2]), shape=(nxy, nxy, nz),
                    spacing=(sxy, sxy, sz), mask_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
                    mask_spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])))
