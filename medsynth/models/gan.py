"""Mask-conditioned GAN networks (builders only): a SPADE-ResNet generator and a multi-scale
patch discriminator, 2D or 3D.

Generator (SPADE, Park et al. 2019): a random noise map ``(N, Z, *spatial / F)`` (F = 2 ** (levels-1))
and the conditioning map (one-hot labels, plus one-hot class channels when class-conditioned, plus
the label-mean fill's C channels when ``fill`` is not ``none``) shrunk to that grid enter a convolution
at the coarsest level; each level is a SPADE residual block whose parameter-free instance norm is
modulated by ``gamma``/``beta`` convolved from the conditioning map, followed by 2x nearest
upsampling. The SPADE block is our own: MONAI's ``SPADE`` instance-normalises gamma and beta (its
``Convolution`` default norm), which removes their spatial mean per channel, and shrinks the map with
``nearest`` (a shift of (f - 1) / 2 voxels); here they are plain convolutions of the map shrunk by
area averaging (:func:`medsynth.models.conditioning.resize_condition`).

``fill`` (``model.generator.fill``):

- ``residual`` (default): the output is ``fill + r`` (in [-1, 1] units) where the last convolution
  ``r`` starts at zero, so a fresh generator paints the label-mean fill (per-label intensities of
  the training set by construction) and training adds partial volume and texture on top;
- ``input``: the fill is an input channel only, output ``tanh``;
- ``none``: no fill, output ``tanh`` (the plain SPADE generator).

The fill is blurred by the partial-volume width fitted on the training set (``DataInfo.fill_sigma``).
The pooled per-label means are a buffer of the generator (saved with its weights); ``forward`` may
instead take one table per sample (``label_means`` ``(N, C, L)``: the *per-case* fill of
``model.generator.appearance: per_case``, drawn at inference from
:class:`medsynth.models.appearance.AppearanceDistribution`). The fill also enters every SPADE
modulation (it is part of the conditioning map), after the instance norm: a per-sample appearance
that no normalisation erases. The network is fully convolutional: a model trained on patches
generates any size divisible by F; the noise makes one mask give many images (the seed picks one).

Noise: the map ``(N, Z, *spatial / F)`` at the coarsest level, and with ``level_noise`` (StyleGAN,
Karras et al. 2019) one more single-channel map per level ``(N, 1, *level spatial)``, added after
each block (before its upsampling) with a learned per-channel scale (zero at the start, so a fresh
generator is the one without it). :meth:`SpadeGenerator.draw_noise` draws all of them from one
``torch.Generator`` in a fixed order (the coarse map first: a run without level noise draws what it
always drew).

Discriminator: pix2pixHD-style multi-scale: ``num_d`` MONAI ``PatchDiscriminator`` s, the i-th seeing
the input average-pooled by 2**i, each convolution under spectral normalisation (Miyato et al. 2018;
SPADE's ``spectralinstance``) unless turned off. (MONAI's ``MultiScalePatchDiscriminator`` instead
deepens the i-th discriminator to ``num_layers * (i + 1)`` layers with channels doubling at every
layer uncapped: num_d=2, num_layers=3 builds a 4096-channel convolution.) It sees the image
concatenated with the one-hot conditioning map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth.errors import ConfigError
from medsynth.models.conditioning import fill_image, resize_condition

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import GanModelConfig
    from medsynth.data.loader import DataInfo

FillMode = Literal["none", "input", "residual"]


def _conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3) -> nn.Conv2d | nn.Conv3d:
    cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return cls(cin, cout, kernel, padding=kernel // 2)


class SpadeNorm(nn.Module):
    """``instance_norm(x) * (1 + gamma(cond)) + beta(cond)``; x ``(N, C, *s)``, cond ``(N, Lc, *S)``
    (resized to ``s``), gamma/beta plain 3x3 convolutions of a shared ReLU hidden layer."""

    def __init__(self, spatial_dims: int, channels: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.norm = norm(channels, affine=False)
        self.shared = nn.Sequential(_conv(spatial_dims, cond_channels, hidden), nn.ReLU())
        self.gamma = _conv(spatial_dims, hidden, channels)
        self.beta = _conv(spatial_dims, hidden, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.shared(resize_condition(cond, x.shape[2:]))
        return self.norm(x) * (1.0 + self.gamma(h)) + self.beta(h)


class SpadeResBlock(nn.Module):
    """SPADE residual block: ``x + conv(act(norm(conv(act(norm(x))))))`` with a learned
    (SPADE-normalised) shortcut when the channel count changes; LeakyReLU 0.2."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, cond_channels: int, hidden: int) -> None:
        super().__init__()
        mid = min(cin, cout)
        self.norm_0 = SpadeNorm(spatial_dims, cin, cond_channels, hidden)
        self.conv_0 = _conv(spatial_dims, cin, mid)
        self.norm_1 = SpadeNorm(spatial_dims, mid, cond_channels, hidden)
        self.conv_1 = _conv(spatial_dims, mid, cout)
        self.shortcut: nn.ModuleList | None = None
        if cin != cout:
            self.shortcut = nn.ModuleList([SpadeNorm(spatial_dims, cin, cond_channels, hidden),
                                           _conv(spatial_dims, cin, cout, kernel=1)])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, cond), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, cond), 0.2))
        if self.shortcut is None:
            return x + dx
        norm, conv = self.shortcut
        return conv(norm(x, cond)) + dx


