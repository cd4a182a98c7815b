"""What ``medsynth downstream`` reports: its options, per-variant results, paired comparisons and the
summary object (written as ``summary.json``; returned by :func:`medsynth.downstream`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsynth.evaluation.downstream.segmenter import Network

REFERENCE = "real+classic"
SUMMARY_KIND = "medsynth-downstream"
SUMMARY_VERSION = 1

RULES = (
    "Each batch sample is synthetic with probability 1 - real_fraction (only in variants with a synthetic set), "
    "else real; the case is uniform within its group.",
    "Intensities: each channel z-scored with its case's own mean and standard deviation, the same for every variant.",
    "+classic: every sample goes through the classic chain of `medsynth augment` (random affine + elastic "
    "deformation, MONAI bias field, gamma, scaling and noise) on the fly.",
    "Mean Dice of a seed: the mean over test cases of each case's mean Dice over the foreground labels in its "
    "reference. A label absent from a case's reference has no Dice (NaN); a label present but not predicted has "
    "Dice 0 and no HD95.",
    "Difference to real+classic: mean over (test case, seed) pairs of the paired difference of case scores; 95% "
    "percentile bootstrap interval resampling test cases and seeds independently.",
)


# ------------------------------------------------------------------------------------ options / results


@dataclass
class DownstreamOptions:
    """What ``medsynth downstream`` was asked to do.

    train: real training set (MSD JSON, CSV or nnU-Net raw folder). test: held-out labelled set, or
    None for ``folds``-fold cross-validation over the training cases. synthetic: datasets written by
    ``medsynth augment``. out: output folder (None: write nothing). seeds: training seeds (each
    variant trained once per seed). steps: optimizer steps per model. batch_size: samples per step.
    channels: base channel count of the network (default 16). patch_size: cap on the patch side
    (default 256 in 2D, 96 in 3D). real_fraction: share of real samples in batches of variants with
    a synthetic set. bootstrap: bootstrap replicates of each confidence interval. workers: processes
    making training batches (results do not depend on it). plain_sets: also train ``real+<set>`` without
    the online classic chain (False: only ``real+<set>+classic`` beside ``real`` and ``real+classic``).
    """

    train: Path
    test: Path | None = None
    synthetic: tuple[Path, ...] = ()
    out: Path | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 500
    network: Network = "unet"
    batch_size: int = 8
    folds: int = 3
    device: str = "auto"
    channels: int | None = None
    patch_size: int | None = None
    real_fraction: float = 0.5
    bootstrap: int = 10_000
    workers: int = 0
    overwrite: bool = False
    progress: bool = False
    plain_sets: bool = True


@dataclass
class SeedStat:
    """One metric of one variant: per seed, and mean +- sample std over seeds (None: undefined)."""

    mean: float | None
    std: float | None
    per_seed: list[float | None]


@dataclass
class VariantResult:
    """The results of one variant.

    dice, hd95 (mm): per seed the mean over test cases of each case's mean over labels.
    dice_per_label, hd95_per_label: label name -> mean over seeds of the mean over test cases.
    empty_predictions: (case, seed, label) triples where the reference has the label and the model
    predicted none of it. absent_labels: triples where the reference lacks the label (no Dice).
    real_cases, synthetic_cases: cases the training drew from (per fold, summed over folds).
    """

    name: str
    synthetic_set: str | None
    classic: bool
    dice: SeedStat
    hd95: SeedStat
    dice_per_label: dict[str, float | None]
    hd95_per_label: dict[str, float | None]
    empty_predictions: int
    absent_labels: int
    real_cases: int
    synthetic_cases: int
    seconds: float


@dataclass
class Comparison:
    """Paired difference of a variant's case scores minus the reference's, with its 95% interval."""

    variant: str
    reference: str
    metric: str
    mean_difference: float | None
    ci_low: float | None
    ci_high: float | None
    pairs: int


@dataclass
class DownstreamSummary:
    """Everything ``medsynth downstream`` measured (``summary.json`` is :meth:`to_dict`)."""

    train: str
    test: str | None
    synthetic: list[str]
    folds: int | None
    spatial_dims: int
    labels: dict[int, str]
    seeds: list[int]
    steps: int
    batch_size: int
    real_fraction: float
    segmenter: str
    parameters: int
    patch: list[int]
    device: str
    train_cases: int
    test_cases: int
    variants: list[VariantResult]
    comparisons: list[Comparison]
    reference: str = REFERENCE
    rules: list[str] = field(default_factory=lambda: list(RULES))
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    out: str | None = None

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def comparison(self, name: str) -> Comparison:
        for c in self.comparisons:
            if c.variant == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; NaN written as None."""
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return {"kind": SUMMARY_KIND, "version": SUMMARY_VERSION, **_clean(d)}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True)
class MetricRow:
    """One line of ``metrics.csv``: one variant x seed x test case x foreground label."""

    variant: str
    seed: int
    fold: int
    case_id: str
    label: int
    label_name: str
    dice: float
    hd95_mm: float
    reference_voxels: int
    predicted_voxels: int


# ------------------------------------------------------------------------------------ plan


