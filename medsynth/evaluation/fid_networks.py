"""FID feature networks: architectures built in code, weights read as tensors only.

An FID network reaches medsynth as *weights*, never as code: a safetensors state dict (or a ``.pt`` /
``.pth`` state dict, read with ``torch.load(weights_only=True)``) for one of the architectures named
in :data:`FID_NETWORKS`. The name comes from ``--fid-network NAME`` or from the safetensors header
metadata key :data:`FID_NETWORK_KEY`. A ``torch.export`` program (``.pt2``), a TorchScript file or a
pickle is refused by its name: each can carry code that runs when it is loaded.

The architectures are MONAI's MedicalNet-style ResNets (``monai.networks.nets.resnet10`` ...) with one
input channel and no classification head, so ``net(x)`` maps ``(N, 1, *spatial)`` to ``(N, 512)``
(``(N, 2048)`` for ``medicalnet_resnet50``); shortcut type and downsampling bias are MedicalNet's for
that depth, so MedicalNet's published 3D weights, saved as safetensors, load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import resnet10, resnet18, resnet34, resnet50
from monai.networks.nets.resnet import ResNet, get_medicalnet_pretrained_resnet_args
from safetensors import SafetensorError

from medsynth.errors import CheckpointError, DataError
from medsynth.safe_weights import load_weights_into, load_weights_only, read_safetensors, safetensors_metadata

__all__ = [
    "FID_NETWORKS",
    "FID_NETWORK_KEY",
    "WEIGHT_SUFFIXES",
    "FidNetwork",
    "check_fid_weights",
    "check_weights_file",
    "fid_network_names",
    "load_fid_network",
    "load_weights_into",
    "read_state_dict",
]

#: the safetensors metadata key that names the architecture of an FID weights file
FID_NETWORK_KEY = "medsynth.fid_network"
#: file endings an FID weights file may have (anything else is refused by name, unread)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


@dataclass(frozen=True)
class FidNetwork:
    """One FID architecture: ``build(spatial_dims)`` makes it, untrained, on the CPU."""

    name: str
    description: str
    build: Callable[[int], torch.nn.Module]


def _medicalnet(depth: int, make: Callable[..., ResNet]) -> FidNetwork:
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)

    def build(spatial_dims: int) -> torch.nn.Module:
        return make(spatial_dims=spatial_dims, n_input_channels=1, conv1_t_stride=2, feed_forward=False,
                    shortcut_type=shortcut_type, bias_downsample=bias_downsample)

    width = 2048 if depth >= 50 else 512
    return FidNetwork(f"medicalnet_resnet{depth}", f"MedicalNet ResNet-{depth}, 1 channel in, {width} features out",
                      build)


#: name -> architecture; the only networks an FID weights file can fill
FID_NETWORKS: dict[str, FidNetwork] = {
    net.name: net
    for net in (_medicalnet(10, resnet10), _medicalnet(18, resnet18), _medicalnet(34, resnet34),
                _medicalnet(50, resnet50))
}


def fid_network_names() -> tuple[str, ...]:
    return tuple(FID_NETWORKS)


def _refuse_suffix(path: Path) -> None:
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(
            f"{path}: not loaded: FID weights must be a .safetensors (or .pt/.pth) state dict for a named "
            f"architecture ({', '.join(fid_network_names())}); torch.export programs (.pt2), TorchScript "
            "and pickles can carry code and are never loaded")


def _file_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (empty for a ``.pt``/``.pth`` file)."""
    if not path.name.lower().endswith(".safetensors"):
        return {}
    try:
        return safetensors_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without running anything from it.

    ``.safetensors``: tensors only, by construction. ``.pt``/``.pth``: ``torch.load(weights_only=True)``
    (plain tensors and containers; a ``{"state_dict": ...}`` wrapper is unwrapped). Any other ending
    is refused unread. CheckpointError naming the file otherwise."""
    path = Path(path)
    _refuse_suffix(path)
    if path.name.lower().endswith(".safetensors"):
        try:
            return read_safetensors(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    obj = load_weights_only(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (names -> tensors)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
    return obj


def _network_name(path: Path, name: str | None) -> str:
    """The architecture for the weights at ``path``: ``name``, else the one its metadata names."""
    stored = _file_metadata(path).get(FID_NETWORK_KEY)
    known = ", ".join(fid_network_names())
    if name is not None and stored is not None and name != stored:
        raise CheckpointError(f"{path}: its metadata key {FID_NETWORK_KEY!r} names {stored!r}, but --fid-network "
                              f"is {name!r}")
    chosen = name if name is not None else stored
    if chosen is None:
        raise CheckpointError(f"{path}: names no FID network (no {FID_NETWORK_KEY!r} key in its safetensors "
                              f"metadata); pass --fid-network NAME (one of: {known})")
    if chosen not in FID_NETWORKS:
        where = "--fid-network" if name is not None else f"its metadata key {FID_NETWORK_KEY!r}"
        raise CheckpointError(f"{path}: FID network {chosen!r} (from {where}) is unknown; known: {known}")
    return chosen


def check_fid_weights(path: str | Path, name: str | None) -> str:
    """Before any work: the architecture name for the weights file ``path``, which must exist, have an
    allowed ending and hold tensors only (it is read once here). DataError for a missing file,
    CheckpointError otherwise (as :func:`load_fid_network`)."""
    path = check_weights_file(path)
    chosen = _network_name(path, name)
    read_state_dict(path)  # tensors only, or refused now
    return chosen


def check_weights_file(path: str | Path) -> Path:
    """``path`` (``~`` expanded) if it is an existing file with an allowed ending (nothing is read);
    DataError for a missing file, CheckpointError for another ending."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"FID feature weights not found: {path} (FID needs a local weights file you provide; "
                        "medsynth downloads nothing)")
    _refuse_suffix(path)
    return path


def load_fid_network(path: str | Path, name: str | None, spatial_dims: int) -> torch.nn.Module:
    """The FID network of architecture ``name`` (or the one the file's metadata names) with the weights
    of ``path``, on the CPU, in eval mode: ``(N, 1, *spatial)`` -> ``(N, F)``.

    spatial_dims: 2 or 3, the dimensionality of the images it will see. DataError for a missing
    file; CheckpointError naming the file when no name is given anywhere, the name is unknown,
    ``name`` and the file disagree, or the weights do not fit."""
    path = check_weights_file(path)
    chosen = _network_name(path, name)
    if spatial_dims not in (2, 3):
        raise CheckpointError(f"{path}: FID networks take 2D or 3D images, got {spatial_dims}D")
    net = FID_NETWORKS[chosen].build(spatial_dims)
    return load_weights_into(net, read_state_dict(path), path).eval()
