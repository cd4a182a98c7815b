"""The ``model`` section of the ``maisi_controlnet`` family: fine-tune a MAISI CT bundle's ControlNet.

Only the settings live here (pydantic, no torch): the trainer is
:class:`medsynth.training.maisi.MaisiControlNetFamily`, the registry entry is in :mod:`medsynth.registry`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from medsynth.bundles.geometry import MAISI_LIMITS, FitLimits
from medsynth.config import ModelSection, StrictModel

__all__ = ["FitLimitsConfig", "MaisiControlNetConfig"]

_Size = Annotated[int, Field(gt=0, le=4096)]


class FitLimitsConfig(StrictModel):
    """The work grid sizes and spacings sampling fits a mask to (:mod:`medsynth.bundles.geometry`)."""

    xy_sizes: list[_Size] = Field(default_factory=lambda: list(MAISI_LIMITS.xy_sizes), min_length=1, description=(
        "In-plane sizes (voxels, both in-plane axes equal) a mask is generated at: the smallest that covers "
        "the mask's field of view is taken. The published MAISI sizes; each a multiple of the networks' "
        "downsampling (16 for the published bundles)."))
    z_sizes: list[_Size] = Field(default_factory=lambda: list(MAISI_LIMITS.z_sizes), min_length=1, description=(
        "Axial sizes (voxels) a mask is generated at, as xy_sizes."))
    xy_spacing: tuple[float, float] = Field(default=MAISI_LIMITS.xy_spacing, description=(
        "[lo, hi] in-plane spacing in mm: a mask's spacing is clamped to it for generation, and every training "
        "case's in-plane spacing must lie in it."))
    z_spacing: tuple[float, float] = Field(default=MAISI_LIMITS.z_spacing, description=(
        "[lo, hi] axial spacing in mm, as xy_spacing."))

    @model_validator(mode="after")
    def _order(self) -> FitLimitsConfig:
        for name in ("xy_spacing", "z_spacing"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} needs 0 < lo <= hi, got {[lo, hi]}")
        return self

    def limits(self) -> FitLimits:
        return FitLimits(xy_sizes=tuple(self.xy_sizes), z_sizes=tuple(self.z_sizes),
                         xy_spacing=(float(self.xy_spacing[0]), float(self.xy_spacing[1])),
                         z_spacing=(float(self.z_spacing[0]), float(self.z_spacing[1])))


class MaisiControlNetConfig(ModelSection):
    """``model.family: maisi_controlnet``: the bundle's ControlNet trained on the dataset's (image, mask) pairs,
    starting from the bundle's weights, with its diffusion UNet and autoencoder frozen."""

    family: Literal["maisi_controlnet"] = Field(default="maisi_controlnet", description=(
        "The model family: `maisi_controlnet` (one stage: the ControlNet of a downloaded MAISI CT bundle, "
        "fine-tuned; the bundle's UNet and autoencoder stay frozen and the bundle folder is never written)."))
    bundle: Path | None = Field(default=None, description=(
        "The downloaded MAISI CT bundle folder (configs/, models/; ddpm or rflow layout). Required: give it with "
        "`--set model.bundle=DIR`. The run records the sha256 of its weights files and refuses to sample "
        "when they changed."))
    labels: Path | None = Field(default=None, description=(
        "The YAML label mapping (dataset label value -> bundle label name, `spare` for a new class in an unused "
        "value, `body: outline|none`); `medsynth bundle-labels` writes a first one. Required: "
        "`--set model.labels=FILE`. The run card keeps the mapping, so sampling needs no --labels."))
    weighted_loss: float = Field(default=1.0, ge=1.0, description=(
        "MAISI's region weight: the L1 loss on latent voxels of `weighted_labels` is multiplied by it (1: off)."))
    weighted_labels: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, description=(
        "Dataset label values (e.g. a tumour) whose latent voxels get `weighted_loss`."))
    sample_steps: int | None = Field(default=None, ge=1, le=1000, description=(
        "Sampler steps when sampling gives none (null: the bundle's, rflow 30, ddpm 1000)."))
    limits: FitLimitsConfig = Field(default_factory=FitLimitsConfig, description=(
        "The grids sampling fits a mask to (sizes, spacing bounds); the published MAISI limits by default."))
