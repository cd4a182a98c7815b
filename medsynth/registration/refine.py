"""Fusion with the target's own intensities: the atlases' votes as a spatial prior, times a Gaussian
intensity model per label fitted on the target image by EM (the generative model of atlas-based tools such
as SPM's unified segmentation and FreeSurfer's SAMSEG, reduced to one mixture component per label).

Registration aligns shapes; where the atlases disagree, or where the target's anatomy differs from every
atlas (a ventricle of another size, a sulcus the atlases lack), the target's intensities decide. Per voxel:

    p(l | x) ∝ prior_l(x) * N(I(x); mu_l, sigma_l)

``prior_l`` is the share of the atlases voting ``l``, blurred by ``prior_sigma_vox`` (a vote one voxel away
still counts a little) and floored by ``prior_floor`` (no label is impossible where some atlas is near);
``mu_l``/``sigma_l`` per channel start from the voxels where every atlas agrees and are updated by EM on
the posteriors (``iterations`` rounds). The fused label is the posterior's argmax; its agreement is the
winning posterior.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["intensity_fusion"]


def intensity_fusion(target: np.ndarray, propagated: Sequence[np.ndarray], *, iterations: int = 5,
                     prior_sigma_vox: float = 1.0, prior_floor: float = 1e-3,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ``propagated`` label maps on ``target``'s grid with ``target``'s intensities.

    target: ``(*spatial)`` or ``(C, *spatial)`` image; propagated: label maps ``(*spatial)`` (integers).
    Returns ``(labels, posterior of the winning label)`` of the grid's shape: labels in the maps' dtype, the
    posterior float32 in [0, 1].
    """
    maps = np.stack([np.asarray(p) for p in propagated])
    spatial = maps.shape[1:]
    image = np.asarray(target, dtype=np.float64)
    channels = image[None] if image.shape == spatial else image
    x = channels.reshape(channels.shape[0], -1).T  # (voxels, C)
    values = np.unique(maps)
    votes = np.stack([(maps == v).mean(axis=0) for v in values]).astype(np.float64)  # (L, *spatial)
    prior = np.stack([gaussian_filter(v, prior_sigma_vox, mode="nearest") if prior_sigma_vox > 0 else v
                      for v in votes])
    prior = prior.reshape(len(values), -1) + prior_floor
    prior /= prior.sum(axis=0, keepdims=True)
    # start: the voxels where every atlas agrees (all of a label's votes when it has none)
    resp = votes.reshape(len(values), -1).copy()
    sure = resp.max(axis=0) >= 1.0 - 1e-9
    init = np.where(sure[None], resp, 0.0)
    for i in range(len(values)):
        if init[i].sum() < 2:
            init[i] = resp[i]
    resp = init
    spread = max(float(x.std()), 1e-6)
    for _ in range(max(iterations, 1)):
        log_post = np.log(prior)
        for i in range(len(values)):
            w = resp[i]
            total = float(w.sum())
            if total < 1e-6:
                log_post[i] = -np.inf
                continue
            mu = (w[:, None] * x).sum(axis=0) / total
            var = (w[:, None] * (x - mu) ** 2).sum(axis=0) / total
            var = np.maximum(var, (0.01 * spread) ** 2)
            log_post[i] += (-0.5 * ((x - mu) ** 2 / var).sum(axis=1) - 0.5 * np.log(var).sum())
        log_post -= log_post.max(axis=0, keepdims=True)
        post = np.exp(log_post)
        post /= post.sum(axis=0, keepdims=True)
        resp = post
    winner = resp.argmax(axis=0)
    labels = values[winner].reshape(spatial).astype(maps.dtype)
    confidence = resp.max(axis=0).reshape(spatial).astype(np.float32)
    return labels, confidence
