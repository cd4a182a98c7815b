"""Label fusion: one mask from several atlases' propagated labels, by (locally weighted) majority vote."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from medsynth.registration.settings import RegistrationError

__all__ = ["fuse_labels", "local_weights"]


def fuse_labels(
    propagated: Sequence[np.ndarray], *, weights: Sequence[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of label maps on one grid, optionally weighted per atlas and voxel.

    propagated: N integer label maps of one shape (atlases warped onto the target).
    weights: N non-negative arrays of that shape (e.g. :func:`local_weights`); None: one vote each.
    Returns ``(labels, agreement)``: the winning label per voxel (dtype of the inputs; ties go to
    the smaller label) and float32 agreement in [0, 1], the fraction of the (weighted) votes the
    winner got. Voxels where every weight is 0 fall back to the unweighted vote.
    """
    if len(propagated) == 0:
        raise RegistrationError("fuse_labels needs at least one propagated label map, got none")
    maps = [np.asarray(p) for p in propagated]
    shape = maps[0].shape
    for k, m in enumerate(maps):
        if m.shape != shape:
            raise RegistrationError(f"propagated label map {k} has shape {m.shape}, map 0 has {shape}")
        if not np.issubdtype(m.dtype, np.integer):
            raise RegistrationError(f"propagated label map {k} has dtype {m.dtype}, expected integers")
    dtype = np.result_type(*maps)
    if weights is None:
        ws = [np.ones(shape, dtype=np.float32)] * len(maps)
    else:
        if len(weights) != len(maps):
            raise RegistrationError(f"fuse_labels got {len(weights)} weight maps for {len(maps)} label maps")
        ws = [np.asarray(w, dtype=np.float32) for w in weights]
        for k, w in enumerate(ws):
            if w.shape != shape or not np.all(np.isfinite(w)) or np.any(w < 0):
                raise RegistrationError(f"weight map {k} must be finite, non-negative and of shape {shape}")
        total = np.sum(ws, axis=0)
        if np.any(total <= 0):
            empty = total <= 0
            ws = [np.where(empty, np.float32(1), w) for w in ws]
    total = np.sum(ws, axis=0)
    best = np.full(shape, -1.0, dtype=np.float32)
    winner = np.zeros(shape, dtype=dtype)
    for value in np.unique(np.concatenate([np.unique(m) for m in maps])):  # ascending: ties keep the smaller
        votes = np.zeros(shape, dtype=np.float32)
        for m, w in zip(maps, ws):
            votes += np.where(m == value, w, np.float32(0))
        better = votes > best
        best[better] = votes[better]
        winner[better] = value
    agreement = np.clip(best / total, 0.0, 1.0).astype(np.float32)
    return winner, agreement


def _normalised(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1.0, 99.0])
    return ((np.asarray(image, dtype=np.float32) - low) / max(float(high - low), 1e-6)).astype(np.float32)


def local_weights(
    target: np.ndarray, warped_images: Sequence[np.ndarray], *, sigma_vox: float = 2.0, beta: float = 4.0
) -> list[np.ndarray]:
    """Per-voxel atlas weights for locally weighted voting, from local similarity to the target.

    Each image is scaled to its own 1st-99th percentile range; ``d_a`` is the Gaussian-weighted
    (``sigma_vox`` voxels) local mean squared difference between atlas image ``a`` (warped onto the
    target) and the target. Weights are ``exp(-beta * (d_a - min_a d_a) / (mean_a d_a + 1e-6))``:
    the locally best atlas gets 1, a worse one less (``beta`` = 0: plain majority vote).
    Returns one float32 array of the target's shape per atlas.
    """
    if sigma_vox <= 0 or beta < 0:
        raise RegistrationError(f"local_weights needs sigma_vox > 0 and beta >= 0, got {sigma_vox}, {beta}")
    t = _normalised(target)
    dist = []
    for k, image in enumerate(warped_images):
        if np.shape(image) != t.shape:
            raise RegistrationError(f"warped image {k} has shape {np.shape(image)}, the target {t.shape}")
        dist.append(ndimage.gaussian_filter((_normalised(image) - t) ** 2, sigma_vox, mode="nearest"))
    if not dist:
        raise RegistrationError("local_weights needs at least one warped image, got none")
    d = np.stack(dist)
    rel = (d - d.min(axis=0)) / (d.mean(axis=0) + 1e-6)
    return [w.astype(np.float32) for w in np.exp(-beta * rel)]
