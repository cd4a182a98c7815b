"""``medsynth augment``: grow a segmentation dataset with synthetic image/label pairs.

The job, split along its seams: :mod:`~medsynth.augment.options` (the recipe and the options),
:mod:`~medsynth.augment.facts` (what the real cases show), :mod:`~medsynth.augment.plan` (source,
donor, files and seed of each synthetic case), :mod:`~medsynth.augment.model` (the trained run of a
family method), :mod:`~medsynth.augment.layout` (the output folder, asked of the format registry),
:mod:`~medsynth.augment.case` (making one case with the synthetic-pair core),
:mod:`~medsynth.augment.workers` (processes and torchrun ranks) and :mod:`~medsynth.augment.job`
(the stages, in order).
"""

from __future__ import annotations

from medsynth.augment.job import JOB_FORMAT_VERSION, PROVENANCE_FILE, AugmentSummary, run_augment
from medsynth.augment.options import AugmentConfig, AugmentOptions, load_augment_config
from medsynth.augment.plan import SYNTHETIC_PREFIX, PlannedCase
from medsynth.synthesis.pairs import QCConfig

__all__ = [
    "JOB_FORMAT_VERSION",
    "PROVENANCE_FILE",
    "SYNTHETIC_PREFIX",
    "AugmentConfig",
    "AugmentOptions",
    "AugmentSummary",
    "PlannedCase",
    "QCConfig",
    "load_augment_config",
    "run_augment",
]
