"""Distribution metrics for an unpaired real set against a synthetic set, with no downloaded weights.

- :func:`radiomic_features` / :func:`compare_radiomics`: a radiomic feature vector per image computed
  with scikit-image (first-order statistics and GLCM texture, per label region or over the
  foreground), z-normalised with the *reference* set's mean and standard deviation, then compared
  with a Frechet distance (:func:`frechet_distance`) and an RBF-kernel MMD (:func:`mmd`). These are
  scikit-image features: the numbers are not comparable with published values of the Frechet
  Radiomic Distance, which uses pyradiomics.
- :func:`fid`: a Frechet distance over the features of a network built in code (a named architecture
  of :mod:`medsynth.evaluation.fid_networks`, or a module the caller builds) with weights from a
  *local* state dict (safetensors, or ``.pt`` read as tensors only). Off unless called; nothing downloads.
  Small sets are said to be small: with fewer than 2 x F images per set for F features the sample
  covariances are rank-deficient and the distance mostly measures estimation noise, so the result
  carries a warning, a bootstrap interval of each distance, the distance two sets of one
  distribution give at these sizes and permutation p-values (:func:`bootstrap_distances`).
- :func:`diversity`: mean pairwise MS-SSIM inside the synthetic set (lower = more diverse): the
  variety of the masks (deformed, edited) and of the images together. :func:`seed_diversity`
  separates the model's own variety: images of the *same* mask for several seeds;
  :func:`grouped_diversity` compares only images within groups (e.g. made from one source case).
- :func:`memorisation`: for each synthetic image, the highest SSIM to any training image, and to its
  own source image warped by the same deformation (:func:`warped_sources`, from the provenance
  records of ``medsynth augment``), flagged at or above a threshold (default 0.95): a warped copy of
  a real image is flagged although it resembles no real image as it is.

Images are numpy arrays, ``(H, W)`` or ``(D, H, W)``, in their intensity units; label maps have the
same shape with non-negative integers. Conventions and the exact feature list: ``docs/evaluation.md``.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsynth.errors import DataError
from medsynth.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FIRST_ORDER_FEATURES",
    "TEXTURE_FEATURES",
    "BootstrapDistances",
    "DiversityResult",
    "FeatureSet",
    "MemorisationCase",
    "MemorisationResult",
    "RadiomicComparison",
    "SeedDiversityResult",
    "bootstrap_distances",
    "compare_radiomics",
    "diversity",
    "fid",
    "frechet_distance",
    "grouped_diversity",
    "median_bandwidth",
    "memorisation",
    "mmd",
    "pairwise_ssim",
    "radiomic_features",
    "seed_diversity",
    "small_sample_warning",
    "warped_sources",
    "zscore",
]

#: fewer images per set than this many times the number of features: the distances are unreliable
SAMPLES_PER_FEATURE = 2

FIRST_ORDER_FEATURES = ("mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "entropy", "energy")
TEXTURE_FEATURES = ("contrast", "homogeneity", "energy", "correlation", "dissimilarity")
GLCM_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)
GLCM_DISTANCE = 1


# ------------------------------------------------------------------------------------ features


@dataclass
class FeatureSet:
    """Radiomic features of a set of images.

    values: ``(n_images, n_features)`` float64, raw (not normalised).
    names: one per feature, ``"<region>_<feature>"`` (region ``fg`` or ``label<k>``; texture
    features prefixed ``glcm_``).
    regions: the label values used, or None for the foreground.
    intensity_range: ``(low, high)`` used for the histogram and the GLCM quantisation.
    """

    values: np.ndarray
    names: list[str]
    regions: list[int] | None
    intensity_range: tuple[float, float]
    levels: int


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise DataError(f"{what}: expected a 2D or 3D image, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{what}: dtype {arr.dtype} is not real-valued")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what}: contains NaN or Inf")
    return arr


def _foreground(image: np.ndarray) -> np.ndarray:
    from skimage.filters import threshold_otsu

    if image.max() == image.min():
        return np.ones(image.shape, dtype=bool)
    return image > threshold_otsu(image)


def _quantise(values: np.ndarray, low: float, high: float, levels: int) -> np.ndarray:
    """Intensities -> bins 0..levels-1 over ``[low, high]`` (values outside are clipped)."""
    scaled = (values - low) / (high - low) * levels
    return np.clip(np.floor(scaled), 0, levels - 1).astype(np.int64)


def _first_order(v: np.ndarray, low: float, high: float, levels: int) -> list[float]:
    mean = float(v.mean())
    std = float(v.std())
    if std > 0:
        z = (v - mean) / std
        skew = float(np.mean(z**3))
        kurt = float(np.mean(z**4) - 3.0)
    else:
        skew = kurt = 0.0
    p10, p50, p90 = (float(p) for p in np.percentile(v, (10, 50, 90)))
    counts = np.bincount(_quantise(v, low, high, levels), minlength=levels).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log2(p)).sum())
    energy = float(np.mean(v * v))
    return [mean, std, skew, kurt, p10, p50, p90, entropy, energy]


def _slices_25d(region: np.ndarray, per_plane: int) -> list[tuple[int, int]]:
    """(axis, index) of the 2.5D slices through a 3D region: ``per_plane`` evenly spaced within its
    bounding box on each of the three axes (the middle one when 1), each moved to the nearest slice
    that holds region voxels."""
    out: list[tuple[int, int]] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(region.any(axis=other))
        if present.size == 0:
            continue
        lo, hi = int(present[0]), int(present[-1])
        for i in range(per_plane):
            target = lo + (hi - lo) * (i + 1) / (per_plane + 1)
            idx = int(present[np.argmin(np.abs(present - target))])
            if (axis, idx) not in out:
                out.append((axis, idx))
    return out


def _texture(
    image: np.ndarray, region: np.ndarray, low: float, high: float, levels: int, per_plane: int
) -> list[float]:
    from skimage.feature import graycomatrix, graycoprops

    q = np.where(region, _quantise(image, low, high, levels) + 1, 0).astype(np.uint8)
    if q.ndim == 2:
        planes = [q]
    else:
        planes = [np.take(q, idx, axis=axis) for axis, idx in _slices_25d(region, per_plane)]
    glcm = np.zeros((levels + 1, levels + 1, 1, len(GLCM_ANGLES)), dtype=np.float64)
    for plane in planes:
        glcm += graycomatrix(plane, [GLCM_DISTANCE], list(GLCM_ANGLES), levels=levels + 1, symmetric=True)
    glcm = glcm[1:, 1:]  # drop pairs that touch voxels outside the region
    counts = glcm.sum(axis=(0, 1))[0]  # per angle
    used = counts > 0
    if not used.any():
        return [math.nan] * len(TEXTURE_FEATURES)
    glcm = glcm[..., used]
    return [float(graycoprops(glcm, prop)[0].mean()) for prop in TEXTURE_FEATURES]


def _names(regions: list[int] | None) -> list[str]:
    tags = ["fg"] if regions is None else [f"label{r}" for r in regions]
    return [
        name
        for tag in tags
        for name in [f"{tag}_{f}" for f in FIRST_ORDER_FEATURES] + [f"{tag}_glcm_{f}" for f in TEXTURE_FEATURES]
    ]


def radiomic_features(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    *,
    regions: Sequence[int] | None = None,
    intensity_range: tuple[float, float],
    levels: int = 32,
    slices_per_plane: int = 1,
    ids: Sequence[str] | None = None,
) -> FeatureSet:
    """One radiomic feature vector per image (scikit-image only).

    images: 2D ``(H, W)`` or 3D ``(D, H, W)`` arrays in intensity units.
    labels: label maps of the same shapes, required when ``regions`` is given.
    regions: label values to describe (14 features each); None: the foreground (voxels above the
        image's Otsu threshold).
    intensity_range: ``(low, high)`` for the entropy histogram and the GLCM quantisation into
        ``levels`` bins (use the reference set's range for every set that is compared).
    slices_per_plane: 3D texture is 2.5D: this many slices per orthogonal plane through each region.

    Per region: first-order ``mean, std, skewness, kurtosis`` (excess), ``p10, p50, p90``,
    ``entropy`` (bits, ``levels``-bin histogram), ``energy`` (mean of squared intensities), over all
    the region's voxels; GLCM ``contrast, homogeneity, energy, correlation, dissimilarity`` (distance
    1, symmetric, averaged over the angles 0, 45, 90, 135 degrees) with co-occurrences counted only
    between two region voxels and summed over the 2.5D slices. A region absent from an image is an error.
    """
    low, high = (float(v) for v in intensity_range)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise DataError(f"intensity_range must be two finite numbers low < high, got {intensity_range!r}")
    if not 2 <= int(levels) <= 255:
        raise DataError(f"levels must be in 2..255, got {levels!r}")
    if int(slices_per_plane) < 1:
        raise DataError(f"slices_per_plane must be >= 1, got {slices_per_plane!r}")
    if regions is not None and labels is None:
        raise DataError("regions need label maps: pass labels=")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{len(images)} images but {len(labels)} label maps")
    region_list = None if regions is None else [int(r) for r in regions]
    if region_list is not None and not region_list:
        raise DataError("regions is empty; pass None to use the foreground")
    rows = []
    for i, image in enumerate(images):
        name = ids[i] if ids is not None else f"image {i}"
        arr = _check_image(image, name)
        if region_list is None:
            masks = [_foreground(arr)]
        else:
            lab = np.asarray(labels[i])  # type: ignore[index]
            if lab.shape != arr.shape:
                raise DataError(f"{name}: label shape {lab.shape} differs from image shape {arr.shape}")
            masks = [lab == r for r in region_list]
        row: list[float] = []
        for r, mask in zip([str(v) for v in region_list] if region_list is not None else ["fg"], masks):
            if not mask.any():
                raise DataError(f"{name}: region {r} has no voxels")
            row += _first_order(arr[mask], low, high, int(levels))
            row += _texture(arr, mask, low, high, int(levels), int(slices_per_plane))
        rows.append(row)
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    return FeatureSet(values, _names(region_list), region_list, (low, high), int(levels))


def zscore(reference: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-normalise feature matrices ``(n, F)`` with the reference's per-feature mean and std.

    A feature that is constant over the reference (its std at most 1e-9 of its largest magnitude:
    round-off) is only centred (its std is taken as 1). NaN entries (a GLCM with no co-occurrences)
    are set to the reference mean (z = 0). Returns ``[reference_z, *others_z]``.
    """
    ref = np.asarray(reference, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN feature: handled below
        mean = np.nanmean(ref, axis=0)
        std = np.nanstd(ref, axis=0)
        scale = np.nanmax(np.abs(ref), axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    varies = np.isfinite(std) & (std > 0) & ~(std <= 1e-9 * np.where(np.isfinite(scale), scale, 0.0))
    std = np.where(varies, std, 1.0)
    out = []
    for m in (ref, *others):
        z = (np.asarray(m, dtype=np.float64) - mean) / std
        out.append(np.where(np.isfinite(z), z, 0.0))
    return out


# ------------------------------------------------------------------------------------ distances


def _check_sets(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise DataError(f"{what}: expected two (n, F) feature matrices with the same F, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise DataError(f"{what}: needs at least 2 samples in each set (got {len(a)} and {len(b)})")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise DataError(f"{what}: features contain NaN or Inf")
    return a, b


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(n, F)`` and ``(m, F)``.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with sample covariances. When the
    product is singular (fewer samples than features), ``1e-6 I`` is added to both covariances
    (as pytorch-fid does); an imaginary part from round-off is dropped. Never negative.
    """
    from scipy import linalg

    a, b = _check_sets(a, b, "frechet_distance")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False))
    s2 = np.atleast_2d(np.cov(b, rowvar=False))
    # scipy prints "Failed to find a square root." on stdout for a singular product (handled below): keep
    # stdout for the caller's own output (`evaluate --json`)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(a: np.ndarray, b: np.ndarray) -> float:
    """The median heuristic: the median Euclidean distance between distinct samples of the pooled set."""
    pooled = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    d = np.sqrt(_sq_dists(pooled, pooled))
    iu = np.triu_indices(len(pooled), k=1)
    positive = d[iu][d[iu] > 0]
    return float(np.median(positive)) if positive.size else 1.0


def mmd(a: np.ndarray, b: np.ndarray, *, bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared MMD with the RBF kernel ``exp(-|u-v|^2 / (2 sigma^2))``.

    a: ``(n, F)``, b: ``(m, F)``; bandwidth sigma (None: :func:`median_bandwidth` of the pooled
    samples). Diagonal terms are left out of the within-set sums, so the value is ~0 (and may be
    slightly negative) for two samples of one distribution.
    """
    a, b = _check_sets(a, b, "mmd")
    sigma = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not (math.isfinite(sigma) and sigma > 0):
        raise DataError(f"mmd bandwidth must be > 0, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * sigma * sigma)
    kaa = np.exp(-gamma * _sq_dists(a, a))
    kbb = np.exp(-gamma * _sq_dists(b, b))
    kab = np.exp(-gamma * _sq_dists(a, b))
    n, m = len(a), len(b)
    term_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    term_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(term_a + term_b - 2.0 * kab.mean())


@dataclass
class RadiomicComparison:
    """Reference set vs candidate set in z-normalised radiomic feature space.

    frechet_ci, mmd2_ci, frechet_null, frechet_p, mmd2_p: see :class:`BootstrapDistances` (None
    without bootstrap): the spread over resampled cases, the distance two sets of one distribution
    give at these sizes, and permutation p-values; warning: why the distances are unreliable (too
    few images for the number of features), else None.
    """

    frechet_distance: float
    mmd2: float  # unbiased MMD^2, RBF kernel
    bandwidth: float  # the RBF sigma (median heuristic)
    n_reference: int
    n_candidate: int
    n_features: int
    regions: list[int] | None
    intensity_range: tuple[float, float]
    levels: int
    feature_names: list[str] = field(repr=False)
    reference_z: np.ndarray = field(repr=False)
    candidate_z: np.ndarray = field(repr=False)
    frechet_ci: tuple[float, float] | None = None
    mmd2_ci: tuple[float, float] | None = None
    frechet_null: float | None = None
    frechet_p: float | None = None
    mmd2_p: float | None = None
    bootstrap: int = 0
    confidence: float = 0.95
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("reference_z", "candidate_z"):
            d.pop(key)
        d["intensity_range"] = list(self.intensity_range)
        for key in ("frechet_ci", "mmd2_ci"):
            d[key] = None if d[key] is None else list(d[key])
        d["features"] = "scikit-image first-order + GLCM (not comparable with published FRD values)"
        return d


def small_sample_warning(n_reference: int, n_candidate: int, n_features: int) -> str | None:
    """Why distances over ``n_features`` features are unreliable for sets of these sizes (fewer than
    :data:`SAMPLES_PER_FEATURE` x features images in a set), or None."""
    need = SAMPLES_PER_FEATURE * n_features
    if min(n_reference, n_candidate) >= need:
        return None
    return (f"{n_reference} reference and {n_candidate} candidate images for {n_features} features: fewer than "
            f"{SAMPLES_PER_FEATURE} x {n_features} = {need} images per set, so the covariances are rank-deficient and "
            "the Frechet distance (and MMD) mostly measure sampling noise; read them with their bootstrap interval, "
            "the distance two sets of one distribution give at these sizes and the permutation p-value, or use more "
            "cases or fewer features (regions)")


@dataclass
class BootstrapDistances:
    """How much the Frechet distance and MMD^2 of two feature sets can be trusted at their sizes.

    frechet_ci, mmd2_ci: percentile intervals (``confidence``) over resamplings of the rows of both
    sets with replacement (the spread that comes from which cases happened to be drawn);
    frechet_null: the median Frechet distance over random splits of the pooled rows into sets of the
    two sizes, i.e. what two sets of *one* distribution give at these sizes (sampling noise alone);
    frechet_p, mmd2_p: permutation p-values, the share of those splits at least as far apart as the
    real sets (``(1 + count) / (1 + rounds)``): large means the sets cannot be told apart."""

    frechet_ci: tuple[float, float]
    mmd2_ci: tuple[float, float]
    frechet_null: float
    frechet_p: float
    mmd2_p: float
    rounds: int
    confidence: float


def bootstrap_distances(
    reference: np.ndarray, candidate: np.ndarray, *, rounds: int = 200, confidence: float = 0.95, seed: int = 0,
    normalise: bool = True, progress: bool = False,
) -> BootstrapDistances:
    """Intervals, the noise level and permutation p-values of :func:`frechet_distance` and :func:`mmd`
    (see :class:`BootstrapDistances`) for raw features ``reference`` ``(n, F)`` and ``candidate`` ``(m, F)``.

    Each distance is computed as :func:`compare_radiomics` does: both sets z-normalised with the
    reference part (``normalise``; :func:`zscore`), MMD with the median-heuristic bandwidth. Every
    resampling and every random split is normalised with its own reference part, so the observed
    split is one draw among the others when the sets come from one distribution (an exact
    permutation test). rounds: resamplings, and as many random splits, drawn from
    ``numpy.random.default_rng(seed)``. progress: a bar over the rounds on stderr
    (:func:`medsynth.progress.progress_bar`)."""
    a, b = _check_sets(reference, candidate, "bootstrap_distances")
    if int(rounds) < 1:
        raise DataError(f"bootstrap rounds must be >= 1, got {rounds!r}")
    if not 0 < float(confidence) < 1:
        raise DataError(f"confidence must be in (0, 1), got {confidence!r}")

    def distances(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        if normalise:
            x, y = zscore(x, y)
        return frechet_distance(x, y), mmd(x, y)

    rng = np.random.default_rng(seed)
    n, m = len(a), len(b)
    pooled = np.concatenate([a, b])
    observed_fd, observed_mmd = distances(a, b)
    fd, md, null_fd, null_mmd = [], [], [], []
    with progress_bar("bootstrap distances", int(rounds), enabled=progress, transient=True) as bar:
        for _ in range(int(rounds)):
            # 1. resample each set (the interval)
            f, d = distances(a[rng.integers(n, size=n)], b[rng.integers(m, size=m)])
            fd.append(f)
            md.append(d)
            # 2. split the pooled rows at random (the null: one distribution, these sizes)
            order = rng.permutation(n + m)
            f, d = distances(pooled[order[:n]], pooled[order[n:]])
            null_fd.append(f)
            null_mmd.append(d)
            bar.advance()
    tail = (1.0 - float(confidence)) / 2.0 * 100.0
    f_lo, f_hi = (float(v) for v in np.percentile(fd, (tail, 100.0 - tail)))
    m_lo, m_hi = (float(v) for v in np.percentile(md, (tail, 100.0 - tail)))
    p_fd = (1 + sum(v >= observed_fd for v in null_fd)) / (1 + int(rounds))
    p_mmd = (1 + sum(v >= observed_mmd for v in null_mmd)) / (1 + int(rounds))
    return BootstrapDistances((f_lo, f_hi), (m_lo, m_hi), float(np.median(null_fd)), float(p_fd), float(p_mmd),
                              int(rounds), float(confidence))


def compare_radiomics(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    reference_labels: Sequence[np.ndarray] | None = None,
    candidate_labels: Sequence[np.ndarray] | None = None,
    *,
    regions: Sequence[int] | None = None,
    intensity_range: tuple[float, float] | None = None,
    levels: int = 32,
    slices_per_plane: int = 1,
    reference_ids: Sequence[str] | None = None,
    candidate_ids: Sequence[str] | None = None,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> RadiomicComparison:
    """Radiomic features of both sets, z-normalised with the reference, then Frechet distance and MMD.

    intensity_range: default the reference set's ``(min, max)``. regions: default, when both sets
    have label maps, the non-zero label values present in every label map of both sets (else the
    foreground). See :func:`radiomic_features` for the features.
    bootstrap: resamplings (and random splits) of the cases for the intervals, the noise level and the
    p-values (0: none; :func:`bootstrap_distances`); confidence: the interval's coverage; seed: of ``numpy.random.default_rng``;
    progress: a bar over the bootstrap rounds on stderr. The result's ``warning`` says when the sets
    are too small for the number of features
    (:func:`small_sample_warning`).
    """
    if int(bootstrap) < 0:
        raise DataError(f"bootstrap must be >= 0, got {bootstrap!r}")
    if not 0 < float(confidence) < 1:
        raise DataError(f"confidence must be in (0, 1), got {confidence!r}")
    if len(reference) < 2 or len(candidate) < 2:
        raise DataError(f"compare_radiomics needs at least 2 images per set (got {len(reference)} and {len(candidate)})")
    if intensity_range is None:
        intensity_range = (
            float(min(np.min(r) for r in reference)),
            float(max(np.max(r) for r in reference)),
        )
        if intensity_range[1] <= intensity_range[0]:
            raise DataError("the reference images are all one constant value; pass intensity_range")
    if regions is None and reference_labels is not None and candidate_labels is not None:
        regions = common_regions([*reference_labels, *candidate_labels]) or None
    use_labels = regions is not None
    ref = radiomic_features(reference, reference_labels if use_labels else None, ids=reference_ids, regions=regions,
                            intensity_range=intensity_range, levels=levels, slices_per_plane=slices_per_plane)
    cand = radiomic_features(candidate, candidate_labels if use_labels else None, ids=candidate_ids, regions=regions,
                             intensity_range=intensity_range, levels=levels, slices_per_plane=slices_per_plane)
    ref_z, cand_z = zscore(ref.values, cand.values)
    bandwidth = median_bandwidth(ref_z, cand_z)
    boot = None if not bootstrap else bootstrap_distances(ref.values, cand.values, rounds=int(bootstrap),
                                                          confidence=confidence, seed=seed, progress=progress)
    return RadiomicComparison(
        frechet_ci=None if boot is None else boot.frechet_ci,
        mmd2_ci=None if boot is None else boot.mmd2_ci,
        frechet_null=None if boot is None else boot.frechet_null,
        frechet_p=None if boot is None else boot.frechet_p,
        mmd2_p=None if boot is None else boot.mmd2_p,
        bootstrap=int(bootstrap),
        confidence=float(confidence),
        warning=small_sample_warning(len(reference), len(candidate), ref.values.shape[1]),
        frechet_distance=frechet_distance(ref_z, cand_z),
        mmd2=mmd(ref_z, cand_z, bandwidth=bandwidth),
        bandwidth=bandwidth,
        n_reference=len(reference),
        n_candidate=len(candidate),
        n_features=ref.values.shape[1],
        regions=ref.regions,
        intensity_range=ref.intensity_range,
        levels=ref.levels,
        feature_names=ref.names,
        reference_z=ref_z,
        candidate_z=cand_z,
    )


def common_regions(labels: Sequence[np.ndarray]) -> list[int]:
    """The non-zero label values present in every one of the label maps (sorted)."""
    common: set[int] | None = None
    for lab in labels:
        present = {int(v) for v in np.unique(np.asarray(lab))} - {0}
        common = present if common is None else common & present
    return sorted(common or [])


# ------------------------------------------------------------------------------------ FID


def fid(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    feature_weights: str | Path,
    network: str | None = None,
    model: torch.nn.Module | None = None,
    device: str = "cpu",
) -> float:
    """Frechet distance over the features of a network whose weights come from a local file (off by default).

    feature_weights: a state dict: ``.safetensors``, or ``.pt``/``.pth`` read with
        ``torch.load(weights_only=True)``; any other file (a ``torch.export`` program, TorchScript, a
        pickle) is refused unread, since it can carry code.
    network: the architecture (:data:`medsynth.evaluation.fid_networks.FID_NETWORKS`, e.g.
        ``"medicalnet_resnet10"``), built in code for the images' dimensionality; None: the name the
        safetensors file's metadata gives (key ``medsynth.fid_network``).
    model: instead of a named architecture, the ``torch.nn.Module`` the state dict is for.
    Each image is fed alone as a float32 ``(1, 1, *spatial)`` tensor in its own units (scale it first
    if the network expects otherwise); the output is flattened, after a global average over any
    spatial axes, into one feature vector. medsynth never downloads weights.
    """
    import torch

    from medsynth.evaluation.fid_networks import (
        check_weights_file,
        load_fid_network,
        load_weights_into,
        read_state_dict,
    )

    path = Path(feature_weights).expanduser()
    if model is not None and network is not None:
        raise DataError("fid: pass either network= (a named architecture) or model= (your own module), not both")
    if model is None:
        dims = _check_image(reference[0], "reference image 0").ndim if len(reference) else 3
        net = load_fid_network(path, network, dims)
    else:
        net = load_weights_into(model, read_state_dict(check_weights_file(path)), path)
    net = net.to(device).eval()

    def features(images: Sequence[np.ndarray], what: str) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for i, image in enumerate(images):
                arr = _check_image(image, f"{what} image {i}")
                t = torch.from_numpy(arr.astype(np.float32))[None, None].to(device)
                try:
                    out = net(t)
                except RuntimeError as exc:  # e.g. a 2D image for a 3D network
                    raise DataError(f"{what} image {i} of shape {arr.shape}: the FID network of {path} cannot "
                                    f"take it ({exc})") from None
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.ndim > 2:
                    out = out.flatten(2).mean(-1)
                rows.append(out.reshape(-1).double().cpu().numpy())
        return np.stack(rows)

    return frechet_distance(features(reference, "reference"), features(candidate, "candidate"))


# ------------------------------------------------------------------------------------ SSIM sets


def _check_set(images: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    return [_check_image(im, f"{what} image {i}") for i, im in enumerate(images)]


def pairwise_ssim(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], *, data_range: float
) -> np.ndarray:
    """SSIM of every image of ``a`` with every image of ``b``: ``(len(a), len(b))`` float64.

    Equal to :func:`medsynth.evaluation.metrics.ssim` for each pair, but each image's local mean and
    second moment are filtered once, so a pair costs one filtered map instead of five.
    Pairs whose shapes differ are NaN.
    """
    import torch

    from medsynth.evaluation import metrics as M

    if not (isinstance(data_range, (int, float)) and math.isfinite(data_range) and data_range > 0):
        raise DataError(f"data_range must be a finite number > 0, got {data_range!r}")
    a = _check_set(a, "first set")
    b = _check_set(b, "second set")
    for i, im in enumerate([*a, *b]):
        if min(im.shape) < M.WINDOW_SIZE:
            raise DataError(f"image {i} of shape {im.shape} is smaller than the 11-voxel SSIM window")

    def stats(im: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        t = torch.from_numpy(im.astype(np.float64))
        mean = float(t.mean())
        tc = (t - mean).to(torch.float32)[None, None]
        both = torch.cat([tc, tc * tc], dim=1)
        f = M._filter_valid(both, im.ndim)
        return tc, f, mean

    sa = [stats(im) for im in a]
    sb = [stats(im) for im in b]
    c1 = (M.K1 * data_range) ** 2
    c2 = (M.K2 * data_range) ** 2
    out = np.full((len(a), len(b)), np.nan)
    for i, (xa, fa, ma) in enumerate(sa):
        ux, uxx = fa[0, 0], fa[0, 1]
        vx = uxx - ux * ux
        mux = ux + ma
        for j, (xb, fb, mb) in enumerate(sb):
            if xa.shape != xb.shape:
                continue
            uy, uyy = fb[0, 0], fb[0, 1]
            uxy = M._filter_valid(xa * xb, xa.ndim - 2)[0, 0]
            vy = uyy - uy * uy
            vxy = uxy - ux * uy
            muy = uy + mb
            s = (2 * mux * muy + c1) * (2 * vxy + c2) / ((mux * mux + muy * muy + c1) * (vx + vy + c2))
            out[i, j] = float(s.mean(dtype=torch.float64))
    return out


@dataclass
class DiversityResult:
    """Mean pairwise similarity inside a set (lower = more diverse)."""

    mean: float
    std: float
    pairs: int
    metric: str  # "ms_ssim" or "ssim"
    scales: int  # MS-SSIM scales used (1 for SSIM)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diversity(
    images: Sequence[np.ndarray], *, data_range: float, max_pairs: int = 200, seed: int = 0
) -> DiversityResult:
    """Mean pairwise MS-SSIM inside one (synthetic) set.

    images: same-shape 2D/3D arrays (pairs of different shapes are skipped).
    MS-SSIM uses as many of Wang's scales as the image size allows (``side // 2**(M-1) >= 11``), with
    the first M weights renormalised to sum to 1; when only one scale fits it is plain SSIM.
    At most ``max_pairs`` pairs, drawn without replacement with ``numpy.random.default_rng(seed)``.
    """
    ims = _check_set(images, "diversity")
    pairs = [(i, j) for i in range(len(ims)) for j in range(i + 1, len(ims)) if ims[i].shape == ims[j].shape]
    if not pairs:
        raise DataError("diversity needs at least two images of the same shape")
    return _pairs_similarity(ims, pairs, data_range, max_pairs, seed)


def _similarity(a: np.ndarray, b: np.ndarray, data_range: float) -> tuple[float, int]:
    """(MS-SSIM with as many scales as fit, or SSIM when one fits; the scales used) of two images."""
    from medsynth.evaluation.metrics import MS_SSIM_WEIGHTS, max_scales, ms_ssim, ssim

    m = min(max_scales(a.shape), len(MS_SSIM_WEIGHTS))
    if m >= 2:
        w = np.asarray(MS_SSIM_WEIGHTS[:m])
        return float(ms_ssim(a, b, data_range=data_range, weights=tuple(w / w.sum()))), m
    return float(ssim(a, b, data_range=data_range)), 1


def _pairs_similarity(ims: list[np.ndarray], pairs: list[tuple[int, int]], data_range: float, max_pairs: int,
                      seed: int) -> DiversityResult:
    """Mean similarity over ``pairs`` of ``ims`` (at most ``max_pairs``, drawn with ``seed``)."""
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))
        pairs = [pairs[k] for k in pick]
    values = []
    scales_used = 1
    for i, j in pairs:
        value, scales_used = _similarity(ims[i], ims[j], data_range)
        values.append(value)
    arr = np.asarray(values)
    return DiversityResult(
        mean=float(arr.mean()),
        std=float(arr.std()),
        pairs=len(values),
        metric="ms_ssim" if scales_used >= 2 else "ssim",
        scales=scales_used,
    )


def grouped_diversity(
    images: Sequence[np.ndarray], groups: Sequence[str], *, data_range: float, max_pairs: int = 200, seed: int = 0
) -> DiversityResult:
    """Mean pairwise similarity of images *within* each group only (lower = more diverse).

    groups: one name per image, e.g. the source case each synthetic case was made from (its
    ``provenance.jsonl`` record's ``"source"``): the variety of one source's deformations and images.
    Metric and pair sampling as :func:`diversity`."""
    ims = _check_set(images, "grouped diversity")
    if len(groups) != len(ims):
        raise DataError(f"{len(ims)} images but {len(groups)} group names")
    pairs = [(i, j) for i in range(len(ims)) for j in range(i + 1, len(ims))
             if groups[i] == groups[j] and ims[i].shape == ims[j].shape]
    if not pairs:
        raise DataError("grouped diversity needs a group with at least two images of the same shape")
    return _pairs_similarity(ims, pairs, data_range, max_pairs, seed)


@dataclass
class SeedDiversityResult:
    """The model's own variety: similarity of images of the same mask made with different seeds.

    mean, std: over the masks, of each mask's mean pairwise similarity across the seeds (lower = the
    model varies its images more); per_mask: mask id -> that mean; seeds: the seeds used."""

    mean: float
    std: float
    pairs: int
    metric: str
    scales: int
    seeds: list[int]
    per_mask: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_diversity(
    generate: Callable[[np.ndarray, int], np.ndarray],
    masks: Sequence[np.ndarray],
    seeds: Sequence[int],
    *,
    data_range: float,
    mask_ids: Sequence[str] | None = None,
) -> SeedDiversityResult:
    """Mean pairwise similarity of images generated for the *same* mask with different seeds.

    generate: ``(mask, seed) -> image`` with the mask's shape (e.g. ``Synthesizer.generate``, channel 0
    of a multi-channel run is used); masks: label maps ``(H, W)`` or ``(D, H, W)``; seeds: at least two.
    Unlike :func:`diversity` over a synthetic set, whose masks were deformed, this is the variety
    the model adds to one mask. Metric as :func:`diversity`.
    """
    seed_list = [int(s) for s in seeds]
    if len(set(seed_list)) < 2:
        raise DataError(f"seed diversity needs at least two different seeds, got {seed_list}")
    if not masks:
        raise DataError("seed diversity needs at least one mask")
    ids = list(mask_ids) if mask_ids is not None else [f"mask_{i}" for i in range(len(masks))]
    per_mask: dict[str, float] = {}
    pairs = 0
    scales = 1
    for mid, mask in zip(ids, masks):
        ims = []
        for s in seed_list:
            out = np.asarray(generate(np.asarray(mask), s))
            ims.append(_check_image(out[0] if out.ndim == np.asarray(mask).ndim + 1 else out, f"mask {mid} seed {s}"))
        values = []
        for i in range(len(ims)):
            for j in range(i + 1, len(ims)):
                value, scales = _similarity(ims[i], ims[j], data_range)
                values.append(value)
        per_mask[mid] = float(np.mean(values))
        pairs += len(values)
    arr = np.asarray(list(per_mask.values()))
    return SeedDiversityResult(mean=float(arr.mean()), std=float(arr.std()), pairs=pairs,
                               metric="ms_ssim" if scales >= 2 else "ssim", scales=scales, seeds=seed_list,
                               per_mask=per_mask)


@dataclass
class MemorisationCase:
    """One synthetic image: its most similar training image (None: none of its shape) and that SSIM;
    warped_source_ssim: its SSIM to its own source image warped by its own deformation (None: not
    known); flagged: either reaches the threshold."""

    case_id: str
    nearest_id: str | None
    max_ssim: float | None
    flagged: bool
    warped_source_ssim: float | None = None


@dataclass
class MemorisationResult:
    """For each synthetic image, its highest SSIM to any training image."""

    threshold: float
    cases: list[MemorisationCase]

    @property
    def flagged(self) -> list[str]:
        return [c.case_id for c in self.cases if c.flagged]

    def to_dict(self) -> dict[str, Any]:
        values = [c.max_ssim for c in self.cases if c.max_ssim is not None]
        warped = [c.warped_source_ssim for c in self.cases if c.warped_source_ssim is not None]
        return {
            "threshold": self.threshold,
            "flagged": len(self.flagged),
            "flagged_cases": self.flagged,
            "max_ssim_mean": float(np.mean(values)) if values else None,
            "max_ssim_max": float(np.max(values)) if values else None,
            "warped_source_checked": len(warped),
            "warped_source_ssim_max": float(np.max(warped)) if warped else None,
            "cases": [asdict(c) for c in self.cases],
        }


def memorisation(
    synthetic: Sequence[np.ndarray],
    training: Sequence[np.ndarray],
    *,
    data_range: float,
    threshold: float = 0.95,
    synthetic_ids: Sequence[str] | None = None,
    training_ids: Sequence[str] | None = None,
    warped: Sequence[np.ndarray | None] | None = None,
) -> MemorisationResult:
    """Flag synthetic images that nearly copy a training image: max SSIM >= ``threshold``.

    Only same-shape pairs are compared (a synthetic image with no same-shape training image gets
    ``max_ssim=None`` and is not flagged). SSIM as :func:`medsynth.ssim` with ``data_range``.
    warped: per synthetic image, its source image warped by the same deformation
    (:func:`warped_sources`; None where unknown); an image whose SSIM to it reaches ``threshold``
    is flagged too (a warped copy resembles no training image as it is).
    """
    if warped is not None and len(warped) != len(synthetic):
        raise DataError(f"{len(synthetic)} synthetic images but {len(warped)} warped source images")
    if not 0 < float(threshold) <= 1:
        raise DataError(f"threshold must be in (0, 1], got {threshold!r}")
    if not training:
        raise DataError("memorisation needs at least one training image")
    sids = list(synthetic_ids) if synthetic_ids is not None else [f"synthetic_{i}" for i in range(len(synthetic))]
    tids = list(training_ids) if training_ids is not None else [f"training_{j}" for j in range(len(training))]
    table = pairwise_ssim(synthetic, training, data_range=data_range)
    cases = []
    for i, row in enumerate(table):
        own = _warped_ssim(synthetic[i], None if warped is None else warped[i], data_range, sids[i])
        copy = own is not None and own >= threshold
        if np.all(np.isnan(row)):
            cases.append(MemorisationCase(sids[i], None, None, copy, own))
            continue
        j = int(np.nanargmax(row))
        cases.append(MemorisationCase(sids[i], tids[j], float(row[j]), bool(row[j] >= threshold) or copy, own))
    return MemorisationResult(float(threshold), cases)


def _warped_ssim(image: np.ndarray, warped: np.ndarray | None, data_range: float, what: str) -> float | None:
    """SSIM of a synthetic image and its warped source (None when there is none or the shapes differ)."""
    if warped is None or np.shape(warped) != np.shape(image):
        return None
    return float(pairwise_ssim([image], [warped], data_range=data_range)[0, 0])


def warped_sources(
    provenance: Mapping[str, Mapping[str, Any]],
    candidate_ids: Sequence[str],
    reference: Mapping[str, np.ndarray],
) -> list[np.ndarray | None]:
    """Each candidate's source image warped by the candidate's own deformation, for :func:`memorisation`.

    provenance: ``provenance.jsonl`` records of ``medsynth augment`` by case id (each names its
    ``"source"`` case and its ``"warp"``); reference: source case id -> its image ``(*spatial)``.
    None for a candidate without a record, whose source is not in ``reference``, or whose record
    has no ``"warp"`` (an older medsynth). The deformation is drawn again from the record
    (:func:`medsynth.synthesis.pairs.warp_like_pair`)."""
    from medsynth.synthesis.pairs import warp_like_pair

    out: list[np.ndarray | None] = []
    for cid in candidate_ids:
        record = provenance.get(cid)
        source = None if record is None else reference.get(str(record.get("source")))
        if record is None or source is None or "warp" not in record:
            out.append(None)
            continue
        out.append(warp_like_pair(np.asarray(source), dict(record), where=f"provenance of {cid}").astype(np.float64))
    return out
