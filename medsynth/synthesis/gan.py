"""Generating with a trained GAN run: the SPADE generator from ``RUN/model.safetensors``.

The synthesizer's backend for ``family: gan`` (see :mod:`medsynth.synthesis.synthesizer`): tensors
in, tensors out; geometry and intensity units are the Synthesizer's job.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from medsynth.config import GanModelConfig
from medsynth.errors import CheckpointError, ConfigError
from medsynth.runcard import RunCard

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.synthesis.synthesizer import GenerationOptions

__all__ = ["GanBackend", "load_gan_backend"]


class GanBackend:
    """The run's SPADE generator in eval mode on ``device``."""

    def __init__(self, card: RunCard, device: torch.device) -> None:
        from medsynth.models.gan import build_generator

        self.info = card.data
        self.device = device
        model_cfg = card.model_config(GanModelConfig, "GAN")
        state = card.read_weights()
        with torch.random.fork_rng(devices=[]):  # initial values are overwritten; keep the global RNG
            try:
                self.net = build_generator(model_cfg, self.info)
            except ConfigError as exc:
                raise CheckpointError(f"{card.path}: {exc} (a run of an older medsynth: train it again)") from None
        card.load_into(self.net, state, "generator")
        self.net.to(device).eval().requires_grad_(False)
        self.size_multiple = self.net.factor

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int],
                 options: GenerationOptions) -> torch.Tensor:
        """index ``(N, *spatial)`` int64 label channels, class_index ``(N,)``, one seed per item (it
        alone draws the item's noise map) -> ``(N, C, *spatial)`` float in [0, 1]. Iterative-sampling
        options have no effect (a warning names the ones given)."""
        from medsynth.data.loader import one_hot
        from medsynth.models.gan import condition_map

        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            warnings.warn(f"generation options {given} have no effect on a GAN", stacklevel=3)
        spatial = tuple(index.shape[1:])
        noise = torch.stack([
            torch.randn(self.net.noise_shape(spatial), generator=torch.Generator().manual_seed(s)) for s in seeds
        ]).to(self.device)
        cond = condition_map(one_hot(index.to(self.device), self.info.num_labels),
                             class_index.to(self.device), self.info.num_classes)
        with torch.no_grad():
            out = self.net(cond, noise)
        return (out.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def load_gan_backend(card: RunCard, device: torch.device) -> GanBackend:
    """The registry's backend loader of ``family: gan``."""
    return GanBackend(card, device)
