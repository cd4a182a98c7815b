"""Load a trained run and generate images from label maps.

``Synthesizer.from_run(RUN)`` reads the run card (:func:`medsynth.runcard.read_run_card`) and asks
the family registry (:mod:`medsynth.registry`) for the family's backend loader, which rebuilds the
network from ``RUN/model.safetensors`` (no pickle anywhere). ``generate(mask, seed=...)`` maps the
mask's label values to the run's label channels, pads it to the network's size multiple, generates,
crops and maps intensities back to the dataset's units. A 2D run given a 3D mask generates slice by
slice along the run's slice axis (with a warning).

Empty slices: a 2D run trained on slices of 3D volumes with ``data.foreground_slices`` on never saw a
slice without foreground, so the same policy holds when generating: a slice of a 3D mask that is all
background is not generated but painted with the background's mean training intensity
(``DataInfo.label_means``; 0 in [0, 1] units when the card has none).

Appearance: a run trained on a per-case fill (``model.generator.appearance: per_case``) paints each
image from a label-mean vector: by default drawn from the training cases' distribution
(:class:`medsynth.models.appearance.AppearanceDistribution`) with the seed, once per ``generate`` call
(every slice of a volume shares it); ``appearance=`` picks it instead (see :meth:`Synthesizer.generate`).

A backend loader is called as ``loader(card, device)`` and returns a :class:`Backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict, cast

import numpy as np

from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.models.appearance import AppearanceDistribution
from medsynth.progress import ProgressBar, progress_bar
from medsynth.seeds import Stream, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medsynth.data.loader import DataInfo
    from medsynth.data.nifti import Volume
    from medsynth.runcard import RunCard

# slices generated per forward pass when a 2D run works through a 3D mask
_SLICE_CHUNK = 16
# progress units of one volume generated in one call (its share done, in percent)
_VOLUME_UNITS = 100


#: ``generate(appearance=...)``: "pooled" (the training set's means), an int (training case k's own
#: means, manifest order), {label value: intensity} or a (L,) / (C, L) sequence in the dataset's units
Appearance = Literal["pooled"] | int | Mapping[int, float] | Sequence[float] | np.ndarray


class GenerationOptions(TypedDict):
    """Options of families that sample iteratively (None: the run's default)."""

    steps: int | None
    sampler: str | None
    guidance: float | None


class Backend(Protocol):
    """A family's generator, tensors in and out (geometry and units are the Synthesizer's job).

    size_multiple: spatial sides given to ``generate`` are multiples of it.
    generate(index, class_index, seeds, options): index ``(N, *spatial)`` int64 label-channel
    indices, class_index ``(N,)`` int64, one seed per item (an item's image depends only on its own
    seed), options the generation options (``steps``, ``sampler``, ``guidance``; None when not
    given) -> ``(N, C, *spatial)`` float in [0, 1].
    reports_progress (optional, default False): ``generate`` also takes ``progress``, a callable it
    calls with the share of the call done (0..1) as it goes, so that one long volume shows an ETA.
    tiling (optional): a :class:`~medsynth.synthesis.tiling.TileSettings`; ``generate`` tiles items of
    more than ``tiling.max_voxels`` voxels (``Synthesizer.from_run(tile_voxels=...)`` sets it).
    per_case_appearance (optional, default False): ``generate`` also takes ``appearance``, the ``(C, L)``
    label means ([0, 1] units) the fill paints (None: the pooled ones).
    """

    size_multiple: int

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int],
                 options: GenerationOptions) -> torch.Tensor: ...


