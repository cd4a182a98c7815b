"""Settings of one pairwise registration, and the error a registration that cannot be used raises."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from medsynth.errors import ConfigError, DataError
from medsynth.seeds import SEED_MAX

__all__ = ["DEFAULT_MAX_VOXELS", "RegistrationError", "RegistrationSettings"]

Transform = Literal["affine", "deformable"]
Deformable = Literal["bspline", "demons"]
Metric = Literal["auto", "mi", "mse"]
Initializer = Literal["geometry", "moments"]

#: the most voxels the fixed or the moving image may have (256^3): a 3D registration holds a few
#: float64 vector fields of that size (about 0.4 GB each at 256^3)
DEFAULT_MAX_VOXELS = 256**3


class RegistrationError(DataError):
    """A pair that cannot be registered, or whose registration cannot be used (diverged, folded,
    over its time or size limit). Callers that register many pairs skip the pair with a warning."""


@dataclass(frozen=True)
class RegistrationSettings:
    """How :func:`~medsynth.registration.register` aligns one moving image to one fixed image.

    transform: ``"affine"`` (initialisation, then affine) or ``"deformable"`` (then the
        ``deformable`` stage on top of the affine).
    deformable: ``"demons"`` (default: symmetric-gradient diffeomorphic demons on the affine-aligned
        moving image, histogram matched to the fixed one; an inverted contrast, intensities that fall
        where the fixed ones rise, is negated first) or ``"bspline"`` (free-form deformation: a cubic
        B-spline grid optimised on the metric by gradient descent with line search, the grid refined
        at each level; the choice for contrasts that are not monotone functions of each other).
        Demons measured better on real anatomy (``benchmarks/registration.py``: 2D MNI slice pairs
        Dice 0.68 / 0.86 / 0.84 for CSF / GM / WM at 0.1 s against 0.65 / 0.83 / 0.81 at 3 s).
    metric: ``"auto"`` / ``"mi"``: Mattes mutual information (works across contrasts);
        ``"mse"``: mean squared difference (same contrast and intensity scale).
    initializer: the centring before the affine stage: ``"geometry"`` (image centres) or
        ``"moments"`` (intensity centres of mass; better for shifted fields of view, worse across contrasts).
    levels: resolution levels, shrink factors ``2**(levels-1) .. 2, 1``.
    iterations: the most optimiser (B-spline) or demons iterations per level of the deformable stage
        (demons: half of them at full resolution).
    affine_iterations: the most optimiser iterations per level of the affine stage.
    threads: ITK threads of every filter this registration runs (set per filter, never globally).
    time_limit_s: wall-clock seconds one registration may take; past it the optimiser is stopped
        and :class:`RegistrationError` names this limit.
    seed: seeds the metric's random sampling (``sampling_fraction < 1``); same seed, same bytes.
    sampling_fraction: fraction of fixed voxels the metric samples (1: all, no randomness).
    affine_samples: the most fixed voxels the affine stage samples per level (random, seeded by
        ``seed``): its 12 parameters need few, and full sampling of a 96^3 image took 4 s.
    histogram_bins: joint histogram bins of mutual information.
    grid_spacing_mm: B-spline control point spacing at the finest level (coarser levels double it).
    demons_sigma_vox: Gaussian smoothing (voxels) of the demons displacement field each iteration.
    max_voxels: refuse a fixed or moving image with more voxels than this (memory bound).
    max_folding_fraction: a result with a larger fraction of folded fixed voxels (Jacobian
        determinant <= 0) raises :class:`RegistrationError`.
    """

    transform: Transform = "deformable"
    deformable: Deformable = "demons"
    metric: Metric = "auto"
    initializer: Initializer = "geometry"
    levels: int = 3
    iterations: int = 30
    affine_iterations: int = 100
    threads: int = 1
    time_limit_s: float = 120.0
    seed: int = 0
    sampling_fraction: float = 1.0
    affine_samples: int = 20000
    histogram_bins: int = 32
    grid_spacing_mm: float = 10.0
    demons_sigma_vox: float = 1.0
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_folding_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name, options in (
            ("transform", Transform),
            ("deformable", Deformable),
            ("metric", Metric),
            ("initializer", Initializer),
        ):
            value = getattr(self, name)
            if value not in get_args(options):
                raise ConfigError(f"registration {name} {value!r} is not one of {', '.join(get_args(options))}")
        for name, low in (("levels", 1), ("iterations", 1), ("affine_iterations", 1), ("threads", 1),
                          ("histogram_bins", 4), ("max_voxels", 1), ("affine_samples", 100)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"registration {name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"registration seed must be an integer in 0..{SEED_MAX}, got {self.seed!r}")
        for name in ("time_limit_s", "grid_spacing_mm", "demons_sigma_vox"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"registration {name} must be a positive number, got {value!r}")
        if not 0 < self.sampling_fraction <= 1:
            raise ConfigError(f"registration sampling_fraction must be in (0, 1], got {self.sampling_fraction!r}")
        if not 0 <= self.max_folding_fraction <= 1:
            raise ConfigError(
                f"registration max_folding_fraction must be in [0, 1], got {self.max_folding_fraction!r}"
            )

    @property
    def resolved_metric(self) -> Literal["mi", "mse"]:
        """The metric in use: ``"auto"`` is mutual information."""
        return "mse" if self.metric == "mse" else "mi"

    @property
    def shrink_factors(self) -> list[int]:
        return [2 ** (self.levels - 1 - level) for level in range(self.levels)]
