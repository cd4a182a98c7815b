"""Synthetic training pairs made on the fly, inside a training script.

Two pieces, both built on the same functions the augment job uses (mask deformation and edits from
:mod:`medsynth.data.transforms`, ``synthseg_image`` from :mod:`medsynth.synthesis.procedural`, a trained
run through :class:`medsynth.synthesis.synthesizer.Synthesizer`):

- :class:`RandSyntheticPaird`, a MONAI dictionary transform: with probability ``prob`` it replaces a
  sample's image AND label with a synthetic pair made from a deformed copy of the sample's own label.
- :class:`SyntheticMixDataset`, a torch ``Dataset`` that mixes real cases and synthetic cases (made
  on the fly from deformed copies of real labels) at a chosen ratio, deterministically per index.

Arrays are channel-first as MONAI loaders give them: image ``(C, *spatial)``, label ``(1, *spatial)``,
``spatial`` 2D ``(H, W)`` or 3D ``(X, Y, Z)``; numpy arrays, torch tensors and MONAI ``MetaTensor``
are accepted and given back as the same kind, dtype and device (a MetaTensor keeps its meta data; the
affine is unchanged because the grid is the same). Spacing (mm) for the deformation comes from the
MetaTensor's affine, or the ``spacing`` argument, or 1 mm.

Methods (as in ``medsynth augment``):

- ``synthseg``: deform (and optionally edit) the label, then a SynthSeg-style random-contrast image;
- ``classic``: one random deformation applied jointly to the real image (linear) and label
  (nearest), then MONAI random intensity transforms;
- ``gan`` / ``ldm``: deform (and edit) the label, then ``Synthesizer.from_run(model).generate``.

With ``match_range=True`` (default) the image of a mask-conditioned method (synthseg, gan, ldm) is
rescaled linearly so that each channel's min/max equal those of the real image it replaces, so a
pipeline's later normalisation behaves the same on real and synthetic samples. ``classic`` images
are transformed real images and keep their units.

Randomness: every draw comes from a ``numpy.random.SeedSequence``; the transform draws that
sequence's entropy from MONAI's ``self.R`` (so ``set_random_state(seed)`` and the per-worker seeding
of ``monai.data.DataLoader`` apply), the dataset from ``(seed, epoch, index)`` only.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_data_type, convert_to_dst_type
from pydantic import BaseModel, ValidationError

from medsynth.data.transforms import ClassicConfig, DeformConfig, EditConfig
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.synthesis.procedural import SynthSegConfig

Method = Literal["synthseg", "classic", "gan", "ldm"]
METHODS: tuple[str, ...] = ("synthseg", "classic", "gan", "ldm")

# SeedSequence spawn-key tags of SyntheticMixDataset (one independent stream per purpose)
_TAG_LAYOUT, _TAG_REAL, _TAG_SOURCE, _TAG_ITEM, _TAG_TRANSFORM = 0, 1, 2, 3, 4
_MAX_SEED = 2**32  # MONAI's set_random_state takes seeds below this


# ------------------------------------------------------------------------------------ settings


def _model_of(cls: type[BaseModel], value: Any, name: str) -> Any:
    """``cls`` from an instance, a dict or None (defaults); bad fields -> ConfigError naming ``name``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
    try:
        return cls.model_validate(dict(value))
    except ValidationError as exc:
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        )
        raise ConfigError(problems) from None


_SYNTHESIZERS: dict[tuple[str, str], Any] = {}


def _load_synthesizer(run: Path, device: str) -> Any:
    """``Synthesizer.from_run(run, device=device)``, loaded once per process."""
    key = (str(run), device)
    if key not in _SYNTHESIZERS:
        from medsynth.synthesis.synthesizer import Synthesizer

        _SYNTHESIZERS[key] = Synthesizer.from_run(run, device=device)
    return _SYNTHESIZERS[key]


