"""The bundle's networks built from MONAI 1.6's own classes and filled from its weights files.

Weights files (the key layout MAISI's inference code reads, ``scripts/sample.py`` and
``configs/inference.json`` of the model-zoo bundle):

- ``trained_autoencoder_path``: the autoencoder's state dict itself;
- ``trained_diffusion_path``: ``{"unet_state_dict": ..., "scale_factor": tensor, ...}``;
- ``trained_controlnet_path``: ``{"controlnet_state_dict": ..., ...}``.

Each is read by :func:`medsynth.safe_weights.load_weights_only` (``weights_only=True``; numpy scalars
are the only globals allowed beyond torch's own) and loaded strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

from medsynth.bundles.reader import Bundle, NetworkDef
from medsynth.errors import CheckpointError
from medsynth.safe_weights import NUMPY_SCALAR_GLOBALS, load_weights_into, load_weights_only

__all__ = ["MaisiNetworks", "build", "load_networks", "read_checkpoint"]

#: the entry of each weights file that holds the state dict (None: the file is the state dict)
STATE_KEYS: dict[str, str | None] = {
    "trained_autoencoder_path": None,
    "trained_diffusion_path": "unet_state_dict",
    "trained_controlnet_path": "controlnet_state_dict",
}


@dataclass
class MaisiNetworks:
    """The three networks in eval mode on one device, and the latent scale factor."""

    autoencoder: AutoencoderKlMaisi
    unet: DiffusionModelUNetMaisi
    controlnet: ControlNetMaisi
    scale_factor: float

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def build(definition: NetworkDef, device: torch.device) -> Any:
    """The class of ``definition`` with its arguments; on the CPU, flash attention and float16 group norm
    are switched off (they change speed and memory, not the weights)."""
    kwargs = dict(definition.kwargs)
    if device.type != "cuda":
        if "use_flash_attention" in kwargs:
            kwargs["use_flash_attention"] = False
        if "norm_float16" in kwargs:
            kwargs["norm_float16"] = False
    try:
        return definition.cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"key {definition.key!r}: {definition.cls.__name__} refuses its arguments ({exc})") from None


def read_checkpoint(bundle: Bundle, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict stored in the weights file of config key ``key`` and the file's other entries."""
    path = bundle.weights[key]
    obj = load_weights_only(path, NUMPY_SCALAR_GLOBALS)
    entry = STATE_KEYS[key]
    if entry is None:
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        return obj, {}
    if not isinstance(obj, dict) or not isinstance(obj.get(entry), dict):
        raise CheckpointError(f"{path}: key {entry!r} is missing; MAISI keeps the network's weights there")
    return obj[entry], {k: v for k, v in obj.items() if k != entry}


def _scale_factor(bundle: Bundle, extra: dict[str, Any]) -> float:
    path = bundle.weights["trained_diffusion_path"]
    value = extra.get("scale_factor")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1e3:
        raise CheckpointError(f"{path}: key 'scale_factor' is missing or not a positive number ({value!r})")
    return float(value)


def load_networks(bundle: Bundle, device: torch.device | str = "cpu") -> MaisiNetworks:
    """Build the bundle's autoencoder, diffusion UNet and ControlNet and load their weights strictly
    (CheckpointError naming the file and the key of a missing, unexpected or misshapen tensor)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # initial values are overwritten; keep the global RNG as it was
        ae = build(bundle.autoencoder, device)
        unet = build(bundle.unet, device)
        control = build(bundle.controlnet, device)
    state, _ = read_checkpoint(bundle, "trained_autoencoder_path")
    load_weights_into(ae, state, bundle.weights["trained_autoencoder_path"])
    state, extra = read_checkpoint(bundle, "trained_diffusion_path")
    load_weights_into(unet, state, bundle.weights["trained_diffusion_path"], "unet_state_dict")
    scale = _scale_factor(bundle, extra)
    state, _ = read_checkpoint(bundle, "trained_controlnet_path")
    load_weights_into(control, state, bundle.weights["trained_controlnet_path"], "controlnet_state_dict")
    return MaisiNetworks(ae.to(device).eval(), unet.to(device).eval(), control.to(device).eval(), scale)
