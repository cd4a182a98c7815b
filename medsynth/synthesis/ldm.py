"""Sampling from a trained latent diffusion run: mask -> latents -> image.

:class:`LatentDiffusionPipeline` loads ``RUN/model.safetensors`` (``autoencoder.*`` and EMA
``unet.*`` weights, read as tensors only) and ``RUN/model_card.json`` (recipe, data facts, scale
factor, sampler defaults), and turns one-hot masks into images in [0, 1]. Geometry (reading the mask,
label values -> channels, slices of a 3D mask for a 2D run, intensity units, writing) is the
:class:`~medsynth.synthesis.synthesizer.Synthesizer`'s job; this module works on tensors.

Stages of :meth:`LatentDiffusionPipeline.__call__`:
  1. pad the mask with background up to a multiple of the networks' downsampling (autoencoder x UNet);
  2. sample scaled latents with the chosen sampler (noise from a CPU generator seeded by ``seed``;
     on CUDA the UNet forward is captured once in a CUDA graph and replayed at each step);
  3. unscale and decode in float32 (in overlapping latent tiles when ``model.autoencoder.decode_tile``
     is set), and add the label-mean fill for a ``model.fill: residual`` run;
  4. crop back to the mask's size and clamp to [0, 1].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.config import LdmModelConfig
from medsynth.diffusion import (
    SAMPLERS,
    Condition,
    NoiseProcess,
    Sampler,
    make_process,
    sample_latents,
    size_multiple,
    use_flash,
)
from medsynth.errors import CheckpointError, ConfigError
from medsynth.runcard import RunCard

if TYPE_CHECKING:  # pragma: no cover
    from monai.networks.nets import AutoencoderKL

    from medsynth.models.diffusion import MaskConditionedUNet
    from medsynth.synthesis.synthesizer import GenerationOptions


@dataclass
class SamplingDefaults:
    """The recipe's sampling settings (each overridable per call)."""

    sampler: Sampler
    steps: int
    guidance: float


