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
  per-label intensities of a fresh model are the training set's by construction. With ``sigma`` the
  fill is blurred by a Gaussian of that width over every spatial axis (the partial-volume width
  fitted on the training set, :attr:`medsynth.data.loader.DataInfo.fill_sigma`; edges repeated, as
  scipy's ``gaussian_filter(mode="nearest")`` with ``truncate=4``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["fill_image", "fill_means_of", "gaussian_blur", "resize_condition"]


def resize_condition(cond: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(N, L, *spatial)`` -> ``(N, L, *size)``: area averaging where an axis shrinks,
    ``nearest-exact`` where it grows (an axis that keeps its size is untouched)."""
    spatial = tuple(int(s) for s in cond.shape[2:])
    size = tuple(int(s) for s in size)
    if spatial == size:
        return cond
    if all(t <= s for s, t in zip(spatial, size)):
        pool = F.adaptive_avg_pool2d if cond.ndim == 4 else F.adaptive_avg_pool3d
        return pool(cond, size)  # type: ignore[arg-type]  # one size per spatial axis
    if all(t >= s for s, t in zip(spatial, size)):
        return F.interpolate(cond, size=size, mode="nearest-exact")
    # some axes shrink, some grow: grow first (exact copies), then average
    grown = tuple(max(s, t) for s, t in zip(spatial, size))
    return resize_condition(F.interpolate(cond, size=grown, mode="nearest-exact"), size)


def fill_image(onehot: torch.Tensor, means: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """The label-mean fill. onehot: ``(N, L, *spatial)`` (soft maps give the weighted mean);
    means: ``(C, L)`` per channel and label, [0, 1] units, or ``(N, C, L)`` one table per sample (a
    per-case fill); sigma: Gaussian blur width in voxels (0: none) -> ``(N, C, *spatial)``."""
    means = means.to(device=onehot.device, dtype=onehot.dtype)
    if means.ndim == 3:
        fill = torch.einsum("nl...,ncl->nc...", onehot, means)
    else:
        fill = torch.einsum("nl...,cl->nc...", onehot, means)
    return gaussian_blur(fill, sigma) if sigma > 0 else fill


def fill_means_of(image: torch.Tensor, onehot: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Each image's own per-label means: image ``(N, C, *spatial)``, onehot ``(N, L, *spatial)`` ->
    ``(N, C, L)``; a label an image lacks takes ``pooled`` ``(C, L)``."""
    count = onehot.flatten(2).sum(-1)  # (N, L)
    total = torch.einsum("nc...,nl...->ncl", image.float(), onehot.float())
    own = total / count.clamp_min(1.0)[:, None, :]
    return torch.where(count[:, None, :] > 0, own, pooled.to(own)[None].expand_as(own))


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)`` over every spatial axis, edges repeated."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    sd, c = x.ndim - 2, x.shape[1]
    conv = F.conv2d if sd == 2 else F.conv3d
    for axis in range(sd):
        shape = [c, 1] + [kernel.numel() if a == axis else 1 for a in range(sd)]
        pad = [0, 0] * sd
        pad[2 * (sd - 1 - axis)] = pad[2 * (sd - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), kernel.reshape([1, 1, *shape[2:]]).expand(shape), groups=c)
    return x
