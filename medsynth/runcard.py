"""The run card: ``RUN/model_card.json``, what a trained run is and how to use it.

One writer (:func:`write_run_card`, called by the training engine) and one reader
(:func:`read_run_card`, used by the synthesizer, ``medsynth augment``, the online API and the
demo). The file is JSON::

    {"format": "medsynth-model-card", "version": 1, "medsynth_version": "0.1.0",
     "family": "gan",                      a registered family (medsynth.registry)
     "config": {...},                      the resolved recipe (Config.to_dict())
     "data": {...},                        medsynth.data.loader.DataInfo.to_dict()
     "steps": 200, "final_losses": {...},  the last stage trained
     "model": {...},                       facts the family's export returned (weights file, ...)
     "stages": {"autoencoder": {"steps": ..., "final_losses": {...}}, ...},  staged families only
     "yardstick": {"model_ssim": ..., "fill_ssim": ..., "beats_fill": true, ...}}  once measured

A card of another format, an older or newer layout, or with a missing or mistyped field is refused
with a :class:`~medsynth.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from medsynth import __version__
from medsynth.data.loader import DataInfo
from medsynth.errors import CheckpointError

_Config = TypeVar("_Config", bound=BaseModel)

CARD_FILE = "model_card.json"
#: the inference weights of every family, beside the card
WEIGHTS_FILE = "model.safetensors"
CARD_FORMAT = "medsynth-model-card"
#: the layout this code writes and reads; a card of another version is refused
CARD_VERSION = 1
_DATA_KEYS = ("dim", "slice_axis", "volume_ndim", "size", "labels", "channels", "normalization")
_NORMALIZATION_KEYS = ("mode", "lo", "hi")


@dataclass(frozen=True)
class StageRecord:
    """What one stage of a staged family trained: ``steps`` and the losses of its last step."""

    steps: int
    final_losses: dict[str, float]


@dataclass(frozen=True)
class RunCard:
    """A trained run's card (see the module docstring for the file layout).

    run_dir: the run folder the card was read from (or is written to); family: its model family;
    config: the resolved recipe as a plain dict; data: the training data facts (labels, channels,
    classes, spacing, normalisation); steps / final_losses: of the last stage trained; model: the
    family's exported facts; stages: per-stage records of a staged family; yardstick: the end-of-training
    mask -> image check against the label-mean fill (:mod:`medsynth.training.yardstick`; None: not
    measured), whose ``beats_fill`` says whether the model learned more than the fill.
    """

    run_dir: Path
    family: str
    config: dict[str, Any]
    data: DataInfo
    steps: int
    final_losses: dict[str, float]
    model: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, StageRecord] = field(default_factory=dict)
    yardstick: dict[str, Any] | None = None
    medsynth_version: str = ""
    version: int = CARD_VERSION

    # ------------------------------------------------------------------ what consumers need
    @property
    def path(self) -> Path:
        """``RUN/model_card.json``."""
        return self.run_dir / CARD_FILE

    @property
    def weights_path(self) -> Path:
        """``RUN/model.safetensors`` (present once the family exported inference weights)."""
        return self.run_dir / WEIGHTS_FILE

    @property
    def labels(self) -> list[int]:
        """Label values in one-hot channel order (background first)."""
        return list(self.data.labels)

    @property
    def channels(self) -> int:
        """Image channels the run generates."""
        return self.data.num_channels

    @property
    def classes(self) -> list[str]:
        """Class-conditioning values in order (empty or one value: not class-conditioned)."""
        return list(self.data.classes)

    @property
    def class_key(self) -> str | None:
        """The manifest field the classes come from (None when not class-conditioned)."""
        return self.data.class_key

    @property
    def model_section(self) -> dict[str, Any]:
        """The recipe's ``model`` section (a plain dict; validate it with the family's config class)."""
        section = self.config.get("model")
        return dict(section) if isinstance(section, dict) else {}

    def model_config(self, config_class: type[_Config], what: str) -> _Config:
        """The ``model`` section validated by the family's config class; CheckpointError naming the card
        when it does not fit (``what``: the family in words, e.g. "GAN")."""
        from pydantic import ValidationError

        try:
            return config_class.model_validate(self.model_section)
        except ValidationError as exc:
            raise CheckpointError(f"{self.path}: field 'config.model' does not fit this medsynth's {what} "
                                  f"({exc.error_count()} problem(s), first: {exc.errors()[0]['msg']})") from None

    def read_weights(self) -> dict[str, Any]:
        """The exported inference tensors of ``RUN/model.safetensors`` (read as tensors only, nothing
        executed); CheckpointError when the file is missing or unreadable."""
        from safetensors import SafetensorError

        from medsynth.safe_weights import read_safetensors

        weights = self.weights_path
        if not weights.is_file():
            raise CheckpointError(f"{self.run_dir}: no {weights.name} (has the training finished?)")
        try:
            return read_safetensors(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights}: cannot read the weights ({exc})") from None

    def load_into(self, module: Any, state: dict[str, Any], what: str) -> None:
        """``module.load_state_dict(state)``; CheckpointError naming the weights file when the tensors do
        not fit the network the card's recipe builds (``what``: which network)."""
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.weights_path}: {what} weights do not fit the run's recipe "
                                  f"({str(exc).splitlines()[0]})") from None

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": CARD_FORMAT,
            "version": CARD_VERSION,
            "medsynth_version": self.medsynth_version or __version__,
            "family": self.family,
            "config": self.config,
            "data": self.data.to_dict(),
            "steps": int(self.steps),
            "final_losses": {k: float(v) for k, v in self.final_losses.items()},
            "model": self.model,
        }
        if self.yardstick is not None:
            out["yardstick"] = self.yardstick
        if self.stages:
            out["stages"] = {k: {"steps": int(r.steps), "final_losses": dict(r.final_losses)}
                             for k, r in self.stages.items()}
        return out

    @classmethod
    def from_dict(cls, raw: object, run_dir: Path) -> RunCard:
        """Parse a card's JSON object; CheckpointError naming ``RUN/model_card.json`` and the field."""
        where = Path(run_dir) / CARD_FILE

        def bad(key: str, problem: str) -> CheckpointError:
            return CheckpointError(f"{where}: field {key!r} {problem}")

        if not isinstance(raw, dict):
            raise CheckpointError(f"{where}: not a medsynth model card (not a JSON object)")
        if raw.get("format") != CARD_FORMAT:
            raise CheckpointError(f"{where}: not a medsynth model card (field 'format' is "
                                  f"{raw.get('format')!r}, expected {CARD_FORMAT!r})")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise bad("version", f"must be an integer, got {version!r}")
        if version > CARD_VERSION:
            raise bad("version", f"is {version}: written by a newer medsynth (this one reads version "
                                 f"{CARD_VERSION}); upgrade medsynth")
        if version < CARD_VERSION:
            raise bad("version", f"is {version}: an older card layout this medsynth no longer reads "
                                 f"(version {CARD_VERSION}); train the run again")
        for key in ("family", "config", "data", "steps", "final_losses"):
            if key not in raw:
                raise bad(key, "is missing")
        family = raw["family"]
        if not isinstance(family, str) or not family:
            raise bad("family", f"must be a family name, got {family!r}")
        config = raw["config"]
        if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
            raise bad("config", "must be the recipe as an object with a 'model' section")
        if config["model"].get("family") != family:
            raise bad("config.model.family", f"is {config['model'].get('family')!r}, the card says {family!r}")
        _check_sizes(config, bad)
        data = raw["data"]
        if not isinstance(data, dict):
            raise bad("data", "must be an object")
        for key in _DATA_KEYS:
            if key not in data:
                raise bad(f"data.{key}", "is missing")
        norm = data["normalization"]
        if not isinstance(norm, dict):
            raise bad("data.normalization", "must be an object")
        for key in _NORMALIZATION_KEYS:
            if key not in norm:
                raise bad(f"data.normalization.{key}", "is missing")
        try:
            info = DataInfo.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad("data", f"is malformed ({type(exc).__name__}: {exc})") from None
        if not info.labels or not info.channels:
            raise bad("data.labels" if not info.labels else "data.channels", "is empty")
        steps = raw["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise bad("steps", f"must be a non-negative integer, got {steps!r}")
        losses = _losses(raw["final_losses"], "final_losses", bad)
        model = raw.get("model", {})
        if not isinstance(model, dict):
            raise bad("model", "must be an object")
        weights = model.get("weights", WEIGHTS_FILE)
        if weights != WEIGHTS_FILE:
            raise bad("model.weights", f"is {weights!r}; a run's weights are always {WEIGHTS_FILE}")
        stages_raw = raw.get("stages", {})
        if not isinstance(stages_raw, dict):
            raise bad("stages", "must be an object")
        stages: dict[str, StageRecord] = {}
        for name, rec in stages_raw.items():
            if not isinstance(rec, dict) or not isinstance(rec.get("steps"), int):
                raise bad(f"stages.{name}", "must be an object with an integer 'steps'")
            stages[str(name)] = StageRecord(int(rec["steps"]),
                                            _losses(rec.get("final_losses", {}), f"stages.{name}.final_losses", bad))
        yardstick = raw.get("yardstick")
        if yardstick is not None and (not isinstance(yardstick, dict)
                                      or not isinstance(yardstick.get("beats_fill"), bool)):
            raise bad("yardstick", "must be an object with a boolean 'beats_fill'")
        mv = raw.get("medsynth_version", "")
        return cls(run_dir=Path(run_dir), family=family, config=config, data=info, steps=steps,
                   final_losses=losses, model=model, stages=stages, yardstick=yardstick,
                   medsynth_version=mv if isinstance(mv, str) else str(mv), version=version)


def _check_sizes(config: dict[str, Any], bad: Any) -> None:
    """Refuse network sizes no recipe may ask for (:data:`medsynth.config.MAX_CHANNELS`,
    :data:`~medsynth.config.MAX_LEVELS`, :data:`~medsynth.config.MAX_SIZE`), before a network is built."""
    from medsynth.config import MAX_CHANNELS, MAX_LEVELS, MAX_SIZE, network_widths

    for widths in network_widths(config["model"]):
        if len(widths) > MAX_LEVELS or any(not 0 < c <= MAX_CHANNELS for c in widths):
            raise bad("config.model", f"asks for a network with channels {widths[:MAX_LEVELS + 1]}; a recipe allows at "
                                      f"most {MAX_LEVELS} levels of 1 to {MAX_CHANNELS} channels")
    size = config.get("data", {}).get("size") if isinstance(config.get("data"), dict) else None
    if isinstance(size, list) and any(not isinstance(s, int) or not 0 < s <= MAX_SIZE for s in size):
        raise bad("config.data.size", f"is {size[:4]}; a recipe allows 1 to {MAX_SIZE} voxels per axis")


def _losses(raw: object, key: str, bad: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise bad(key, "must be an object of name -> number")
    out: dict[str, float] = {}
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(f"{key}.{name}", f"must be a finite number, got {value!r}")
        out[str(name)] = float(value)
    return out


def read_run_card(run_dir: str | Path) -> RunCard:
    """Read ``RUN/model_card.json``. CheckpointError when the folder or card is missing, unreadable,
    foreign, of another version, or has a missing or mistyped field (the message names both)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    path = run_dir / CARD_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CARD_FILE} (has the training finished?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model card ({exc})") from None
    return RunCard.from_dict(raw, run_dir)


def write_run_card(run_dir: str | Path, card: RunCard) -> Path:
    """Write ``card`` as ``RUN/model_card.json`` atomically; returns the path."""
    from medsynth.data.atomic import atomic_write_text

    path = Path(run_dir) / CARD_FILE
    atomic_write_text(path, json.dumps(card.to_dict(), indent=2) + "\n")
    return path


__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_VERSION",
    "WEIGHTS_FILE",
    "RunCard",
    "StageRecord",
    "read_run_card",
    "write_run_card",
]
