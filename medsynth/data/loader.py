"""Training data: volumes from a validated manifest -> normalised arrays -> seeded patches/slices.

Everything a model family needs to know about the data is in :class:`DataInfo` (stored in the run's
model card so a Synthesizer can map masks and intensities the same way).

Data order is a pure function of (seed, global sample index): sample ``g`` (global index
``step * global_batch + rank * batch_size + b``) takes case ``perm(seed, epoch)[g % n]`` with
``epoch = g // n``, and its crop/slice from ``default_rng([seed, g])``. A resumed run therefore needs
only the step and the seed, and a torchrun job of P processes shards every global batch by rank.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from medsynth.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader, Dataset

    from medsynth.config import DataConfig
    from medsynth.data.manifest import Case, Manifest

# cap on the voxels per channel used to estimate percentiles (deterministic stride subsample)
_PERCENTILE_VOXELS = 20_000_000
#: values :meth:`Normalization.to_unit` converts in float64 at a time
_UNIT_SLAB = 1 << 20
# soft upper tail (Normalization.tail == "soft"): the upper percentile maps to KNEE, brighter values approach 1
KNEE = 0.8
SOFT_MAX_UNIT = 0.9995  # generated values above this map back as this (about lo + 2.9 (hi - lo))
#: 3D training crops: the fraction centred near a random foreground voxel (the rest uniform), so a
#: large volume does not give mostly-background patches; foreground coordinates kept per case
FOREGROUND_CROPS = 2 / 3
FOREGROUND_VOXELS = 4096
#: the sample ``index`` of pool crop 0 (:meth:`TrainingData.pool_item`); training indices stay below it and
#: the fixed batch uses 2**62 on
POOL_BASE = 2**61


@dataclass
class Normalization:
    """Map dataset intensities to [0, 1] and back, per channel.

    mode: ``ct_window`` or ``mri_percentiles``; lo/hi: per-channel bounds in dataset units;
    percentiles: the percentiles used (mri_percentiles only); region: the voxels they were taken over,
    ``foreground`` (label > 0: background air does not pull them down, :func:`foreground_mask`) or
    ``all`` (run cards written before medsynth took them on the foreground; their stored lo/hi are used
    as they are).
    tail: ``clip`` (run cards before it: ``to_unit`` is ``clip((x - lo) / (hi - lo), 0, 1)``, ``from_unit``
    ``u * (hi - lo) + lo``: anything above ``hi`` is lost) or ``soft``: with ``v = (x - lo) / (hi - lo)``,
    ``u = KNEE * v`` up to ``hi`` and ``KNEE + (1 - KNEE) (1 - exp(-(v - 1) KNEE / (1 - KNEE)))`` above it (slope
    continuous at the knee, approaching 1), so a bright lesion or vessel above the upper percentile keeps its
    own value: ``from_unit`` inverts it exactly up to ``SOFT_MAX_UNIT`` (``v`` about 2.9: ``lo + 2.9 (hi - lo)``).
    Below ``lo`` both clip (background).
    """

    mode: str
    lo: list[float]
    hi: list[float]
    percentiles: list[float] | None = None
    region: str = "foreground"
    tail: str = "clip"

    def _squash(self, v: np.ndarray) -> np.ndarray:
        """v: (x - lo) / (hi - lo), float64 -> unit values (in place where it can)."""
        if self.tail != "soft":
            return np.clip(v, 0.0, 1.0, out=v)
        np.clip(v, 0.0, None, out=v)
        above = v > 1.0
        out = KNEE * v
        out[above] = KNEE + (1.0 - KNEE) * -np.expm1(-(v[above] - 1.0) * (KNEE / (1.0 - KNEE)))
        return out

    def _unsquash(self, u: np.ndarray) -> np.ndarray:
        """unit values, float64 -> (x - lo) / (hi - lo)."""
        if self.tail != "soft":
            return u
        u = np.clip(u, None, SOFT_MAX_UNIT)
        above = u > KNEE
        v = u / KNEE
        v[above] = 1.0 - ((1.0 - KNEE) / KNEE) * np.log1p(-(u[above] - KNEE) / (1.0 - KNEE))
        return v

    def slope(self) -> np.ndarray:
        """(C,) dataset units per unit below the upper percentile (the linear part): what spreads and
        textures measured in unit values scale by."""
        span = np.asarray(self.hi, np.float64) - np.asarray(self.lo, np.float64)
        return span / KNEE if self.tail == "soft" else span

    def to_unit(self, image: np.ndarray) -> np.ndarray:
        """image: (C, *spatial) in dataset units -> float32 in [0, 1] (computed in float64, a slab of
        :data:`_UNIT_SLAB` values at a time: no float64 copy of a whole volume)."""
        lo = np.asarray(self.lo, np.float64).reshape(-1, *([1] * (image.ndim - 1)))
        hi = np.asarray(self.hi, np.float64).reshape(lo.shape)
        scale = np.maximum(hi - lo, 1e-12)
        if image.ndim < 2 or image[0].size <= _UNIT_SLAB:
            out = (np.asarray(image, np.float64) - lo) / scale
            return self._squash(out).astype(np.float32)
        result = np.empty(image.shape, np.float32)
        step = max(1, _UNIT_SLAB // max(1, image[0, 0].size))
        for a in range(0, image.shape[1], step):
            part = (np.asarray(image[:, a : a + step], np.float64) - lo) / scale
            result[:, a : a + step] = self._squash(part)
        return result

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        """unit: (C, *spatial) in [0, 1] -> float32 in dataset units."""
        lo = np.asarray(self.lo, np.float64).reshape(-1, *([1] * (unit.ndim - 1)))
        hi = np.asarray(self.hi, np.float64).reshape(lo.shape)
        return (self._unsquash(np.asarray(unit, np.float64)) * (hi - lo) + lo).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lo": list(self.lo), "hi": list(self.hi), "percentiles": self.percentiles,
                "region": self.region, "tail": self.tail}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return cls(mode=d["mode"], lo=[float(v) for v in d["lo"]], hi=[float(v) for v in d["hi"]],
                   percentiles=d.get("percentiles"), region=str(d.get("region", "all")),
                   tail=str(d.get("tail", "clip")))


@dataclass
class DataInfo:
    """Facts about the training data that networks and synthesizers need.

    dim: 2 or 3 (the model's spatial dims); slice_axis: axis 2D slices came from (3D volumes);
    volume_ndim: ndim of the source volumes (2 or 3); size: training patch/slice size;
    labels: label values in one-hot channel order (background 0 first); label_names: value -> name;
    channels: image channel names; classes: class-conditioning values (empty: none);
    spacing: target spacing in mm (None: native grid); normalization: intensity mapping;
    fingerprint: sha256 over the training arrays as read; num_cases: training cases;
    label_means / label_stds: per image channel, per label (one-hot order), the mean / standard
    deviation of the training intensities in [0, 1] units over that label's voxels (a label with no
    voxels gets the channel's overall value); the label-mean fill and QC read them (None: not known);
    fill_sigma: the partial-volume width in voxels: the Gaussian blur (over the model's axes: in-plane
    for 2D runs) of the label-mean fill that best matches the training images (:func:`fit_fill_sigma`);
    case_stats: the same statistics per training case, and the texture inside each label
    (:class:`CaseStatistics`; None: a run card written before medsynth recorded them).
    """

    dim: int
    slice_axis: int
    volume_ndim: int
    size: list[int]
    labels: list[int]
    label_names: dict[int, str]
    channels: list[str]
    classes: list[str]
    spacing: list[float] | None
    normalization: Normalization
    fingerprint: str = ""
    num_cases: int = 0
    class_key: str | None = None
    label_means: list[list[float]] | None = None
    label_stds: list[list[float]] | None = None
    fill_sigma: float = 0.0
    case_stats: CaseStatistics | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def condition_channels(self) -> int:
        """Channels of the conditioning map: one-hot labels + one-hot classes (when > 1 class)."""
        return self.num_labels + (self.num_classes if self.num_classes > 1 else 0)

    def label_lut(self) -> np.ndarray:
        """Lookup table label value -> channel index (-1 for values not in ``labels``)."""
        lut = np.full(max(self.labels) + 1, -1, dtype=np.int64)
        lut[np.asarray(self.labels)] = np.arange(len(self.labels))
        return lut

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim, "slice_axis": self.slice_axis, "volume_ndim": self.volume_ndim,
            "size": list(self.size), "labels": list(self.labels),
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "channels": list(self.channels), "classes": list(self.classes), "class_key": self.class_key,
            "spacing": None if self.spacing is None else list(self.spacing),
            "normalization": self.normalization.to_dict(), "fingerprint": self.fingerprint,
            "num_cases": self.num_cases, "label_means": self.label_means, "label_stds": self.label_stds,
            "fill_sigma": self.fill_sigma,
            "case_stats": None if self.case_stats is None else self.case_stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        return cls(
            dim=int(d["dim"]), slice_axis=int(d["slice_axis"]), volume_ndim=int(d["volume_ndim"]),
            size=[int(s) for s in d["size"]], labels=[int(v) for v in d["labels"]],
            label_names={int(k): str(v) for k, v in d.get("label_names", {}).items()},
            channels=list(d["channels"]), classes=list(d.get("classes", [])),
            spacing=None if d.get("spacing") is None else [float(s) for s in d["spacing"]],
            normalization=Normalization.from_dict(d["normalization"]),
            fingerprint=str(d.get("fingerprint", "")), num_cases=int(d.get("num_cases", 0)),
            class_key=d.get("class_key"),
            label_means=_stat_table(d.get("label_means")), label_stds=_stat_table(d.get("label_stds")),
            fill_sigma=float(d.get("fill_sigma", 0.0)),
            case_stats=None if d.get("case_stats") is None else CaseStatistics.from_dict(d["case_stats"]),
        )


@dataclass
class CaseStatistics:
    """Per training case, image channel and label, in [0, 1] units: ``means``, ``stds`` and ``texture``,
    ``(K, C, L)`` float64 arrays, NaN where the case lacks the label (texture: where the label has no
    interior). texture: the standard deviation of the discrete Laplacian over the label's interior,
    its voxels at least ``texture_depth`` voxels (face steps) inside the label (:func:`label_texture`):
    the high-frequency energy a real image has inside a tissue and a flat fill has not."""

    means: np.ndarray
    stds: np.ndarray
    texture: np.ndarray
    texture_depth: int

    def to_dict(self) -> dict[str, Any]:
        def table(a: np.ndarray) -> list[Any]:
            return [[[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in case] for case in a]

        return {"means": table(self.means), "stds": table(self.stds), "texture": table(self.texture),
                "texture_depth": self.texture_depth}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseStatistics:
        def array(raw: Any) -> np.ndarray:
            return np.asarray([[[np.nan if v is None else float(v) for v in row] for row in case] for case in raw],
                              np.float64)

        return cls(array(d["means"]), array(d["stds"]), array(d["texture"]), int(d["texture_depth"]))


def _stat_table(raw: object) -> list[list[float]] | None:
    """A (channels, labels) table of floats from JSON, or None."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(row, list) for row in raw):
        raise TypeError(f"expected a list of lists of numbers, got {raw!r}")
    return [[float(v) for v in row] for row in raw]


@dataclass
class CaseArrays:
    """One training case in memory: image (C, *spatial) float32 in [0, 1]; index (*spatial) int16
    label channel indices; fg_slices: slice indices along slice_axis holding foreground; fg_voxels:
    (K, ndim) coordinates of up to :data:`FOREGROUND_VOXELS` foreground voxels (3D crops)."""

    case_id: str
    image: np.ndarray
    index: np.ndarray
    class_index: int = 0
    fg_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fg_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))


