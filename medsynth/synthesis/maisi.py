"""The synthesizer backend of a ``maisi_controlnet`` run: the bundle's networks with the run's ControlNet.

The run folder points at its bundle (``model.bundle`` of the run card; the bundle is never copied or
written). Loading reads the bundle as :func:`medsynth.bundles.reader.read_bundle` does, refuses it when the
sha256 of its autoencoder or UNet file differs from the one recorded at training, loads those two strictly
from the bundle and the ControlNet strictly from ``RUN/model.safetensors``. The label mapping and the
sampling limits come from the card, so a mask is generated in HU on its own grid exactly as
``medsynth sample BUNDLE --labels MAPPING`` does (:class:`medsynth.bundles.sampler.BundleSampler`).

A :class:`MaisiRunBackend` works on whole volumes (``generates_volumes``): the mask's affine decides the
work grid, so :class:`~medsynth.synthesis.synthesizer.Synthesizer` hands it the mask itself.

A bundle used as it is (``medsynth augment --method ldm --model BUNDLE --labels MAPPING``) gets the same
backend with the bundle's own ControlNet and a card made from the bundle and the mapping
(:func:`bundle_card`, :func:`bundle_synthesizer`): nothing is written into the bundle folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsynth.bundles.finetune_config import FitLimitsConfig
from medsynth.bundles.labels import LabelMapping, read_mapping
from medsynth.bundles.networks import load_networks
from medsynth.bundles.reader import FROZEN_KEYS, WEIGHT_KEYS, read_bundle
from medsynth.bundles.sampler import HU_RANGE, BundleSampler
from medsynth.data.ledger import sha256_file
from medsynth.data.loader import DataInfo, Normalization
from medsynth.data.nifti import Volume
from medsynth.errors import CheckpointError, ConfigError
from medsynth.runcard import RunCard
from medsynth.synthesis.synthesizer import Synthesizer

__all__ = ["BUNDLE_METHOD", "MaisiRunBackend", "bundle_card", "bundle_inputs", "bundle_synthesizer",
           "load_maisi_backend"]

#: the augment method a bundle used as it is stands for: a pretrained latent diffusion model
BUNDLE_METHOD = "ldm"


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



def bundle_card(root: str | Path, mapping_path: str | Path) -> RunCard:
    """A card for a bundle used as it is (no run folder): family :data:`BUNDLE_METHOD`, the mapping's dataset
    labels, one CT channel in HU (``ct_window`` -1000..1000), and in ``model`` the bundle, the sha256 of its
    weights files and the mapping. Nothing is written."""
    bundle = read_bundle(root)
    mapping = read_mapping(mapping_path, bundle)
    labels = sorted(mapping.values)
    info = DataInfo(dim=3, slice_axis=2, volume_ndim=3, size=[], labels=labels,
                    label_names={v: mapping.names.get(v, f"label_{v}") for v in labels}, channels=["CT"],
                    classes=[], spacing=None,
                    normalization=Normalization("ct_window", [HU_RANGE[0]], [HU_RANGE[1]]))
    model = {"bundle": str(bundle.root.resolve()), "bundle_layout": bundle.layout, "bundle_version": bundle.version,
             "label_mapping": mapping.to_facts(), "labels_file": str(Path(mapping_path).resolve()), "weights": None}
    return RunCard(run_dir=bundle.root.resolve(), family=BUNDLE_METHOD, config={}, data=info, steps=0,
                   final_losses={}, model=model)


def bundle_inputs(card: RunCard) -> dict[str, str]:
    """The files a :func:`bundle_card` card stands on, path -> sha256: the bundle's configs, its three weights
    files and the mapping file (a resumed augment job refuses any that changed)."""
    bundle = read_bundle(card.model["bundle"])
    files = [bundle.config_path, bundle.root / "configs" / "label_dict.json", *(bundle.weights[k] for k in WEIGHT_KEYS),
             Path(card.model["labels_file"])]
    return {str(f): sha256_file(f) for f in files}


def bundle_synthesizer(root: str | Path, mapping_path: str | Path, device: str = "auto") -> Synthesizer:
    """A Synthesizer of the bundle at ``root`` with its own ControlNet and the mapping file: images in HU on
    each mask's grid (the published limits, the bundle's sampler steps)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {device!r}")
    card = bundle_card(root, mapping_path)
    sampler = BundleSampler.from_bundle(root, mapping_path, device=device)
    sampler.dataset_names = dict(card.data.label_names)
    return Synthesizer(card, MaisiRunBackend(sampler), sampler.device)
