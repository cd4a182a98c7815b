"""The trained run of a family method: its card (read by :func:`medsynth.runcard.read_run_card`),
the checksum of its weights for provenance, and whether it fits the method and the dataset."""

from __future__ import annotations

from pathlib import Path

from medsynth.bundles import is_bundle
from medsynth.data.manifest import Case
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.journal import sha256_file
from medsynth.runcard import RunCard, read_run_card
from medsynth.synthesis.pairs import check_run_family


def read_model(model: Path) -> RunCard:
    """The card of the run folder ``--model`` (a MAISI bundle folder is refused with what to run instead)."""
    if is_bundle(model):
        raise ConfigError(f"--model {model}: a MAISI bundle; augment does not take bundles yet: make an image per "
                          f"mask with `medsynth sample {model} --labels MAPPING --mask MASK --out IMAGE` "
                          "(docs/maisi.md)")
    return read_run_card(Path(model))


def model_checksum(card: RunCard) -> str:
    """sha256 of the run's weights file (``RUN/model.safetensors``): the provenance checksum."""
    if not card.weights_path.is_file():
        raise CheckpointError(f"--model {card.run_dir}: no {card.weights_path.name} (has the training finished?)")
    return sha256_file(card.weights_path)


def check_model(card: RunCard, method: str, labels: list[int], channels: int, sources: list[Case]) -> None:
    """Refuse a run that does not fit the method or the dataset (family, label set, channels, classes)."""
    check_run_family(card, method, option="--method")
    if sorted(card.labels) != sorted(labels):
        raise ConfigError(f"the run {card.run_dir} was trained with labels {sorted(card.labels)}, "
                          f"the dataset has {sorted(labels)}")
    if card.channels != channels:
        raise ConfigError(f"the run {card.run_dir} makes {card.channels} image channel(s), the dataset has {channels}")
    if len(card.classes) > 1:
        key = card.class_key or ""
        missing = [c.case_id for c in sources if str(c.extra.get(key, "")) not in card.classes]
        if missing:
            raise DataError(
                f"the run {card.run_dir} is conditioned on {key!r} ({card.classes}); training case(s) "
                f"{missing[:5]} lack a known value in the manifest's {key!r} field"
            )


def fill_warning(card: RunCard) -> str | None:
    """Why the run's images may say no more than its masks: its end-of-training yardstick (run card)
    did not beat the label-mean fill on SSIM and PSNR (None: it did, or it was never measured)."""
    y = card.yardstick
    if y is None or y.get("beats_fill", True):
        return None
    where = "held-out" if y.get("held_out") else "training"
    return (f"the run {card.run_dir} never beat the label-mean fill on its {where} masks (SSIM "
            f"{y.get('model_ssim')} vs {y.get('fill_ssim')}, PSNR {y.get('model_psnr')} vs {y.get('fill_psnr')} dB): "
            "its images may say no more than the label maps; train longer or use a larger recipe")


def class_key(card: RunCard) -> str | None:
    """The manifest field that picks a class-conditioned run's class (None: not class-conditioned)."""
    return card.class_key if len(card.classes) > 1 else None
