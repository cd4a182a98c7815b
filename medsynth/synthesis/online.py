"""Synthetic training pairs made on the fly, inside a training script.

Two pieces, both wrappers of the synthetic-pair core :func:`medsynth.synthesis.pairs.make_pair`
(the one ``medsynth augment`` uses: deform -> edit -> image -> QC):

- :class:`RandSyntheticPaird`, a MONAI dictionary transform: with probability ``prob`` it replaces a
  sample's image AND label with a synthetic pair made from a deformed copy of the sample's own label.
- :class:`SyntheticMixDataset`, a torch ``Dataset`` that mixes real cases and synthetic cases (made
  on the fly from deformed copies of real labels) at a chosen ratio, deterministically per index.

Arrays are channel-first as MONAI loaders give them: image ``(C, *spatial)``, label ``(1, *spatial)``,
``spatial`` 2D ``(H, W)`` or 3D ``(X, Y, Z)``; numpy arrays, torch tensors and MONAI ``MetaTensor``
are accepted and given back as the same kind, dtype and device (a MetaTensor keeps its meta data; the
affine is unchanged because the grid is the same). The grid (voxel size in mm, for the deformation
and for a trained run's training spacing) comes from the MetaTensor's affine, or the ``spacing``
argument, or 1 mm.

Methods are those of ``medsynth augment`` (:func:`medsynth.registry.method_names`): ``synthseg``,
``classic`` and every registered family (``gan``, ``ldm``: a trained run, given as ``model``, whose
images come through ``Synthesizer.generate_volume`` in the run's own intensity units).

Intensities: the core takes per-channel intensity statistics. By default they are the replaced
sample's own; ``intensity_stats`` fixes them (for example the dataset's, as ``medsynth augment``
uses). With ``match_range`` (synthseg only; default on when ``intensity_stats`` is not given) a
synthseg image spans the real image's min/max instead of its p0.5..p99.5 range, so a pipeline's later
min/max normalisation treats real and synthetic samples alike. Classic images are transformed real
images and keep their units; a trained run's images are never rescaled.

Randomness: every pair comes from a ``numpy.random.SeedSequence``; the transform draws that
sequence's entropy from MONAI's ``self.R`` (so ``set_random_state(seed)`` and the per-worker seeding
of ``monai.data.DataLoader`` apply), the dataset from ``(seed, epoch, index)`` only
(:class:`medsynth.seeds.MixTag`). :meth:`RandSyntheticPaird.make_pair` and
:meth:`SyntheticMixDataset.make_pair` make the pair of a given seed sequence.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_data_type, convert_to_dst_type
from pydantic import BaseModel, ValidationError

from medsynth.data.labels import as_label_array
from medsynth.data.transforms import ClassicConfig, DeformConfig, EditConfig, check_edit_labels
from medsynth.errors import CheckpointError, ConfigError, DataError, QualityControlError
from medsynth.registry import is_model_method
from medsynth.runcard import read_run_card
from medsynth.seeds import MixTag, seed_sequence
from medsynth.synthesis.pairs import (
    GENERATE_OPTIONS,
    GenerateOptions,
    PairSettings,
    PairSource,
    QCConfig,
    check_method,
    check_run_family,
    load_synthesizer,
    make_pair,
)
from medsynth.synthesis.procedural import IntensityStats, SynthSegConfig, fit_intensity_stats

#: what the online API accepts as an image or label: numpy arrays, torch tensors, MONAI MetaTensors
ArrayLike = np.ndarray | torch.Tensor
#: a MONAI-style data dict
Sample = Mapping[Hashable, Any]

_MAX_SEED = 2**32  # MONAI's set_random_state takes seeds below this
M = TypeVar("M", bound=BaseModel)


# ------------------------------------------------------------------------------------ settings


def _model_of(cls: type[M], value: M | Mapping[str, object] | None, name: str) -> M:
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


@dataclass(frozen=True)
class OnlinePairs:
    """The checked settings of the transform and the dataset, and how they call the pair core.

    labels: the dataset's label values, or None to use the values of each sample's own label.
    spacing: voxel size (mm) per spatial axis when the input carries no affine; None: 1 mm.
    intensity_stats: per-channel intensity statistics, or None for each sample's own.
    match_range: synthseg images span the sample's min/max (only without ``intensity_stats``).
    """

    settings: PairSettings
    labels: tuple[int, ...] | None
    spacing: tuple[float, ...] | None
    intensity_stats: tuple[IntensityStats, ...] | None
    match_range: bool
    model: Path | None
    device: str
    generate_kwargs: tuple[tuple[str, object], ...]

    @classmethod
    def build(
        cls, *, method: str, deform: DeformConfig | Mapping[str, object] | None,
        edits: EditConfig | Mapping[str, object] | None, synthseg: SynthSegConfig | Mapping[str, object] | None,
        classic: ClassicConfig | Mapping[str, object] | None, labels: Sequence[int] | None,
        spacing: Sequence[float] | None, intensity_stats: Sequence[IntensityStats] | None,
        match_range: bool | None, model: str | Path | None, device: str,
        generate_kwargs: Mapping[str, object] | None, qc: QCConfig | Mapping[str, object] | None = None,
    ) -> OnlinePairs:
        """Check every setting; raise ConfigError / CheckpointError naming the parameter."""
        check_method(method)
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
            check_edit_labels(edit_cfg, list(label_values))
        spacing_t = None
        if spacing is not None:
            try:
                spacing_t = tuple(float(s) for s in spacing)
            except (TypeError, ValueError):
                raise ConfigError(f"spacing must be a sequence of numbers (mm), got {spacing!r}") from None
            if len(spacing_t) not in (2, 3) or not all(np.isfinite(s) and s > 0 for s in spacing_t):
                raise ConfigError(f"spacing must be 2 or 3 positive numbers (mm per voxel), got {spacing!r}")
        stats = None
        if intensity_stats is not None:
            stats = tuple(intensity_stats)
            if not stats or not all(isinstance(s, IntensityStats) for s in stats):
                raise ConfigError("intensity_stats must be one IntensityStats per image channel")
        if match_range and method != "synthseg":
            raise ConfigError(f"match_range applies to method 'synthseg' only, not {method!r} "
                              "(classic keeps the real image's units; a trained run's images are never rescaled)")
        if match_range and stats is not None:
            raise ConfigError("match_range uses each sample's own min/max; it cannot be combined with intensity_stats")
        run = None
        if is_model_method(method):
            if model is None:
                raise ConfigError(f"method {method!r} needs model=RUN (a trained run folder)")
            run = Path(model).expanduser().resolve()
            if not run.is_dir():
                raise CheckpointError(f"model {model}: no such run folder")
            if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
                raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
            check_run_family(read_run_card(run), method)
        elif model is not None:
            raise ConfigError(f"model is only used by a trained model's method, not {method!r}")
        unknown = sorted(set(generate_kwargs or {}) - set(GENERATE_OPTIONS))
        if unknown:
            raise ConfigError(f"generate_kwargs: unknown option(s) {unknown} (known: {', '.join(GENERATE_OPTIONS)})")
        settings = PairSettings(
            method=method,
            deform=_model_of(DeformConfig, deform, "deform"),
            edits=edit_cfg,
            synthseg=_model_of(SynthSegConfig, synthseg, "synthseg"),
            classic=_model_of(ClassicConfig, classic, "classic"),
            qc=_model_of(QCConfig, qc, "qc"),
        )
        return cls(
            settings=settings,
            labels=label_values,
            spacing=spacing_t,
            intensity_stats=stats,
            match_range=(method == "synthseg" and stats is None) if match_range is None else bool(match_range),
            model=run,
            device=str(device),
            generate_kwargs=tuple(sorted((generate_kwargs or {}).items())),
        )

    @property
    def method(self) -> str:
        return self.settings.method

    def replace_pair(self, image: ArrayLike, label: ArrayLike, seq: np.random.SeedSequence,
                     where: str) -> tuple[ArrayLike, ArrayLike]:
        """The synthetic (image, label) replacing ``image`` ``(C, *spatial)`` and ``label``
        ``(1, *spatial)`` (or ``(*spatial)``), each returned as the same kind, dtype and device as its input."""
        # 1. the sample as plain arrays on its grid
        img = _numpy(image)
        if img.ndim not in (3, 4):
            raise DataError(f"{where}: image shape {tuple(img.shape)}; expected channel-first (C, H, W) or (C, X, Y, Z)")
        spatial = tuple(int(s) for s in img.shape[1:])
        lab = _split_label(_numpy(label), spatial, where)
        img = img.astype(np.float32, copy=False)
        if not np.all(np.isfinite(img)):
            raise DataError(f"{where}: image contains NaN or Inf")
        affine = _affine_of(image if isinstance(getattr(image, "affine", None), torch.Tensor) else label,
                            len(spatial), self.spacing)
        # 2. intensity statistics and label values: given, or the sample's own
        if self.intensity_stats is not None:
            if len(self.intensity_stats) != img.shape[0]:
                raise DataError(f"{where}: {img.shape[0]} image channel(s), intensity_stats has "
                                f"{len(self.intensity_stats)}")
            stats = list(self.intensity_stats)
        else:
            stats = [fit_intensity_stats([(img[c], lab)]) for c in range(img.shape[0])]
            if self.match_range:  # min/max instead of the robust p0.5..p99.5 range
                stats = [replace(s, low=s.minimum, high=s.maximum) for s in stats]
        labels = list(self.labels) if self.labels is not None else [int(v) for v in np.unique(lab)]
        # 3. the pair
        synthesizer = None if self.model is None else load_synthesizer(self.model, self.device)
        pair = make_pair(PairSource(img, lab, affine), self.settings, stats=stats, labels=labels, seq=seq,
                         synthesizer=synthesizer, generate_options=cast(GenerateOptions, dict(self.generate_kwargs)),
                         where=where)
        new_label = pair.label.reshape(_numpy(label).shape)
        return _like(pair.images, image), _like(new_label, label)


# ------------------------------------------------------------------------------------ array plumbing


def _numpy(x: ArrayLike) -> np.ndarray:
    return np.asarray(convert_data_type(x, np.ndarray)[0])


def _affine_of(x: ArrayLike, ndim: int, fallback: tuple[float, ...] | None) -> np.ndarray:
    """The ``(4, 4)`` voxel -> mm affine of ``x``: its MetaTensor affine, else a diagonal one from
    ``fallback`` (mm per voxel), else 1 mm."""
    affine = getattr(x, "affine", None)
    if affine is not None:
        a = _numpy(affine).astype(np.float64)
        if a.ndim == 2 and a.shape[0] == a.shape[1] and a.shape[0] - 1 >= ndim:
            norms = np.linalg.norm(a[:-1, :ndim], axis=0)
            if np.all(np.isfinite(a)) and np.all(norms > 0):
                if a.shape == (4, 4):
                    return a
                out = np.eye(4)
                k = a.shape[0] - 1
                out[:k, :k], out[:k, 3] = a[:k, :k], a[:k, k]
                return out
    if fallback is not None and len(fallback) < ndim:
        raise ConfigError(f"spacing has {len(fallback)} values, the data has {ndim} spatial axes")
    spacing = fallback[:ndim] if fallback is not None else (1.0,) * ndim
    return np.diag([*spacing, *([1.0] * (4 - ndim))])


def _like(array: np.ndarray, template: ArrayLike) -> ArrayLike:
    """``array`` as the same kind (numpy / tensor / MetaTensor with its meta), dtype and device as ``template``."""
    dtype = template.dtype
    is_int = (isinstance(dtype, torch.dtype) and not dtype.is_floating_point and not dtype.is_complex
              and dtype != torch.bool) or (isinstance(dtype, np.dtype) and dtype.kind in "iu")
    if is_int:
        info = torch.iinfo(dtype) if isinstance(dtype, torch.dtype) else np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    converted: ArrayLike = convert_to_dst_type(np.ascontiguousarray(array), template, dtype=dtype)[0]
    return converted


def _split_label(label: np.ndarray, spatial: tuple[int, ...], where: str) -> np.ndarray:
    """Label ``(1, *spatial)`` or ``(*spatial)`` -> int64 ``(*spatial)`` label values."""
    if tuple(label.shape) == (1, *spatial):
        lab = label[0]
    elif tuple(label.shape) == spatial:
        lab = label
    else:
        raise DataError(
            f"{where}: label shape {tuple(label.shape)} does not match the image's spatial shape {spatial} "
            "(expected a (1, *spatial) label map)"
        )
    return as_label_array(lab, where)


# ------------------------------------------------------------------------------------ the transform


class RandSyntheticPaird(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace a sample's image and label by a synthetic pair made from a
    randomly deformed copy of its own label (MONAI dictionary transform).

    keys: ``(image_key, label_key)``; the image ``(C, *spatial)``, the label ``(1, *spatial)``
        (or ``(*spatial)``), numpy arrays, tensors or MetaTensors, 2D or 3D.
    prob: probability of replacing a sample, in [0, 1].
    method: ``synthseg``, ``classic`` or a registered family such as ``gan``, ``ldm`` (see the
        module docstring).
    model: run folder of a trained model (family methods only).
    deform, edits, synthseg, classic, qc: settings as in the augment recipe
        (:class:`~medsynth.data.transforms.DeformConfig`, ``EditConfig``,
        :class:`~medsynth.synthesis.procedural.SynthSegConfig`, ``ClassicConfig``,
        :class:`~medsynth.synthesis.pairs.QCConfig`) or dicts of their fields.
        Edits apply to every method but classic; lesion pasting is not available here (no donor case).
    labels: the dataset's label values (fixes which structures edits and synthseg draw for);
        None: the values found in each sample's label.
    spacing: mm per voxel when the data has no affine (numpy / plain tensors); None: 1 mm.
    intensity_stats: one :class:`~medsynth.synthesis.procedural.IntensityStats` per channel
        (synthseg's output range, classic's intensity sizes, the QC range); None: each sample's own.
    match_range: synthseg only: its image spans the real image's per-channel min/max
        (default: on unless ``intensity_stats`` is given).
    device: where a trained run generates (``cpu`` by default: safe inside DataLoader workers,
        which cannot use a CUDA context forked from the parent; ``cuda`` with ``num_workers=0``
        or a ``spawn`` multiprocessing context).
    generate_kwargs: extra arguments of ``Synthesizer.generate_volume`` (e.g. ``{"steps": 20}`` for ldm).
    flag_key: if set, every sample gets ``data[flag_key] = True/False`` (replaced or not).

    Output: the same dict with ``keys`` replaced (same kind, dtype and device; MetaTensor meta
    kept). The replaced label's values are a subset of the original's. A sample whose draws all fail
    quality control keeps its real pair (``flag_key`` False), is counted in ``qc_fallbacks`` (this
    process's count) and warned about once per process: a training loop never stops for it.
    Raises ConfigError (bad settings, naming the parameter) and DataError (bad sample);
    :meth:`make_pair` (one explicit seed) raises QualityControlError instead of falling back.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("image", "label"),
        prob: float = 0.5,
        method: str = "synthseg",
        model: str | Path | None = None,
        *,
        deform: DeformConfig | Mapping[str, object] | None = None,
        edits: EditConfig | Mapping[str, object] | None = None,
        synthseg: SynthSegConfig | Mapping[str, object] | None = None,
        classic: ClassicConfig | Mapping[str, object] | None = None,
        qc: QCConfig | Mapping[str, object] | None = None,
        labels: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        intensity_stats: Sequence[IntensityStats] | None = None,
        match_range: bool | None = None,
        device: str = "cpu",
        generate_kwargs: Mapping[str, object] | None = None,
        flag_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        if isinstance(keys, (str, bytes)) or len(tuple(keys)) != 2:
            raise ConfigError(f"keys must be two keys (image key, label key), got {keys!r}")
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ConfigError(f"prob must be a number in [0, 1], got {prob!r}")
        MapTransform.__init__(self, tuple(keys), allow_missing_keys)
        RandomizableTransform.__init__(self, prob=float(prob))
        self.pairs = OnlinePairs.build(
            method=method, deform=deform, edits=edits, synthseg=synthseg, classic=classic, labels=labels,
            spacing=spacing, intensity_stats=intensity_stats, match_range=match_range, model=model,
            device=device, generate_kwargs=generate_kwargs, qc=qc,
        )
        self.flag_key = flag_key
        self.qc_fallbacks = 0
        self._entropy = (0, 0)

    @property
    def method(self) -> str:
        return self.pairs.method

    def randomize(self, data: object = None) -> None:
        """Draw whether to replace and the entropy of this sample's seed sequence (always both,
        so the stream stays aligned whatever the outcome)."""
        super().randomize(None)
        words = self.R.randint(0, 2**31 - 1, size=2)
        self._entropy = (int(words[0]), int(words[1]))

    def make_pair(self, data: Sample, seq: np.random.SeedSequence) -> dict[Hashable, Any]:
        """``data`` with its image and label replaced by the synthetic pair of seed ``seq`` (no draw)."""
        d = dict(data)
        image_key, label_key = self.keys
        d[image_key], d[label_key] = self.pairs.replace_pair(
            d[image_key], d[label_key], seq, where=f"RandSyntheticPaird({image_key!r}, {label_key!r})"
        )
        return d

    def __call__(self, data: Sample) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        missing = [k for k in self.keys if k not in d]
        if missing:
            if self.allow_missing_keys:
                return d
            raise DataError(f"RandSyntheticPaird: sample has no key(s) {missing} (keys {list(d)})")
        replaced = bool(self._do_transform)
        if replaced:
            try:
                d = self.make_pair(d, np.random.SeedSequence(entropy=list(self._entropy)))
            except QualityControlError:
                replaced = False
                self.qc_fallbacks += 1
                _warn_fallback("RandSyntheticPaird")
        if self.flag_key is not None:
            d[self.flag_key] = replaced
        return d


def _warn_fallback(owner: str) -> None:
    """One warning per process and owner (the text never changes, so Python shows it once)."""
    warnings.warn(f"{owner}: a synthetic pair failed quality control; the real pair was used instead "
                  "(counted in qc_fallbacks; training goes on)", stacklevel=3)


# ------------------------------------------------------------------------------------ the dataset


def _is_paths(value: object) -> bool:
    if isinstance(value, (str, Path)):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (str, Path)) for v in value)


def _case_id(entry: Sample, label_key: str, j: int) -> str:
    for key in ("case_id", "id", "source"):
        value = entry.get(key)
        if isinstance(value, str):
            return value
    label = entry.get(label_key)
    meta = getattr(label, "meta", None)
    if isinstance(meta, Mapping) and isinstance(meta.get("filename_or_obj"), (str, Path)):
        label = meta["filename_or_obj"]  # a MetaTensor loaded from a file (LoadImaged)
    if isinstance(label, (str, Path)) and str(label):
        from medsynth.data.nifti import strip_suffix

        return strip_suffix(Path(label))
    return f"case_{j:04d}"


def load_pair(entry: Sample, image_key: str = "image", label_key: str = "label") -> dict[Hashable, Any]:
    """A MONAI-style data dict -> a copy whose image and label are channel-first.

    File paths (one per channel for the image) are read with
    :func:`medsynth.data.nifti.read_case_arrays` and become float32 ``MetaTensor`` s ``(C, *spatial)``
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
        (paths are read with ``read_case_arrays``; an optional ``"case_id"`` names the case), or a torch
        ``Dataset`` whose items are such dicts with channel-first arrays (for example a
        ``monai.data.Dataset`` with ``LoadImaged`` + ``EnsureChannelFirstd``; keep it deterministic
        and put random augmentation in ``transform``).
    ratio: fraction of synthetic items, in [0, 1].
    method, model, deform, edits, synthseg, classic, labels, spacing, intensity_stats, match_range,
        device, generate_kwargs: as in :class:`RandSyntheticPaird`.
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
    ``"synthetic": bool``, ``"source": case id`` (the real case itself, or the synthetic item's
    source) and ``"qc_fallback": bool``: a synthetic position whose draws all failed quality control
    shows its source case instead (``synthetic`` False), counted in ``qc_fallbacks`` (this process's
    count; with loader workers, sum the items' flags) and warned about once per process.
    ``set_epoch(e)`` changes the layout and every draw (call it before each epoch;
    ``persistent_workers=True`` keeps the workers' old copy).
    """

    def __init__(
        self,
        real: Sequence[Sample] | torch.utils.data.Dataset,
        ratio: float = 0.5,
        method: str = "synthseg",
        model: str | Path | None = None,
        *,
        length: int | None = None,
        seed: int = 0,
        transform: Callable[[dict[Hashable, Any]], Any] | None = None,
        deform: DeformConfig | Mapping[str, object] | None = None,
        edits: EditConfig | Mapping[str, object] | None = None,
        synthseg: SynthSegConfig | Mapping[str, object] | None = None,
        classic: ClassicConfig | Mapping[str, object] | None = None,
        qc: QCConfig | Mapping[str, object] | None = None,
        labels: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        intensity_stats: Sequence[IntensityStats] | None = None,
        match_range: bool | None = None,
        device: str = "cpu",
        generate_kwargs: Mapping[str, object] | None = None,
        cache: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        # 1. the real cases
        if isinstance(real, torch.utils.data.Dataset):
            self._entries: list[Sample] | None = None
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
        self.pairs = OnlinePairs.build(
            method=method, deform=deform, edits=edits, synthseg=synthseg, classic=classic, labels=labels,
            spacing=spacing, intensity_stats=intensity_stats, match_range=match_range, model=model,
            device=device, generate_kwargs=generate_kwargs, qc=qc,
        )
        self.epoch = 0
        self._num_real_cases = n
        self._layout: tuple[np.ndarray, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._loaded: dict[int, dict[Hashable, Any]] = {}
        self.qc_fallbacks = 0

    @classmethod
    def from_manifest(cls, path: str | Path, **kwargs: Any) -> SyntheticMixDataset:
        """A mix of the labelled training cases of a dataset (any registered manifest format),
        validated first with :func:`medsynth.data.validate.load_valid_dataset`. ``kwargs``: as in
        the constructor; ``labels`` defaults to the manifest's."""
        from medsynth.data.validate import load_valid_dataset

        manifest = load_valid_dataset(path)
        entries: list[Sample] = [
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
        return self.pairs.method

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

    def _get_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(is_synthetic (length,) bool, rank of each position among its kind (length,) int64)."""
        if self._layout is None:
            perm = np.random.default_rng(seed_sequence(self.seed, MixTag.LAYOUT, self.epoch)).permutation(self.length)
            synthetic = np.zeros(self.length, dtype=bool)
            synthetic[perm[: self.num_synthetic]] = True
            rank = np.empty(self.length, dtype=np.int64)
            rank[synthetic] = np.arange(int(synthetic.sum()))
            rank[~synthetic] = np.arange(int((~synthetic).sum()))
            self._layout = (synthetic, rank)
        return self._layout

    def _pick(self, tag: MixTag, rank: int) -> int:
        """Real case for the ``rank``-th item of a kind: each case once per cycle, order drawn per cycle."""
        n = self._num_real_cases
        cycle, pos = divmod(rank, n)
        key = (int(tag), cycle)
        if key not in self._perms:
            rng = np.random.default_rng(seed_sequence(self.seed, tag, self.epoch, cycle))
            self._perms[key] = rng.permutation(n)
        return int(self._perms[key][pos])

    def is_synthetic(self, index: int) -> bool:
        """Whether item ``index`` of the current epoch is synthetic (no loading)."""
        return bool(self._get_layout()[0][self._check_index(index)])

    def source_of(self, index: int) -> int:
        """Position in ``real`` of the case item ``index`` shows (real) or was made from (synthetic)."""
        i = self._check_index(index)
        synthetic, rank = self._get_layout()
        return self._pick(MixTag.SOURCE if synthetic[i] else MixTag.REAL, int(rank[i]))

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {index} out of range for SyntheticMixDataset of length {self.length}")
        return i

    # -------------------------------------------------------------------------- items

    def _load(self, j: int) -> dict[Hashable, Any]:
        if j in self._loaded:
            hit = self._loaded[j]
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v.copy() if isinstance(v, np.ndarray) else v)
                    for k, v in hit.items()}
        if self._entries is None:
            item = self.real[j]
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

    def make_pair(self, j: int, seq: np.random.SeedSequence) -> dict[Hashable, Any]:
        """Real case ``j`` (its data dict, with ``case_id``) with its image and label replaced by the
        synthetic pair of seed ``seq``."""
        sample = self._load(j)
        sample[self.image_key], sample[self.label_key] = self.pairs.replace_pair(
            sample[self.image_key], sample[self.label_key], seq,
            where=f"SyntheticMixDataset case {str(sample['case_id'])!r}",
        )
        return sample

    def __getitem__(self, index: int) -> Any:
        i = self._check_index(index)
        synthetic, rank = self._get_layout()
        is_syn = bool(synthetic[i])
        # 1. the real case this item shows, or a synthetic pair made from it
        j = self._pick(MixTag.SOURCE if is_syn else MixTag.REAL, int(rank[i]))
        fallback = False
        if is_syn:
            try:
                sample = self.make_pair(j, seed_sequence(self.seed, MixTag.ITEM, self.epoch, i))
            except QualityControlError:  # the real case instead: a training loop never stops for it
                fallback, is_syn = True, False
                self.qc_fallbacks += 1
                _warn_fallback("SyntheticMixDataset")
        if not is_syn:
            sample = self._load(j)
        sample["source"] = str(sample.pop("case_id"))
        sample["synthetic"] = is_syn
        sample["qc_fallback"] = fallback
        # 2. the user's transform, seeded from (seed, epoch, index) when it is random
        if self.transform is not None:
            set_state = getattr(self.transform, "set_random_state", None)
            if callable(set_state):
                s = int(seed_sequence(self.seed, MixTag.TRANSFORM, self.epoch, i).generate_state(1)[0]) % _MAX_SEED
                set_state(seed=s)
            return self.transform(sample)
        return sample

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_loaded"] = {}  # each worker loads its own cache
        return state