# ---------------------------------------------------------------------------- helpers


def with_one_hot(batch: dict[str, Any], num: int) -> dict[str, Any]:
    """``batch`` with ``label`` (N, num, *spatial) float32 built from ``label_index`` on its device, when
    it has none (the training loader's batches: one-hot is built where the batch is, not in collate)."""
    if "label" in batch or "label_index" not in batch:
        return batch
    return {**batch, "label": one_hot(batch["label_index"], num)}


def one_hot(index: torch.Tensor, num: int) -> torch.Tensor:
    """index: (N, *spatial) int64 channel indices -> (N, num, *spatial) float32 one-hot."""
    import torch

    out = torch.zeros((index.shape[0], num, *index.shape[1:]), dtype=torch.float32, device=index.device)
    return out.scatter_(1, index.unsqueeze(1).long(), 1.0)


def resample(array: np.ndarray, size: tuple[int, ...], *, label: bool) -> np.ndarray:
    """Resample (C, *spatial) to ``size`` (labels nearest, images linear), exact output shape."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(array)).unsqueeze(0)
    if label:
        # "nearest-exact" samples voxel centres like the images' align_corners=False; plain
        # "nearest" floors and shifts labels by (factor - 1) / 2 voxels against the image.
        out = F.interpolate(t.float(), size=size, mode="nearest-exact").to(t.dtype)
    else:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        out = F.interpolate(t.float(), size=size, mode=mode, align_corners=False)
    return out[0].numpy()


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: list[float]) -> tuple[int, ...]:
    """Grid size that covers the same extent at ``target`` spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def crop_padded(array: np.ndarray, starts: list[int], size: list[int], value: float = 0) -> np.ndarray:
    """``pad_to(array, size, value)[..., a:a+s, ...]`` (``starts`` in the padded grid) without padding the
    whole array: a view when the crop lies inside ``array``, else a new array of the crop's size."""
    spatial = array.shape[-len(size):]
    lead = (slice(None),) * (array.ndim - len(size))
    src, dst = [], []
    for a, s, n in zip(starts, size, spatial):
        lo = a - max(0, s - n) // 2  # the crop's first voxel in the unpadded array
        src.append(slice(max(lo, 0), min(lo + s, n)))
        dst.append(slice(max(lo, 0) - lo, min(lo + s, n) - lo))
    if all(d.start == 0 and d.stop == s for d, s in zip(dst, size)):
        return array[lead + tuple(src)]
    out = np.full(array.shape[: array.ndim - len(size)] + tuple(size), value, dtype=array.dtype)
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out


