"""medsynth: synthesize medical scans from label maps and grow segmentation datasets.

The public API is imported lazily, so ``import medsynth`` (and ``medsynth --help``) stays fast
and does not import torch until a name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # errors
    "MedsynthError": "medsynth.errors",
    "DataError": "medsynth.errors",
    "ConfigError": "medsynth.errors",
    "CheckpointError": "medsynth.errors",
    "JobError": "medsynth.errors",
    # data
    "Case": "medsynth.data.manifest",
    "Manifest": "medsynth.data.manifest",
    "read_manifest": "medsynth.data.manifest",
    "write_manifest": "medsynth.data.manifest",
    "Volume": "medsynth.data.nifti",
    "read_volume": "medsynth.data.nifti",
    "write_volume": "medsynth.data.nifti",
    "validate_dataset": "medsynth.data.validate",
    "load_valid_dataset": "medsynth.data.validate",
    "make_phantom_dataset": "medsynth.data.phantoms",
    # evaluation
    "ssim": "medsynth.evaluation.metrics",
    "psnr": "medsynth.evaluation.metrics",
    "ms_ssim": "medsynth.evaluation.metrics",
    "mae": "medsynth.evaluation.metrics",
    # families, training, run cards
    "Family": "medsynth.registry",
    "register_family": "medsynth.registry",
    "load_config": "medsynth.config",
    "run_training": "medsynth.training",
    "RunCard": "medsynth.runcard",
    "read_run_card": "medsynth.runcard",
    # synthesis
    "Synthesizer": "medsynth.synthesis.synthesizer",
    "RandSyntheticPaird": "medsynth.synthesis.online",
    "SyntheticMixDataset": "medsynth.synthesis.online",
    # recipes
    "recipe_path": "medsynth.recipes",
    "list_recipes": "medsynth.recipes",
    # augment
    "AugmentOptions": "medsynth.augment",
    "AugmentConfig": "medsynth.augment",
    "run_augment": "medsynth.augment",
    # downstream: does the synthetic data make a segmenter better?
    "downstream": "medsynth.evaluation.downstream",
    "DownstreamOptions": "medsynth.evaluation.downstream",
    "DownstreamSummary": "medsynth.evaluation.downstream",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medsynth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from medsynth.augment import AugmentConfig, AugmentOptions, run_augment
    from medsynth.config import load_config
    from medsynth.data.manifest import Case, Manifest, read_manifest, write_manifest
    from medsynth.data.nifti import Volume, read_volume, write_volume
    from medsynth.errors import CheckpointError, ConfigError, DataError, JobError, MedsynthError
    from medsynth.evaluation.downstream import DownstreamOptions, DownstreamSummary, downstream
    from medsynth.evaluation.metrics import mae, ms_ssim, psnr, ssim
    from medsynth.recipes import list_recipes, recipe_path
    from medsynth.registry import Family, register_family
    from medsynth.runcard import RunCard, read_run_card
    from medsynth.synthesis.online import RandSyntheticPaird, SyntheticMixDataset
    from medsynth.synthesis.synthesizer import Synthesizer
    from medsynth.training import run_training
