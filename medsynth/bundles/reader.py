"""A MAISI / NV-Generate CT bundle folder read as data.

The layout is the MONAI model-zoo bundle ``maisi_ct_generative`` (read from Project-MONAI/model-zoo,
``models/maisi_ct_generative/configs/inference.json``, ``metadata.json``, ``large_files.yml``)::

    BUNDLE/configs/inference.json   network definitions (``autoencoder_def``, ``diffusion_unet_def``,
                                    ``controlnet_def``), ``noise_scheduler``, ``trained_*_path``
    BUNDLE/configs/label_dict.json  label name -> label value (the 132-class vocabulary)
    BUNDLE/configs/metadata.json    ``version``: 0.x is the ddpm layout, 1.x the rflow layout
    BUNDLE/models/*.pt              the weights the ``trained_*_path`` keys name

Nothing in the JSON runs. ``@key`` references are looked up in the same file (data, not code); a value
medsynth needs that is a ``$`` expression is refused, except the one path form the bundles use,
``"$@model_dir + '/FILE.pt'"``, which is matched as text (``models/FILE.pt``), never evaluated. The
``imports`` list and the ``scripts`` folder are never read. ``_target_`` must be one of
:data:`ALLOWED_TARGETS`, which name MONAI 1.6's own classes; the class comes from that table, not
from importing the string.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

from medsynth.data.ledger import sha256_file
from medsynth.errors import CheckpointError, DataError

__all__ = ["ALLOWED_TARGETS", "FROZEN_KEYS", "Bundle", "Layout", "NetworkDef", "read_bundle"]

Layout = Literal["ddpm", "rflow"]

#: ``_target_`` -> class: the only things a bundle config can name. ``scripts.rectified_flow.RFlowScheduler``
#: (the bundle's own copy, in ``scripts/``) is read as MONAI's ``RFlowScheduler``: its file is never imported.
ALLOWED_TARGETS: dict[str, type] = {
    "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi": AutoencoderKlMaisi,
    "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi": DiffusionModelUNetMaisi,
    "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi": ControlNetMaisi,
    "monai.networks.schedulers.ddpm.DDPMScheduler": DDPMScheduler,
    "monai.networks.schedulers.rectified_flow.RFlowScheduler": RFlowScheduler,
    "monai.networks.schedulers.RFlowScheduler": RFlowScheduler,
    "scripts.rectified_flow.RFlowScheduler": RFlowScheduler,
}
#: the config keys of the networks and the scheduler, and the class each must name
NETWORK_KEYS: dict[str, type] = {
    "autoencoder_def": AutoencoderKlMaisi,
    "diffusion_unet_def": DiffusionModelUNetMaisi,
    "controlnet_def": ControlNetMaisi,
}
#: the config keys naming the weights files
WEIGHT_KEYS = ("trained_autoencoder_path", "trained_diffusion_path", "trained_controlnet_path")
#: the networks a fine-tuned ControlNet run keeps frozen: their files' sha256 is recorded and checked again
FROZEN_KEYS = ("trained_autoencoder_path", "trained_diffusion_path")
#: bundle major version -> layout (metadata.json ``version``)
KNOWN_MAJOR: dict[int, Layout] = {0: "ddpm", 1: "rflow"}
#: the largest config file read
MAX_CONFIG_BYTES = 4 << 20
_MODEL_PATH = re.compile(r"^\$@model_dir\s*\+\s*'/([A-Za-z0-9_.\-]+\.pt)'$")
_PLAIN_PATH = re.compile(r"^(?:\./)?models/([A-Za-z0-9_.\-]+\.pt)$")
_GET = "get it with `python -m monai.bundle download maisi_ct_generative --bundle_dir DIR` (the licence of the " \
       "weights is yours to read and accept)"


@dataclass(frozen=True)
class NetworkDef:
    """One ``*_def`` of the config: its class and its constructor arguments (plain JSON values)."""

    key: str
    cls: type
    kwargs: dict[str, Any]


@dataclass
class Bundle:
    """A bundle folder, read and checked; no weights loaded yet (:func:`medsynth.bundles.networks.load_networks`)."""

    root: Path
    layout: Layout
    version: str
    autoencoder: NetworkDef
    unet: NetworkDef
    controlnet: NetworkDef
    scheduler: NetworkDef
    weights: dict[str, Path]
    label_dict: dict[str, int]
    config_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.kwargs["in_channels"])

    def checksums(self, keys: tuple[str, ...] = WEIGHT_KEYS) -> dict[str, str]:
        """Weights config key -> sha256 of its file (a fine-tuned run records its frozen networks' files)."""
        return {key: sha256_file(self.weights[key]) for key in keys}

    @property
    def label_names(self) -> dict[int, str]:
        """label value -> name (the first name of a value given twice)."""
        out: dict[int, str] = {}
        for name, value in self.label_dict.items():
            out.setdefault(value, name)
        return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing; a MAISI bundle has configs/inference.json, configs/label_dict.json and "
                        f"models/; {_GET}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes, more than a bundle config holds")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