class LatentDiffusionPipeline:
    """Autoencoder + conditioned UNet + noise process of one run, in eval mode on ``device``.

    Call it with ``mask (N, L, *spatial)`` one-hot float over the run's labels and optional
    ``class_labels (N,)`` to get images ``(N, C, *spatial)`` in [0, 1].
    """

    def __init__(self, autoencoder: AutoencoderKL, unet: MaskConditionedUNet, process: NoiseProcess, *,
                 scale_factor: float, factor: int, multiple: int, latent_channels: int, defaults: SamplingDefaults,
                 decode_tile: int | None = None, decode_overlap: float = 0.25, can_guide: bool = True,
                 residual: bool = False, per_case_appearance: bool = False) -> None:
        self.autoencoder = autoencoder.eval()
        self.unet = unet.eval()
        self.process = process
        self.scale_factor = float(scale_factor)
        self.factor = int(factor)
        self.multiple = int(multiple)
        self.latent_channels = int(latent_channels)
        self.defaults = defaults
        self.decode_tile = decode_tile
        self.decode_overlap = decode_overlap
        self.can_guide = can_guide
        self.residual = residual
        #: trained on a per-case fill (model.appearance: per_case): ``generate`` takes the label means
        #: of the image (``appearance``)
        self.per_case_appearance = per_case_appearance
        self.cuda_graph = True  # on CUDA: replay one captured UNet forward per step
        self.num_labels = int(unet.num_labels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_card(cls, card: RunCard, device: torch.device) -> LatentDiffusionPipeline:
        """Build the networks of the card's recipe and load the run's weights; the card's model facts give
        the scale factor, classes and sampling defaults."""
        from medsynth.models.autoencoder import build_autoencoder, downsample_factor
        from medsynth.models.diffusion import MaskConditionedUNet

        model = card.model_config(LdmModelConfig, "latent diffusion")
        info, facts = card.data, card.model
        tensors = card.read_weights()
        flash = use_flash(model, device)
        fill = str(facts.get("fill", "none"))
        if fill != "none" and info.label_means is None:
            raise CheckpointError(f"{card.path}: the run was trained with model.fill {fill!r} but its card has no "
                                  "data.label_means")
        with torch.random.fork_rng(devices=[]):  # initial values are overwritten; keep global RNG as it was
            ae = build_autoencoder(model.autoencoder, spatial_dims=info.dim, in_channels=info.num_channels,
                                   use_flash_attention=flash)
            unet = MaskConditionedUNet(model.diffusion, spatial_dims=info.dim,
                                       latent_channels=model.autoencoder.latent_channels,
                                       num_labels=info.num_labels, num_classes=int(facts.get("num_classes", 0)),
                                       downsample_factor=downsample_factor(model.autoencoder),
                                       use_flash_attention=flash,
                                       label_means=info.label_means if fill != "none" else None,
                                       fill_sigma=info.fill_sigma)
        for prefix, net in (("autoencoder.", ae), ("unet.", unet)):
            card.load_into(net, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                           prefix.rstrip("."))
        process = make_process(model.diffusion, info.dim, facts.get("base_numel"))
        defaults = SamplingDefaults(facts.get("sampler", model.diffusion.sampler),
                                    int(facts.get("sample_steps", model.diffusion.sample_steps)),
                                    float(facts.get("guidance", model.diffusion.guidance)))
        return cls(ae.to(device), unet.to(device), process, scale_factor=facts["scale_factor"],
                   factor=downsample_factor(model.autoencoder), multiple=size_multiple(model),
                   latent_channels=model.autoencoder.latent_channels, defaults=defaults,
                   decode_tile=model.autoencoder.decode_tile, decode_overlap=model.autoencoder.decode_overlap,
                   can_guide=float(facts.get("cond_dropout", model.diffusion.cond_dropout)) > 0,
                   residual=fill == "residual",
                   per_case_appearance=dict(facts.get("appearance") or {}).get("fill") == "per_case")

    def resolve(self, sampler: str | None, steps: int | None, guidance: float | None) -> SamplingDefaults:
        """Per-call settings over the recipe's defaults, checked (ConfigError names the option)."""
        s = self.defaults.sampler if sampler is None else sampler
        k = self.defaults.steps if steps is None else int(steps)
        g = self.defaults.guidance if guidance is None else float(guidance)
        if s not in SAMPLERS:
            raise ConfigError(f"--sampler: must be one of {', '.join(SAMPLERS)}, got {s!r}")
        if k < 1:
            raise ConfigError(f"--steps: must be at least 1, got {k}")
        if not g >= 0:
            raise ConfigError(f"--guidance: must be >= 0, got {g}")
        if g != 1.0 and not self.can_guide:
            raise ConfigError("--guidance: this run was trained without condition dropout "
                              "(model.diffusion.cond_dropout: 0), so it cannot use guidance other than 1")
        sampler_name = cast(Sampler, s)
        self.process.timesteps(sampler_name, k, (1, 1, *([1] * self.process.spatial_dims)))  # validates steps
        return SamplingDefaults(sampler_name, k, g)

    @property
    def size_multiple(self) -> int:
        """Mask sides are padded to a multiple of this (autoencoder and UNet downsampling)."""
        return self.multiple

    @torch.no_grad()
    def __call__(self, mask: torch.Tensor, *, class_labels: torch.Tensor | None = None,
                 seed: int | list[int] = 0, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, label_means: torch.Tensor | None = None) -> torch.Tensor:
        """mask: ``(N, L, *spatial)`` one-hot float; class_labels: ``(N,)`` long or None; seed: one
        seed for the batch, or one per item (an item's image then depends only on its own seed);
        label_means: ``(N, C, L)`` the fill means of a per-case run (None: the pooled ones).
        Returns ``(N, C, *spatial)`` float32 in [0, 1] on the CPU."""
        opts = self.resolve(sampler, steps, guidance)
        if isinstance(seed, (list, tuple)):
            generator: torch.Generator | list[torch.Generator] = [torch.Generator().manual_seed(int(s)) for s in seed]
        else:
            generator = torch.Generator().manual_seed(int(seed))
        return self._generate(mask, class_labels, opts, generator, label_means)

    #: ``generate`` reports the share done through ``progress`` (see the Synthesizer's Backend)
    reports_progress = True

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int],
                 options: GenerationOptions, progress: Callable[[float], None] | None = None,
                 appearance: np.ndarray | None = None) -> torch.Tensor:
        """The Synthesizer's backend call: index ``(N, *spatial)`` int64 label channels, class_index
        ``(N,)``, one seed per item, options ``steps``/``sampler``/``guidance`` (None: the run's
        defaults) -> ``(N, C, *spatial)`` float in [0, 1]. progress: called with the share done after
        each UNet forward (the steps make 90%, the decoder the rest; a CUDA-graph replay reports none).
        appearance (a per-case run): ``(C, L)`` label means in [0, 1] units for every item, or ``(N, C, L)``
        one per item (None: the pooled ones)."""
        from medsynth.data.loader import one_hot

        mask = one_hot(index.long(), self.num_labels)
        labels = class_index.long() if self.unet.num_classes > 0 else None
        handle = None
        if progress is not None:
            steps = max(1, self.resolve(options.get("sampler"), options.get("steps"), options.get("guidance")).steps)
            calls = [0]

            def after(*_: object) -> None:
                calls[0] += 1
                progress(min(0.9, 0.9 * calls[0] / steps))

            handle = self.unet.register_forward_hook(after)
        try:
            means = None if appearance is None else \
                torch.as_tensor(appearance, dtype=torch.float32).expand(len(seeds), -1, -1)
            return self(mask, class_labels=labels, seed=[int(s) for s in seeds], sampler=options.get("sampler"),
                        steps=options.get("steps"), guidance=options.get("guidance"), label_means=means)
        finally:
            if handle is not None:
                handle.remove()

    def _generate(self, mask: torch.Tensor, class_labels: torch.Tensor | None, opts: SamplingDefaults,
                  generator: torch.Generator | list[torch.Generator],
                  label_means: torch.Tensor | None = None) -> torch.Tensor:
        from medsynth.models.autoencoder import decode

        dev = self.device
        spatial = tuple(mask.shape[2:])
        # 1. pad with background to a multiple of the downsampling factor
        pads = [(-s) % self.multiple for s in spatial]
        mask = mask.to(dev, torch.float32)
        if any(pads):
            flat = [p for pad in reversed(pads) for p in (0, pad)]
            # channel 0 is the background: keep the mask's own, and fill the padding with it
            mask = torch.cat([F.pad(mask[:, :1], flat, value=1.0), F.pad(mask[:, 1:], flat, value=0.0)], dim=1)
        latent = (mask.shape[0], self.latent_channels, *(s // self.factor for s in mask.shape[2:]))
        labels = class_labels.to(dev).long() if class_labels is not None else None
        if labels is None and self.unet.num_classes > 0:
            labels = torch.full((mask.shape[0],), self.unet.null_class, dtype=torch.long, device=dev)
        means = None if label_means is None else label_means.to(dev, torch.float32)
        cond = Condition(mask=mask, class_labels=labels, label_means=means)
        null = Condition(*self.unet.null_condition(mask, labels))
        # 2. latents
        amp = torch.bfloat16 if dev.type == "cuda" else None

        def sample(cuda_graph: bool) -> torch.Tensor:
            return sample_latents(self.unet, cond, latent, process=self.process, sampler=opts.sampler,
                                  steps=opts.steps, guidance=opts.guidance, generator=generator, null=null,
                                  autocast_dtype=amp, cuda_graph=cuda_graph)

        if self.cuda_graph and dev.type == "cuda":
            gens = generator if isinstance(generator, list) else [generator]
            states = [g.get_state() for g in gens]
            try:
                z = sample(cuda_graph=True)
            except RuntimeError as exc:  # an op that cannot be captured: run eagerly from the same draws
                warnings.warn(f"CUDA graph capture failed ({str(exc).splitlines()[0][:120]}); sampling eagerly",
                              stacklevel=3)
                self.cuda_graph = False
                for g, st in zip(gens, states):
                    g.set_state(st)
                z = sample(cuda_graph=False)
        else:
            z = sample(cuda_graph=False)
        # 3. decode in float32 (bf16 keeps about 8 bits of intensity), add the fill, 4. crop and clamp
        image = decode(self.autoencoder, z.float() / self.scale_factor, tile=self.decode_tile,
                       overlap=self.decode_overlap).float()
        if self.residual:
            image = image + self.unet.fill_of(mask, means)
        crop = (slice(None), slice(None), *(slice(0, s) for s in spatial))
        return image[crop].clamp(0.0, 1.0).cpu()


def load_ldm_backend(card: RunCard, device: torch.device) -> LatentDiffusionPipeline:
    """The registry's backend loader of ``family: ldm``."""
    if "scale_factor" not in card.model:
        raise CheckpointError(f"{card.run_dir}: the diffusion stage has not finished (no scale factor in the "
                              "model card); train it first")
    return LatentDiffusionPipeline.from_card(card, torch.device(device))
