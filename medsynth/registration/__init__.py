"""Registration core: displacement fields between scans, label propagation and fusion.

It sits above :mod:`medsynth.data` and below synthesis, and imports nothing above it. Built on
SimpleITK: centring, affine, then a deformable stage (B-spline or diffeomorphic demons),
multi-resolution, 2D and 3D, mutual information across contrasts. Fields are numpy arrays in the
fixed image's RAS world (see :class:`Registration`); warping, scaling, Jacobians and label fusion
are numpy/scipy.
"""

from medsynth.registration.fusion import fuse_labels, local_weights
from medsynth.registration.pairwise import register
from medsynth.registration.result import Registration
from medsynth.registration.settings import DEFAULT_MAX_VOXELS, RegistrationError, RegistrationSettings
from medsynth.registration.warp import (
    MAX_ONE_HOT_LABELS,
    folding_fraction,
    jacobian_determinant,
    scale_field,
    warp_image,
    warp_labels,
)

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "MAX_ONE_HOT_LABELS",
    "Registration",
    "RegistrationError",
    "RegistrationSettings",
    "folding_fraction",
    "fuse_labels",
    "jacobian_determinant",
    "local_weights",
    "register",
    "scale_field",
    "warp_image",
    "warp_labels",
]