@dataclass(frozen=True)
class PairMaker:
    """How to make one synthetic pair (checked settings, shared by the transform and the dataset).

    labels: the dataset's label values, or None to use the values of each sample's own label.
    spacing: voxel size (mm) per spatial axis when the input carries no affine; None: 1 mm.
    """

    method: str
    deform: DeformConfig
    edits: EditConfig
    synthseg: SynthSegConfig
    classic: ClassicConfig
    labels: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    model: Path | None
    device: str
    match_range: bool
    generate_kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def build(
        cls, *, method: str, deform: Any, edits: Any, synthseg: Any, classic: Any, labels: Any, spacing: Any,
        model: Any, device: str, match_range: bool, generate_kwargs: Mapping[str, Any] | None,
    ) -> PairMaker:
        """Check every setting; raise ConfigError / CheckpointError naming the parameter."""
        if method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        edit_cfg = _model_of(EditConfig, edits, "edits")
        if edit_cfg.paste_prob > 0:
            raise ConfigError(
                "edits.paste_prob must be 0 here: lesion pasting needs a donor case (use medsynth augment)"
            )
        label_values = None
        if labels is not None:
            try:
                label_values = tuple(sorted({int(v) for v in labels}))
            except (TypeError, ValueError):
                raise ConfigError(f"labels must be a sequence of integer label values, got {labels!r}") from None
            from medsynth.data.transforms import check_edit_labels

            check_edit_labels(edit_cfg, list(label_values))
        spacing_t = None
        if spacing is not None:
            try:
                spacing_t = tuple(float(s) for s in spacing)
            except (TypeError, ValueError):
                raise ConfigError(f"spacing must be a sequence of numbers (mm), got {spacing!r}") from None
            if len(spacing_t) not in (2, 3) or not all(np.isfinite(s) and s > 0 for s in spacing_t):
                raise ConfigError(f"spacing must be 2 or 3 positive numbers (mm per voxel), got {spacing!r}")
        run = None
        if method in ("gan", "ldm"):
            if model is None:
                raise ConfigError(f"method {method!r} needs model=RUN (a trained run folder)")
            run = Path(model).expanduser().resolve()
            if not run.is_dir():
                raise CheckpointError(f"model {model}: no such run folder")
            if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
                raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
            from medsynth.synthesis.synthesizer import read_model_card

            family = read_model_card(run).get("family")
            if family != method:
                raise ConfigError(f"method is {method!r} but the run {run} is a {family!r} model")
        elif model is not None:
            raise ConfigError(f"model is only used by method 'gan' or 'ldm', not {method!r}")
        return cls(
            method=method,
            deform=_model_of(DeformConfig, deform, "deform"),
            edits=edit_cfg,
            synthseg=_model_of(SynthSegConfig, synthseg, "synthseg"),
            classic=_model_of(ClassicConfig, classic, "classic"),
            labels=label_values,
            spacing=spacing_t,
            model=run,
            device=str(device),
            match_range=bool(match_range),
            generate_kwargs=tuple(sorted((generate_kwargs or {}).items())),
        )

    def make(
        self, image: np.ndarray, label: np.ndarray, spacing: tuple[float, ...], seq: np.random.SeedSequence
    ) -> tuple[np.ndarray, np.ndarray]:
        """One synthetic pair from ``image`` ``(C, *spatial)`` float and ``label`` ``(*spatial)``
        int64 with voxel ``spacing`` (mm). Every draw comes from ``seq``.

        Returns image float32 ``(C, *spatial)`` and label int64 ``(*spatial)`` (its values a subset
        of the input label's)."""
        from medsynth.data import transforms as T

        streams = seq.spawn(4)  # deform, edit, image, generator seed
        rng_deform, rng_edit, rng_image = (np.random.default_rng(s) for s in streams[:3])
        channels = image.shape[0]
        # 1. classic: one joint spatial transform, then intensity transforms of the real image
        if self.method == "classic":
            ranges = [tuple(float(v) for v in np.percentile(image[c], [0.5, 99.5])) for c in range(channels)]
            out_image, out_label, _ = T.classic_pair(
                image, label, spacing, deform=self.deform, intensity=self.classic, ranges=ranges, rng=rng_deform
            )
            return out_image, out_label
        # 2. mask-conditioned: deform the label, edit it
        labels = list(self.labels) if self.labels is not None else [int(v) for v in np.unique(label)]
        params = T.draw_spatial(label.shape, spacing, self.deform, rng_deform)
        new_label, _ = T.apply_spatial(params, label)
        if self.edits.active:
            new_label = T.random_edits(new_label, self.edits, rng_edit, labels).label
        # 3. an image for the new label
        if self.method == "synthseg":
            out_image = np.stack(
                [
                    _synthseg_channel(image[c], label, new_label, rng_image, self.synthseg, labels, self.match_range)
                    for c in range(channels)
                ]
            )
        else:
            assert self.model is not None
            seed = int(streams[3].generate_state(1)[0] & 0x7FFFFFFF)
            synth = _load_synthesizer(self.model, self.device)
            generated = synth.generate(new_label, seed=seed, **dict(self.generate_kwargs))
            out_image = np.asarray(convert_data_type(generated, np.ndarray)[0], dtype=np.float32)
            if out_image.ndim == new_label.ndim:
                out_image = out_image[None]
            if out_image.shape[0] != channels:
                raise DataError(
                    f"the run {self.model} makes {out_image.shape[0]} image channel(s), the sample has {channels}"
                )
        # 4. intensities into the real image's range
        if self.match_range:
            out_image = np.stack([_rescale(out_image[c], image[c]) for c in range(channels)])
        return np.ascontiguousarray(out_image, dtype=np.float32), new_label


