"""Which torch device a ``device`` option names: the one home of ``auto`` / ``cpu`` / ``cuda``."""

from __future__ import annotations

import torch

from medsynth.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str, option: str = "device") -> str:
    """``"cpu"`` or ``"cuda"`` for ``device`` (``auto``: CUDA when there is one); ConfigError naming
    ``option`` for any other value, or for ``cuda`` on a machine without a CUDA device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{option}: expected auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}: cuda was asked for but no CUDA device is available")
    return device
