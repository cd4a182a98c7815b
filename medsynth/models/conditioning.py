"""What the generators are conditioned on: the label map at any grid, and the label-mean fill.

- :func:`resize_condition`: a one-hot (or soft) conditioning map ``(N, L, *spatial)`` on another grid.
  Shrinking averages (``area``: each label's fraction of the voxels under a coarse voxel, rows still
  sum to 1; at an integer factor it is an average pool over aligned blocks); growing picks the
  nearest voxel centre (``nearest-exact``). Plain ``nearest`` floors the source coordinate and shifts
  a mask by ``(factor - 1) / 2`` voxels against the image; it is not used anywhere.
- :func:`fill_image`: the *label-mean fill*: each voxel painted with its label's mean training
  intensity, ``fill[n, c] = sum_l onehot[n, l] * means[c][l]`` (``means`` from
  :attr:`medsynth.data.loader.DataInfo.label_means`, in [0, 1] units). A learned model must beat it;
  the generators also take it as an input channel (and the GAN predicts a residual over it), so the
  per-label intensities of a fresh model are the training set's by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fill_image", "resize_condition"]


def resize_condition(cond: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, L, *spatial)`` -> ``(N, L, *size)``: area averaging where an axis shrinks,
    ``nearest-exact`` where it grows (an axis that keeps its size is untouched)."""
    spatial = tuple(int(s) for s in cond.shape[2:])
    size = tuple(int(s) for s in size)
    if spatial == size:
        return cond
    if all(t <= s for s, t in zip(spatial, size)):
        pool = F.adaptive_avg_pool2d if cond.ndim == 4 else F.adaptive_avg_pool3d
        return pool(cond, size)
    if all(t >= s for s, t in zip(spatial, size)):
        return F.interpolate(cond, size=size, mode="nearest-exact")
    # some axes shrink, some grow: grow first (exact copies), then average
    grown = tuple(max(s, t) for s, t in zip(spatial, size))
    return resize_condition(F.interpolate(cond, size=grown, mode="nearest-exact"), size)


def fill_image(onehot: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The label-mean fill. onehot: ``(N, L, *spatial)`` (soft maps give the weighted mean);
    means: ``(C, L)`` per channel and label, [0, 1] units -> ``(N, C, *spatial)``."""
    means = means.to(device=onehot.device, dtype=onehot.dtype)
    return torch.einsum("nl...,cl->nc...", onehot, means)
