"""Load a trained run and generate images from label maps.

``Synthesizer.from_run(RUN)`` reads ``RUN/model_card.json`` (JSON) and the family's weights
(``RUN/model.safetensors`` for a GAN; no pickle anywhere) and rebuilds the network.
``generate(mask, seed=...)`` maps the mask's label values to the run's label channels, pads it to the
network's size multiple, generates, crops and maps intensities back to the dataset's units. A 2D run
given a 3D mask generates slice by slice along the run's slice axis (with a warning).

Families plug in through :data:`BACKENDS` (family -> ``"module:loader"``); a loader is called as
``loader(run_dir, card, info, device)`` and returns an object with ``size_multiple: int`` and
``generate(index, class_index, seeds, options) -> Tensor``: index (N, *spatial) int64 label-channel
indices, class_index (N,) int64, seeds one int per item, options a dict of generation options
(``steps``, ``sampler``, ``guidance``; None when not given) -> (N, C, *spatial) float in [0, 1].
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.errors import CheckpointError, ConfigError, DataError

#: model family -> "module:function" that loads its generation backend
BACKENDS: dict[str, str] = {
    "gan": "medsynth.synthesis.synthesizer:load_gan_backend",
    "ldm": "medsynth.synthesis.ldm:load_ldm_backend",
}

# slices generated per forward pass when a 2D run works through a 3D mask
_SLICE_CHUNK = 16


def _derive(seed: int, k: int) -> int:
    from medsynth.training.engine import derive_seed

    return derive_seed(seed, 13, k)


def read_model_card(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "model_card.json"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no model_card.json (has the training finished?)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable model card ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != "medsynth-model-card":
        raise CheckpointError(f"{path}: not a medsynth model card")
    for key in ("family", "config", "data"):
        if key not in card:
            raise CheckpointError(f"{path}: model card lacks {key!r}")
    return card


class GanBackend:
    """SPADE generator from ``RUN/model.safetensors``."""

    def __init__(self, run_dir: Path, card: dict[str, Any], info: Any, device: Any) -> None:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from medsynth.config import GanModelConfig
        from medsynth.models.gan import build_generator

        self.info = info
        self.device = device
        model_cfg = GanModelConfig.model_validate(card["config"]["model"])
        weights = Path(run_dir) / card.get("model", {}).get("weights", "model.safetensors")
        if not weights.is_file():
            raise CheckpointError(f"{run_dir}: no {weights.name} (has the training finished?)")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights}: unreadable weights ({exc})") from None
        with torch.random.fork_rng(devices=[]):
            self.net = build_generator(model_cfg, info)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{weights}: does not fit the model card's generator "
                                  f"({str(exc).splitlines()[0]})") from None
        self.net.to(device).eval().requires_grad_(False)
        self.size_multiple = self.net.factor

    def generate(self, index: Any, class_index: Any, seeds: list[int], options: dict[str, Any]) -> Any:
        import torch

        from medsynth.data.loader import one_hot
        from medsynth.models.gan import condition_map

        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            warnings.warn(f"generation options {given} have no effect on a GAN", stacklevel=3)
        spatial = tuple(index.shape[1:])
        noise = torch.stack([
            torch.randn(self.net.noise_shape(spatial), generator=torch.Generator().manual_seed(s)) for s in seeds
        ]).to(self.device)
        cond = condition_map(one_hot(index.to(self.device), self.info.num_labels),
                             class_index.to(self.device), self.info.num_classes)
        with torch.no_grad():
            out = self.net(cond, noise)
        return (out.float() * 0.5 + 0.5).clamp(0.0, 1.0)


def load_gan_backend(run_dir: Path, card: dict[str, Any], info: Any, device: Any) -> GanBackend:
    return GanBackend(run_dir, card, info, device)


class Synthesizer:
    """A trained run, ready to generate.

    labels: the label values a mask may contain; dim: 2 or 3; normalization: how unit intensities map
    to the dataset's units.
    """

    def __init__(self, run_dir: Path, card: dict[str, Any], info: Any, backend: Any, device: Any) -> None:
        self.run_dir = Path(run_dir)
        self.card = card
        self.info = info
        self.backend = backend
        self.device = device

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto") -> Synthesizer:
        """Load ``run_dir`` (model card + weights; no pickle). ``device``: auto, cpu or cuda."""
        import torch

        from medsynth.data.loader import DataInfo

        run_dir = Path(run_dir)
        card = read_model_card(run_dir)
        try:
            info = DataInfo.from_dict(card["data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{run_dir}/model_card.json: malformed data section ({exc})") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but no CUDA device is available")
        target = BACKENDS.get(card["family"])
        if target is None:
            raise CheckpointError(f"{run_dir}: unknown model family {card['family']!r}")
        module_name, fn = target.split(":")
        try:
            loader = getattr(importlib.import_module(module_name), fn)
        except (ModuleNotFoundError, AttributeError):
            raise CheckpointError(f"{run_dir}: the {card['family']!r} family cannot be loaded by this installation") from None
        dev = torch.device(device)
        return cls(run_dir, card, info, loader(run_dir, card, info, dev), dev)

    @property
    def labels(self) -> list[int]:
        return list(self.info.labels)

    @property
    def dim(self) -> int:
        return self.info.dim

    def _index(self, mask: Any) -> np.ndarray:
        from medsynth.data.nifti import Volume

        arr = mask.array if isinstance(mask, Volume) else np.asarray(mask)
        src = mask.path if isinstance(mask, Volume) and mask.path is not None else "mask"
        if arr.size == 0:
            raise DataError(f"{src}: mask is empty (shape {arr.shape})")
        if arr.dtype.kind == "b":
            arr = arr.astype(np.uint8)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise DataError(f"{src}: has non-integer, NaN or Inf values; a mask holds label values")
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iu":
            raise DataError(f"{src}: has dtype {arr.dtype}; a mask holds integer label values")
        values = np.unique(arr)
        unknown = sorted(int(v) for v in values if int(v) not in set(self.info.labels))
        if unknown:
            raise DataError(f"{src}: has label values {unknown} that the run was not trained on "
                            f"(its labels: {self.info.labels})")
        return self.info.label_lut()[arr.astype(np.int64)]

    def generate(self, mask: Any, seed: int = 0, *, class_value: str | None = None, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None) -> np.ndarray:
        """mask: (H, W) or (X, Y, Z) label values (numpy array or Volume) -> image with the mask's
        shape, float32 in the dataset's intensity units ((C, *shape) when the run has C > 1 channels).

        seed picks the latent (same seed, same image); class_value the condition class for
        class-conditioned runs; steps/sampler/guidance are options of families that sample iteratively.
        """
        import torch

        # 1. label values -> channel indices, and the shape to work on
        index = self._index(mask)
        if index.ndim not in (2, 3):
            raise DataError(f"mask has shape {index.shape}; expected a 2D or 3D label map")
        if self.info.dim == 3 and index.ndim == 2:
            raise DataError(f"this is a 3D run; the mask is 2D (shape {index.shape})")
        cls_idx = self._class_index(class_value)
        options = {"steps": steps, "sampler": sampler, "guidance": guidance}

        # 2. one stack of items to generate: the volume itself, or its slices (2D run, 3D mask)
        axis = self.info.slice_axis
        if self.info.dim == 2 and index.ndim == 3:
            warnings.warn(f"2D run given a 3D mask: generating {index.shape[axis]} slices along axis {axis} "
                          "one by one (no continuity between slices)", stacklevel=2)
            items = np.moveaxis(index, axis, 0)
        else:
            items = index[None]

        # 3. pad to the network's size multiple, generate in chunks, crop
        mult = int(self.backend.size_multiple)
        spatial = items.shape[1:]
        padded = [int(np.ceil(s / mult) * mult) for s in spatial]
        before = [(p - s) // 2 for p, s in zip(padded, spatial)]
        pads = [(0, 0)] + [(b, p - s - b) for b, p, s in zip(before, padded, spatial)]
        items_p = np.pad(items, pads, mode="constant", constant_values=int(self.info.label_lut()[0]))
        chunk = _SLICE_CHUNK if len(items) > 1 else 1
        outs = []
        for start in range(0, len(items_p), chunk):
            part = torch.from_numpy(np.ascontiguousarray(items_p[start : start + chunk])).long()
            seeds = [_derive(seed, k) for k in range(start, start + len(part))]
            classes = torch.full((len(part),), cls_idx, dtype=torch.int64)
            outs.append(self.backend.generate(part, classes, seeds, options).float().cpu().numpy())
        unit = np.concatenate(outs)  # (N, C, *padded)
        crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
        unit = unit[(slice(None), slice(None), *crop)]

        # 4. back to the mask's layout and the dataset's intensity units
        if self.info.dim == 2 and index.ndim == 3:
            unit = np.moveaxis(unit, 0, axis + 1)  # (C, *mask.shape)
        else:
            unit = unit[0]
        image = self.info.normalization.from_unit(unit)
        return image[0] if image.shape[0] == 1 else image

    def _class_index(self, class_value: str | None) -> int:
        classes = self.info.classes
        if len(classes) <= 1:
            return 0
        if class_value is None:
            raise ConfigError(f"this run is conditioned on {self.info.class_key!r}; pass class_value, one of {classes}")
        if str(class_value) not in classes:
            raise ConfigError(f"class_value {class_value!r} is not one of the run's classes {classes}")
        return classes.index(str(class_value))

    def generate_volume(self, mask: Any, seed: int = 0, **options: Any) -> Any:
        """mask: a label Volume -> an image Volume with the mask's shape and affine.

        When the run was trained at a target spacing (``data.spacing``) and the mask's grid differs,
        the mask is resampled to it (nearest), generated there, and the image resampled back
        (linear) onto the mask's grid.
        """
        from medsynth.data.loader import resample, target_shape
        from medsynth.data.nifti import Volume

        arr = np.asarray(mask.array)
        target = self.info.spacing
        if target is not None and len(target) == arr.ndim and not np.allclose(mask.spacing, target, rtol=1e-3):
            shape = target_shape(arr.shape, mask.spacing, target)
            self._index(mask)  # unknown labels fail before any work
            small = resample(arr.astype(np.int32)[None], shape, label=True)[0]
            image = self.generate(small, seed, **options)
            chans = image if image.ndim == arr.ndim + 1 else image[None]
            image = resample(chans, arr.shape, label=False).astype(np.float32)
            image = image[0] if image.shape[0] == 1 else image
        else:
            image = self.generate(mask, seed, **options)
        return Volume(array=image, affine=np.array(mask.affine, dtype=np.float64), path=None, header={})
