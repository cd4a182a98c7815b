"""Training-free label -> image synthesis in the SynthSeg way (``--method synthseg``).

For a label map ``(H, W)`` or ``(X, Y, Z)`` an image is made in five stages (Billot et al.,
SynthSeg, Medical Image Analysis 2023), all in intensities normalised to the dataset's robust
range ``[low, high]`` (its p0.5..p99.5), then mapped back to dataset units:

1. a Gaussian intensity model per label: mean and std drawn per label per sample (uniform in
   ``mean_range`` / ``std_range``), or, with ``fit_intensities=True``, around each label's mean
   and std measured on the real data;
2. partial-volume blur (Gaussian, sigma in voxels);
3. a smooth multiplicative bias field (log-field on a coarse grid, cubic B-spline upsampled);
4. random resolution: with ``resolution_prob`` each axis is blurred and resampled to a coarser
   grid (factor up to ``max_resolution_factor``) and back (linear), like thick slices;
5. additive Gaussian noise, then a random gamma (contrast) on the image rescaled to [0, 1]
   (``fit_intensities=True`` keeps the fitted scale and clips to the real data's full range).

A segmenter trained on such images learns shape rather than one scanner's contrast.
Randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medsynth.data.transforms import smooth_field


class SynthSegConfig(BaseModel):
    """Settings of the procedural generator. Intensities are fractions of the dataset range."""

    model_config = ConfigDict(extra="forbid")

    mean_range: tuple[float, float] = Field(default=(0.0, 1.0), description="Per-label mean drawn in this range.")
    std_range: tuple[float, float] = Field(default=(0.0, 0.08), description="Per-label std drawn in this range.")
    fit_intensities: bool = Field(default=False, description="Draw around per-label intensities fitted to the real data.")
    fit_mean_jitter: float = Field(default=0.05, ge=0, description="Fitted mode: std of the mean's jitter (fraction of range).")
    fit_std_scale: tuple[float, float] = Field(default=(0.5, 1.5),
                                               description="Fitted mode: the fitted std is scaled by U(a, b).")
    blur_sigma: tuple[float, float] = Field(default=(0.3, 1.0), description="Partial-volume blur sigma range, voxels.")
    bias_prob: float = Field(default=0.9, ge=0, le=1, description="Probability of a bias field.")
    bias_std: float = Field(default=0.3, ge=0, description="Std of the log bias field at control points.")
    bias_control_points: int = Field(default=4, ge=2, le=32, description="Control points per axis of the bias grid.")
    resolution_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of simulating a coarser resolution.")
    max_resolution_factor: float = Field(default=3.0, ge=1, le=10, description="Largest down-sampling factor of an axis.")
    noise_std: tuple[float, float] = Field(default=(0.0, 0.03), description="Noise std range (fraction of range).")
    gamma_std: float = Field(default=0.25, ge=0, le=2, description="gamma = exp(N(0, gamma_std)).")

    @field_validator("mean_range", "std_range", "blur_sigma", "noise_std", "fit_std_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= v[0] <= v[1]):
            raise ValueError(f"need 0 <= low <= high, got {list(v)}")
        return v


@dataclass
class IntensityStats:
    """Intensity facts of one image channel of a dataset (dataset units).

    low, high: robust range (mean over cases of each case's p0.5 and p99.5).
    minimum, maximum: the exact extremes over all cases.
    per_label: label value -> (mean, std) over all voxels with that label.
    """

    low: float
    high: float
    minimum: float
    maximum: float
    per_label: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def span(self) -> float:
        return max(self.high - self.low, 1e-6)

    def plausible(self, margin: float = 0.5) -> tuple[float, float]:
        """``[min - margin * r, max + margin * r]`` with ``r = max - min``: the QC range."""
        r = max(self.maximum - self.minimum, 1e-6)
        return self.minimum - margin * r, self.maximum + margin * r

    def to_dict(self) -> dict[str, object]:
        return {
            "low": self.low, "high": self.high, "minimum": self.minimum, "maximum": self.maximum,
            "per_label": {str(k): list(v) for k, v in sorted(self.per_label.items())},
        }


class IntensityAccumulator:
    """Streams (image, label) pairs of one channel into :class:`IntensityStats`."""

    def __init__(self) -> None:
        self._lows: list[float] = []
        self._highs: list[float] = []
        self._min = np.inf
        self._max = -np.inf
        self._sums: dict[int, np.ndarray] = {}

    def add(self, image: np.ndarray, label: np.ndarray) -> None:
        """image: float array; label: same shape, integers."""
        image = np.asarray(image, dtype=np.float64)
        lo, hi = np.percentile(image, [0.5, 99.5])
        self._lows.append(float(lo))
        self._highs.append(float(hi))
        self._min = min(self._min, float(image.min()))
        self._max = max(self._max, float(image.max()))
        flat_l = np.asarray(label).reshape(-1).astype(np.int64)
        flat_i = image.reshape(-1)
        n = int(flat_l.max()) + 1
        count = np.bincount(flat_l, minlength=n).astype(np.float64)
        s1 = np.bincount(flat_l, weights=flat_i, minlength=n)
        s2 = np.bincount(flat_l, weights=flat_i * flat_i, minlength=n)
        for v in np.flatnonzero(count):
            acc = self._sums.setdefault(int(v), np.zeros(3))
            acc += (count[v], s1[v], s2[v])

    def result(self) -> IntensityStats:
        if not self._lows:
            raise ValueError("no images were added")
        per_label = {}
        for v, (n, s1, s2) in sorted(self._sums.items()):
            mean = s1 / n
            per_label[v] = (float(mean), float(np.sqrt(max(s2 / n - mean * mean, 0.0))))
        return IntensityStats(
            low=float(np.mean(self._lows)),
            high=float(np.mean(self._highs)),
            minimum=float(self._min),
            maximum=float(self._max),
            per_label=per_label,
        )


def fit_intensity_stats(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> IntensityStats:
    """Intensity statistics of one channel from ``(image, label)`` pairs (same shapes)."""
    acc = IntensityAccumulator()
    for image, label in pairs:
        acc.add(image, label)
    return acc.result()


def _resample_matrix(n: int, factor: float) -> np.ndarray:
    """``(n, n)`` float32: blur + sample at ``n / factor`` points, then linear interpolation back."""
    m = max(int(round(n / factor)), 2)
    if m >= n:
        return np.eye(n, dtype=np.float32)
    x = np.arange(n, dtype=np.float64)
    centres = np.linspace(0.0, n - 1.0, m)
    sigma = 0.4 * (n - 1.0) / (m - 1.0)  # anti-aliasing blur matched to the coarse spacing
    down = np.exp(-0.5 * ((centres[:, None] - x[None, :]) / sigma) ** 2)
    down /= down.sum(axis=1, keepdims=True)
    pos = x * (m - 1.0) / (n - 1.0)
    lo = np.clip(np.floor(pos).astype(int), 0, m - 2)
    frac = pos - lo
    up = np.zeros((n, m))
    up[np.arange(n), lo] = 1.0 - frac
    up[np.arange(n), lo + 1] = frac
    return (up @ down).astype(np.float32)


def _apply_along(image: np.ndarray, matrix: np.ndarray, axis: int) -> np.ndarray:
    if axis == image.ndim - 1:
        return image @ matrix.T
    moved = np.moveaxis(image, axis, -2)
    return np.moveaxis(np.matmul(matrix, moved), -2, axis)


def synthseg_image(
    label: np.ndarray,
    *,
    rng: np.random.Generator,
    config: SynthSegConfig,
    stats: IntensityStats,
    labels: list[int],
) -> np.ndarray:
    """Make one image for ``label`` ``(H, W)`` or ``(X, Y, Z)`` (integers).

    labels: the dataset's label values (sorted); one mean/std is drawn for each, in this order,
    whether or not it occurs in ``label``, so streams stay aligned.
    Returns float32 of ``label.shape`` in dataset intensity units."""
    from scipy.ndimage import gaussian_filter

    shape = label.shape
    d = label.ndim
    span = stats.span
    # 1. Gaussian intensity model per label (normalised units)
    values = sorted(set(int(v) for v in labels) | {int(v) for v in np.unique(label)})
    lut_size = max(values) + 1
    means = np.zeros(lut_size, dtype=np.float32)
    stds = np.zeros(lut_size, dtype=np.float32)
    for v in values:
        u_mean = rng.uniform(*config.mean_range)
        u_std = rng.uniform(*config.std_range)
        jitter = rng.normal(0.0, 1.0)
        u_scale = rng.uniform(*config.fit_std_scale)
        if config.fit_intensities and v in stats.per_label:
            mu, sd = stats.per_label[v]
            means[v] = (mu - stats.low) / span + config.fit_mean_jitter * jitter
            stds[v] = sd / span * u_scale
        else:
            means[v] = u_mean
            stds[v] = u_std
    idx = label.astype(np.intp, copy=False)
    image = means[idx]
    image += stds[idx] * rng.standard_normal(shape, dtype=np.float32)
    # 2. partial-volume blur
    sigma = rng.uniform(*config.blur_sigma, size=d)
    image = gaussian_filter(image, sigma=sigma, mode="nearest")
    # 3. bias field
    use_bias = rng.random() < config.bias_prob
    coarse = rng.normal(0.0, config.bias_std, size=(config.bias_control_points,) * d)
    if use_bias and config.bias_std > 0:
        image *= np.exp(smooth_field(coarse, shape))
    # 4. random resolution (thick slices / low in-plane resolution)
    use_res = rng.random() < config.resolution_prob
    factors = rng.uniform(1.0, config.max_resolution_factor, size=d)
    thick_axis = int(rng.integers(d))
    if use_res and config.max_resolution_factor > 1:
        for a in range(d):
            f = factors[a] if a == thick_axis else 1.0 + (factors[a] - 1.0) * 0.25
            if f > 1.05:
                image = _apply_along(image, _resample_matrix(shape[a], f), a)
    # 5. noise and gamma
    noise_std = rng.uniform(*config.noise_std)
    noise = rng.standard_normal(shape, dtype=np.float32)
    gamma = float(np.exp(rng.normal(0.0, config.gamma_std)))
    image += np.float32(noise_std) * noise
    if config.fit_intensities:
        lo_n = min(0.0, (stats.minimum - stats.low) / span)
        hi_n = max(1.0, (stats.maximum - stats.low) / span)
        np.clip(image, 0.0, hi_n, out=image)
        image = np.power(image / np.float32(hi_n), np.float32(gamma)) * np.float32(hi_n)
        np.clip(image, lo_n, hi_n, out=image)
    else:
        lo, hi = float(image.min()), float(image.max())
        image -= np.float32(lo)
        image *= np.float32(1.0 / max(hi - lo, 1e-6))
        image = np.power(image, np.float32(gamma))
    out = np.float32(stats.low) + image * np.float32(span)
    return np.ascontiguousarray(out, dtype=np.float32)
