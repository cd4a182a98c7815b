"""Will a recipe fit? The lower bound :func:`medsynth.config.memory_estimate` of the memory training
takes, against the memory of the device it trains on, checked before anything is allocated."""

from __future__ import annotations

from medsynth.config import Config, memory_estimate
from medsynth.data.limits import available_memory, format_bytes
from medsynth.errors import ConfigError

__all__ = ["check_memory", "device_memory"]


def device_memory(device: str) -> tuple[str, int]:
    """``(what, bytes)``: the memory training on ``device`` (``auto``, ``cpu``, ``cuda``) can use: one
    GPU's total memory under CUDA (each torchrun process has one), else
    :func:`medsynth.data.limits.available_memory`."""
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            return f"GPU {torch.cuda.get_device_name(index)}", int(torch.cuda.get_device_properties(index).total_memory)
    return "memory of this machine", available_memory()


def check_memory(cfg: Config, available: int, what: str = "device") -> int:
    """ConfigError when the lower bound :func:`~medsynth.config.memory_estimate` of training ``cfg``
    exceeds ``available`` bytes (``what``: the device, named in the message). Returns the bound in bytes."""
    needed, parameters = memory_estimate(cfg)
    if needed > available:
        raise ConfigError(
            f"{cfg.name}: training this recipe needs at least {format_bytes(needed)} (about {parameters:,} "
            f"parameters with their gradients and optimiser state, and batch {cfg.training.batch_size} of "
            f"{'x'.join(map(str, cfg.data.size))} crops), more than the {format_bytes(available)} of the {what}; "
            "lower training.batch_size, data.size or the model's channels"
        )
    return needed
