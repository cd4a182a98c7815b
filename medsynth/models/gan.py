"""Mask-conditioned GAN networks (builders only): a SPADE-ResNet generator and a multi-scale
patch discriminator, 2D or 3D, from MONAI blocks.

Generator (SPADE, Park et al. 2019): a random noise map ``(N, Z, *spatial / F)`` (F = 2 ** (levels-1))
and the downsampled conditioning map enter a convolution at the coarsest level; each level is a
MONAI ``SPADENetResBlock`` whose normalisation is modulated by the conditioning map (one-hot labels,
plus one-hot class channels when class-conditioned), followed by 2x nearest upsampling. The network is
fully convolutional, so a model trained on patches generates any size divisible by F; the noise map
makes one mask give many images (the seed picks one).

Discriminator: pix2pixHD-style multi-scale: ``num_d`` MONAI ``PatchDiscriminator`` s, the i-th seeing
the input average-pooled by 2**i. (MONAI's ``MultiScalePatchDiscriminator`` instead deepens the i-th
discriminator to ``num_layers * (i + 1)`` layers with channels doubling at every layer uncapped:
num_d=2, num_layers=3 builds a 4096-channel convolution. Pooling keeps each scale small.)
It sees the image concatenated with the conditioning map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import GanModelConfig
    from medsynth.data.loader import DataInfo


class SpadeGenerator(nn.Module):
    """SPADE-ResNet generator.

    forward(cond, noise): cond (N, Lc, *spatial) float conditioning map; noise (N, Z, *spatial / F)
    -> image (N, C, *spatial) in [-1, 1] (tanh).
    """

    def __init__(self, spatial_dims: int, cond_channels: int, out_channels: int, channels: list[int],
                 noise_channels: int, spade_hidden: int) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution
        from monai.networks.nets.spade_network import SPADENetResBlock

        self.spatial_dims = spatial_dims
        self.noise_channels = noise_channels
        self.factor = 2 ** (len(channels) - 1)
        self.conv_in = Convolution(spatial_dims, noise_channels + cond_channels, channels[0],
                                   kernel_size=3, act=None, norm=None)
        blocks = []
        prev = channels[0]
        for ch in channels:
            blocks.append(SPADENetResBlock(spatial_dims, prev, ch, cond_channels,
                                           spade_intermediate_channels=spade_hidden, norm="INSTANCE"))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = Convolution(spatial_dims, prev, out_channels, kernel_size=3, act=None, norm=None,
                                    conv_only=True)

    def noise_shape(self, spatial: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """(Z, *spatial / F) for an output of ``spatial`` (each divisible by F)."""
        return (self.noise_channels, *[int(s) // self.factor for s in spatial])

    def forward(self, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        x = torch.cat([noise, F.interpolate(cond, size=noise.shape[2:], mode="nearest")], dim=1)
        x = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if i < len(self.blocks) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return torch.tanh(self.conv_out(F.leaky_relu(x, 0.2)))


class MultiScaleDiscriminator(nn.Module):
    """``num_d`` patch discriminators on the input pooled by 1, 2, 4, ...

    forward(x) -> (outputs: list of (N, 1, *patches), features: list of lists of intermediate maps),
    the same interface as MONAI's MultiScalePatchDiscriminator.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_d: int, num_layers: int, channels: int) -> None:
        super().__init__()
        from monai.networks.nets import PatchDiscriminator

        self.spatial_dims = spatial_dims
        self.nets = nn.ModuleList(
            PatchDiscriminator(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels,
                               out_channels=1, num_layers_d=num_layers, norm="INSTANCE")
            # The last conv must be spatial (MONAI's default 4x4): a 1x1 conv over instance-normalised
            # features gives every image nearly the same mean score, and a hinge D then never learns.
            for _ in range(num_d)
        )

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        outs, feats = [], []
        for i, net in enumerate(self.nets):
            xi = x if i == 0 else pool(x, kernel_size=2 ** i, stride=2 ** i)
            out = net(xi)
            outs.append(out[-1])
            feats.append(out[:-1])
        return outs, feats


def _patch_sizes(size: int, num_layers: int) -> list[int]:
    """Spatial size after each normalised layer of a PatchDiscriminator (kernel 4, padding 1)."""
    n = (size + 2 - 4) // 2 + 1  # initial conv, stride 2, no norm
    out = []
    for layer in range(num_layers):
        stride = 1 if layer == num_layers - 1 else 2
        n = (n + 2 - 4) // stride + 1
        out.append(n)
    return out


def check_sizes(model: GanModelConfig, size: list[int]) -> None:
    """ConfigError when ``size`` does not suit the generator's factor or the discriminator's depth."""
    factor = 2 ** (len(model.generator.channels) - 1)
    bad = [s for s in size if s % factor]
    if bad:
        raise ConfigError(f"data.size {size}: each value must be divisible by {factor} "
                          f"(2 ** (len(model.generator.channels) - 1))")
    smallest = min(size)
    d = model.discriminator
    for i in range(d.num_d):
        sizes = _patch_sizes(smallest // 2 ** i, d.num_layers)
        if min(sizes) < 2:
            raise ConfigError(
                f"model.discriminator: scale {i} sees {smallest // 2 ** i} voxels, too small for "
                f"num_layers={d.num_layers} (lower num_layers or num_d, or raise data.size)")


def build_generator(model: GanModelConfig, info: DataInfo) -> SpadeGenerator:
    """The generator for ``info``'s dims, conditioning channels and image channels."""
    g = model.generator
    return SpadeGenerator(info.dim, info.condition_channels, info.num_channels, list(g.channels),
                          g.noise_channels, g.spade_hidden)


def build_discriminator(model: GanModelConfig, info: DataInfo) -> MultiScaleDiscriminator:
    """The discriminator: input = image (C) + conditioning map (Lc) channels."""
    d = model.discriminator
    return MultiScaleDiscriminator(info.dim, info.num_channels + info.condition_channels,
                                   d.num_d, d.num_layers, d.channels)


def condition_map(label: torch.Tensor, class_index: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """label (N, L, *spatial) one-hot; class_index (N,) -> (N, L [+ K], *spatial) conditioning map
    (class one-hot channels broadcast over space when there are more than one class)."""
    if num_classes <= 1 or class_index is None:
        return label
    k = F.one_hot(class_index.long(), num_classes).to(label.dtype)
    k = k.view(*k.shape, *([1] * (label.ndim - 2))).expand(-1, -1, *label.shape[2:])
    return torch.cat([label, k], dim=1)
