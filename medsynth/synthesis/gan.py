"""Generating with a trained GAN run: the SPADE generator from ``RUN/model.safetensors``.

The synthesizer's backend for ``family: gan`` (see :mod:`medsynth.synthesis.synthesizer`): tensors
in, tensors out; geometry and intensity units are the Synthesizer's job.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from medsynth.config import GanModelConfig
from medsynth.errors import CheckpointError, ConfigError
from medsynth.runcard import RunCard
from medsynth.synthesis.tiling import TileSettings, receptive_radius, tiled_forward

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
        #: volumes above ``tiling.max_voxels`` are generated tile by tile (:mod:`medsynth.synthesis.tiling`)
        self.tiling = TileSettings()
        #: trained on a per-case fill: ``generate`` takes the label means of the image (``appearance``)
        self.per_case_appearance = model_cfg.generator.appearance == "per_case"

    #: ``generate`` reports the share done through ``progress`` (see the Synthesizer's Backend)
    reports_progress = True

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int],
                 options: GenerationOptions, progress: Callable[[float], None] | None = None,
                 appearance: np.ndarray | None = None) -> torch.Tensor:
        """index ``(N, *spatial)`` int64 label channels, class_index ``(N,)``, one seed per item (it
        alone draws the item's noise maps) -> ``(N, C, *spatial)`` float in [0, 1]. Iterative-sampling
        options have no effect (a warning names the ones given). progress: called with the share of
        the work done after each generator block (weighted by its voxels x channels). A volume of
        more than ``tiling.max_voxels`` voxels is generated in blended tiles with the whole volume's
        norm statistics (:mod:`medsynth.synthesis.tiling`). appearance:
        ``(C, L)`` label means in [0, 1] units the fill paints for every item, or ``(N, C, L)`` one per
        item (None: the pooled ones)."""
        from medsynth.data.loader import one_hot
        from medsynth.models.gan import condition_map

        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            warnings.warn(f"generation options {given} have no effect on a GAN", stacklevel=3)
        spatial = tuple(index.shape[1:])
        draws = [self.net.draw_noise(1, spatial, torch.Generator().manual_seed(s)) for s in seeds]
        noise = torch.cat([d[0] for d in draws]).to(self.device)
        levels = [torch.cat([d[1][k] for d in draws]).to(self.device) for k in range(len(draws[0][1]))]
        means = None if appearance is None else \
            torch.as_tensor(appearance, dtype=torch.float32, device=self.device).expand(len(seeds), -1, -1)
        classes = class_index.to(self.device)

        def run(box: tuple[slice, ...]) -> torch.Tensor:
            # the generator on one box of the volume: every input cropped to it (each at its own grid)
            def crop(t: torch.Tensor) -> torch.Tensor:
                return t[(slice(None), slice(None)) + tuple(
                    slice(b.start * n // s, b.stop * n // s) for b, n, s in zip(box, t.shape[2:], spatial))]

            cond = condition_map(one_hot(index[(slice(None),) + box].to(self.device), self.info.num_labels),
                                 classes, self.info.num_classes)
            return self.net(cond, crop(noise), [crop(level) for level in levels] or None, means)

        whole = tuple(slice(0, s) for s in spatial)
        with torch.no_grad():
            if int(np.prod(spatial)) <= self.tiling.max_voxels:
                with _block_progress(self.net, progress):
                    out = run(whole)
            else:
                radius = receptive_radius(len(self.net.blocks), self.net.fill_sigma)
                out = tiled_forward(self.net, run, spatial, self.net.factor, self.tiling, radius, progress)
        return (out.float() * 0.5 + 0.5).clamp(0.0, 1.0)


@contextlib.contextmanager
def _block_progress(net: torch.nn.Module, progress: Callable[[float], None] | None) -> Iterator[None]:
    """While open, ``progress(share)`` after each convolution of the generator, its share the
    multiply-adds it does: ``cin x cout x kernel`` times its voxels, block k working at ``2^k`` times
    the noise map's side (``conv_in`` at the first block's size, ``conv_out`` at the last's)."""
    blocks = list(getattr(net, "blocks", []))
    if progress is None or not blocks:
        yield
        return
    per_level = 2 ** int(getattr(net, "spatial_dims", 3))
    levels = [(getattr(net, "conv_in", None), 0), *((b, k) for k, b in enumerate(blocks)),
              (getattr(net, "conv_out", None), len(blocks) - 1)]
    weights: dict[torch.nn.Module, float] = {}
    for module, level in levels:
        if module is None:
            continue
        for conv in module.modules():
            if isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)):
                kernel = float(np.prod(conv.kernel_size))
                weights[conv] = per_level ** level * conv.in_channels * conv.out_channels * kernel / conv.groups
    total, done = sum(weights.values()) or 1.0, [0.0]

    def after(module: torch.nn.Module, args: object, output: object, w: float = 0.0) -> None:
        done[0] += w
        progress(min(1.0, done[0] / total))

    handles = [c.register_forward_hook(functools.partial(after, w=w)) for c, w in weights.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def load_gan_backend(card: RunCard, device: torch.device) -> GanBackend:
    """The registry's backend loader of ``family: gan``."""
    return GanBackend(card, device)
