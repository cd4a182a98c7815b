"""Generate a CT image for a user's mask with a bundle's networks: mask -> bundle labels -> image in HU.

Stages of :meth:`BundleSampler.generate` (MAISI's own image sampling, ``ldm_conditional_sample_one_image``
of the bundle's ``scripts/sample.py``, on MONAI 1.6's classes):
  1. the mask's labels -> the bundle's vocabulary (:mod:`medsynth.bundles.labels`), body label 200 added;
  2. the mask resampled (nearest) onto a work grid within the bundle's limits (:mod:`medsynth.bundles.geometry`);
  3. the label map as 8 binary channels (bit k of each value: MAISI's ``binarize_labels``), the ControlNet's input;
  4. latents from a generator seeded by ``seed``, denoised by the scheduler (rflow: timesteps shifted for the
     latent size; the UNet takes the spacing x 100, the modality class 1 (CT) when it has class embeddings,
     and the ddpm layout's body-region indices);
  5. decoded, clipped to [0, 1] and mapped to HU (-1000 .. 1000), background (label 0) set to -1000;
  6. resampled (linear) back onto the mask's own grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.bundles import geometry
from medsynth.bundles.geometry import FitLimits, WorkGrid, fit_grid
from medsynth.bundles.labels import LabelMapping, add_body, apply_mapping, read_mapping
from medsynth.bundles.networks import MaisiNetworks, build, load_networks
from medsynth.bundles.reader import Bundle, read_bundle
from medsynth.data.nifti import Volume
from medsynth.devices import resolve_device
from medsynth.errors import ConfigError

__all__ = ["HU_RANGE", "BundleSampler", "binarize_labels", "downsample_factor", "unet_conditions"]

#: MAISI's CT intensity window: the autoencoder's [0, 1] is this range in HU
HU_RANGE = (-1000.0, 1000.0)
#: the modality class of CT (``configs/modality_mapping.json`` of MAISI: "ct": 1)
CT_MODALITY = 1
#: default sampler steps per layout (the bundles' ``num_inference_steps``: rflow 30; ddpm 1000)
DEFAULT_STEPS = {"rflow": 30, "ddpm": 1000}
#: ddpm layout: body-region one-hots (head, chest, abdomen, pelvis) x 100 for the top and bottom of the volume
DDPM_REGION = ((0.0, 0.0, 100.0, 0.0), (0.0, 0.0, 100.0, 0.0))


def binarize_labels(labels: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``(N, 1, *spatial)`` integer labels 0..255 -> ``(N, bits, *spatial)`` float: channel k is bit k."""
    shifts = torch.arange(bits, device=labels.device).view(1, bits, *([1] * (labels.ndim - 2)))
    return ((labels.long() >> shifts) & 1).float()


def unet_conditions(bundle: Bundle, spacings: Sequence[Sequence[float]], device: torch.device) -> dict[str, torch.Tensor]:
    """The UNet's extra inputs for volumes of RAS ``spacings`` (mm, one per volume): spacing x 100, the
    modality class (CT) when the UNet has class embeddings, the ddpm layout's body-region indices."""
    n = len(spacings)
    out = {"spacing_tensor": torch.tensor([[float(s) * 100.0 for s in sp] for sp in spacings], device=device)}
    if bundle.unet.kwargs.get("num_class_embeds"):
        out["class_labels"] = torch.full((n,), CT_MODALITY, dtype=torch.long, device=device)
    if bundle.unet.kwargs.get("include_top_region_index_input"):
        out["top_region_index_tensor"] = torch.tensor([DDPM_REGION[0]] * n, device=device)
        out["bottom_region_index_tensor"] = torch.tensor([DDPM_REGION[1]] * n, device=device)
    return out


def downsample_factor(bundle: Bundle) -> int:
    """Image voxels per latent voxel (autoencoder) times the UNet's downsampling: sizes must be multiples."""
    ae = 2 ** (len(bundle.autoencoder.kwargs["num_channels"]) - 1)
    unet = 2 ** (len(bundle.unet.kwargs["num_channels"]) - 1)
    return int(ae * unet)


