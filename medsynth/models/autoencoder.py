"""Stage 1 of latent diffusion: MONAI's ``AutoencoderKL`` and ``PatchDiscriminator``, 2D or 3D.

Builders only, plus the three operations the rest of medsynth needs:

- :func:`encode` -> latents ``(N, latent_channels, *spatial / f)`` (reparameterised with an explicit
  generator, or the posterior mean), where ``f = downsample_factor(cfg)``;
- :func:`decode` -> images ``(N, C, *spatial)``, whole or in overlapping latent tiles (MONAI
  ``SlidingWindowInferer`` with Gaussian blending) so that memory stays bounded for large volumes;
- :func:`build_discriminator` for the patch adversarial loss.

Image intensities are whatever the data loader produces (normalised, roughly ``[-1, 1]`` or
``[0, 1]``); the autoencoder does not rescale them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from monai.networks.nets import AutoencoderKL

    from medsynth.config import LdmAutoencoderConfig


def downsample_factor(cfg: LdmAutoencoderConfig) -> int:
    """How many image voxels one latent voxel covers along each axis: ``2 ** (levels - 1)``."""
    return 2 ** (len(cfg.channels) - 1)


def _attention_levels(cfg: LdmAutoencoderConfig) -> tuple[bool, ...]:
    levels = cfg.attention_levels
    return tuple(levels) if levels is not None else (False,) * len(cfg.channels)


def build_autoencoder(
    cfg: LdmAutoencoderConfig, *, spatial_dims: int, in_channels: int, use_flash_attention: bool = False,
    zero_output: bool = False,
) -> AutoencoderKL:
    """MONAI ``AutoencoderKL``: ``(N, in_channels, *spatial)`` <-> ``(N, latent_channels, *spatial/f)``.

    ``use_flash_attention`` turns on PyTorch SDPA in the attention blocks (CUDA only matters);
    ``zero_output`` starts the decoder's last convolution at zero, so a fresh autoencoder of a residual
    (the image's difference to the label-mean fill) decodes to zero: the fill itself.
    """
    from monai.networks.nets import AutoencoderKL

    net = AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        attention_levels=_attention_levels(cfg),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.nonlocal_attn,
        with_decoder_nonlocal_attn=cfg.nonlocal_attn,
        use_checkpoint=cfg.use_checkpoint,
        use_flash_attention=use_flash_attention,
    )
    if zero_output:
        last = cast(Any, net.decoder.blocks)[-1].conv  # MONAI's last decoder block: a Convolution
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return net


def build_discriminator(cfg: LdmAutoencoderConfig, *, spatial_dims: int, in_channels: int) -> nn.Module:
    """MONAI ``PatchDiscriminator`` (PatchGAN): ``(N, C, *spatial)`` -> list whose last item is the
    patch logits ``(N, 1, *patches)``. Instance norm, so its output does not depend on the batch."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        num_layers_d=cfg.disc_layers,
        channels=cfg.disc_channels,
        in_channels=in_channels,
        out_channels=1,
        norm="INSTANCE",
    )


def encode(
    autoencoder: AutoencoderKL, image: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``image (N, C, *spatial)`` -> ``(z, mu, sigma)``, each ``(N, latent_channels, *spatial/f)``.

    ``z = mu + sigma * eps`` with ``eps`` drawn from ``generator`` (on the CPU when given, so the
    same seed gives the same draw on any device); ``sample=False`` returns ``z = mu``.
    MONAI's own ``sampling`` uses the global RNG, which we avoid.
    """
    mu, sigma = autoencoder.encode(image)
    if not sample:
        return mu, mu, sigma
    eps = randn_like(mu, generator)
    return mu + eps * sigma, mu, sigma


def randn_like(ref: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``ref``, drawn on the generator's device then moved."""
    gen_device = generator.device if generator is not None else ref.device
    noise = torch.randn(ref.shape, generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=ref.device, dtype=ref.dtype)


def decode(
    autoencoder: AutoencoderKL,
    z: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: float = 0.25,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Decode latents ``z (N, latent_channels, *latent_spatial)`` -> ``(N, C, *latent_spatial * f)``.

    tile: latent tile edge. When set and smaller than the latent grid, the decoder runs on
        overlapping ``tile**d`` latent patches (MONAI ``SlidingWindowInferer``, Gaussian blending,
        ``overlap`` fraction), and the output is accumulated on ``out_device`` (default: z's
        device; ``"cpu"`` keeps GPU memory bounded by one tile).
    """
    if tile is None or all(s <= tile for s in z.shape[2:]):
        out = autoencoder.decode(z)
        return out if out_device is None else out.to(out_device)
    from monai.inferers import SlidingWindowInferer

    roi = tuple(min(tile, s) for s in z.shape[2:])
    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=1,
        overlap=overlap,
        mode="gaussian",
        sw_device=z.device,
        device=out_device if out_device is not None else z.device,
        progress=False,
    )
    return cast(torch.Tensor, inferer(z, autoencoder.decode))
