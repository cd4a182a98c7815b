"""The trained run of a family method: its card (read by :func:`medsynth.runcard.read_run_card`),
the checksum of its weights for provenance, and whether it fits the method and the dataset."""

from __future__ import annotations

import hashlib
from pathlib import Path

from medsynth.bundles import is_bundle
from medsynth.data.manifest import Case
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.journal import sha256_file
from medsynth.runcard import RunCard, read_run_card
from medsynth.synthesis.pairs import check_run_family


def read_model(model: Path, labels: Path | None = None) -> RunCard:
    """The card of the run folder ``--model``, or of a MAISI bundle folder with its label mapping ``--labels``
    (:func:`medsynth.synthesis.maisi.bundle_card`: the bundle is only read)."""
    if is_bundle(model):
        if labels is None:
            raise ConfigError(f"--model {model}: a MAISI bundle needs --labels MAPPING (the dataset's labels -> the "
                              "bundle's names; `medsynth bundle-labels BUNDLE --data DATASET --out MAPPING` writes a "
                              "first one)")
        from medsynth.synthesis.maisi import bundle_card  # torch and MONAI only when a bundle is used

        return bundle_card(model, labels)
    if labels is not None:
        raise ConfigError(f"--labels {labels}: a label mapping goes with a MAISI bundle as --model, not a run folder")
    return read_run_card(Path(model))


def is_bundle_card(card: RunCard) -> bool:
    """Whether ``card`` stands for a MAISI bundle used as it is (no run folder, no weights file of its own)."""
    return "bundle" in card.model and card.model.get("weights", "") is None


def model_inputs(card: RunCard) -> dict[str, str]:
    """The model's files the job stands on, path -> sha256: the run's weights file, or a bundle's configs,
    weights and label mapping."""
    if is_bundle_card(card):
        from medsynth.synthesis.maisi import bundle_inputs

        return bundle_inputs(card)
    return {str(card.weights_path): model_checksum(card)}


def model_digest(inputs: dict[str, str]) -> str:
    """The provenance checksum of :func:`model_inputs`: the one file's sha256, or the sha256 of the files'
    sha256 in path order (a bundle)."""
    if len(inputs) == 1:
        return next(iter(inputs.values()))
    return hashlib.sha256("\n".join(inputs[k] for k in sorted(inputs)).encode()).hexdigest()


def model_checksum(card: RunCard) -> str:
    """sha256 of the run's weights file (``RUN/model.safetensors``): the provenance checksum."""
    if not card.weights_path.is_file():
        raise CheckpointError(f"--model {card.run_dir}: no {card.weights_path.name} (has the training finished?)")
    return sha256_file(card.weights_path)


def check_model(card: RunCard, method: str, labels: list[int], channels: int, sources: list[Case]) -> None:
    """Refuse a run that does not fit the method or the dataset (family, label set, channels, classes)."""
    check_run_family(card, method, option="--method")
    if is_bundle_card(card):
        unmapped = sorted(set(labels) - set(card.labels))
        if unmapped:
            raise ConfigError(f"{card.model.get('labels_file')}: the dataset's label value(s) {unmapped} are not "
                              "mapped; map each to a bundle label name (or 'spare')")
        if channels != 1:
            raise ConfigError(f"the bundle {card.run_dir} makes one CT image channel, the dataset has {channels}")
        return
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
