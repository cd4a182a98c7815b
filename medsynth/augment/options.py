"""What ``medsynth augment`` is asked to do: the recipe (``--config``) and the options."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsynth.data.transforms import ClassicConfig, DeformConfig, EditConfig
from medsynth.errors import ConfigError
from medsynth.registry import is_model_method
from medsynth.synthesis.pairs import PairSettings, QCConfig, check_method
from medsynth.synthesis.procedural import SynthSegConfig


class AugmentConfig(BaseModel):
    """The recipe of ``medsynth augment --config``: every section is optional."""

    model_config = ConfigDict(extra="forbid")

    deform: DeformConfig = Field(default_factory=DeformConfig)
    edits: EditConfig = Field(default_factory=EditConfig)
    synthseg: SynthSegConfig = Field(default_factory=SynthSegConfig)
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    qc: QCConfig = Field(default_factory=QCConfig)


def load_augment_config(path: str | Path | None) -> AugmentConfig:
    """Read an augment recipe (YAML). ``None``: the defaults. Every bad field is reported."""
    if path is None:
        return AugmentConfig()
    from medsynth.config import format_validation_error, read_yaml_mapping

    raw = read_yaml_mapping(Path(path))
    try:
        return AugmentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


@dataclass
class AugmentOptions:
    """What ``medsynth augment`` was asked to do.

    input: a dataset manifest (any registered format). out: output folder (same format as the input).
    method: a training-free method or a registered family (:func:`medsynth.registry.method_names`).
    num: synthetic cases to make. seed: job seed (>= 0). model: run folder for a family method.
    workers: parallel CPU processes (results identical for any value).
    """

    input: Path
    out: Path
    method: str
    num: int
    seed: int = 0
    model: Path | None = None
    resume: bool = False
    overwrite: bool = False
    synthetic_only: bool = False
    workers: int = 1
    dry_run: bool = False
    config: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = False

    def pair_settings(self) -> PairSettings:
        """The settings of the synthetic-pair core for this job."""
        c = self.config
        return PairSettings(method=self.method, deform=c.deform, edits=c.edits, synthseg=c.synthseg,
                            classic=c.classic, qc=c.qc)


def check_options(options: AugmentOptions) -> None:
    """ConfigError naming the first bad option."""
    check_method(options.method, "--method")
    if options.num < 1:
        raise ConfigError(f"--num must be at least 1, got {options.num}")
    if options.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {options.seed}")
    if options.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {options.workers}")
    if options.resume and options.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if is_model_method(options.method) and options.model is None:
        raise ConfigError(f"--method {options.method} needs --model RUN (a trained run folder)")
    if not is_model_method(options.method) and options.model is not None:
        raise ConfigError(f"--model is only used by a trained model's method, not {options.method}")
