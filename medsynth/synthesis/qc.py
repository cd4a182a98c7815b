"""Does a generated image follow its mask, and look like a real image inside each label? QC both ways.

A mask-conditioned generator that ignores its mask (blurry blobs, an image of another anatomy) can
still produce plausible intensities, so a range check passes it; one that paints each label flat (a
"cartoon", the label-mean fill) follows its mask perfectly. :func:`check_label_agreement` compares one
image with the mask it was generated for, against statistics of the training set
(:class:`LabelIntensityStats`: per training case and label, never pooled over cases where the run
recorded them), and returns a :class:`QcResult` with every reason it fails:

1. **per-label mean**: for each label with at least ``min_voxels`` voxels, the image's mean over the
   label lies within the range the training cases' own means of that label span, widened by
   ``range_margin`` times that span plus ``abs_tolerance`` of the span of the label means (a lesion
   brighter than every tissue passes when training cases had such lesions, whatever the pooled mean),
   or within ``mean_tolerance`` pooled training standard deviations plus the same absolute margin of
   the pooled mean (all that run cards of older runs allow: they have no per-case statistics);
2. **per-label spread**: the image's standard deviation over the label is at most ``std_factor``
   times the training one (plus the absolute margin): an image that ignores the mask mixes tissues
   inside each label;
3. **contrast between neighbouring labels**: for each pair of labels that touch in the mask, where
   one is brighter than the other in at least ``contrast_agreement`` (90 %) of the training cases that
   have both, and the sign is a rule, not chance (:func:`_sign_is_a_rule`: 8 agreeing cases of 8, or fewer
   that all agree by a difference large against its spread, one-sided t test at ``contrast_confidence``;
   the 3D phantom split's lesions were brighter than label 3 in 3 training cases of 3, by 47 to 1056, and
   darker in 14 of 57 held-out ones), and by more than the absolute margin (median over those cases), the
   image's difference
   has that sign and at least ``contrast_fraction`` of the smallest such training difference.
   Without per-case statistics: the pooled means' sign and ``contrast_fraction`` of their difference;
4. **edges at label borders**: the mean gradient magnitude on voxels next to a border between
   contrasting labels (a sign agreed by ``contrast_agreement`` of the training cases, a rule or not) is
   at least ``min_edge_ratio`` times the mean elsewhere (the image changes where
   the mask says it should);
5. **texture inside labels** (``texture``; on for trained generators, off for images meant to be flat,
   synthseg's and the label-mean fill): for each label with an interior (voxels at least
   ``reference.texture_depth`` face steps inside it, past the fill's partial-volume blur), the standard
   deviation of the image's Laplacian there (:func:`medsynth.data.loader.label_texture`) is at least
   ``min_texture_ratio`` times the smallest of the training cases' own. A flat fill has none.

The thresholds were calibrated on held-out real images (``tests/test_qc.py``; ``benchmarks/qc_both_ways.py``
and ``benchmarks/RESULTS.md``, "QC both ways"): at most 1 % of real images rejected, at least 99 % of
label-mean fill images rejected as ``gan`` output.

Images and statistics are in the same units (the dataset's, or [0, 1] units throughout); checks are
per channel. numpy and scipy: no model, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from medsynth.data.loader import case_statistics, label_texture, texture_depth

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.data.loader import DataInfo

__all__ = ["LabelIntensityStats", "QcResult", "QcSettings", "check_label_agreement"]


@dataclass(frozen=True)
class LabelIntensityStats:
    """Per image channel and label: mean and standard deviation of the training intensities, pooled
    and per training case.

    labels: the label values (column order); means, stds: ``(C, L)`` float64 arrays (pooled);
    case_means, case_texture: ``(K, C, L)`` per training case (NaN: the case lacks the label, or its
    interior), None when not known (older run cards: the pooled checks only, no texture check);
    texture_depth: the interior depth (voxels) the texture was measured at.
    """

    labels: tuple[int, ...]
    means: np.ndarray
    stds: np.ndarray
    case_means: np.ndarray | None = None
    case_texture: np.ndarray | None = None
    texture_depth: int = 1

    @classmethod
    def from_info(cls, info: DataInfo, *, units: str = "dataset") -> LabelIntensityStats:
        """From a run's data facts (``label_means`` / ``label_stds`` in [0, 1] units), mapped to the
        dataset's units (``units="dataset"``) or kept in [0, 1] (``units="unit"``)."""
        if info.label_means is None or info.label_stds is None:
            raise ValueError("the run's data facts have no per-label statistics (trained by an older medsynth)")
        means = np.asarray(info.label_means, np.float64)
        stds = np.asarray(info.label_stds, np.float64)
        cases = info.case_stats
        case_means = None if cases is None else cases.means
        case_texture = None if cases is None else cases.texture
        if units == "dataset":
            norm = info.normalization
            slope = norm.slope()[:, None]
            means, stds = norm.from_unit(means).astype(np.float64), stds * slope
            if cases is not None:  # the Laplacian is linear: texture scales with the slope
                case_means = np.swapaxes(norm.from_unit(np.swapaxes(cases.means, 0, 1)), 0, 1).astype(np.float64)
                case_texture = cases.texture * slope
        return cls(tuple(info.labels), means, stds, case_means, case_texture,
                   cases.texture_depth if cases is not None else 1)

    @classmethod
    def from_pairs(cls, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                   label_values: Sequence[int] | None = None, *, fill_sigma: float = 0.0) -> LabelIntensityStats:
        """From real pairs (one per training case): images ``(C, *spatial)`` (or ``(*spatial)``), labels
        ``(*spatial)`` label values; ``label_values`` fixes the label set (default: the values found);
        ``fill_sigma``: the fill's partial-volume blur (voxels) that sets the texture depth."""
        values = sorted({int(v) for lab in labels for v in np.unique(lab)} if label_values is None
                        else {int(v) for v in label_values})
        chans = [img if img.ndim == lab.ndim + 1 else img[None] for img, lab in zip(images, labels)]
        lut = np.full(max(max(values), max(int(lab.max()) for lab in labels)) + 1, -1, np.int64)
        lut[values] = np.arange(len(values))
        depth = texture_depth(fill_sigma)
        per_case = case_statistics([(np.asarray(img, np.float64), lut[np.asarray(lab, np.int64)])
                                    for img, lab in zip(chans, labels)], len(values), depth)
        nch = chans[0].shape[0]
        means = np.zeros((nch, len(values)))
        stds = np.zeros((nch, len(values)))
        for j, v in enumerate(values):
            for c in range(nch):
                x = np.concatenate([img[c][lab == v].ravel() for img, lab in zip(chans, labels)]).astype(np.float64)
                means[c, j], stds[c, j] = (float(x.mean()), float(x.std())) if x.size else (np.nan, np.nan)
        return cls(tuple(values), means, stds, per_case.means, per_case.texture, depth)


