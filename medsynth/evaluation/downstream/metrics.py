"""Segmentation metrics and the paired bootstrap of ``medsynth downstream``.

- :func:`label_metrics`: Dice and HD95 of each foreground label of one test case, with MONAI's
  ``compute_dice`` and ``compute_hausdorff_distance(percentile=95)`` in millimetres (the case's
  voxel spacing). A label absent from the reference has Dice NaN and HD95 NaN (nothing to find);
  a label present in the reference but not predicted has Dice 0 and HD95 NaN (no surface to measure).
- :func:`case_scores`: one number per test case, the mean over the labels with a value (NaN-skipping).
- :func:`paired_bootstrap`: the mean of a ``(cases, seeds)`` matrix of paired differences and its
  percentile confidence interval, resampling test cases and seeds independently with replacement
  (a two-way bootstrap: the training seed is a source of variation as much as the test case).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaseMetrics:
    """Per-label metrics of one case, one entry per foreground label (in the order asked for).

    dice: ``(L,)`` in [0, 1] or NaN; hd95: ``(L,)`` mm or NaN; reference, predicted: voxel counts."""

    dice: np.ndarray
    hd95: np.ndarray
    reference: np.ndarray
    predicted: np.ndarray


def label_metrics(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], spacing: Sequence[float]) -> CaseMetrics:
    """Dice and HD95 (mm) of every label value in ``labels`` between two label maps of the same shape.

    pred, ref: ``(*spatial)`` integer label values; spacing: mm per spatial axis."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    p = np.stack([pred == v for v in labels])[None]  # (1, L, *spatial)
    r = np.stack([ref == v for v in labels])[None]
    pt, rt = torch.from_numpy(p.astype(np.float32)), torch.from_numpy(r.astype(np.float32))
    dice = compute_dice(pt, rt, include_background=True, ignore_empty=True)[0].double().numpy()
    n_ref = r.reshape(len(labels), -1).sum(axis=1)
    n_pred = p.reshape(len(labels), -1).sum(axis=1)
    hd95 = np.full(len(labels), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation notes inside its edge finder
        for k in range(len(labels)):
            if n_ref[k] and n_pred[k]:
                hd95[k] = float(compute_hausdorff_distance(pt[:, k:k + 1], rt[:, k:k + 1], include_background=True,
                                                           percentile=95, spacing=list(spacing))[0, 0])
    dice[n_ref == 0] = np.nan
    return CaseMetrics(dice=dice, hd95=hd95, reference=n_ref.astype(np.int64), predicted=n_pred.astype(np.int64))


def nanmean(values: np.ndarray | Sequence[float]) -> float:
    """Mean of every value ignoring NaN; NaN (without a warning) when every value is NaN."""
    return float(nanmean_axis(np.asarray(values, dtype=np.float64).reshape(-1), 0))


def nanmean_axis(values: np.ndarray, axis: int) -> np.ndarray:
    """Means along ``axis`` ignoring NaN; NaN (without a warning) where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(np.asarray(values, dtype=np.float64), axis=axis))


def case_scores(per_label: np.ndarray) -> np.ndarray:
    """``(cases, L)`` per-label values -> ``(cases,)`` means over the labels with a value (NaN if none)."""
    return nanmean_axis(per_label, 1)


def paired_bootstrap(diff: np.ndarray, *, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``diff`` ``(cases, seeds)`` and its ``level`` percentile bootstrap interval.

    Each bootstrap replicate draws ``cases`` rows and ``seeds`` columns with replacement from
    ``numpy.random.default_rng(seed)`` and takes the mean of that grid. Rows with a NaN are dropped
    first. Returns (mean, low, high); all NaN when no row is left."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"diff must be (cases, seeds), got shape {d.shape}")
    d = d[~np.isnan(d).any(axis=1)]
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    n_c, n_s = d.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_c, size=(n_boot, n_c))
    cols = rng.integers(0, n_s, size=(n_boot, n_s))
    w_rows = np.zeros((n_boot, n_c))
    w_cols = np.zeros((n_boot, n_s))
    np.add.at(w_rows, (np.arange(n_boot)[:, None], rows), 1.0)
    np.add.at(w_cols, (np.arange(n_boot)[:, None], cols), 1.0)
    means = np.einsum("bi,ij,bj->b", w_rows, d, w_cols) / (n_c * n_s)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(low), float(high)
