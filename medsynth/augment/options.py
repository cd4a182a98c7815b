"""What ``medsynth augment`` is asked to do: the recipe (``--config``) and the options."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsynth.data.transforms import ClassicConfig, DeformConfig, EditConfig
from medsynth.errors import ConfigError
from medsynth.registry import is_model_method
from medsynth.synthesis.pairs import PairSettings, QCConfig, check_method
from medsynth.synthesis.procedural import SynthSegConfig

#: an augment-only method: the unlabelled image itself with its propagated mask (``--anatomy unlabelled:BANK``)
PSEUDO = "pseudo"
#: where new masks come from (``--anatomy``): deformations of the labelled masks, a labelled mask warped
#: by a bank field, or the propagated masks of the bank's unlabelled images
ANATOMY_SOURCES = ("deform", "bank:BANK", "unlabelled:BANK")


class AnatomyConfig(BaseModel):
    """How masks are drawn from an anatomy bank (``--anatomy bank:BANK`` / ``unlabelled:BANK``)."""

    model_config = ConfigDict(extra="forbid")

    min_agreement: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="unlabelled: use only images whose propagated mask has at least this mean agreement "
                    "(over its foreground; the share of the atlases' vote the fused label got).")
    alpha_min: float = Field(default=0.5, ge=0.0, le=1.0,
                             description="bank: a field is scaled by alpha drawn uniformly from [alpha_min, alpha_max] "
                                         "(1: the full warp onto the unlabelled image's anatomy; below: in between).")
    alpha_max: float = Field(default=1.0, ge=0.0, le=1.0, description="bank: the largest field scale.")


class AugmentConfig(BaseModel):
    """The recipe of ``medsynth augment --config``: every section is optional."""

    model_config = ConfigDict(extra="forbid")

    anatomy: AnatomyConfig = Field(default_factory=AnatomyConfig)

    deform: DeformConfig = Field(default_factory=DeformConfig)
    edits: EditConfig = Field(default_factory=EditConfig)
    synthseg: SynthSegConfig = Field(default_factory=SynthSegConfig)
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    qc: QCConfig = Field(default_factory=QCConfig)


def load_augment_config(path: str | Path | None, overrides: Sequence[str] = ()) -> AugmentConfig:
    """Read an augment recipe (YAML; ``None``: the defaults), then apply ``--set key=value`` overrides
    (dotted key, YAML value, as ``medsynth train --set``). Every bad field is reported."""
    from medsynth.config import apply_overrides, format_validation_error, read_yaml_mapping

    raw = {} if path is None else read_yaml_mapping(Path(path))
    apply_overrides(raw, list(overrides))
    source = "augment settings" if path is None else str(path)
    try:
        return AugmentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source + (" with --set" if overrides else ""))) from None


@dataclass
class AugmentOptions:
    """What ``medsynth augment`` was asked to do.

    input: a dataset manifest (any registered format). out: output folder (same format as the input).
    method: a training-free method or a registered family (:func:`medsynth.registry.method_names`).
    num: synthetic cases to make. seed: job seed (>= 0). model: run folder for a family method, or a
    MAISI bundle folder for ``ldm`` with ``labels``, its label mapping file.
    workers: parallel CPU processes (results identical for any value).
    real: how real cases enter the output folder (:data:`medsynth.augment.layout.REAL_MODES`).
    """

    input: Path
    out: Path
    method: str
    num: int
    seed: int = 0
    model: Path | None = None
    labels: Path | None = None
    resume: bool = False
    overwrite: bool = False
    synthetic_only: bool = False
    workers: int = 1
    dry_run: bool = False
    real: str = "auto"
    config: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = False
    anatomy: str = "deform"

    @property
    def anatomy_source(self) -> tuple[str, Path | None]:
        """``--anatomy`` split: ``("deform", None)``, ``("bank", BANK)`` or ``("unlabelled", BANK)``."""
        kind, sep, rest = self.anatomy.partition(":")
        return kind, (Path(rest).expanduser() if sep else None)

    def pair_settings(self) -> PairSettings:
        """The settings of the synthetic-pair core for this job."""
        c = self.config
        return PairSettings(method=self.method, deform=c.deform, edits=c.edits, synthseg=c.synthseg,
                            classic=c.classic, qc=c.qc)


#: the most synthetic cases one job makes (its plan and journal stay a few hundred MB at most)
NUM_MAX = 1_000_000
#: worker processes per usable CPU core, at most
WORKERS_PER_CORE = 4


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_options(options: AugmentOptions) -> None:
    """ConfigError naming the first bad option."""
    from medsynth.seeds import SEED_MAX

    if options.method != PSEUDO:
        check_method(options.method, "--method")
    kind, bank = options.anatomy_source
    if kind not in ("deform", "bank", "unlabelled") or (kind == "deform") != (bank is None) or str(bank) == ".":
        raise ConfigError(f"--anatomy {options.anatomy!r}: must be one of {', '.join(ANATOMY_SOURCES)} (BANK: a folder "
                          "written by `medsynth anatomy`)")
    if options.method == PSEUDO and kind != "unlabelled":
        raise ConfigError("--method pseudo writes the unlabelled images with their propagated masks: it needs "
                          "--anatomy unlabelled:BANK")
    c = options.config.anatomy
    if c.alpha_min > c.alpha_max:
        raise ConfigError(f"anatomy.alpha_min {c.alpha_min} is above anatomy.alpha_max {c.alpha_max}")
    for name, value in (("--num", options.num), ("--seed", options.seed), ("--workers", options.workers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
    if not 1 <= options.num <= NUM_MAX:
        raise ConfigError(f"--num {options.num}: must be from 1 to {NUM_MAX:,} synthetic cases per job")
    if not 0 <= options.seed <= SEED_MAX:
        raise ConfigError(f"--seed {options.seed}: must be a whole number from 0 to {SEED_MAX} (2**63 - 1)")
    most = WORKERS_PER_CORE * usable_cores()
    if not 1 <= options.workers <= most:
        raise ConfigError(f"--workers {options.workers}: must be from 1 to {most} ({WORKERS_PER_CORE} per CPU core "
                          "of this machine); each worker holds its own copy of the job's data")
    if options.resume and options.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if is_model_method(options.method) and options.model is None:
        raise ConfigError(f"--method {options.method} needs --model RUN (a trained run folder)")
    if not is_model_method(options.method) and options.model is not None:
        raise ConfigError(f"--model is only used by a trained model's method, not {options.method}")
    if options.labels is not None and options.model is None:
        raise ConfigError(f"--labels {options.labels}: a label mapping goes with a MAISI bundle as --model")