@dataclass
class BundleSampler:
    """A bundle's networks with a label mapping, ready to generate."""

    bundle: Bundle
    networks: MaisiNetworks
    mapping: LabelMapping
    limits: FitLimits = field(default_factory=lambda: geometry.MAISI_LIMITS)
    dataset_names: dict[int, str] | None = None
    #: sampler steps when ``generate`` is given none (None: the layout's :data:`DEFAULT_STEPS`)
    default_steps: int | None = None

    @classmethod
    def from_bundle(cls, root: str | Path, mapping: str | Path, *, device: str = "auto",
                    limits: FitLimits | None = None) -> BundleSampler:
        """Read the bundle at ``root`` and the mapping file, load the weights on ``device`` (auto, cpu, cuda)."""
        device = resolve_device(device)
        bundle = read_bundle(root)
        label_map = read_mapping(mapping, bundle)
        limits = limits or geometry.MAISI_LIMITS  # read at call time: the published limits
        limits.check(downsample_factor(bundle))
        return cls(bundle, load_networks(bundle, torch.device(device)), label_map, limits)

    @property
    def device(self) -> torch.device:
        return self.networks.device

    def work_labels(self, mask: Volume) -> tuple[np.ndarray, WorkGrid]:
        """Stages 1-2: the mask as bundle labels (body added) on the work grid (RAS order), and the grid."""
        where = str(mask.path) if mask.path is not None else "mask"
        arr = np.asarray(mask.array)
        grid = fit_grid(arr.shape, mask.affine, self.limits)
        mapped = apply_mapping(arr, self.mapping, where, self.dataset_names)
        if self.mapping.body == "outline":
            mapped = add_body(mapped, z_axis=grid.order[2])
        return grid.to_work(mapped), grid

    def generate(self, mask: Volume, seed: int = 0, *, steps: int | None = None) -> Volume:
        """mask: a 3D label Volume -> an image Volume in HU (float32) on the mask's grid and affine."""
        labels, grid = self.work_labels(mask)
        hu = self.generate_work(labels, grid.spacing, seed, steps=steps)
        image = np.clip(grid.to_mask(hu), *HU_RANGE).astype(np.float32)
        return Volume(array=image, affine=np.array(mask.affine, np.float64), path=None, header={})

    def _scheduler(self, steps: int, latent_numel: int) -> Any:
        scheduler = build(self.bundle.scheduler, torch.device("cpu"))
        if self.bundle.layout == "rflow":
            scheduler.set_timesteps(num_inference_steps=steps, device=self.device, input_img_size_numel=latent_numel)
        else:
            scheduler.set_timesteps(num_inference_steps=steps, device=self.device)
        return scheduler

    def conditions(self, spacing: tuple[float, ...], n: int = 1) -> dict[str, torch.Tensor]:
        """The UNet's extra inputs for ``n`` volumes of one ``spacing`` (:func:`unet_conditions`)."""
        return unet_conditions(self.bundle, [spacing] * n, self.device)

    @torch.no_grad()
    def generate_work(self, labels: np.ndarray, spacing: tuple[float, ...], seed: int, *,
                      steps: int | None = None) -> np.ndarray:
        """Stages 3-5 on the work grid: ``labels`` (X, Y, Z) bundle values -> image (X, Y, Z) float32 in HU."""
        nets, dev = self.networks, self.device
        steps = int(steps or self.default_steps or DEFAULT_STEPS[self.bundle.layout])
        if steps < 1:
            raise ConfigError(f"steps: must be at least 1, got {steps}")
        factor = 2 ** (len(self.bundle.autoencoder.kwargs["num_channels"]) - 1)
        lab = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))[None, None].to(dev)
        # 3. the ControlNet's input
        cond = binarize_labels(lab)
        # 4. latents, denoised
        latent_shape = (1, self.bundle.latent_channels, *(s // factor for s in labels.shape))
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        latents = torch.randn(latent_shape, generator=gen).to(dev)
        scheduler = self._scheduler(steps, int(np.prod(latent_shape[2:])))
        extra = self.conditions(spacing)
        control_extra = {"class_labels": extra["class_labels"]} if "class_labels" in extra else {}
        autocast = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else contextlib.nullcontext()
        timesteps = scheduler.timesteps
        nexts = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))
        step_gen = torch.Generator(device=dev).manual_seed(int(seed) + 1)
        with autocast:
            for t, t_next in zip(timesteps, nexts):
                tt = torch.full((1,), float(t), device=dev)
                down, mid = nets.controlnet(x=latents, timesteps=tt, controlnet_cond=cond, **control_extra)
                pred = nets.unet(x=latents, timesteps=tt, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid, **extra)
                if self.bundle.layout == "rflow":
                    latents, _ = scheduler.step(pred.float(), t, latents, t_next)
                else:
                    latents, _ = scheduler.step(pred.float(), int(t), latents, generator=step_gen)
            # 5. decode, HU, background
            image = nets.autoencoder.decode_stage_2_outputs(latents / nets.scale_factor)
        unit = torch.clip(image.float(), 0.0, 1.0)[0, 0]
        hu = unit * (HU_RANGE[1] - HU_RANGE[0]) + HU_RANGE[0]
        hu[lab[0, 0] == 0] = HU_RANGE[0]
        return hu.cpu().numpy().astype(np.float32)


def sample_file(bundle: str | Path, mapping: str | Path | None, mask: str | Path, *, seed: int = 0,
                steps: int | None = None, device: str = "auto") -> tuple[Volume, Volume]:
    """``medsynth sample BUNDLE --labels MAPPING --mask MASK``: (the mask as read, the image in HU on its grid)."""
    from medsynth.data.nifti import read_volume

    if mapping is None:
        raise ConfigError(f"{bundle}: a bundle needs --labels MAPPING (the dataset's labels -> the bundle's names; "
                          "`medsynth bundle-labels BUNDLE --data DATASET --out MAPPING` writes a first one)")
    sampler = BundleSampler.from_bundle(bundle, mapping, device=device)
    label = read_volume(mask, kind="label")
    return label, sampler.generate(label, seed, steps=steps)


def write_mapping_file(bundle: str | Path, dataset: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """``medsynth bundle-labels``: a first mapping of ``dataset``'s label names onto the bundle's, written to ``out``."""
    from medsynth.bundles.labels import mapping_text, suggest_mapping
    from medsynth.data.atomic import atomic_write_text
    from medsynth.data.manifest import read_manifest
    from medsynth.errors import DataError, JobError

    out = Path(out)
    if out.exists() and not overwrite:
        raise JobError(f"{out}: exists; pass --overwrite to replace it")
    read = read_bundle(bundle)
    manifest = read_manifest(dataset)
    if not manifest.labels:
        raise DataError(f"{dataset}: the manifest names no labels (a CSV manifest cannot); write the mapping by hand")
    text = mapping_text(suggest_mapping(dict(manifest.labels), read), read, str(dataset))
    atomic_write_text(out, text)
    return out
