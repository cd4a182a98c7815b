"""Does a generated image follow its mask? Label/intensity agreement against the training set.

A mask-conditioned generator that ignores its mask (blurry blobs, an image of another anatomy) can
still produce plausible intensities, so a range check passes it. :func:`check_label_agreement`
compares one image with the mask it was generated for, against per-label statistics of the training
set (:class:`LabelIntensityStats`), and returns a :class:`QcResult` with every reason it fails:

1. **per-label mean**: for each label with at least ``min_voxels`` voxels, the image's mean over the
   label lies within ``mean_tolerance`` training standard deviations (plus ``abs_tolerance`` of the
   span of the training label means) of the training mean;
2. **per-label spread**: the image's standard deviation over the label is at most ``std_factor``
   times the training one (plus the same absolute margin): an image that ignores the mask mixes
   tissues inside each label;
3. **contrast between neighbouring labels**: for each pair of labels that touch in the mask and whose
   training means differ by more than the absolute margin, the image's difference has the training
   sign and at least ``contrast_fraction`` of its size;
4. **edges at label borders**: the mean gradient magnitude on voxels next to a border between such
   labels is at least ``min_edge_ratio`` times the mean elsewhere (the image changes where the mask
   says it should).

Images and statistics are in the same units (the dataset's, or [0, 1] units throughout); checks are
per channel. Pure numpy: no model, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.data.loader import DataInfo

__all__ = ["LabelIntensityStats", "QcResult", "QcSettings", "check_label_agreement"]


@dataclass(frozen=True)
class LabelIntensityStats:
    """Per image channel and label: mean and standard deviation of the training intensities.

    labels: the label values (column order); means, stds: ``(C, L)`` float64 arrays.
    """

    labels: tuple[int, ...]
    means: np.ndarray
    stds: np.ndarray

    @classmethod
    def from_info(cls, info: DataInfo, *, units: str = "dataset") -> LabelIntensityStats:
        """From a run's data facts (``label_means`` / ``label_stds`` in [0, 1] units), mapped to the
        dataset's units (``units="dataset"``) or kept in [0, 1] (``units="unit"``)."""
        if info.label_means is None or info.label_stds is None:
            raise ValueError("the run's data facts have no per-label statistics (trained by an older medsynth)")
        means = np.asarray(info.label_means, np.float64)
        stds = np.asarray(info.label_stds, np.float64)
        if units == "dataset":
            lo = np.asarray(info.normalization.lo, np.float64)[:, None]
            hi = np.asarray(info.normalization.hi, np.float64)[:, None]
            means, stds = lo + means * (hi - lo), stds * (hi - lo)
        return cls(tuple(info.labels), means, stds)

    @classmethod
    def from_pairs(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   label_values: Sequence[int] | None = None) -> LabelIntensityStats:
        """From real pairs: images ``(C, *spatial)`` (or ``(*spatial)``), labels ``(*spatial)`` label
        values; ``label_values`` fixes the label set (default: the values found)."""
        values = sorted({int(v) for lab in labels for v in np.unique(lab)} if label_values is None
                        else {int(v) for v in label_values})
        chans = [img if img.ndim == lab.ndim + 1 else img[None] for img, lab in zip(images, labels)]
        nch = chans[0].shape[0]
        means = np.zeros((nch, len(values)))
        stds = np.zeros((nch, len(values)))
        for j, v in enumerate(values):
            for c in range(nch):
                x = np.concatenate([img[c][lab == v].ravel() for img, lab in zip(chans, labels)]).astype(np.float64)
                means[c, j], stds[c, j] = (float(x.mean()), float(x.std())) if x.size else (np.nan, np.nan)
        return cls(tuple(values), means, stds)


@dataclass(frozen=True)
class QcSettings:
    """Tolerances of :func:`check_label_agreement` (see the module docstring)."""

    mean_tolerance: float = 2.0
    std_factor: float = 3.0
    abs_tolerance: float = 0.05
    contrast_fraction: float = 0.25
    min_edge_ratio: float = 2.0
    min_voxels: int = 20


@dataclass(frozen=True)
class QcResult:
    """passed: no check failed; reasons: one line per failure; label_means: the image's mean per
    label value (one per channel); edge_ratio: per channel, border / elsewhere mean gradient (None
    when the mask has no border between contrasting labels)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    label_means: dict[int, list[float]] = field(default_factory=dict)
    edge_ratio: list[float | None] = field(default_factory=list)


def _borders(index: np.ndarray, contrasting: np.ndarray) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Voxels next to a face-neighbour of another label whose pair is ``contrasting[a, b]``, and the
    set of touching label-index pairs (a < b)."""
    band = np.zeros(index.shape, bool)
    pairs: set[tuple[int, int]] = set()
    for axis in range(index.ndim):
        a = np.take(index, np.arange(index.shape[axis] - 1), axis=axis)
        b = np.take(index, np.arange(1, index.shape[axis]), axis=axis)
        change = a != b
        if not change.any():
            continue
        lo, hi = np.minimum(a[change], b[change]), np.maximum(a[change], b[change])
        pairs |= set(zip(lo.tolist(), hi.tolist()))
        marked = change & contrasting[a, b]
        head = [slice(None)] * index.ndim
        tail = [slice(None)] * index.ndim
        head[axis], tail[axis] = slice(0, -1), slice(1, None)
        band[tuple(head)] |= marked
        band[tuple(tail)] |= marked
    return band, pairs