def _synthseg_channel(
    real: np.ndarray, real_label: np.ndarray, new_label: np.ndarray, rng: np.random.Generator,
    config: SynthSegConfig, labels: list[int], match_range: bool,
) -> np.ndarray:
    """synthseg image for ``new_label`` with intensity facts measured on one real channel."""
    from dataclasses import replace

    from medsynth.synthesis.procedural import fit_intensity_stats, synthseg_image

    stats = fit_intensity_stats([(real, real_label)])
    if match_range:  # min/max instead of the robust p0.5..p99.5 range
        stats = replace(stats, low=stats.minimum, high=stats.maximum)
    return synthseg_image(new_label, rng=rng, config=config, stats=stats, labels=labels)


def _rescale(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` mapped linearly so its min/max equal ``reference``'s (constant -> reference min)."""
    lo, hi = float(image.min()), float(image.max())
    r_lo, r_hi = float(reference.min()), float(reference.max())
    if hi - lo <= 1e-12:
        return np.full(image.shape, r_lo, dtype=np.float32)
    out = (image.astype(np.float64) - lo) * ((r_hi - r_lo) / (hi - lo)) + r_lo
    return np.clip(out, r_lo, r_hi).astype(np.float32)


# ------------------------------------------------------------------------------------ array plumbing


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(convert_data_type(x, np.ndarray)[0])


def _spacing_of(x: Any, ndim: int, fallback: tuple[float, ...] | None) -> tuple[float, ...]:
    """Voxel size (mm) of ``x``: its MetaTensor affine's column norms, else ``fallback``, else 1 mm."""
    affine = getattr(x, "affine", None)
    if affine is not None:
        a = _numpy(affine).astype(np.float64)
        if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] - 1 >= ndim:
            norms = np.linalg.norm(a[:-1, :ndim], axis=0)
            if np.all(np.isfinite(norms)) and np.all(norms > 0):
                return tuple(float(v) for v in norms)
    if fallback is not None:
        if len(fallback) < ndim:
            raise ConfigError(f"spacing has {len(fallback)} values, the data has {ndim} spatial axes")
        return tuple(fallback[:ndim])
    return (1.0,) * ndim


def _like(array: np.ndarray, template: Any) -> Any:
    """``array`` as the same kind (numpy / tensor / MetaTensor with its meta), dtype and device as ``template``."""
    dtype = getattr(template, "dtype", None)
    is_int = (isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex
              and dtype != torch.bool) or (isinstance(dtype, np.dtype) and dtype.kind in "iu")
    if is_int:
        info = torch.iinfo(dtype) if isinstance(dtype, torch.dtype) else np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return convert_to_dst_type(np.ascontiguousarray(array), template, dtype=dtype)[0]


def _split_label(label: np.ndarray, spatial: tuple[int, ...], where: str) -> tuple[np.ndarray, bool]:
    """Label ``(1, *spatial)`` or ``(*spatial)`` -> int64 ``(*spatial)`` and whether it had a channel axis."""
    if tuple(label.shape) == (1, *spatial):
        lab, channel = label[0], True
    elif tuple(label.shape) == spatial:
        lab, channel = label, False
    else:
        raise DataError(
            f"{where}: label shape {tuple(label.shape)} does not match the image's spatial shape {spatial} "
            "(expected a (1, *spatial) label map)"
        )
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.array_equal(lab, np.round(lab)):
            raise DataError(f"{where}: label has non-integer values (resample labels with nearest neighbour)")
    elif lab.dtype.kind == "b":
        pass
    elif lab.dtype.kind not in "iu":
        raise DataError(f"{where}: label has dtype {lab.dtype}, expected integer label values")
    return lab.astype(np.int64), channel


def _replace_pair(
    maker: PairMaker, image: Any, label: Any, seq: np.random.SeedSequence, where: str
) -> tuple[Any, Any]:
    """The synthetic (image, label) replacing ``image`` ``(C, *spatial)`` and ``label``
    ``(1, *spatial)``, each returned as the same kind, dtype and device as its input."""
    img = _numpy(image)
    if img.ndim not in (3, 4):
        raise DataError(f"{where}: image shape {tuple(img.shape)}; expected channel-first (C, H, W) or (C, X, Y, Z)")
    spatial = tuple(int(s) for s in img.shape[1:])
    lab, _ = _split_label(_numpy(label), spatial, where)
    img = img.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img)):
        raise DataError(f"{where}: image contains NaN or Inf")
    spacing = _spacing_of(image if hasattr(image, "affine") else label, len(spatial), maker.spacing)
    new_image, new_label = maker.make(img, lab, spacing, seq)
    new_label = new_label.reshape(_numpy(label).shape)
    return _like(new_image, image), _like(new_label, label)


# ------------------------------------------------------------------------------------ the transform


class RandSyntheticPaird(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace a sample's image and label by a synthetic pair made from a
    randomly deformed copy of its own label (MONAI dictionary transform).

    keys: ``(image_key, label_key)``; the image ``(C, *spatial)``, the label ``(1, *spatial)``
        (or ``(*spatial)``), numpy arrays, tensors or MetaTensors, 2D or 3D.
    prob: probability of replacing a sample, in [0, 1].
    method: ``synthseg``, ``classic``, ``gan`` or ``ldm`` (see the module docstring).
    model: run folder of a trained model (gan, ldm only).
    deform, edits, synthseg, classic: settings as in the augment recipe
        (:class:`~medsynth.data.transforms.DeformConfig`, ``EditConfig``,
        :class:`~medsynth.synthesis.procedural.SynthSegConfig`, ``ClassicConfig``) or dicts of their fields.
        Edits apply to synthseg/gan/ldm; lesion pasting is not available here (no donor case).
    labels: the dataset's label values (fixes which structures edits and synthseg draw for);
        None: the values found in each sample's label.
    spacing: mm per voxel when the data has no affine (numpy / plain tensors); None: 1 mm.
    match_range: rescale synthseg/gan/ldm images to the real image's per-channel min/max.
    device: where a gan/ldm run generates (``cpu`` by default: safe inside DataLoader workers,
        which cannot use a CUDA context forked from the parent; ``cuda`` with ``num_workers=0``
        or a ``spawn`` multiprocessing context).
    generate_kwargs: extra arguments of ``Synthesizer.generate`` (e.g. ``{"steps": 20}`` for ldm).
    flag_key: if set, every sample gets ``data[flag_key] = True/False`` (replaced or not).

    Output: the same dict with ``keys`` replaced (same kind, dtype and device; MetaTensor meta
    kept). The replaced label's values are a subset of the original's.
    Raises ConfigError (bad settings, naming the parameter) and DataError (bad sample).
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image", "label"),
        prob: float = 0.5,
        method: Method = "synthseg",
        model: str | Path | None = None,
        *,
        deform: DeformConfig | Mapping[str, Any] | None = None,
        edits: EditConfig | Mapping[str, Any] | None = None,
        synthseg: SynthSegConfig | Mapping[str, Any] | None = None,
        classic: ClassicConfig | Mapping[str, Any] | None = None,
        labels: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        match_range: bool = True,
        device: str = "cpu",
        generate_kwargs: Mapping[str, Any] | None = None,
        flag_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        if isinstance(keys, (str, bytes)) or len(tuple(keys)) != 2:
            raise ConfigError(f"keys must be two keys (image key, label key), got {keys!r}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ConfigError(f"prob must be a number in [0, 1], got {prob!r}")
        MapTransform.__init__(self, tuple(keys), allow_missing_keys)
        RandomizableTransform.__init__(self, prob=float(prob))
        self.maker = PairMaker.build(
            method=method, deform=deform, edits=edits, synthseg=synthseg, classic=classic, labels=labels,
            spacing=spacing, model=model, device=device, match_range=match_range, generate_kwargs=generate_kwargs,
        )
        self.flag_key = flag_key
        self._entropy = (0, 0)

    @property
    def method(self) -> str:
        return self.maker.method

    def randomize(self, data: Any = None) -> None:
        """Draw whether to replace and the entropy of this sample's seed sequence (always both,
        so the stream stays aligned whatever the outcome)."""
        super().randomize(None)
        words = self.R.randint(0, 2**31 - 1, size=2)
        self._entropy = (int(words[0]), int(words[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        image_key, label_key = self.keys
        missing = [k for k in (image_key, label_key) if k not in d]
        if missing:
            if self.allow_missing_keys:
                return d
            raise DataError(f"RandSyntheticPaird: sample has no key(s) {missing} (keys {list(d)})")
        if self._do_transform:
            seq = np.random.SeedSequence(entropy=list(self._entropy))
            d[image_key], d[label_key] = _replace_pair(
                self.maker, d[image_key], d[label_key], seq, where=f"RandSyntheticPaird({image_key!r}, {label_key!r})"
            )
        if self.flag_key is not None:
            d[self.flag_key] = bool(self._do_transform)
        return d


# ------------------------------------------------------------------------------------ the dataset


def _is_paths(value: Any) -> bool:
    if isinstance(value, (str, Path)):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (str, Path)) for v in value)


def _case_id(entry: Mapping[str, Any], label_key: str, j: int) -> str:
    for key in ("case_id", "id", "source"):
        if isinstance(entry.get(key), str):
            return entry[key]
    label = entry.get(label_key)
    meta = getattr(label, "meta", None)
    if isinstance(meta, Mapping) and isinstance(meta.get("filename_or_obj"), (str, Path)):
        label = meta["filename_or_obj"]  # a MetaTensor loaded from a file (LoadImaged)
    if isinstance(label, (str, Path)) and str(label):
        from medsynth.data.nifti import strip_suffix

        return strip_suffix(Path(label))
    return f"case_{j:04d}"


def load_pair(entry: Mapping[str, Any], image_key: str = "image", label_key: str = "label") -> dict[str, Any]:
    """A MONAI-style data dict -> a copy whose image and label are channel-first.

    File paths (one per channel for the image) are read with
    :func:`medsynth.data.nifti.read_volume` and become float32 ``MetaTensor`` s ``(C, *spatial)``
    and ``(1, *spatial)`` carrying the label file's affine (like MONAI's ``LoadImaged`` +
    ``EnsureChannelFirstd``). In-memory arrays keep their kind; a missing channel axis is added.
    Other keys are copied unchanged. Raises DataError for unreadable files or mismatched shapes."""
    if image_key not in entry or label_key not in entry:
        raise DataError(f"data dict has no {image_key!r} or {label_key!r} key (keys {sorted(map(str, entry))})")
    out = dict(entry)
    image, label = entry[image_key], entry[label_key]
    if _is_paths(label) or _is_paths(image):
        if not (_is_paths(label) and _is_paths(image)):
            raise DataError(f"{image_key!r} and {label_key!r} must both be file paths or both be arrays")
        from monai.data import MetaTensor

        from medsynth.data.nifti import read_case_arrays

        paths = [image] if isinstance(image, (str, Path)) else list(image)
        case = read_case_arrays([Path(p) for p in paths], Path(label))  # splits 4D multi-channel files
        affine = torch.as_tensor(case.affine, dtype=torch.float64)
        meta = {"filename_or_obj": str(label)}
        out[image_key] = MetaTensor(torch.from_numpy(case.images), affine=affine, meta=dict(meta))
        out[label_key] = MetaTensor(
            torch.from_numpy(case.label.astype(np.float32)[None]), affine=affine.clone(), meta=dict(meta)
        )
        return out
    # in-memory arrays: label (*spatial) or (1, *spatial); image (*spatial) or (C, *spatial)
    lab_shape = tuple(getattr(label, "shape", np.shape(label)))
    img_shape = tuple(getattr(image, "shape", np.shape(image)))
    channel_first = len(lab_shape) == 4 or (len(lab_shape) == 3 and lab_shape[0] == 1 and len(img_shape) == 3)
    spatial = lab_shape[1:] if channel_first else lab_shape
    if len(spatial) not in (2, 3):
        raise DataError(f"label shape {lab_shape}: expected (*spatial) or (1, *spatial) with 2 or 3 spatial axes")
    if not channel_first:
        out[label_key] = label[None]
    if img_shape == spatial:
        out[image_key] = image[None]
    elif img_shape[1:] != spatial:
        raise DataError(f"image shape {img_shape} does not match label shape {lab_shape}")
    return out


class SyntheticMixDataset(torch.utils.data.Dataset):
    """Real and synthetic cases mixed at a fixed ratio, each item deterministic given
    ``(seed, epoch, index)`` (so any number of workers, and a rerun, give the same items).

    real: MONAI-style data dicts ``{"image": path | [paths] | array, "label": path | array, ...}``
        (paths are read with ``read_volume``; an optional ``"case_id"`` names the case), or a torch
        ``Dataset`` whose items are such dicts with channel-first arrays (for example a
        ``monai.data.Dataset`` with ``LoadImaged`` + ``EnsureChannelFirstd``; keep it deterministic
        and put random augmentation in ``transform``).
    ratio: fraction of synthetic items, in [0, 1].
    method, model, deform, edits, synthseg, classic, labels, spacing, match_range, device,
        generate_kwargs: as in :class:`RandSyntheticPaird`.
    length: items per epoch; None: ``round(len(real) / (1 - ratio))``, so every real case appears
        once per epoch (``len(real)`` when ``ratio == 1``).
    seed: the seed of every draw. transform: applied to each item last (a MONAI ``Randomizable``
        is re-seeded per item from ``(seed, epoch, index)``). cache: keep loaded real cases in
        memory (per worker process).

    The mix is exact, not drawn per item: ``round(length * ratio)`` positions, chosen by a random
    permutation from ``(seed, epoch)``, are synthetic. Real positions walk through the real cases
    (each once per ``len(real)`` real items, in an order drawn per cycle); synthetic positions take
    their source case the same way (each real case is the source equally often).

    Items: the source dict with ``image`` ``(C, *spatial)`` and ``label`` ``(1, *spatial)``,
    ``"synthetic": bool`` and ``"source": case id`` (the real case itself, or the synthetic item's
    source). ``set_epoch(e)`` changes the layout and every draw (call it before each epoch;
    ``persistent_workers=True`` keeps the workers' old copy).
    """

    def __init__(
        self,
        real: Sequence[Mapping[str, Any]] | torch.utils.data.Dataset,
        ratio: float = 0.5,
        method: Method = "synthseg",
        model: str | Path | None = None,
        *,
        length: int | None = None,
        seed: int = 0,
        transform: Any = None,
        deform: DeformConfig | Mapping[str, Any] | None = None,
        edits: EditConfig | Mapping[str, Any] | None = None,
        synthseg: SynthSegConfig | Mapping[str, Any] | None = None,
        classic: ClassicConfig | Mapping[str, Any] | None = None,
        labels: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        match_range: bool = True,
        device: str = "cpu",
        generate_kwargs: Mapping[str, Any] | None = None,
        cache: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        # 1. the real cases
        if isinstance(real, torch.utils.data.Dataset):
            self._entries: list[Mapping[str, Any]] | None = None
            n = len(real)  # type: ignore[arg-type]
        elif isinstance(real, Sequence) and not isinstance(real, (str, bytes)):
            bad = [j for j, e in enumerate(real) if not isinstance(e, Mapping)]
            if bad:
                raise ConfigError(f"real must hold data dicts; item {bad[0]} is a {type(real[bad[0]]).__name__}")
            self._entries = list(real)
            n = len(self._entries)
        else:
            raise ConfigError(f"real must be a sequence of data dicts or a torch Dataset, got {type(real).__name__}")
        if n == 0:
            raise ConfigError("real has no cases")
        # 2. ratio, length, seed
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
            raise ConfigError(f"ratio must be a number in [0, 1], got {ratio!r}")
        if length is None:
            length = n if ratio >= 1.0 else max(1, int(np.floor(n / (1.0 - ratio) + 0.5)))
        elif isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
            raise ConfigError(f"length must be a positive integer, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        self.real = real
        self.ratio = float(ratio)
        self.length = int(length)
        self.num_synthetic = int(np.floor(self.length * self.ratio + 0.5))
        self.seed = int(seed)
        self.transform = transform
        self.cache = bool(cache)
        self.image_key, self.label_key = image_key, label_key
        self.maker = PairMaker.build(
            method=method, deform=deform, edits=edits, synthseg=synthseg, classic=classic, labels=labels,
            spacing=spacing, model=model, device=device, match_range=match_range, generate_kwargs=generate_kwargs,
        )
        self.epoch = 0
        self._num_real_cases = n
        self._layout: tuple[np.ndarray, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._loaded: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_manifest(cls, path: str | Path, **kwargs: Any) -> SyntheticMixDataset:
        """A mix of the labelled training cases of a dataset (MSD JSON, CSV or nnU-Net raw folder),
        validated first with :func:`medsynth.data.validate.load_valid_dataset`."""
        from medsynth.data.validate import load_valid_dataset

        manifest = load_valid_dataset(path)
        entries = [
            {"image": [str(p) for p in c.images], "label": str(c.label), "case_id": c.case_id}
            for c in manifest.cases if c.label is not None and c.split == "train"
        ]
        if not entries:
            raise DataError(f"{path}: no labelled training cases")
        if "labels" not in kwargs and manifest.labels is not None:
            kwargs["labels"] = sorted(manifest.labels)
        return cls(entries, **kwargs)

    @property
    def method(self) -> str:
        return self.maker.method

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Use the layout and draws of ``epoch`` (>= 0) from now on."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._layout = None
            self._perms.clear()

    # -------------------------------------------------------------------------- draws

    def _seq(self, *key: int) -> np.random.SeedSequence:
        return np.random.SeedSequence(entropy=self.seed, spawn_key=(*key,))

    def _get_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(is_synthetic (length,) bool, rank of each position among its kind (length,) int64)."""
        if self._layout is None:
            perm = np.random.default_rng(self._seq(_TAG_LAYOUT, self.epoch)).permutation(self.length)
            synthetic = np.zeros(self.length, dtype=bool)
            synthetic[perm[: self.num_synthetic]] = True
            rank = np.empty(self.length, dtype=np.int64)
            rank[synthetic] = np.arange(int(synthetic.sum()))
            rank[~synthetic] = np.arange(int((~synthetic).sum()))
            self._layout = (synthetic, rank)
        return self._layout

    def _pick(self, tag: int, rank: int) -> int:
        """Real case for the ``rank``-th item of a kind: each case once per cycle, order drawn per cycle."""
        n = self._num_real_cases
        cycle, pos = divmod(rank, n)
        key = (tag, cycle)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng(self._seq(tag, self.epoch, cycle)).permutation(n)
        return int(self._perms[key][pos])

    def is_synthetic(self, index: int) -> bool:
        """Whether item ``index`` of the current epoch is synthetic (no loading)."""
        return bool(self._get_layout()[0][self._check_index(index)])

    def source_of(self, index: int) -> int:
        """Position in ``real`` of the case item ``index`` shows (real) or was made from (synthetic)."""
        i = self._check_index(index)
        synthetic, rank = self._get_layout()
        return self._pick(_TAG_SOURCE if synthetic[i] else _TAG_REAL, int(rank[i]))

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for SyntheticMixDataset of length {self.length}")
        return i

    # -------------------------------------------------------------------------- items

    def _load(self, j: int) -> dict[str, Any]:
        if j in self._loaded:
            hit = self._loaded[j]
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
                    for k, v in hit.items()}
        if self._entries is None:
            item = self.real[j]  # type: ignore[index]
            if not isinstance(item, Mapping):
                raise DataError(f"real[{j}] is a {type(item).__name__}, expected a data dict")
            sample = load_pair(item, self.image_key, self.label_key)
            sample.setdefault("case_id", _case_id(item, self.label_key, j))
        else:
            entry = self._entries[j]
            sample = load_pair(entry, self.image_key, self.label_key)
            sample["case_id"] = _case_id(entry, self.label_key, j)
            if self.cache:
                self._loaded[j] = sample
                return self._load(j)
        return sample

    def __getitem__(self, index: int) -> Any:
        i = self._check_index(index)
        synthetic, rank = self._get_layout()
        is_syn = bool(synthetic[i])
        # 1. the real case this item shows or is made from
        j = self._pick(_TAG_SOURCE if is_syn else _TAG_REAL, int(rank[i]))
        sample = self._load(j)
        case_id = str(sample.pop("case_id"))
        # 2. synthetic: a pair from a deformed copy of the case's label
        if is_syn:
            sample[self.image_key], sample[self.label_key] = _replace_pair(
                self.maker, sample[self.image_key], sample[self.label_key], self._seq(_TAG_ITEM, self.epoch, i),
                where=f"SyntheticMixDataset case {case_id!r}",
            )
        sample["synthetic"] = is_syn
        sample["source"] = case_id
        # 3. the user's transform, seeded from (seed, epoch, index) when it is random
        if self.transform is not None:
            if hasattr(self.transform, "set_random_state"):
                s = int(self._seq(_TAG_TRANSFORM, self.epoch, i).generate_state(1)[0]) % _MAX_SEED
                self.transform.set_random_state(seed=s)
            sample = self.transform(sample)
        return sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_loaded"] = {}  # each worker loads its own cache
        return state
