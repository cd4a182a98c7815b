"""Stage 2 of latent diffusion: a MONAI diffusion UNet conditioned on the label map, 2D or 3D.

:class:`MaskConditionedUNet` wraps one of three MONAI conditioning schemes behind one call
``net(z_t, t, mask, class_labels) -> prediction``:

- ``concat``: the one-hot mask resampled to the latent grid (``area``: the fraction of each label
  inside a latent voxel; ``nearest``: one voxel's label) is concatenated to the noisy latent
  (``DiffusionModelUNet`` with ``latent_channels + num_labels`` inputs);
- ``controlnet``: a MONAI ``ControlNet`` reads the full-resolution one-hot mask (its embedding
  downsamples by the autoencoder's factor) and adds residuals to a base ``DiffusionModelUNet``
  (both trained together; the ControlNet starts as a copy of the base, as in MONAI's tutorial);
- ``spade``: ``SPADEDiffusionModelUNet``, whose normalisation layers are modulated by the mask
  (given on the latent grid, resampled as for ``concat``).

With ``fill`` on, the label-mean fill of the mask (:func:`medsynth.models.conditioning.fill_image`,
C channels from the buffer ``label_means``) joins the mask as conditioning channels wherever the
mask goes (concatenated on the latent grid, in the SPADE map, in the ControlNet's input).

Optional class conditioning (``num_classes > 0``, from ``data.class_key``) uses MONAI's class embedding with one extra
"null" class. Classifier-free guidance drops the conditions: the null condition is an all-zero
mask and the null class, see :meth:`MaskConditionedUNet.null_condition` (its fill is zero too).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from medsynth.models.conditioning import fill_image, resize_condition

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import LdmDiffusionConfig


def resample_mask(mask: torch.Tensor, size: tuple[int, ...], mode: str = "area") -> torch.Tensor:
    """One-hot (or soft) mask ``(N, L, *spatial)`` -> ``(N, L, *size)``.

    ``area`` gives each label's fraction of the voxels under a latent voxel (rows still sum to 1);
    ``nearest`` keeps a one-hot map by picking the voxel nearest each latent voxel's centre
    (``nearest-exact``; plain ``nearest`` would shift the mask by ``(f - 1) / 2`` voxels).
    """
    if tuple(mask.shape[2:]) == tuple(size):
        return mask
    if mode == "area":
        return resize_condition(mask, size)
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest-exact")
    raise ValueError(f"mask resample mode must be 'area' or 'nearest', got {mode!r}")


class MaskConditionedUNet(nn.Module):
    """Predicts the diffusion target for noisy latents given a label map.

    Args:
        cfg: the recipe's ``model.diffusion`` section.
        spatial_dims: 2 or 3.
        latent_channels: channels of the autoencoder's latent.
        num_labels: channels of the one-hot mask (background included).
        num_classes: class conditioning with this many classes (0: off; one more "null" class is
            embedded for classifier-free guidance).
        downsample_factor: image voxels per latent voxel along each axis (a power of 2).
        use_flash_attention: PyTorch SDPA in MONAI's attention blocks.
        label_means: ``(C, L)`` per-label mean training intensities in [0, 1] units: turns on the
            fill conditioning (None: off).
        fill_sigma: the fill's partial-volume blur in voxels (``DataInfo.fill_sigma``).
    """

    label_means: torch.Tensor  # a buffer: (C, L), when the fill conditioning is on

    def __init__(
        self,
        cfg: LdmDiffusionConfig,
        *,
        spatial_dims: int,
        latent_channels: int,
        num_labels: int,
        num_classes: int = 0,
        downsample_factor: int,
        use_flash_attention: bool = False,
        label_means: list[list[float]] | None = None,
        fill_sigma: float = 0.0,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ControlNet, DiffusionModelUNet, SPADEDiffusionModelUNet

        self.conditioning = cfg.conditioning
        self.mask_resample = cfg.mask_resample
        self.num_labels = num_labels
        self.num_classes = num_classes
        self.fill = label_means is not None
        self.fill_sigma = float(fill_sigma)
        cond_channels = num_labels
        if label_means is not None:  # a buffer only then: runs without the fill keep their weight names
            means = torch.tensor(label_means, dtype=torch.float32)
            if means.ndim != 2 or means.shape[1] != num_labels:
                raise ValueError(f"label_means has shape {tuple(means.shape)}, expected (channels, {num_labels})")
            self.register_buffer("label_means", means)
            cond_channels += means.shape[0]
        levels = cfg.attention_levels if cfg.attention_levels is not None else [False] * len(cfg.channels)
        common: dict[str, Any] = dict(
            spatial_dims=spatial_dims,
            num_res_blocks=cfg.num_res_blocks,
            channels=tuple(cfg.channels),
            attention_levels=tuple(levels),
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=tuple(cfg.head_channels()),
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
            use_flash_attention=use_flash_attention,
        )
        self.controlnet: ControlNet | None = None
        self.unet: DiffusionModelUNet | SPADEDiffusionModelUNet
        if cfg.conditioning == "concat":
            self.unet = DiffusionModelUNet(
                in_channels=latent_channels + cond_channels, out_channels=latent_channels, **common
            )
        elif cfg.conditioning == "spade":
            self.unet = SPADEDiffusionModelUNet(
                in_channels=latent_channels,
                out_channels=latent_channels,
                label_nc=cond_channels,
                spade_intermediate_channels=cfg.spade_channels,
                **common,
            )
        elif cfg.conditioning == "controlnet":
            self.unet = DiffusionModelUNet(in_channels=latent_channels, out_channels=latent_channels, **common)
            n_down = int(round(math.log2(downsample_factor)))
            embed = tuple(cfg.controlnet_channels * 2**i for i in range(n_down + 1))
            self.controlnet = ControlNet(
                in_channels=latent_channels,
                conditioning_embedding_in_channels=cond_channels,
                conditioning_embedding_num_channels=embed,
                **common,
            )
            # MONAI's recipe: the ControlNet's trunk starts as a copy of the base UNet.
            self.controlnet.load_state_dict(self.unet.state_dict(), strict=False)
        else:
            raise ValueError(f"unknown conditioning {cfg.conditioning!r}")

    @property
    def null_class(self) -> int:
        """The class index that means "no class" (classifier-free guidance)."""
        return self.num_classes

    def null_condition(self, mask: torch.Tensor, class_labels: torch.Tensor | None):
        """The dropped condition: an all-zero mask and the null class (same shapes)."""
        null_labels = None
        if class_labels is not None:
            null_labels = torch.full_like(class_labels, self.null_class)
        return torch.zeros_like(mask), null_labels

    def fill_of(self, mask: torch.Tensor, label_means: torch.Tensor | None = None) -> torch.Tensor:
        """The label-mean fill ``(N, C, *spatial)`` in [0, 1] units of a one-hot mask (zero where the
        mask is all zero, as in the null condition); label_means ``(N, C, L)``: one table per sample (a
        per-case fill; None: the pooled buffer)."""
        if not self.fill:
            raise ValueError("this UNet was built without label means (no fill conditioning)")
        return fill_image(mask, self.label_means if label_means is None else label_means, self.fill_sigma)

    def forward(
        self,
        z: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        label_means: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z: ``(N, Cz, *latent)`` noisy latents; timesteps: ``(N,)``; mask: one-hot ``(N, L, *image)``
        at full resolution (image = latent * factor); class_labels: ``(N,)`` long or None
        (None means the null class when the model is class-conditional); label_means: ``(N, C, L)`` the
        per-sample fill means of a per-case run (None: the pooled ones).
        Returns the prediction ``(N, Cz, *latent)``."""
        if self.num_classes > 0 and class_labels is None:
            class_labels = torch.full((z.shape[0],), self.null_class, dtype=torch.long, device=z.device)
        if self.num_classes == 0:
            class_labels = None
        mask = mask.to(dtype=z.dtype)
        if self.fill:
            mask = torch.cat([mask, self.fill_of(mask, label_means)], dim=1)
        if self.controlnet is not None:  # conditioning == "controlnet"
            down, mid = self.controlnet(z, timesteps, controlnet_cond=mask, class_labels=class_labels)
            return self.unet(
                z,
                timesteps,
                class_labels=class_labels,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            )
        small = resample_mask(mask, tuple(z.shape[2:]), self.mask_resample)
        if self.conditioning == "spade":
            return self.unet(z, timesteps, seg=small, class_labels=class_labels)
        return self.unet(torch.cat([z, small], dim=1), timesteps, class_labels=class_labels)
