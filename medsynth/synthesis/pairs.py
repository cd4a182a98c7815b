"""One synthetic training pair: deform -> edit -> image -> QC, for one source case and one seed.

The one core behind ``medsynth augment`` (each synthetic case), :class:`~medsynth.synthesis.online.RandSyntheticPaird`
and :class:`~medsynth.synthesis.online.SyntheticMixDataset`: the same source, settings, intensity
statistics and seed give the same pair on every path.

Methods (:func:`medsynth.registry.method_names`):

- ``classic``: one random spatial transform applied jointly to the real image (linear) and label
  (nearest), then MONAI random intensity transforms sized by each channel's robust range
  (``stats[c].low .. stats[c].high``); the image keeps the real image's units.
- ``synthseg``: deform the label, edit it, then a SynthSeg-style random-contrast image per channel,
  mapped into ``stats[c].low .. stats[c].high``. This range is the only intensity match of the
  core: the caller picks it (the dataset's robust range in ``augment``; the replaced image's own
  min/max in the online API with ``match_range=True``).
- a trained family (``gan``, ``ldm``, ...): deform the label, edit it, then
  ``Synthesizer.generate_volume``, which resamples the label to the run's training spacing, generates
  there and resamples the image back onto the source grid. Its intensities are the run's own
  (the dataset's units it was trained on) and are never stretched.

Seeds: attempt ``a`` of the pair named by ``seq`` draws from ``SeedSequence(seq.entropy,
spawn_key=seq.spawn_key + (a, PairStream.X))``, one stream per stage (:class:`medsynth.seeds.PairStream`);
the seed handed to ``generate_volume`` is the first 31 bits of the ``MODEL`` stream's state.
QC checks every attempt (:func:`qc_sample`); a failed one is redrawn with the next attempt's streams,
up to ``qc.max_tries`` attempts.

The spatial deformation of every method is the first draw of the ``DEFORM`` stream
(:func:`medsynth.data.transforms.draw_spatial`). A pair's record names that stream, the grid and the
deformation settings under ``"warp"`` (:func:`warp_record`), so the very same field can be drawn again
from a provenance record (:func:`warp_from_record`) and applied to the source image
(:func:`warp_like_pair`): what a synthetic image is compared with to flag a warped copy of its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medsynth.data import transforms as T
from medsynth.data.labels import label_problems
from medsynth.data.nifti import Volume
from medsynth.errors import ConfigError, DataError, QualityControlError
from medsynth.registry import TRAINING_FREE_METHODS, is_model_method, method_names
from medsynth.seeds import PairStream
from medsynth.synthesis.procedural import IntensityStats, SynthSegConfig, synthseg_image
from medsynth.synthesis.qc import LabelIntensityStats, QcSettings, check_label_agreement

if TYPE_CHECKING:
    from medsynth.runcard import RunCard
    from medsynth.synthesis.synthesizer import Synthesizer

__all__ = [
    "GENERATE_OPTIONS",
    "GenerateOptions",
    "PairSettings",
    "PairSource",
    "QCConfig",
    "SyntheticPair",
    "agreement_reference",
    "attempt_streams",
    "check_method",
    "check_run_family",
    "load_synthesizer",
    "draw_label",
    "make_pair",
    "model_seed",
    "pair_problem",
    "qc_sample",
    "warp_from_record",
    "warp_like_pair",
    "warp_record",
]


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of ``Synthesizer.generate_volume`` a pair passes on (absent: the run's default)."""

    class_value: str
    steps: int
    sampler: str
    guidance: float


#: the keys of :class:`GenerateOptions`
GENERATE_OPTIONS: tuple[str, ...] = tuple(GenerateOptions.__annotations__)