def check_label_agreement(image: np.ndarray, label: np.ndarray, reference: LabelIntensityStats,
                          settings: QcSettings | None = None) -> QcResult:
    """Check that ``image`` follows ``label`` the way the training images follow theirs.

    image: ``(C, *spatial)`` or ``(*spatial)`` (one channel), in the reference's units; label:
    ``(*spatial)`` label values (values outside ``reference.labels`` fail the check).
    """
    s = settings or QcSettings()
    img = np.asarray(image, np.float64)
    lab = np.asarray(label)
    img = img if img.ndim == lab.ndim + 1 else img[None]
    if img.shape[1:] != lab.shape or img.shape[0] != reference.means.shape[0]:
        return QcResult(False, [f"image shape {tuple(np.shape(image))} does not fit mask {lab.shape} with "
                                f"{reference.means.shape[0]} channel(s)"])
    lut = np.full(int(max(max(reference.labels), int(lab.max()))) + 1, -1, np.int64)
    lut[list(reference.labels)] = np.arange(len(reference.labels))
    index = lut[lab.astype(np.int64)]
    if (index < 0).any():
        unknown = sorted({int(v) for v in np.unique(lab[index < 0])})
        return QcResult(False, [f"mask label values {unknown} have no training statistics"])
    counts = np.bincount(index.ravel(), minlength=len(reference.labels))
    present = [j for j in range(len(reference.labels)) if counts[j] >= s.min_voxels]
    reasons: list[str] = []
    found: dict[int, list[float]] = {int(reference.labels[j]): [] for j in range(len(reference.labels)) if counts[j]}
    ratios: list[float | None] = []
    for c in range(img.shape[0]):
        ref_m, ref_s = reference.means[c], reference.stds[c]
        known = ref_m[np.isfinite(ref_m)]
        margin = s.abs_tolerance * float(known.max() - known.min()) if known.size else 0.0
        x = img[c]
        means = np.full(len(reference.labels), np.nan)
        for j in range(len(reference.labels)):
            if counts[j]:
                vals = x[index == j]
                means[j] = float(vals.mean())
                found[int(reference.labels[j])].append(round(means[j], 4))
                if j not in present or not np.isfinite(ref_m[j]):
                    continue
                name = f"label {reference.labels[j]}" + (f" (channel {c})" if img.shape[0] > 1 else "")
                # 1. per-label mean, 2. per-label spread
                if abs(means[j] - ref_m[j]) > s.mean_tolerance * ref_s[j] + margin:
                    reasons.append(f"{name}: mean {means[j]:.4g}, training {ref_m[j]:.4g} +- {ref_s[j]:.3g}")
                spread = float(vals.std())
                if spread > s.std_factor * ref_s[j] + margin:
                    reasons.append(f"{name}: spread {spread:.4g}, training {ref_s[j]:.3g}")
        # 3. contrast between touching labels with different training means
        diff = np.abs(ref_m[:, None] - ref_m[None, :])
        contrasting = np.nan_to_num(diff, nan=0.0) > margin
        band, pairs = _borders(index, contrasting)
        for a, b in sorted(pairs):
            if not contrasting[a, b] or a not in present or b not in present:
                continue
            want, got = ref_m[b] - ref_m[a], means[b] - means[a]
            if np.sign(got) != np.sign(want) or abs(got) < s.contrast_fraction * abs(want):
                reasons.append(f"labels {reference.labels[a]}/{reference.labels[b]}"
                               + (f" (channel {c})" if img.shape[0] > 1 else "")
                               + f": contrast {got:.4g}, training {want:.4g}")
        # 4. gradient magnitude concentrated at those borders
        if band.any() and (~band).any():
            grads = np.gradient(x) if x.ndim > 1 else [np.gradient(x)]
            mag = np.sqrt(sum(g * g for g in grads))
            inside, outside = float(mag[band].mean()), float(mag[~band].mean())
            ratio = inside / max(outside, 1e-12)
            ratios.append(round(ratio, 3))
            if ratio < s.min_edge_ratio:
                reasons.append(f"edges: gradient at label borders {ratio:.2f}x elsewhere, needs "
                               f">= {s.min_edge_ratio:g}x" + (f" (channel {c})" if img.shape[0] > 1 else ""))
        else:
            ratios.append(None)
    return QcResult(not reasons, reasons, found, ratios)
