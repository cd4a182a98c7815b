"""The result of one pairwise registration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Registration"]


@dataclass
class Registration:
    """One registered pair: a displacement field on the fixed grid and its quality figures.

    field: ``(*fixed_shape, ndim)`` float32, millimetres, components along the RAS world axes (in 2D
        the first two, R and A for an axial slice): the fixed voxel at RAS position ``p`` corresponds
        to the point ``p + field[idx]`` of the moving image's world.
    fixed_affine: ``(4, 4)`` voxel -> RAS mm of the fixed grid, as given.
    similarity_before / similarity_after: the registration metric at the identity transform (no
        initialisation) and at the result, full sampling of the fixed grid (inside ``fixed_mask``),
        higher is better: mutual information in nats (Mattes estimate, ``metric == "mi"``) or the
        negative mean squared difference of the intensity-normalised images (``metric == "mse"``).
        NaN where ITK cannot evaluate it (e.g. the images do not overlap at the identity).
    folding_fraction: fraction of fixed voxels where ``x -> x + field(x)`` has Jacobian determinant <= 0.
    converged: the last stage's optimiser stopped on its convergence test, not its iteration cap.
    seconds: wall-clock seconds of the whole registration.
    metric: ``"mi"`` or ``"mse"``, the metric of the similarities.
    stages: the stages that ran, e.g. ``("affine", "bspline")``.
    """

    field: np.ndarray
    fixed_affine: np.ndarray
    similarity_before: float
    similarity_after: float
    folding_fraction: float
    converged: bool
    seconds: float
    metric: str = "mi"
    stages: tuple[str, ...] = ()

    @property
    def ndim(self) -> int:
        return int(self.field.shape[-1])

    @property
    def fixed_shape(self) -> tuple[int, ...]:
        return tuple(self.field.shape[:-1])