class QCConfig(BaseModel):
    """Quality control of each synthetic sample."""

    model_config = ConfigDict(extra="forbid")

    max_tries: int = Field(default=5, ge=1, le=100, description="Draws per case before the job fails.")
    range_margin: float = Field(
        default=0.5, ge=0, description="Intensities must lie in [min - m*r, max + m*r] of the real data (r = max - min)."
    )
    label_agreement: bool = Field(
        default=True,
        description="gan/ldm: each image must follow its mask the way the run's training images follow theirs "
                    "(per-label mean and spread, contrast between touching labels, edges at label borders: "
                    "medsynth.synthesis.qc); a failing image is redrawn, and a run whose images fail every try "
                    "stops the job. Off: only the range checks.",
    )
    texture: bool = Field(
        default=True,
        description="gan/ldm, with label_agreement: each label's inside must hold at least a fraction of the "
                    "high-frequency energy (texture) the training cases have, so flat, untextured output is "
                    "redrawn (a briefly trained run paints flat images: turn this off to try one out).",
    )


@dataclass(frozen=True)
class PairSettings:
    """How to make a pair: the method and the settings of each stage (all picklable)."""

    method: str
    deform: T.DeformConfig = field(default_factory=T.DeformConfig)
    edits: T.EditConfig = field(default_factory=T.EditConfig)
    synthseg: SynthSegConfig = field(default_factory=SynthSegConfig)
    classic: T.ClassicConfig = field(default_factory=T.ClassicConfig)
    qc: QCConfig = field(default_factory=QCConfig)


@dataclass
class PairSource:
    """The real case a pair is made from.

    images: ``(C, *spatial)`` float32 in the dataset's units; label: ``(*spatial)`` int64;
    affine: ``(4, 4)`` voxel -> RAS mm of both; donor: another case's label map ``(*spatial')`` for
    lesion pasting (None: no pasting), donor_id its case id.
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    donor: np.ndarray | None = None
    donor_id: str | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per spatial axis (column norms of the affine)."""
        norms = np.linalg.norm(np.asarray(self.affine, dtype=np.float64)[:3, : self.label.ndim], axis=0)
        return tuple(float(s) for s in norms)


@dataclass
class SyntheticPair:
    """A pair that passed QC: images ``(C, *spatial)`` float32 and label ``(*spatial)`` int64 on the
    source's grid; record: what was drawn (JSON-ready); attempt: the attempt kept (0-based);
    qc_failures: ``"try a: reason"`` of each rejected attempt."""

    images: np.ndarray
    label: np.ndarray
    record: dict[str, object]
    attempt: int
    qc_failures: list[str]


def check_method(method: str, where: str = "method") -> None:
    """ConfigError unless ``method`` is a training-free method or a registered family."""
    if method not in method_names():
        raise ConfigError(f"{where} must be one of {', '.join(method_names())}, got {method!r}")


def check_run_family(card: RunCard, method: str, option: str = "method") -> None:
    """ConfigError unless the run's family is ``method`` (``option``: the parameter to name)."""
    if card.family != method:
        raise ConfigError(f"{option} {method} but the run {card.run_dir} is a {card.family} model")


_SYNTHESIZERS: dict[tuple[str, str, str], Synthesizer] = {}


def load_synthesizer(run: Path, device: str = "auto", *, labels: Path | None = None) -> Synthesizer:
    """``Synthesizer.from_run(run, device=device)``, loaded once per process and kept; with ``labels``, ``run``
    is a MAISI bundle and ``labels`` its label mapping (:func:`medsynth.synthesis.maisi.bundle_synthesizer`)."""
    from medsynth.synthesis.synthesizer import Synthesizer

    key = (str(Path(run).resolve()), device, "" if labels is None else str(Path(labels).resolve()))
    if key not in _SYNTHESIZERS:
        if labels is not None:
            from medsynth.synthesis.maisi import bundle_synthesizer

            _SYNTHESIZERS[key] = bundle_synthesizer(run, labels, device)
        else:
            _SYNTHESIZERS[key] = Synthesizer.from_run(run, device=device)
    return _SYNTHESIZERS[key]


