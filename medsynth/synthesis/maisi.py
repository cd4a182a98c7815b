"""The synthesizer backend of a ``maisi_controlnet`` run: the bundle's networks with the run's ControlNet.

The run folder points at its bundle (``model.bundle`` of the run card; the bundle is never copied or
written). Loading reads the bundle as :func:`medsynth.bundles.reader.read_bundle` does, refuses it when the
sha256 of its autoencoder or UNet file differs from the one recorded at training, loads those two strictly
from the bundle and the ControlNet strictly from ``RUN/model.safetensors``. The label mapping and the
sampling limits come from the card, so a mask is generated in HU on its own grid exactly as
``medsynth sample BUNDLE --labels MAPPING`` does (:class:`medsynth.bundles.sampler.BundleSampler`).

A :class:`MaisiRunBackend` works on whole volumes (``generates_volumes``): the mask's affine decides the
work grid, so :class:`~medsynth.synthesis.synthesizer.Synthesizer` hands it the mask itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsynth.bundles.finetune_config import FitLimitsConfig
from medsynth.bundles.labels import LabelMapping
from medsynth.bundles.networks import load_networks
from medsynth.bundles.reader import FROZEN_KEYS, read_bundle
from medsynth.bundles.sampler import BundleSampler
from medsynth.data.nifti import Volume
from medsynth.errors import CheckpointError
from medsynth.runcard import RunCard

__all__ = ["MaisiRunBackend", "load_maisi_backend"]


@dataclass
class MaisiRunBackend:
    """A bundle sampler with the run's ControlNet; generates on the mask's own grid, in HU."""

    sampler: BundleSampler
    #: the Synthesizer pads nothing for it: the work grid is fitted to the bundle's sizes
    size_multiple: int = 1
    generates_volumes: bool = True

    def generate_volume(self, mask: Volume, seed: int, *, steps: int | None = None) -> Volume:
        """mask: a 3D label Volume of the run's dataset labels -> an image Volume in HU on its grid."""
        return self.sampler.generate(mask, seed, steps=steps)

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int], options: object) -> torch.Tensor:
        raise CheckpointError("a maisi_controlnet run generates on a mask's grid: Synthesizer.generate_volume")


def load_maisi_backend(card: RunCard, device: torch.device) -> MaisiRunBackend:
    """The backend of the ``maisi_controlnet`` run ``card``; CheckpointError naming the card's field or the
    bundle file for a missing bundle, a changed bundle or weights that do not fit."""
    facts = card.model
    root = facts.get("bundle")
    if not isinstance(root, str):
        raise CheckpointError(f"{card.path}: field 'model.bundle' is missing (has the training finished?)")
    if not Path(root).is_dir():
        raise CheckpointError(f"{card.path}: the run's bundle {root} is missing; the run samples with the "
                              "bundle it was trained on (put it back there)")
    bundle = read_bundle(root)
    recorded = facts.get("bundle_sha256")
    if not isinstance(recorded, dict) or set(recorded) != set(FROZEN_KEYS):
        raise CheckpointError(f"{card.path}: field 'model.bundle_sha256' is missing or incomplete")
    now = bundle.checksums(FROZEN_KEYS)
    for key in FROZEN_KEYS:
        if now[key] != recorded[key]:
            raise CheckpointError(f"{bundle.weights[key]}: changed since the run {card.run_dir} was trained "
                                  f"(sha256 {now[key]}, the run recorded {recorded[key]})")
    try:
        limits = FitLimitsConfig.model_validate(facts.get("limits") or {}).limits()
    except ValueError:
        raise CheckpointError(f"{card.path}: field 'model.limits' is not a set of sizes and spacings") from None
    mapping = LabelMapping.from_facts(facts.get("label_mapping"), str(card.path))
    missing = [v for v in card.labels if v not in mapping.values]
    if missing:
        raise CheckpointError(f"{card.path}: labels {missing} have no entry in field 'model.label_mapping'")
    networks = load_networks(bundle, device)
    card.load_into(networks.controlnet, card.read_weights(), "ControlNet")
    networks.controlnet.eval()
    steps = facts.get("sample_steps")
    names = {int(k): str(v) for k, v in card.data.label_names.items()}
    sampler = BundleSampler(bundle, networks, mapping, limits, dataset_names=names,
                            default_steps=int(steps) if isinstance(steps, int) else None)
    return MaisiRunBackend(sampler)