class _Resolver:
    """``@key`` references of one config, looked up as data; ``$`` expressions refused."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.config = config
        self.path = path

    def value(self, value: Any, key: str, depth: int = 0) -> Any:
        if depth > 16:
            raise CheckpointError(f"{self.path}: key {key!r}: references nest more than 16 deep")
        if isinstance(value, str) and value.startswith("$"):
            raise CheckpointError(f"{self.path}: key {key!r} is the expression {value[:60]!r}; medsynth reads bundle "
                                  "configs as data and evaluates no '$' expression")
        if isinstance(value, str) and value.startswith("@"):
            name = value[1:]
            if name not in self.config:
                raise CheckpointError(f"{self.path}: key {key!r} refers to {value!r}, which the file does not define")
            return self.value(self.config[name], name, depth + 1)
        if isinstance(value, list):
            return [self.value(v, f"{key}[{i}]", depth) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self.value(v, f"{key}.{k}", depth) for k, v in value.items()}
        return value

    def definition(self, key: str, expected: type | None) -> NetworkDef:
        raw = self.config.get(key)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{self.path}: key {key!r} is missing or not an object; this is not a MAISI CT "
                                  "bundle medsynth knows")
        target = raw.get("_target_")
        cls = ALLOWED_TARGETS.get(target) if isinstance(target, str) else None
        if cls is None or (expected is not None and cls is not expected):
            allowed = ", ".join(sorted({t for t, c in ALLOWED_TARGETS.items() if expected is None or c is expected}))
            raise CheckpointError(f"{self.path}: key {key}._target_ is {target!r}; medsynth builds only {allowed}")
        kwargs = {}
        params = inspect.signature(cls).parameters
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # schedule arguments
        for name, value in raw.items():
            if name.startswith("_"):
                if name in ("_target_", "_requires_", "_desc_"):
                    continue
                raise CheckpointError(f"{self.path}: key {key}.{name} is not a constructor argument medsynth reads")
            if name not in params and not open_ended:
                raise CheckpointError(f"{self.path}: key {key}.{name}: {cls.__name__} takes no argument {name!r} "
                                      "(a bundle for another MONAI version?)")
            kwargs[name] = self.value(value, f"{key}.{name}")
        return NetworkDef(key, cls, kwargs)

    def weights_path(self, key: str, root: Path) -> Path:
        raw = self.config.get(key)
        match = None
        if isinstance(raw, str):
            match = _MODEL_PATH.match(raw.strip()) or _PLAIN_PATH.match(raw.strip())
        if match is None:
            raise CheckpointError(f"{self.path}: key {key!r} is {raw!r}; medsynth reads a weights path written as "
                                  "\"$@model_dir + '/FILE.pt'\" or \"models/FILE.pt\"")
        path = root / "models" / match.group(1)
        if not path.is_file():
            raise DataError(f"{path}: missing (config key {key!r} of {self.path}); {_GET}")
        return path


def _layout_of(version: str, scheduler: NetworkDef, meta_path: Path, config_path: Path) -> Layout:
    head = version.split(".")[0]
    if not head.isdigit() or int(head) not in KNOWN_MAJOR:
        raise CheckpointError(f"{meta_path}: key 'version' is {version!r}; medsynth knows the maisi_ct_generative "
                              "bundle versions 0.x (ddpm) and 1.x (rflow)")
    layout = KNOWN_MAJOR[int(head)]
    by_scheduler: Layout = "rflow" if scheduler.cls is RFlowScheduler else "ddpm"
    if by_scheduler != layout:
        raise CheckpointError(f"{config_path}: key 'noise_scheduler' builds {scheduler.cls.__name__}, but version "
                              f"{version} of {meta_path.name} is the {layout} layout")
    return layout


def read_bundle(root: str | Path) -> Bundle:
    """Read and check the bundle folder ``root`` (nothing is imported from it and no weights are read).

    DataError for a missing folder or file (saying how to get the bundle), CheckpointError naming the
    file and the key for anything medsynth does not read: a ``$`` expression where a value is needed,
    a ``_target_`` off the allow-list, an unknown constructor argument, an unknown version."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such bundle folder; {_GET}")
    config_path = root / "configs" / "inference.json"
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: holds a {type(config).__name__}, not an object")
    meta_path = root / "configs" / "metadata.json"
    meta = _read_json(meta_path)
    version = meta.get("version") if isinstance(meta, dict) else None
    if not isinstance(version, str):
        raise CheckpointError(f"{meta_path}: key 'version' is missing or not a string")
    res = _Resolver(config, config_path)
    defs = {key: res.definition(key, cls) for key, cls in NETWORK_KEYS.items()}
    scheduler = res.definition("noise_scheduler", None)
    if scheduler.cls not in (DDPMScheduler, RFlowScheduler):
        raise CheckpointError(f"{config_path}: key noise_scheduler._target_ names {scheduler.cls.__name__}, not a "
                              "scheduler")
    layout = _layout_of(version, scheduler, meta_path, config_path)
    weights = {key: res.weights_path(key, root) for key in WEIGHT_KEYS}
    label_path = root / "configs" / "label_dict.json"
    labels = _read_json(label_path)
    if not isinstance(labels, dict) or not labels:
        raise CheckpointError(f"{label_path}: expected an object of label name -> label value")
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 256:
            raise CheckpointError(f"{label_path}: key {name!r} is {value!r}, not a label value from 0 to 255")
    return Bundle(root=root, layout=layout, version=version, autoencoder=defs["autoencoder_def"],
                  unet=defs["diffusion_unet_def"], controlnet=defs["controlnet_def"], scheduler=scheduler,
                  weights=weights, label_dict=dict(labels), config_path=config_path)