def attempt_streams(seq: np.random.SeedSequence, attempt: int) -> dict[PairStream, np.random.SeedSequence]:
    """The seed sequence of each stage of attempt ``attempt`` of the pair named by ``seq``."""
    key = tuple(int(k) for k in seq.spawn_key)
    return {s: np.random.SeedSequence(entropy=seq.entropy, spawn_key=(*key, int(attempt), int(s))) for s in PairStream}


def warp_record(stream: np.random.SeedSequence, shape: tuple[int, ...], spacing: tuple[float, ...],
                deform: T.DeformConfig) -> dict[str, object]:
    """What draws a pair's deformation again (JSON-ready): the ``DEFORM`` stream's entropy and spawn
    key, the grid ``shape`` (voxels), its ``spacing`` (mm) and the deformation settings."""
    return {
        "entropy": _entropy(stream.entropy),
        "spawn_key": [int(k) for k in stream.spawn_key],
        "shape": [int(n) for n in shape],
        "spacing": [float(v) for v in spacing],
        "deform": deform.model_dump(mode="json"),
    }


def _entropy(value: object) -> int | list[int]:
    """A SeedSequence's entropy as JSON: an int, or a list of ints."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [int(v) for v in value]
    return int(value)  # type: ignore[call-overload]


def warp_from_record(record: dict[str, object], where: str = "provenance record") -> T.SpatialParams:
    """The spatial transform of a pair, drawn again from its record (a provenance line of
    ``medsynth augment``, or :attr:`SyntheticPair.record`). DataError when the record has no
    ``"warp"`` (written by an older medsynth) or the transform drawn does not match the ``"spatial"``
    summary it holds (another medsynth draws differently)."""
    warp = record.get("warp")
    if not isinstance(warp, dict):
        raise DataError(f"{where}: no \"warp\" entry (written by an older medsynth); the deformation cannot be drawn again")
    try:
        entropy = warp["entropy"]
        stream = np.random.SeedSequence(entropy=[int(v) for v in entropy] if isinstance(entropy, list) else int(entropy),
                                        spawn_key=tuple(int(k) for k in warp["spawn_key"]))
        shape = tuple(int(n) for n in warp["shape"])
        spacing = tuple(float(v) for v in warp["spacing"])
        deform = T.DeformConfig.model_validate(warp["deform"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{where}: unreadable \"warp\" entry ({exc})") from None
    params = T.draw_spatial(shape, spacing, deform, np.random.default_rng(stream))
    if "spatial" in record and params.summary() != record["spatial"]:
        raise DataError(f"{where}: the deformation drawn again differs from the one recorded (another medsynth "
                        "version draws differently)")
    return params


def warp_like_pair(image: np.ndarray, record: dict[str, object], where: str = "provenance record") -> np.ndarray:
    """``image`` ``(*spatial)`` or ``(C, *spatial)`` (the pair's source image) warped by the pair's own
    deformation (:func:`warp_from_record`; linear, border replicated), float32 of the same shape.
    DataError when the image's grid is not the recorded one."""
    params = warp_from_record(record, where)
    arr = np.asarray(image, dtype=np.float32)
    channels = arr if arr.ndim == len(params.shape) + 1 else arr[None]
    if tuple(channels.shape[1:]) != params.shape:
        raise DataError(f"{where}: image shape {arr.shape} is not the recorded grid {params.shape}")
    _, warped = T.apply_spatial(params, np.zeros(params.shape, dtype=np.int64), channels)
    assert warped is not None
    return warped if arr.ndim == len(params.shape) + 1 else warped[0]


def qc_sample(
    images: np.ndarray,
    label: np.ndarray,
    *,
    shape: tuple[int, ...],
    affine: np.ndarray,
    source_affine: np.ndarray,
    labels: Sequence[int],
    ranges: Sequence[tuple[float, float]],
) -> str | None:
    """Check one sample; return None if it passes, else the first reason it fails.

    images: ``(C, *spatial)``; label ``(*spatial)``; ranges: allowed (low, high) per channel."""
    problems = label_problems(label, integer_dtype=True)
    if problems:
        return problems[0]
    if tuple(label.shape) != tuple(shape):
        return f"label shape {tuple(label.shape)} differs from the source's {tuple(shape)}"
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != tuple(shape) or images.shape[0] != len(ranges):
        return f"image shape {tuple(images.shape)} does not match {len(ranges)} channel(s) of {tuple(shape)}"
    if not np.allclose(affine, source_affine, rtol=0, atol=1e-6):
        return "affine differs from the source case"
    extra = sorted(set(np.unique(label).tolist()) - set(labels))
    if extra:
        return f"label values {extra} are not in the dataset's labels"
    for c, (low, high) in enumerate(ranges):
        img = images[c]
        if not np.all(np.isfinite(img)):
            return f"channel {c} has NaN or Inf"
        lo, hi = float(img.min()), float(img.max())
        if lo < low or hi > high:
            return f"channel {c} intensities [{lo:.4g}, {hi:.4g}] outside the plausible range [{low:.4g}, {high:.4g}]"
    return None


def agreement_reference(synthesizer: Synthesizer | None) -> LabelIntensityStats | None:
    """The run's per-label training statistics in the dataset's units, for the label-agreement check
    of a family method's images (None: no run, or a run trained without those statistics)."""
    if synthesizer is None or synthesizer.info.label_means is None or synthesizer.info.label_stds is None:
        return None
    return LabelIntensityStats.from_info(synthesizer.info, units="dataset")


def make_pair(
    source: PairSource,
    settings: PairSettings,
    *,
    stats: Sequence[IntensityStats],
    labels: Sequence[int],
    seq: np.random.SeedSequence,
    synthesizer: Synthesizer | None = None,
    generate_options: GenerateOptions | None = None,
    where: str = "synthetic pair",
) -> SyntheticPair:
    """Make one synthetic pair from ``source`` that passes QC.

    stats: intensity facts per image channel (synthseg's output range, classic's intensity sizes,
        the QC range). labels: the label values (sorted) edits and synthseg draw for; QC refuses any
        other value. seq: the seed of this pair (see the module docstring).
    synthesizer: the trained run (a family method only); generate_options: extra arguments of its
        ``generate_volume`` (``class_value``, ``steps``, ...).
    Raises QualityControlError (a JobError) naming ``where`` after ``qc.max_tries`` failed attempts, DataError when the run
    makes another number of channels than the source has.
    """
    if len(stats) != source.images.shape[0]:
        raise ConfigError(f"{where}: {len(stats)} intensity statistics for {source.images.shape[0]} channel(s)")
    if is_model_method(settings.method) and synthesizer is None:
        raise ConfigError(f"{where}: method {settings.method!r} needs a trained run")
    ranges = [s.plausible(settings.qc.range_margin) for s in stats]
    agreement = agreement_reference(synthesizer) if settings.qc.label_agreement else None
    failures: list[str] = []
    for attempt in range(settings.qc.max_tries):
        images, label, record = _draw(source, settings, stats, list(labels), attempt_streams(seq, attempt),
                                      synthesizer, generate_options or GenerateOptions())
        reason = pair_problem(images, label, source, settings, labels=labels, ranges=ranges, agreement=agreement)
        if reason is None:
            return SyntheticPair(images, label, record, attempt, failures)
        failures.append(f"try {attempt}: {reason}")
    raise QualityControlError(f"{where} failed quality control {settings.qc.max_tries} times: {'; '.join(failures)}")


def pair_problem(images: np.ndarray, label: np.ndarray, source: PairSource, settings: PairSettings, *,
                 labels: Sequence[int], ranges: Sequence[tuple[float, float]],
                 agreement: LabelIntensityStats | None) -> str | None:
    """The QC of one attempt at a pair of ``source``: :func:`qc_sample`, then (``agreement``: the run's
    per-label statistics, :func:`agreement_reference`) whether the image follows its mask. None: passed."""
    reason = qc_sample(images, label, shape=source.label.shape, affine=source.affine,
                       source_affine=source.affine, labels=labels, ranges=ranges)
    if reason is None and agreement is not None:
        result = check_label_agreement(images, label, agreement, QcSettings(texture=settings.qc.texture))
        if not result.passed:
            reason = "the image does not follow its mask (" + "; ".join(result.reasons[:3]) + \
                ("; ..." if len(result.reasons) > 3 else "") + "); qc.label_agreement: false turns this check off"
    return reason


def draw_label(source: PairSource, settings: PairSettings, labels: list[int],
               streams: dict[PairStream, np.random.SeedSequence]) -> tuple[np.ndarray, dict[str, object]]:
    """The label of one attempt of a synthseg or family pair: ``source.label`` deformed (``DEFORM``
    stream), then edited (``EDIT``); ``(label (*spatial) int64, record)``."""
    spacing = source.spacing
    warp = warp_record(streams[PairStream.DEFORM], tuple(source.label.shape), spacing, settings.deform)
    params = T.draw_spatial(source.label.shape, spacing, settings.deform, np.random.default_rng(streams[PairStream.DEFORM]))
    deformed, _ = T.apply_spatial(params, source.label)
    edits = T.random_edits(deformed, settings.edits, np.random.default_rng(streams[PairStream.EDIT]), labels,
                           donor=source.donor, donor_id=source.donor_id)
    return edits.label, {"spatial": params.summary(), "warp": warp, "mask_edits": edits.edits}


def model_seed(streams: dict[PairStream, np.random.SeedSequence]) -> int:
    """The seed an attempt hands to a trained run: the first 31 bits of its ``MODEL`` stream."""
    return int(streams[PairStream.MODEL].generate_state(1)[0] & 0x7FFFFFFF)


def _draw(
    source: PairSource,
    settings: PairSettings,
    stats: Sequence[IntensityStats],
    labels: list[int],
    streams: dict[PairStream, np.random.SeedSequence],
    synthesizer: Synthesizer | None,
    options: GenerateOptions,
) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """One attempt: (images (C, *spatial) float32, label (*spatial) int64, record)."""
    # 1. classic: one joint spatial transform, then intensity transforms of the real image
    if settings.method == "classic":
        warp = warp_record(streams[PairStream.DEFORM], tuple(source.label.shape), source.spacing, settings.deform)
        images, label, classic = T.classic_pair(
            source.images, source.label, source.spacing, deform=settings.deform, intensity=settings.classic,
            ranges=[(s.low, s.high) for s in stats], rng=np.random.default_rng(streams[PairStream.DEFORM]),
        )
        return images, label, {**classic, "warp": warp, "mask_edits": []}
    # 2. deform the label, then edit it
    label, record = draw_label(source, settings, labels, streams)
    # 3. an image for the new label
    if settings.method == "synthseg":
        rng = np.random.default_rng(streams[PairStream.IMAGE])
        images = np.stack([synthseg_image(label, rng=rng, config=settings.synthseg, stats=s,
                                          labels=labels) for s in stats])
        return images, label, record
    if settings.method in TRAINING_FREE_METHODS or synthesizer is None:
        raise ConfigError(f"method {settings.method!r} has no image stage here")
    seed = model_seed(streams)
    if "class_value" in options:
        record["class_value"] = options["class_value"]
    generated = synthesizer.generate_volume(Volume(array=label, affine=np.asarray(source.affine, dtype=np.float64)),
                                            seed, **options)
    images = np.asarray(generated.array, dtype=np.float32)
    if images.ndim == label.ndim:
        images = images[None]
    if images.shape[0] != source.images.shape[0]:
        raise DataError(f"the run {synthesizer.run_dir} makes {images.shape[0]} image channel(s), "
                        f"the source has {source.images.shape[0]}")
    record["generator_seed"] = seed
    return images, label, record
