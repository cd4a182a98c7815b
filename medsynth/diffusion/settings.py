"""Resolved network settings of latent diffusion: the size rule and the attention kernel.

Plain functions of a recipe's ``model`` section (any object with the fields named below), used by
training and sampling alike.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

__all__ = ["LdmSettings", "size_multiple", "use_flash"]


class _Levels(Protocol):
    channels: list[int]


class LdmSettings(Protocol):
    """The fields of an ``ldm`` recipe's ``model`` section these rules read."""

    @property
    def autoencoder(self) -> _Levels: ...

    @property
    def diffusion(self) -> _Levels: ...

    use_flash_attention: Literal["auto", True, False]


def size_multiple(model: LdmSettings) -> int:
    """Image sides must be multiples of this: the autoencoder's ``2 ** (len(autoencoder.channels) - 1)``
    times the UNet's ``2 ** (len(diffusion.channels) - 1)`` (its latent is halved at each level)."""
    return 2 ** (len(model.autoencoder.channels) - 1) * 2 ** (len(model.diffusion.channels) - 1)


def use_flash(model: LdmSettings, device: torch.device) -> bool:
    """``model.use_flash_attention`` resolved for ``device`` (auto: PyTorch SDPA on CUDA only)."""
    flag = model.use_flash_attention
    return device.type == "cuda" if flag == "auto" else bool(flag)
