"""Appearance: the per-label mean intensities a mask-conditioned generator starts from, and their
distribution over the training cases.

A run trained with a *per-case* fill (``model.generator.appearance: per_case``) starts each training
image from its own case's per-label means instead of the pooled ones. At inference the generator then
needs a label-mean vector per image; :class:`AppearanceDistribution` draws one from the training
cases' distribution:

- ``mvn``: a multivariate normal over the cases' (C x L) mean vectors (sample mean, sample covariance
  with ``ddof=1``), each draw clipped to the range the training cases span per channel and label (so
  a draw stays inside what the label QC accepts), when there are at least :data:`MIN_CASES_MVN` cases;
- ``diagonal``: independent normals per channel and label (the same clip), with 2 cases up to
  :data:`MIN_CASES_MVN` - 1;
- ``pooled``: no variation (the pooled training means), with fewer than 2 cases.

A label a case lacks takes the pooled mean in that case (it adds no spread). Units: [0, 1] (the
run's normalised intensities), arrays ``(C, L)`` in one-hot label order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["MIN_CASES_MVN", "AppearanceDistribution", "case_mean_table"]

#: fewest training cases for the full covariance (below: a diagonal normal; below 2: the pooled means)
MIN_CASES_MVN = 4

DrawKind = Literal["mvn", "diagonal", "pooled"]


def case_mean_table(case_means: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    """case_means ``(K, C, L)`` with NaN where a case lacks a label -> the same with each NaN replaced by
    the pooled mean ``pooled`` ``(C, L)`` of that channel and label; float64."""
    table = np.asarray(case_means, np.float64)
    return np.where(np.isfinite(table), table, np.asarray(pooled, np.float64)[None])


@dataclass(frozen=True)
class AppearanceDistribution:
    """The distribution of per-label means over the training cases (module docstring).

    mean ``(C, L)``; cov ``(C*L, C*L)`` (zero for ``pooled``; diagonal for ``diagonal``); low/high
    ``(C, L)``: the range the cases span (a draw is clipped to it); kind; num_cases."""

    mean: np.ndarray
    cov: np.ndarray
    low: np.ndarray
    high: np.ndarray
    kind: DrawKind
    num_cases: int

    @classmethod
    def from_cases(cls, case_means: np.ndarray, pooled: np.ndarray) -> AppearanceDistribution:
        """case_means ``(K, C, L)`` per training case (NaN: label absent), pooled ``(C, L)``."""
        pooled = np.asarray(pooled, np.float64)
        table = case_mean_table(case_means, pooled) if len(case_means) else np.zeros((0, *pooled.shape))
        k, size = len(table), pooled.size
        if k < 2:
            return cls(pooled, np.zeros((size, size)), pooled, pooled, "pooled", k)
        flat = table.reshape(k, size)
        cov = np.cov(flat, rowvar=False, ddof=1).reshape(size, size)
        kind: DrawKind = "mvn"
        if k < MIN_CASES_MVN:
            cov, kind = np.diag(np.diag(cov)), "diagonal"
        return cls(table.mean(axis=0), cov, table.min(axis=0), table.max(axis=0), kind, k)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One label-mean table ``(C, L)`` in [0, 1] units, float32."""
        if self.kind == "pooled":
            return self.mean.astype(np.float32)
        # eigen-decomposition: the sample covariance of few cases is singular (rank <= K - 1)
        vals, vecs = np.linalg.eigh(self.cov)
        z = rng.standard_normal(len(vals))
        sample = self.mean.ravel() + vecs @ (np.sqrt(np.clip(vals, 0.0, None)) * z)
        return np.clip(sample.reshape(self.mean.shape), self.low, self.high).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What the run card records: the draw's kind, the number of cases and the per-label mean and
        standard deviation of the distribution ([0, 1] units)."""
        std = np.sqrt(np.clip(np.diag(self.cov), 0.0, None)).reshape(self.mean.shape)
        return {"draw": self.kind, "num_cases": int(self.num_cases),
                "mean": np.round(self.mean, 6).tolist(), "std": np.round(std, 6).tolist()}