class Synthesizer:
    """A trained run, ready to generate.

    labels: the label values a mask may contain; dim: 2 or 3; normalization: how unit intensities map
    to the dataset's units.
    """

    def __init__(self, card: RunCard, backend: Backend, device: torch.device) -> None:
        self.run_dir = card.run_dir
        self.card = card
        self.info: DataInfo = card.data
        self.backend = backend
        self.device = device

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", tile_voxels: int | None = None) -> Synthesizer:
        """Load ``run_dir`` (run card + weights; no pickle). ``device``: auto, cpu or cuda (under
        torchrun, the process's own GPU ``cuda:LOCAL_RANK``). ``tile_voxels``: a backend that tiles
        (``tiling``: the GAN's) generates a volume of more voxels in tiles of at most this many
        (None: its default, :data:`medsynth.synthesis.tiling.DEFAULT_MAX_VOXELS`)."""
        import torch

        from medsynth.devices import resolve_device
        from medsynth.distributed import torchrun_env
        from medsynth.registry import family_names, get_family, load_object
        from medsynth.runcard import read_run_card

        card = read_run_card(Path(run_dir))
        if card.family not in family_names():
            raise CheckpointError(f"{card.path}: field 'family' is {card.family!r}, not a model family of this "
                                  f"installation (known: {', '.join(family_names())})")
        device = resolve_device(device)
        loader = load_object(get_family(card.family).backend)
        if not callable(loader):
            raise ConfigError(f"model family {card.family!r}: its backend {get_family(card.family).backend} "
                              "is not a function")
        dev = torch.device(device)
        env = torchrun_env()
        if dev.type == "cuda" and env.distributed:  # one GPU per torchrun process
            dev = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        backend = loader(card, dev)
        if tile_voxels is not None:
            if tile_voxels < 1:
                raise ConfigError(f"tile_voxels: expected a positive number of voxels, got {tile_voxels}")
            if hasattr(backend, "tiling"):
                backend.tiling = dataclasses.replace(backend.tiling, max_voxels=int(tile_voxels))
        return cls(card, backend, dev)

    @property
    def family(self) -> str:
        """The run's model family."""
        return self.card.family

    @property
    def labels(self) -> list[int]:
        return list(self.info.labels)

    @property
    def dim(self) -> int:
        return self.info.dim

    def _index(self, mask: Volume | np.ndarray) -> np.ndarray:
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

    def generate(self, mask: Volume | np.ndarray | Sequence[Volume | np.ndarray], seed: int | Sequence[int] = 0, *,
                 class_value: str | None = None, steps: int | None = None,
                 sampler: str | None = None, guidance: float | None = None,
                 progress: bool | ProgressBar = False, appearance: Appearance | None = None) -> np.ndarray:
        """mask: (H, W) or (X, Y, Z) label values (numpy array or Volume) -> image with the mask's
        shape, float32 in the dataset's intensity units ((C, *shape) when the run has C > 1 channels).

        seed picks the latent (same seed, same image); class_value the condition class for
        class-conditioned runs; steps/sampler/guidance are options of families that sample iteratively;
        progress shows the slices (or the share of the volume) generated, with an ETA, on stderr; an
        open :class:`~medsynth.progress.ProgressBar` instead: its total grows by this work, which moves it.
        appearance (runs trained on a per-case fill): the per-label means the image starts from: None
        (drawn from the training cases' distribution with the seed), ``"pooled"`` (the training set's),
        an int k (training case k's own, manifest order), ``{label value: intensity}`` (labels left out
        keep the pooled mean) or a sequence of one intensity per label (``labels`` order; ``(C, L)`` for
        C channels), intensities in the dataset's units.

        A batch: a list of masks of one shape, or a ``(B, X, Y, Z)`` array for a 3D run (a 2D run reads a
        3D array as one volume of slices: give it a list) -> ``(B, *image shape)``, image b equal to
        ``generate(mask[b], seed[b])`` (``seed`` one per mask, or one for all), generated in batches.
        """
        import torch

        if getattr(self.backend, "generates_volumes", False):  # the mask's grid is the backend's job
            return self._generate_on_grid(mask, seed, class_value=class_value, steps=steps, sampler=sampler,
                                          guidance=guidance, appearance=appearance)
        # 0. a batch of masks: one image per mask, generated together
        if isinstance(mask, (list, tuple)) or (isinstance(mask, np.ndarray) and self.info.dim == 3 and mask.ndim == 4):
            return self._generate_batch(list(mask), seed, class_value=class_value, steps=steps, sampler=sampler,
                                        guidance=guidance, progress=progress, appearance=appearance)
        if not isinstance(seed, (int, np.integer)):
            raise ConfigError(f"seed: one mask takes one seed, got {seed!r}")
        seed = int(seed)
        mask = cast("Volume | np.ndarray", mask)

        # 1. label values -> channel indices, and the shape to work on
        index = self._index(mask)
        if index.ndim not in (2, 3):
            raise DataError(f"mask has shape {index.shape}; expected a 2D or 3D label map")
        if self.info.dim == 3 and index.ndim == 2:
            raise DataError(f"this is a 3D run; the mask is 2D (shape {index.shape})")
        cls_idx = self._class_index(class_value)
        options = GenerationOptions(steps=steps, sampler=sampler, guidance=guidance)
        fill_means = self.appearance_of(appearance, seed)

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
        skip = self._skipped_slices(items_p, index.ndim)
        keep = np.nonzero(~skip)[0]
        unit = np.empty((len(items_p), self.info.num_channels, *items_p.shape[1:]), np.float32)  # (N, C, *padded)
        # one 3D volume in one call: its share done (when the backend reports it), in percent
        within = len(items) == 1 and index.ndim == 3 and getattr(self.backend, "reports_progress", False)
        what = "volume, %" if within else ("slices" if len(items) > 1 else ("volume" if index.ndim == 3 else "image"))
        per_item = _VOLUME_UNITS if within else 1
        with _opened(progress, f"generating ({what})", len(keep) * per_item) as bar:
            for start in range(0, len(keep), chunk):
                ks = keep[start : start + chunk]
                part = torch.from_numpy(np.ascontiguousarray(items_p[ks])).long()
                seeds = [derive_seed(seed, Stream.SYNTH_ITEM, int(k)) for k in ks]
                classes = torch.full((len(part),), cls_idx, dtype=torch.int64)
                done = bar.completed
                extra: dict[str, object] = {}
                if within:
                    extra["progress"] = lambda share, d=done: bar.update(d + int(share * per_item))
                if fill_means is not None:
                    extra["appearance"] = fill_means
                unit[ks] = self.backend.generate(part, classes, seeds, options, **extra).float().cpu().numpy()
                bar.update(done + len(part) * per_item)
        if skip.any():
            means = self.info.label_means
            background = [row[0] for row in means] if means is not None else [0.0] * self.info.num_channels
            unit[skip] = np.asarray(background, np.float32).reshape(-1, *([1] * (unit.ndim - 2)))
        crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
        unit = unit[(slice(None), slice(None)) + crop]

        # 4. back to the mask's layout and the dataset's intensity units
        if self.info.dim == 2 and index.ndim == 3:
            unit = np.moveaxis(unit, 0, axis + 1)  # (C, *mask.shape)
        else:
            unit = unit[0]
        image = self.info.normalization.from_unit(unit)
        return image[0] if image.shape[0] == 1 else image

    def _generate_on_grid(self, mask: Volume | np.ndarray | Sequence[Volume | np.ndarray], seed: int | Sequence[int], *,
                          class_value: str | None, steps: int | None, sampler: str | None, guidance: float | None,
                          appearance: Appearance | None) -> np.ndarray:
        """:meth:`generate` with a backend that fits each mask's grid itself (``generates_volumes``: a
        fine-tuned MAISI ControlNet run): a Volume keeps its affine; an array is read at the run's
        ``data.spacing`` on RAS axes. Images come back in the dataset's units."""
        from medsynth.data.nifti import Volume

        if class_value is not None or sampler is not None or guidance is not None or appearance is not None:
            raise ConfigError(f"the {self.family} run samples with its bundle's own scheduler: class_value, sampler, "
                              "guidance and appearance do not apply")
        many = isinstance(mask, (list, tuple)) or (isinstance(mask, np.ndarray) and mask.ndim == 4)
        masks = cast("list[Volume | np.ndarray]", list(mask) if many else [mask])  # type: ignore[arg-type]
        seeds = [int(seed)] * len(masks) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != len(masks):
            raise ConfigError(f"seed: expected one seed per mask ({len(masks)}) or one for all, got {len(seeds)}")
        out = []
        for m, s in zip(masks, seeds):
            self._index(m)  # label values the run was not trained on fail here, by value
            vol = m if isinstance(m, Volume) else Volume(
                array=np.asarray(m), affine=_spacing_affine(np.ndim(m), self.info.spacing), path=None, header={})
            out.append(np.asarray(self.backend.generate_volume(vol, s, steps=steps).array, np.float32))  # type: ignore[attr-defined]
        return np.stack(out) if many else out[0]

    def appearance_of(self, appearance: Appearance | None, seed: int) -> np.ndarray | None:
        """The ``(C, L)`` label means in [0, 1] units that ``generate(appearance=..., seed=seed)`` paints
        from (see :meth:`generate`); None for a run without a per-case fill (which takes none)."""
        if not getattr(self.backend, "per_case_appearance", False):
            if appearance is not None:
                raise ConfigError(f"appearance={appearance!r}: this run was not trained on a per-case fill "
                                  "(model.generator.appearance: per_case); it paints one appearance")
            return None
        info = self.info
        if info.label_means is None:
            raise CheckpointError(f"{self.card.path}: the card holds no label means (data.label_means)")
        pooled = np.asarray(info.label_means, np.float64)
        cases = info.case_stats.means if info.case_stats is not None else np.zeros((0, *pooled.shape))
        if appearance is None:
            rng = np.random.default_rng(derive_seed(seed, Stream.APPEARANCE))
            return AppearanceDistribution.from_cases(cases, pooled).draw(rng)
        if isinstance(appearance, str):
            if appearance != "pooled":
                raise ConfigError(f"appearance={appearance!r}: expected 'pooled', a training case index, a "
                                  "{label value: intensity} mapping or one intensity per label")
            return pooled.astype(np.float32)
        if isinstance(appearance, (int, np.integer)) and not isinstance(appearance, bool):
            if not 0 <= int(appearance) < len(cases):
                raise ConfigError(f"appearance={appearance}: the run has {len(cases)} training case(s) "
                                  f"(0..{len(cases) - 1})")
            own = cases[int(appearance)]
            return np.where(np.isfinite(own), own, pooled).astype(np.float32)
        nch, nl = pooled.shape
        if isinstance(appearance, Mapping):
            unknown = sorted(int(k) for k in appearance if int(k) not in set(info.labels))
            if unknown or nch != 1:
                raise ConfigError(f"appearance: label values {unknown} are not the run's labels {info.labels}"
                                  if unknown else f"appearance: a mapping gives one channel; the run has {nch}: "
                                  "pass a (C, L) table")
            table: np.ndarray | None = info.normalization.from_unit(pooled)
            for value, intensity in appearance.items():
                table[0, info.labels.index(int(value))] = float(intensity)  # type: ignore[index]
        else:
            table = np.asarray(appearance, np.float64).reshape(-1, nl) if np.size(appearance) == nch * nl else None
            if table is None or not np.all(np.isfinite(table)):
                raise ConfigError(f"appearance: expected {nch * nl} finite intensities ({nch} channel(s) x "
                                  f"labels {info.labels}), got {np.shape(appearance)}")
        return info.normalization.to_unit(np.asarray(table, np.float64))

    def _generate_batch(self, masks: list[Volume | np.ndarray], seed: int | Sequence[int], *, class_value: str | None,
                        steps: int | None, sampler: str | None, guidance: float | None,
                        progress: bool | ProgressBar, appearance: Appearance | None) -> np.ndarray:
        """:meth:`generate` of a batch: ``(B, *image shape)``, image b as ``generate(masks[b], seeds[b])``."""
        import torch

        # 1. seeds, channel indices and one shape
        seeds = [int(seed)] * len(masks) if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        if len(seeds) != len(masks) or not masks:
            raise ConfigError(f"seed: expected one seed per mask ({len(masks)}) or one for all, got {len(seeds)}")
        indices = [self._index(m) for m in masks]
        shapes = sorted({i.shape for i in indices})
        if len(shapes) > 1:
            raise DataError(f"a batch of masks must share one shape; got {shapes} (generate them one by one)")
        if indices[0].ndim != self.info.dim:  # a 2D run given 3D masks: each is a stack of slices already
            return np.stack([self.generate(m, s, class_value=class_value, steps=steps, sampler=sampler,
                                           guidance=guidance, progress=progress, appearance=appearance)
                             for m, s in zip(masks, seeds)])
        cls_idx = self._class_index(class_value)
        options = GenerationOptions(steps=steps, sampler=sampler, guidance=guidance)
        fills = [self.appearance_of(appearance, s) for s in seeds]

        # 2. pad to the network's size multiple; as many masks per forward as the tile bound allows
        mult = int(self.backend.size_multiple)
        spatial = indices[0].shape
        padded = [int(np.ceil(s / mult) * mult) for s in spatial]
        before = [(p - s) // 2 for p, s in zip(padded, spatial)]
        pads = [(0, 0)] + [(b, p - s - b) for b, p, s in zip(before, padded, spatial)]
        items = np.pad(np.stack(indices), pads, mode="constant", constant_values=int(self.info.label_lut()[0]))
        tiling = getattr(self.backend, "tiling", None)
        bound = int(getattr(tiling, "max_voxels", 0)) or int(np.prod(padded)) * _SLICE_CHUNK
        chunk = max(1, min(_SLICE_CHUNK, bound // int(np.prod(padded))))
        unit = np.empty((len(items), self.info.num_channels, *padded), np.float32)

        # 3. generate, chunk by chunk (each mask's noise from its own seed, as one by one)
        with _opened(progress, f"generating ({'volumes' if self.info.dim == 3 else 'images'})", len(items)) as bar:
            for start in range(0, len(items), chunk):
                ks = range(start, min(start + chunk, len(items)))
                part = torch.from_numpy(np.ascontiguousarray(items[start : ks.stop])).long()
                extra: dict[str, object] = {}
                if fills[0] is not None:
                    extra["appearance"] = np.stack([np.asarray(fills[k]) for k in ks])
                unit[start : ks.stop] = self.backend.generate(
                    part, torch.full((len(part),), cls_idx, dtype=torch.int64),
                    [derive_seed(seeds[k], Stream.SYNTH_ITEM, 0) for k in ks], options, **extra).float().cpu().numpy()
                bar.update(bar.completed + len(part))

        # 4. crop and the dataset's intensity units
        unit = unit[(slice(None), slice(None)) + tuple(slice(b, b + s) for b, s in zip(before, spatial))]
        images = np.stack([self.info.normalization.from_unit(u) for u in unit])
        return images[:, 0] if images.shape[1] == 1 else images

    def _skipped_slices(self, items: np.ndarray, mask_ndim: int) -> np.ndarray:
        """(N,) bool: the items the empty-slice policy paints instead of generating (module docstring)."""
        data = self.card.config.get("data", {})
        trained_on_foreground = bool(data.get("foreground_slices", True)) if isinstance(data, dict) else True
        if not (self.info.dim == 2 and mask_ndim == 3 and self.info.volume_ndim == 3 and trained_on_foreground):
            return np.zeros(len(items), bool)
        background = int(self.info.label_lut()[0])
        return ~(items != background).reshape(len(items), -1).any(axis=1)

    def _class_index(self, class_value: str | None) -> int:
        classes = self.info.classes
        if not classes:
            if class_value is not None:  # silently ignoring it would hand back an image of no class at all
                raise ConfigError(f"class_value {class_value!r}: the run is not class-conditioned (trained without "
                                  "data.class_key)")
            return 0
        if len(classes) == 1:
            if class_value is not None and str(class_value) not in classes:
                raise ConfigError(f"class_value {class_value!r} is not one of the run's classes {classes}")
            return 0
        if class_value is None:
            raise ConfigError(f"this run is conditioned on {self.info.class_key!r}; pass class_value, one of {classes}")
        if str(class_value) not in classes:
            raise ConfigError(f"class_value {class_value!r} is not one of the run's classes {classes}")
        return classes.index(str(class_value))

    def generate_volume(self, mask: Volume, seed: int = 0, *, class_value: str | None = None,
                        steps: int | None = None, sampler: str | None = None,
                        guidance: float | None = None, progress: bool = False,
                        appearance: Appearance | None = None) -> Volume:
        """mask: a label Volume -> an image Volume with the mask's shape and affine (progress: as
        :meth:`generate`).

        When the run was trained at a target spacing (``data.spacing``) and the mask's grid differs,
        the mask is resampled to it (nearest), generated there, and the image resampled back
        (linear) onto the mask's grid. appearance: as :meth:`generate`.
        """
        from medsynth.data.loader import resample, target_shape
        from medsynth.data.nifti import Volume

        if getattr(self.backend, "generates_volumes", False):  # it fits the mask's own grid and affine
            image = self._generate_on_grid(mask, seed, class_value=class_value, steps=steps, sampler=sampler,
                                           guidance=guidance, appearance=appearance)
            return Volume(array=image, affine=np.array(mask.affine, dtype=np.float64), path=None, header={})
        arr = np.asarray(mask.array)
        target = self.info.spacing
        if target is not None and len(target) == arr.ndim and not np.allclose(mask.spacing, target, rtol=1e-3):
            shape = target_shape(arr.shape, mask.spacing, target)
            self._index(mask)  # unknown labels fail before any work
            small = resample(arr.astype(np.int32)[None], shape, label=True)[0]
            image = self.generate(small, seed, class_value=class_value, steps=steps, sampler=sampler,
                                  guidance=guidance, progress=progress, appearance=appearance)
            chans = image if image.ndim == arr.ndim + 1 else image[None]
            image = resample(chans, arr.shape, label=False).astype(np.float32)
            image = image[0] if image.shape[0] == 1 else image
        else:
            image = self.generate(mask, seed, class_value=class_value, steps=steps, sampler=sampler,
                                  guidance=guidance, progress=progress, appearance=appearance)
        return Volume(array=image, affine=np.array(mask.affine, dtype=np.float64), path=None, header={})


def _spacing_affine(ndim: int, spacing: list[float] | None) -> np.ndarray:
    """The affine of a mask given as a bare array: ``spacing`` mm (1 mm without one) on RAS axes."""
    aff = np.eye(4)
    if spacing is not None and len(spacing) == ndim == 3:
        aff[:3, :3] = np.diag([float(s) for s in spacing])
    return aff


@contextlib.contextmanager
def _opened(progress: bool | ProgressBar, description: str, total: int) -> Iterator[ProgressBar]:
    """A bar of ``total`` units: a new one (``progress`` a bool: shown or not), or the open bar
    given, its total grown by ``total``."""
    if isinstance(progress, ProgressBar):
        progress.add_total(total)
        yield progress
        return
    with progress_bar(description, total, enabled=progress) as bar:
        yield bar