class SpadeGenerator(nn.Module):
    """SPADE-ResNet generator (see the module docstring).

    forward(cond, noise): cond (N, L [+ K], *spatial) one-hot labels (first L channels) [+ class
    channels]; noise (N, Z, *spatial / F) -> image (N, C, *spatial) in [-1, 1] units (``residual``
    may leave the range slightly; the synthesizer clamps).
    label_means: (C, L) per-label mean training intensity in [0, 1] units (needed unless fill is ``none``);
    fill_sigma: the fill's partial-volume blur in voxels (DataInfo.fill_sigma).
    """

    label_means: torch.Tensor  # a buffer: (C, L)

    def __init__(self, spatial_dims: int, cond_channels: int, out_channels: int, channels: list[int],
                 noise_channels: int, spade_hidden: int, *, num_labels: int | None = None,
                 fill: FillMode = "none", label_means: list[list[float]] | None = None,
                 fill_sigma: float = 0.0, level_noise: bool = False) -> None:
        super().__init__()
        if fill != "none" and (label_means is None or num_labels is None):
            raise ConfigError(f"model.generator.fill={fill!r} needs the training set's per-label means "
                              "(DataInfo.label_means); this data has none")
        self.spatial_dims = spatial_dims
        self.noise_channels = noise_channels
        self.factor = 2 ** (len(channels) - 1)
        self.fill = fill
        self.fill_sigma = float(fill_sigma)
        self.num_labels = num_labels if num_labels is not None else cond_channels
        extra = out_channels if fill != "none" else 0
        means = torch.tensor(label_means, dtype=torch.float32) if label_means is not None else \
            torch.zeros(out_channels, self.num_labels)
        if tuple(means.shape) != (out_channels, self.num_labels):
            raise ConfigError(f"label means of shape {tuple(means.shape)} do not fit {out_channels} channel(s) "
                              f"x {self.num_labels} labels")
        self.register_buffer("label_means", means)
        full = cond_channels + extra
        self.conv_in = _conv(spatial_dims, noise_channels + full, channels[0])
        blocks = []
        prev = channels[0]
        for ch in channels:
            blocks.append(SpadeResBlock(spatial_dims, prev, ch, full, spade_hidden))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _conv(spatial_dims, prev, out_channels)
        shape = (1, -1) + (1,) * spatial_dims
        self.noise_scales = nn.ParameterList(
            [nn.Parameter(torch.zeros(ch).view(shape)) for ch in channels]) if level_noise else None
        if fill == "residual":  # a fresh generator paints the fill exactly
            nn.init.zeros_(self.conv_out.weight)
            if self.conv_out.bias is not None:
                nn.init.zeros_(self.conv_out.bias)

    def noise_shape(self, spatial: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """(Z, *spatial / F) for an output of ``spatial`` (each divisible by F)."""
        return (self.noise_channels, *[int(s) // self.factor for s in spatial])

    def level_noise_shapes(self, spatial: tuple[int, ...] | list[int]) -> list[tuple[int, ...]]:
        """(1, *level spatial) per level, coarsest first (empty without level noise)."""
        if self.noise_scales is None:
            return []
        levels = len(self.blocks)
        return [(1, *[int(s) // 2 ** (levels - 1 - k) for s in spatial]) for k in range(levels)]

    def draw_noise(self, n: int, spatial: tuple[int, ...] | list[int], generator: torch.Generator
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The coarse noise map ``(n, Z, *spatial / F)`` and the level maps (``level_noise_shapes``),
        standard normal, drawn from ``generator`` in that order (on the CPU)."""
        coarse = torch.randn((n, *self.noise_shape(spatial)), generator=generator)
        return coarse, [torch.randn((n, *shape), generator=generator) for shape in self.level_noise_shapes(spatial)]

    def fill_of(self, cond: torch.Tensor, label_means: torch.Tensor | None = None) -> torch.Tensor:
        """The label-mean fill (N, C, *spatial) of ``cond``'s label channels, in [-1, 1] units, float32:
        computed outside autocast, so bf16/fp16 training and fp32 inference paint the same fill.
        label_means: ``(N, C, L)`` per sample in [0, 1] units (None: the pooled buffer for all)."""
        with torch.autocast(cond.device.type, enabled=False):
            onehot = cond[:, : self.num_labels].float()
            if label_means is None:
                return fill_image(onehot, self.label_means.float(), self.fill_sigma) * 2.0 - 1.0
            fill = torch.cat([fill_image(onehot[i : i + 1], label_means[i].float(), self.fill_sigma)
                              for i in range(len(onehot))])
            return fill * 2.0 - 1.0

    def forward(self, cond: torch.Tensor, noise: torch.Tensor, level_noise: list[torch.Tensor] | None = None,
                label_means: torch.Tensor | None = None) -> torch.Tensor:
        """cond ``(N, L [+ K], *spatial)``, noise ``(N, Z, *spatial / F)``, level_noise one map per level
        (needed with level noise; :meth:`draw_noise`), label_means ``(N, C, L)`` the per-sample fill
        means in [0, 1] units (None: the pooled ones) -> ``(N, C, *spatial)``."""
        if self.noise_scales is not None and (level_noise is None or len(level_noise) != len(self.blocks)):
            raise ValueError(f"this generator adds noise at each of its {len(self.blocks)} levels: pass "
                             "level_noise (see draw_noise)")
        fill = None
        if self.fill != "none":
            fill = self.fill_of(cond, label_means)
            cond = torch.cat([cond, fill.to(cond.dtype)], dim=1)
        x = torch.cat([noise, resize_condition(cond, noise.shape[2:])], dim=1)
        x = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if self.noise_scales is not None and level_noise is not None:
                x = x + self.noise_scales[i] * level_noise[i].to(x.dtype)
            if i < len(self.blocks) - 1:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        out = self.conv_out(F.leaky_relu(x, 0.2))
        if fill is not None and self.fill == "residual":
            with torch.autocast(out.device.type, enabled=False):  # the residual add in float32 as well
                return fill.float() + out.float()
        return torch.tanh(out)


def _spectral(module: nn.Module) -> nn.Module:
    """Spectral normalisation on every convolution of ``module`` (in place; returns it)."""
    from torch.nn.utils.parametrizations import spectral_norm

    convs = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    for conv in convs:
        spectral_norm(conv)
    return module


class MultiScaleDiscriminator(nn.Module):
    """``num_d`` patch discriminators on the input pooled by 1, 2, 4, ...

    forward(x) -> (outputs: list of (N, 1, *patches), features: list of lists of intermediate maps),
    the same interface as MONAI's MultiScalePatchDiscriminator.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_d: int, num_layers: int, channels: int,
                 spectral_norm: bool = True) -> None:
        super().__init__()
        from monai.networks.nets import PatchDiscriminator

        self.spatial_dims = spatial_dims
        nets = []
        for _ in range(num_d):
            # The last conv must be spatial (MONAI's default 4x4): a 1x1 conv over instance-normalised
            # features gives every image nearly the same mean score, and a hinge D then never learns.
            net = PatchDiscriminator(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels,
                                     out_channels=1, num_layers_d=num_layers, norm="INSTANCE")
            nets.append(_spectral(net) if spectral_norm else net)
        self.nets = nn.ModuleList(nets)

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
    """The generator for ``info``'s dims, conditioning channels, image channels and label means."""
    g = model.generator
    return SpadeGenerator(info.dim, info.condition_channels, info.num_channels, list(g.channels),
                          g.noise_channels, g.spade_hidden, num_labels=info.num_labels, fill=g.fill,
                          label_means=info.label_means, fill_sigma=info.fill_sigma, level_noise=g.level_noise)


def build_discriminator(model: GanModelConfig, info: DataInfo) -> MultiScaleDiscriminator:
    """The discriminator: input = image (C) + conditioning map (Lc) channels."""
    d = model.discriminator
    return MultiScaleDiscriminator(info.dim, info.num_channels + info.condition_channels,
                                   d.num_d, d.num_layers, d.channels, spectral_norm=d.spectral_norm)


def condition_map(label: torch.Tensor, class_index: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """label (N, L, *spatial) one-hot; class_index (N,) -> (N, L [+ K], *spatial) conditioning map
    (class one-hot channels broadcast over space when there are more than one class)."""
    if num_classes <= 1 or class_index is None:
        return label
    k = F.one_hot(class_index.long(), num_classes).to(label.dtype)
    k = k.view(*k.shape, *([1] * (label.ndim - 2))).expand(-1, -1, *label.shape[2:])
    return torch.cat([label, k], dim=1)