def pad_to(array: np.ndarray, size: list[int], value: float = 0) -> np.ndarray:
    """Pad the trailing spatial axes of ``array`` symmetrically up to ``size`` (never crops)."""
    spatial = array.shape[-len(size):]
    pads = [(0, 0)] * (array.ndim - len(size))
    for n, want in zip(spatial, size):
        extra = max(0, want - n)
        pads.append((extra // 2, extra - extra // 2))
    if not any(p for pair in pads for p in pair):
        return array
    return np.pad(array, pads, mode="constant", constant_values=value)


def _case_class(case: Case, key: str | None) -> str | None:
    if key is None:
        return None
    if key not in case.extra:
        raise DataError(f"case {case.case_id}: no {key!r} field for class conditioning (data.class_key)")
    return str(case.extra[key])


# ---------------------------------------------------------------------------- the dataset


class TrainingData:
    """Cases in memory and the seeded sampling of patches/slices.

    ``sample(g)`` -> dict with ``image`` (C, *size) float32 in [0, 1], ``label_index`` (*size) int64,
    ``class_index`` () int64, ``index`` () int64 (= g), ``case_index`` () int64 (the training case, the
    order of ``DataInfo.case_stats``). Batches add ``label``: (N, L, *size) one-hot.
    """

    def __init__(self, cases: list[CaseArrays], info: DataInfo, seed: int) -> None:
        self.cases = cases
        self.info = info
        self.seed = seed
        #: None: every sample index draws a fresh crop. k: samples come from a fixed pool of k crops per
        #: case (:meth:`pool_item`; a family's ``crop_pool``, e.g. the LDM's cached latents)
        self.pool_per_case: int | None = None
        self._perm_cache: dict[int, np.ndarray] = {}
        self._pool_perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, g: int) -> dict[str, Any]:
        return self.sample(int(g))

    @staticmethod
    def global_batch(batch_size: int, world_size: int) -> int:
        return batch_size * world_size

    def case_for(self, g: int) -> int:
        n = len(self.cases)
        epoch, pos = divmod(g, n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
            self._perm_cache = {epoch: perm}  # one epoch at a time is enough
        return int(perm[pos])

    @property
    def pool_size(self) -> int:
        """Crops in the pool (0 without one)."""
        return 0 if self.pool_per_case is None else len(self.cases) * self.pool_per_case

    def pool_item(self, g: int) -> int:
        """The pool crop of sample ``g``: every pool crop once per epoch of ``pool_size`` samples, in a
        seeded order. Crop p is case ``p // pool_per_case``'s crop drawn with stream ``POOL_BASE + p``."""
        epoch, pos = divmod(g, self.pool_size)
        perm = self._pool_perm.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, 4, epoch]).permutation(self.pool_size)
            self._pool_perm = {epoch: perm}
        return int(perm[pos])

    def sample(self, g: int) -> dict[str, Any]:
        """Training sample ``g`` (a global index). With a pool, pool crop ``p = pool_item(g)``, whose
        ``index`` is ``POOL_BASE + p`` (the same for every draw of that crop)."""
        if self.pool_per_case is not None:
            p = self.pool_item(g)
            return self.draw(p // self.pool_per_case, POOL_BASE + p)
        return self.draw(self.case_for(g), g)

    def draw(self, case_idx: int, g: int) -> dict[str, Any]:
        """The slice/crop of case ``case_idx`` drawn with the random stream of index ``g``."""
        import torch

        case = self.cases[case_idx]
        rng = np.random.default_rng([self.seed, 2, g])
        image, index = case.image, case.index
        info = self.info
        if info.dim == 2 and info.volume_ndim == 3:
            axis = info.slice_axis
            pool = case.fg_slices if len(case.fg_slices) else np.arange(index.shape[axis])
            k = int(pool[rng.integers(len(pool))])
            image = np.take(image, k, axis=axis + 1)
            index = np.take(index, k, axis=axis)
        shape = index.shape
        padded = [max(n, s) for n, s in zip(shape, info.size)]  # a short axis is padded, lazily (crop_padded)
        if info.dim == 3 and len(case.fg_voxels) and rng.random() < FOREGROUND_CROPS:
            # a random foreground voxel at a random place inside the crop
            voxel = case.fg_voxels[rng.integers(len(case.fg_voxels))]
            offset = [max(0, s - n) // 2 for n, s in zip(shape, info.size)]
            starts = [int(np.clip(v + o - rng.integers(0, s), 0, n - s))
                      for v, o, s, n in zip(voxel, offset, info.size, padded)]
        else:
            starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(padded, info.size)]
        image = crop_padded(image, starts, info.size, 0.0)
        index = crop_padded(index, starts, info.size, 0)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "label_index": torch.from_numpy(np.ascontiguousarray(index).astype(np.int64)),
            "class_index": torch.tensor(case.class_index, dtype=torch.int64),
            "index": torch.tensor(g, dtype=torch.int64),
            "case_index": torch.tensor(case_idx, dtype=torch.int64),
        }

    def collate(self, samples: list[dict[str, Any]], *, one_hot_labels: bool = True) -> dict[str, Any]:
        """Stack samples; with ``one_hot_labels`` add ``label`` (N, L, *size) float32. The training loader
        leaves it out: the engine builds it on the device from ``label_index`` (:func:`with_one_hot`)."""
        import torch

        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        if one_hot_labels:
            batch["label"] = one_hot(batch["label_index"], self.info.num_labels)
        return batch

    def fixed_batch(self, n: int) -> dict[str, Any]:
        """A fixed batch for previews and evaluation: the first case order of a separate stream."""
        rng = np.random.default_rng([self.seed, 3])
        picks = rng.permutation(len(self.cases))[:n]
        picks = np.resize(picks, n)
        # indices from 2**62 on never occur in training: their own crop streams
        return self.collate([self.draw(int(c), 2**62 + j) for j, c in enumerate(picks)])