@dataclass(frozen=True)
class QcSettings:
    """Tolerances of :func:`check_label_agreement` (see the module docstring)."""

    mean_tolerance: float = 2.0
    range_margin: float = 0.5
    std_factor: float = 3.0
    abs_tolerance: float = 0.05
    contrast_fraction: float = 0.25
    contrast_agreement: float = 0.9
    contrast_confidence: float = 0.995
    min_edge_ratio: float = 2.0
    min_voxels: int = 20
    texture: bool = True
    min_texture_ratio: float = 0.15


@dataclass(frozen=True)
class QcResult:
    """passed: no check failed; reasons: one line per failure; label_means: the image's mean per
    label value (one per channel); edge_ratio: per channel, border / elsewhere mean gradient (None
    when the mask has no border between contrasting labels); texture_ratio: per channel, the smallest
    over labels of the image's texture / the training cases' smallest (None: not checked, or no label
    has an interior)."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    label_means: dict[int, list[float]] = field(default_factory=dict)
    edge_ratio: list[float | None] = field(default_factory=list)
    texture_ratio: list[float | None] = field(default_factory=list)


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


def _mean_bounds(reference: LabelIntensityStats, c: int, margin: float, s: QcSettings) -> tuple[np.ndarray, np.ndarray]:
    """Accepted (low, high) of each label's mean in channel ``c``: the pooled mean +- ``mean_tolerance``
    pooled standard deviations, widened to the training cases' range (per-case statistics) plus
    ``range_margin`` of that range."""
    ref_m, ref_s = reference.means[c], reference.stds[c]
    low, high = ref_m - s.mean_tolerance * ref_s - margin, ref_m + s.mean_tolerance * ref_s + margin
    if reference.case_means is None:
        return low, high
    cases = reference.case_means[:, c]
    known = np.isfinite(cases).any(axis=0)
    lo = np.where(known, np.nanmin(np.where(np.isfinite(cases), cases, np.inf), axis=0), np.nan)
    hi = np.where(known, np.nanmax(np.where(np.isfinite(cases), cases, -np.inf), axis=0), np.nan)
    widen = s.range_margin * (hi - lo) + margin
    return np.fmin(low, lo - widen), np.fmax(high, hi + widen)


def _sign_is_a_rule(d: np.ndarray, agree: int, s: QcSettings) -> bool:
    """Whether ``agree`` cases of the ``d.size`` training differences ``d`` make the sign a rule rather than
    chance: Laplace's rule of succession (``(agree + 1) / (cases + 2)`` at least ``contrast_agreement``:
    8 agreeing cases of 8, 18 of 19), or, for fewer cases, a difference that is large against its spread
    between cases (one-sided t test on ``d`` at ``contrast_confidence``)."""
    if (agree + 1) >= s.contrast_agreement * (d.size + 2) - 1e-9:
        return True
    if d.size < 2 or agree < d.size:
        return False
    sd = float(np.std(d, ddof=1))
    t = np.inf if sd == 0.0 else abs(float(np.mean(d))) / (sd / np.sqrt(d.size))
    return bool(t >= stats.t.ppf(s.contrast_confidence, d.size - 1))


def _contrasts(reference: LabelIntensityStats, c: int, margin: float,
               s: QcSettings) -> tuple[np.ndarray, np.ndarray]:
    """``(want, edges)``, each ``(L, L)``: ``want`` the sign and smallest size a difference ``mean[b] -
    mean[a]`` must have in channel ``c`` (+-size), 0 where no sign is a rule (see the module docstring,
    check 3); ``edges`` the pairs whose border the edge check (4) reads: those where ``contrast_agreement``
    of the training cases agree on a sign, rule or not (an edge is expected there either way)."""
    n = len(reference.labels)
    want = np.zeros((n, n))
    edges = np.zeros((n, n), bool)
    if reference.case_means is None:
        ref_m = reference.means[c]
        diff = ref_m[None, :] - ref_m[:, None]
        ok = np.isfinite(diff) & (np.abs(np.nan_to_num(diff)) > margin)
        want[ok] = s.contrast_fraction * diff[ok]
        return want, ok
    cases = reference.case_means[:, c]
    for a in range(n):
        for b in range(n):
            d = cases[:, b] - cases[:, a]
            d = d[np.isfinite(d)]
            if a == b or not d.size or float(np.median(np.abs(d))) <= margin:
                continue
            for sign in (1.0, -1.0):
                agree = d[sign * d > 0]
                if agree.size >= s.contrast_agreement * d.size:
                    edges[a, b] = True
                    if _sign_is_a_rule(d, agree.size, s):
                        want[a, b] = sign * s.contrast_fraction * float(np.abs(agree).min())
    return want, edges


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
    textures: list[float | None] = []
    check_texture = s.texture and reference.case_texture is not None
    image_texture = label_texture(img, index, len(reference.labels), reference.texture_depth) if check_texture else None
    for c in range(img.shape[0]):
        ref_m, ref_s = reference.means[c], reference.stds[c]
        known = ref_m[np.isfinite(ref_m)]
        margin = s.abs_tolerance * float(known.max() - known.min()) if known.size else 0.0
        low, high = _mean_bounds(reference, c, margin, s)
        chan = f" (channel {c})" if img.shape[0] > 1 else ""
        x = img[c]
        means = np.full(len(reference.labels), np.nan)
        for j in range(len(reference.labels)):
            if counts[j]:
                vals = x[index == j]
                means[j] = float(vals.mean())
                found[int(reference.labels[j])].append(round(means[j], 4))
                if j not in present or not np.isfinite(ref_m[j]):
                    continue
                name = f"label {reference.labels[j]}{chan}"
                # 1. per-label mean, 2. per-label spread
                if np.isfinite(low[j]) and not low[j] <= means[j] <= high[j]:
                    reasons.append(f"{name}: mean {means[j]:.4g}, training accepts {low[j]:.4g} .. {high[j]:.4g}")
                spread = float(vals.std())
                if spread > s.std_factor * ref_s[j] + margin:
                    reasons.append(f"{name}: spread {spread:.4g}, training {ref_s[j]:.3g}")
        # 3. contrast between touching labels where the training cases agree on its sign
        want, edges = _contrasts(reference, c, margin, s)
        band, pairs = _borders(index, edges)
        for a, b in sorted(pairs):
            if want[a, b] == 0 or a not in present or b not in present:
                continue
            got = means[b] - means[a]
            if np.sign(got) != np.sign(want[a, b]) or abs(got) < abs(want[a, b]):
                reasons.append(f"labels {reference.labels[a]}/{reference.labels[b]}{chan}: contrast {got:.4g}, "
                               f"training needs {'+' if want[a, b] > 0 else '-'}{abs(want[a, b]):.4g} or more")
        # 4. gradient magnitude concentrated at those borders
        if band.any() and (~band).any():
            grads = np.gradient(x) if x.ndim > 1 else [np.gradient(x)]
            mag = np.sqrt(sum(g * g for g in grads))
            inside, outside = float(mag[band].mean()), float(mag[~band].mean())
            ratio = inside / max(outside, 1e-12)
            ratios.append(round(ratio, 3))
            if ratio < s.min_edge_ratio:
                reasons.append(f"edges: gradient at label borders {ratio:.2f}x elsewhere, needs "
                               f">= {s.min_edge_ratio:g}x{chan}")
        else:
            ratios.append(None)
        # 5. texture inside each label against the training cases' own
        worst: float | None = None
        if image_texture is not None and reference.case_texture is not None:
            floor = np.nanmin(np.where(np.isfinite(reference.case_texture[:, c]), reference.case_texture[:, c],
                                       np.inf), axis=0)
            for j in range(len(reference.labels)):
                got_t = image_texture[c, j]
                if not np.isfinite(got_t) or not np.isfinite(floor[j]) or floor[j] <= 0:
                    continue
                worst = got_t / floor[j] if worst is None else min(worst, got_t / floor[j])
                if got_t < s.min_texture_ratio * floor[j]:
                    reasons.append(f"label {reference.labels[j]}{chan}: texture {got_t:.4g} (Laplacian std inside "
                                   f"the label), training cases {floor[j]:.4g} or more: untextured")
        textures.append(None if worst is None else round(worst, 3))
    return QcResult(not reasons, reasons, found, ratios, textures)