class StepBatchSampler:
    """Yields, for each step in [start_step, max_steps), this rank's global sample indices."""

    def __init__(self, start_step: int, max_steps: int, batch_size: int, rank: int, world_size: int) -> None:
        self.start_step, self.max_steps = start_step, max_steps
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        gb = self.batch_size * self.world_size
        for step in range(self.start_step, self.max_steps):
            first = step * gb + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))


def make_loader(data: TrainingData, *, start_step: int, max_steps: int, batch_size: int, rank: int = 0,
                world_size: int = 1, workers: int = 0, pin_memory: bool = False) -> DataLoader[dict[str, Any]]:
    """A torch DataLoader yielding one collated batch per step from ``start_step``."""
    from torch.utils.data import DataLoader

    sampler = StepBatchSampler(start_step, max_steps, batch_size, rank, world_size)
    dataset = cast("Dataset[dict[str, Any]]", data)  # a map-style dataset: __len__ and __getitem__
    collate = functools.partial(data.collate, one_hot_labels=False)  # one-hot on the device: with_one_hot
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=False)


# ---------------------------------------------------------------------------- building


def load_case(case: Case, cfg: DataConfig, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case as training reads it (resampled to ``cfg.spacing``): (image (C, *spatial) float32 in
    dataset units, label (*spatial) int, affine). ``root``: the folder MetaImage/NRRD data files must
    resolve inside (the manifest's)."""
    from medsynth.data.nifti import read_case_arrays

    if case.label is None:
        raise DataError(f"case {case.case_id}: has no label map")
    arrays = read_case_arrays(case.images, case.label, root=root)  # root: where MetaImage/NRRD data may lie
    image, lab = arrays.images.astype(np.float32, copy=False), arrays.label
    if cfg.spacing is not None:
        if len(cfg.spacing) != lab.ndim:
            raise DataError(f"data.spacing has {len(cfg.spacing)} values but {case.label} is {lab.ndim}D")
        shape = target_shape(lab.shape, arrays.spacing, cfg.spacing)
        if shape != lab.shape:
            image = resample(image, shape, label=False).astype(np.float32, copy=False)
            lab = resample(lab.astype(np.int32)[None], shape, label=True)[0]
    return image, compact_labels(lab), arrays.affine


def compact_labels(label: np.ndarray) -> np.ndarray:
    """``label`` in the smallest of int16 / int32 / int64 that holds its values (a case's label map is
    kept for the whole build: int64 would be twice its float32 image)."""
    if label.size == 0:
        return label
    lo, hi = int(label.min()), int(label.max())
    for dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return label.astype(dtype, copy=False)
    return label


def build_training_data(manifest: Manifest, cfg: DataConfig, *, seed: int, progress: bool = False) -> TrainingData:
    """Load every training case (``manifest.training_cases()``), fit the intensity normalisation on
    them, map labels to channel indices and return the seeded :class:`TrainingData`. ``progress``:
    a bar on stderr while the cases are read and resampled."""
    from medsynth.progress import progress_bar

    cases = manifest.training_cases()
    if not cases:
        raise DataError(f"{manifest.source}: no labelled training cases")
    raw = []
    with progress_bar("loading cases", len(cases), enabled=progress, transient=True) as bar:
        for c in cases:
            raw.append((c, *load_case(c, cfg, manifest.root)))
            bar.advance()
    ndims = {lab.ndim for _, _, lab, _ in raw}
    if len(ndims) > 1:
        raise DataError(f"{manifest.source}: mixes 2D and 3D volumes")
    volume_ndim = ndims.pop()
    if cfg.dim == 3 and volume_ndim == 2:
        raise DataError(f"{manifest.source}: data.dim is 3 but the volumes are 2D (set data.dim: 2)")

    # labels: the manifest's list (background 0 always included), else the values found
    found = sorted({int(v) for _, _, lab, _ in raw for v in np.unique(lab)})
    labels = sorted(set(manifest.labels) | {0}) if manifest.labels else sorted(set(found) | {0})
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise DataError(f"{manifest.source}: label values {unknown} are not in the manifest's labels {labels}")
    names = {v: (manifest.labels or {}).get(v, "background" if v == 0 else f"label_{v}") for v in labels}

    # classes
    class_values = [_case_class(c, cfg.class_key) for c, _, _, _ in raw]
    if cfg.class_key is None:
        classes: list[str] = []
    elif cfg.classes is not None:
        classes = list(cfg.classes)
        bad = sorted({str(v) for v in class_values if v not in classes})
        if bad:
            raise DataError(f"{manifest.source}: {cfg.class_key} values {bad} are not in data.classes {classes}")
    else:
        classes = sorted({str(v) for v in class_values if v is not None})

    # normalisation fitted on the training set (per channel)
    nch = raw[0][1].shape[0]
    if cfg.ct_window is not None:
        norm = Normalization("ct_window", [float(cfg.ct_window[0])] * nch, [float(cfg.ct_window[1])] * nch)
    else:
        pcts = list(cfg.mri_percentiles or (0.5, 99.5))
        masks = [foreground_mask(img, lab) for _, img, lab, _ in raw]
        total = sum(int(m.sum()) for m in masks)
        stride = max(1, int(np.ceil(total / _PERCENTILE_VOXELS)))
        every = max(1, int(np.ceil(sum(img[0].size for _, img, _, _ in raw) / _PERCENTILE_VOXELS)))
        lo, hi = [], []
        for ch in range(nch):
            # the upper percentile over the foreground (background air would pull it into the bright tail);
            # the lower over every voxel, so the background stays the darkest value and is not clipped
            # onto the darkest tissue
            # one float64 sample at a time, partitioned in place (no second copy)
            everything = np.concatenate([img[ch].ravel()[::every] for _, img, _, _ in raw], dtype=np.float64)
            a = float(np.percentile(everything, pcts[0], overwrite_input=True))
            del everything
            values = np.concatenate([img[ch][m][::stride] for (_, img, _, _), m in zip(raw, masks)], dtype=np.float64)
            b = float(np.percentile(values, pcts[1], overwrite_input=True))
            del values
            if not b > a:
                raise DataError(f"{manifest.source}: channel {ch} has constant intensity {a} over the "
                                f"{pcts} percentiles; cannot normalise (use data.ct_window)")
            lo.append(float(a))
            hi.append(float(b))
        norm = Normalization("mri_percentiles", lo, hi, pcts, tail=cfg.upper_tail)

    info = DataInfo(
        dim=cfg.dim, slice_axis=cfg.slice_axis, volume_ndim=volume_ndim, size=list(cfg.size),
        labels=labels, label_names=names, channels=list(manifest.channels), classes=classes,
        spacing=None if cfg.spacing is None else list(cfg.spacing), normalization=norm,
        num_cases=len(raw), class_key=cfg.class_key,
    )
    lut = info.label_lut()
    digest = hashlib.sha256()
    arrays = []
    for (case, image, lab, _), cls in zip(raw, class_values):
        digest.update(case.case_id.encode("utf-8", "surrogateescape"))  # a name that is not UTF-8: its bytes
        # the same bytes as float32 / int64 copies of the whole arrays, a slab at a time
        for flat, dtype in ((np.ravel(image), np.float32), (np.ravel(lab), np.int64)):
            for a in range(0, flat.size, _STAT_SLAB):
                digest.update(np.ascontiguousarray(flat[a : a + _STAT_SLAB], dtype=dtype).tobytes())
        index = lut.astype(np.int16)[lab]  # load_case's labels are integers (compact_labels)
        fg: np.ndarray = np.zeros(0, np.int64)
        if cfg.dim == 2 and volume_ndim == 3 and cfg.foreground_slices:
            other = tuple(a for a in range(3) if a != cfg.slice_axis)
            fg = np.nonzero((lab != 0).any(axis=other))[0].astype(np.int64)
        voxels: np.ndarray = np.zeros((0, 3), np.int64)
        if cfg.dim == 3:
            voxels = np.argwhere(index != 0)
            voxels = voxels[:: max(1, -(-len(voxels) // FOREGROUND_VOXELS))].astype(np.int64)
        arrays.append(CaseArrays(case.case_id, norm.to_unit(image), index,
                                 classes.index(cls) if cls is not None else 0, fg, voxels))
    info.fingerprint = digest.hexdigest()
    info.label_means, info.label_stds = label_statistics([(a.image, a.index) for a in arrays], len(labels))
    blur_axes = tuple(a for a in range(volume_ndim) if not (cfg.dim == 2 and volume_ndim == 3 and a == cfg.slice_axis))
    info.fill_sigma = fit_fill_sigma([(a.image, a.index) for a in arrays], info.label_means, blur_axes)
    info.case_stats = case_statistics([(a.image, a.index) for a in arrays], len(labels),
                                      texture_depth(info.fill_sigma))
    return TrainingData(arrays, info, seed)


def foreground_mask(image: np.ndarray, label: np.ndarray | None, threshold: float = 0.01) -> np.ndarray:
    """The voxels MRI percentiles are taken over: ``label > 0``, or, where the label map has no
    foreground (or there is none), the voxels whose mean over channels is above ``threshold`` of the
    image's range above its minimum. image: (C, *spatial); label: (*spatial) or None -> (*spatial) bool."""
    if label is not None and (label > 0).any():
        return np.asarray(label > 0)
    mean = np.asarray(image).mean(axis=0, dtype=np.float64)
    low = float(mean.min())
    mask = mean > low + threshold * (float(mean.max()) - low)
    return mask if mask.any() else np.ones(mean.shape, bool)


def texture_depth(fill_sigma: float) -> int:
    """How far inside a label (voxels) its texture is measured: past the partial-volume blur of the
    fill (2 sigma) and one voxel more, so a flat fill is flat there."""
    return 1 + int(np.ceil(2.0 * fill_sigma))


#: voxels per slab of the per-label sums (:func:`label_sums`): float64 temporaries of 2 MiB each
_STAT_SLAB = 1 << 18


def label_sums(values: np.ndarray, index: np.ndarray, num_labels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: the voxel count, the sum and the sum of squares of ``values`` (float64), over
    ``index`` (the same shape: label-channel indices), a slab of :data:`_STAT_SLAB` voxels at a time (no
    float64 or int64 copy of a whole volume) -> three ``(num_labels,)`` arrays."""
    flat_v, flat_i = np.ravel(values), np.ravel(index)
    count, total, square = np.zeros(num_labels), np.zeros(num_labels), np.zeros(num_labels)
    for a in range(0, flat_v.size, _STAT_SLAB):
        i = flat_i[a : a + _STAT_SLAB].astype(np.intp)
        v = flat_v[a : a + _STAT_SLAB].astype(np.float64)
        count += np.bincount(i, minlength=num_labels)[:num_labels]
        total += np.bincount(i, weights=v, minlength=num_labels)[:num_labels]
        v *= v
        square += np.bincount(i, weights=v, minlength=num_labels)[:num_labels]
    return count, total, square


def label_texture(image: np.ndarray, index: np.ndarray, num_labels: int, depth: int) -> np.ndarray:
    """The high-frequency energy inside each label: the standard deviation of the discrete Laplacian
    (:func:`scipy.ndimage.laplace`, edges repeated) over the voxels at least ``depth`` face steps inside
    the label. image: (C, *spatial); index: (*spatial) label-channel indices -> (C, L) float64, NaN
    where a label has fewer than 8 such voxels."""
    from scipy import ndimage

    out = np.full((image.shape[0], num_labels), np.nan)
    index = np.asarray(index)
    inner = index.astype(np.int16 if num_labels < 2**15 - 1 else np.int32)  # its label where deep inside, else -1
    if depth > 0:  # every voxel within `depth` face steps has the same label (all labels at once)
        ball = ndimage.iterate_structure(ndimage.generate_binary_structure(index.ndim, 1), depth)
        same = ndimage.grey_erosion(index, footprint=ball, mode="nearest") == \
            ndimage.grey_dilation(index, footprint=ball, mode="nearest")
        inner[~same] = -1
        del same
    inner[inner < 0] = num_labels  # the voxels near a border: one bin past the labels
    n0 = index.shape[0]
    step = max(1, _STAT_SLAB // max(1, int(np.prod(index.shape[1:]))))
    for c in range(image.shape[0]):
        # in the image's own float type (float32 training arrays need no float64 copy), a slab of rows at
        # a time with one row of halo: the same values as the whole volume's Laplacian, without its copies
        values = np.asarray(image[c])
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        count, total, square = np.zeros(num_labels + 1), np.zeros(num_labels + 1), np.zeros(num_labels + 1)
        for a in range(0, n0, step):
            lo, hi = max(a - 1, 0), min(a + step + 1, n0)
            lap = ndimage.laplace(values[lo:hi], mode="nearest")[a - lo : a - lo + min(step, n0 - a)]
            n, t, q = label_sums(lap, inner[a : a + step], num_labels + 1)
            count += n
            total += t
            square += q
        for j in np.nonzero(count[:num_labels] >= 8)[0]:
            mean = total[j] / count[j]
            out[c, int(j)] = float(np.sqrt(max(square[j] / count[j] - mean * mean, 0.0)))
    return out


def case_statistics(cases: list[tuple[np.ndarray, np.ndarray]], num_labels: int, depth: int) -> CaseStatistics:
    """Per case: the mean and standard deviation of each channel over each label, and the label's
    texture (:func:`label_texture`). cases: (image (C, *spatial) float, index (*spatial) label-channel
    indices) pairs."""
    nch = cases[0][0].shape[0]
    means = np.full((len(cases), nch, num_labels), np.nan)
    stds = np.full_like(means, np.nan)
    texture = np.full_like(means, np.nan)
    for k, (image, index) in enumerate(cases):
        for c in range(nch):
            count, total, square = label_sums(image[c], index, num_labels)
            has = count > 0
            m = total / np.maximum(count, 1)
            sq = square / np.maximum(count, 1)
            means[k, c, has] = m[has]
            stds[k, c, has] = np.sqrt(np.maximum(sq - m * m, 0.0))[has]
        texture[k] = label_texture(image, index, num_labels, depth)
    return CaseStatistics(means, stds, texture, depth)


#: candidate partial-volume widths (Gaussian sigma, voxels) of :func:`fit_fill_sigma`
FILL_SIGMAS = tuple(i * 0.25 for i in range(9))


def label_mean_fill(means: np.ndarray, index: np.ndarray, sigma: float = 0.0,
                    axes: tuple[int, ...] | None = None) -> np.ndarray:
    """The label-mean fill in numpy: ``means`` ``(C, L)`` per channel and label, ``index`` ``(*spatial)``
    label-channel indices -> ``(C, *spatial)`` in ``means``' dtype, blurred by a Gaussian of ``sigma``
    voxels along the spatial ``axes`` (default every one; edges repeated) when ``sigma > 0``.
    (:func:`medsynth.models.conditioning.fill_image` is the same on torch tensors.)"""
    from scipy.ndimage import gaussian_filter

    index = np.asarray(index)
    fill = means[:, index if index.dtype.kind in "iu" else index.astype(np.int64)]
    if sigma <= 0:
        return fill
    axes = tuple(range(index.ndim)) if axes is None else axes
    return gaussian_filter(fill, [0.0] + [sigma if a in axes else 0.0 for a in range(index.ndim)], mode="nearest")


def fit_fill_sigma(cases: list[tuple[np.ndarray, np.ndarray]], means: list[list[float]],
                   axes: tuple[int, ...], max_cases: int = 8) -> float:
    """The sigma of :data:`FILL_SIGMAS` whose Gaussian blur (along the spatial ``axes``, edges
    repeated) of the label-mean fill has the smallest mean squared error to the images.

    cases: (image (C, *spatial) in [0, 1] units, index (*spatial) label-channel indices); at most
    ``max_cases`` evenly spaced cases are used."""
    table = np.asarray(means, np.float64)  # (C, L)
    picks = np.unique(np.linspace(0, len(cases) - 1, min(max_cases, len(cases))).round().astype(int))
    errors = np.zeros(len(FILL_SIGMAS))
    for k in picks:
        image, index = cases[k]
        # the fill in the image's float type (float32 for training arrays: no float64 volume), errors in float64
        dtype = image.dtype if image.dtype.kind == "f" else np.float64
        for i, sigma in enumerate(FILL_SIGMAS):
            diff = label_mean_fill(table.astype(dtype), index, sigma, axes)
            diff -= image
            np.square(diff, out=diff)
            errors[i] += float(np.mean(diff, dtype=np.float64))
            del diff
    return float(FILL_SIGMAS[int(np.argmin(errors))])


def label_statistics(cases: list[tuple[np.ndarray, np.ndarray]], num_labels: int
                     ) -> tuple[list[list[float]], list[list[float]]]:
    """Per channel and label: mean and standard deviation of the intensities over the label's voxels.

    cases: (image (C, *spatial) float, index (*spatial) int label-channel indices) pairs. A label
    without voxels gets the channel's overall mean and standard deviation.
    """
    nch = cases[0][0].shape[0]
    count = np.zeros(num_labels)
    total = np.zeros((nch, num_labels))
    square = np.zeros((nch, num_labels))
    for image, index in cases:
        for c in range(nch):
            n, t, q = label_sums(image[c], index, num_labels)
            total[c] += t
            square[c] += q
        count += n
    means, stds = [], []
    for c in range(nch):
        all_mean = total[c].sum() / max(count.sum(), 1)
        all_var = square[c].sum() / max(count.sum(), 1) - all_mean**2
        m = np.where(count > 0, total[c] / np.maximum(count, 1), all_mean)
        var = np.where(count > 0, square[c] / np.maximum(count, 1) - m**2, all_var)
        means.append([float(x) for x in m])
        stds.append([float(x) for x in np.sqrt(np.maximum(var, 0.0))])
    return means, stds
