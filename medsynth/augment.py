"""The augment job: grow a segmentation dataset with synthetic image/label pairs.

``run_augment(AugmentOptions(...))`` reads a dataset (MSD JSON, CSV or nnU-Net raw folder), makes
``num`` new masks from real ones (random spatial deformation, optional per-structure edits), an
image for each (``synthseg``, ``classic``, or a trained ``gan``/``ldm`` run through the
``Synthesizer``), checks every sample (QC), and writes them beside the real cases in the input's
format, with a manifest, a provenance record per synthetic case and a journal.

Stages, in order (nothing is written before stage 6):

1. check options; 2. load and validate the dataset; 3. refuse an output folder that is, or lies
inside, an input folder, or that contains an input; 4. read the training cases once (intensity
statistics per channel for synthesis and QC, the label set, which labels each case has);
5. plan: for synthetic case ``k`` the source case (and a lesion donor) follow from ``(seed, k)``;
6. claim the output folder (new, ``--resume`` with identical settings, or ``--overwrite`` of a
folder this job made) and store the settings in ``OUT/.medsynth_job.json``; 7. place real cases
where the format needs them (nnU-Net: hard links, or copies); 8. make the missing or corrupt
synthetic cases (in process, in ``workers`` processes, and/or sharded over torchrun ranks), each
file written atomically and recorded with its sha256 in ``OUT/.journal.jsonl``; 9. rank 0 checks
every file against the journal, writes ``provenance.jsonl`` and then, last, the manifest.

Every random draw of case ``k`` comes from ``numpy.random.SeedSequence(seed, spawn_key=(...k...))``,
so the bytes written do not depend on workers, ranks, or on a kill followed by ``--resume``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medsynth.data.atomic import atomic_write_text, temp_path_for
from medsynth.data.transforms import ClassicConfig, DeformConfig, EditConfig
from medsynth.errors import CheckpointError, ConfigError, DataError, JobError
from medsynth.journal import (
    Journal,
    check_output_state,
    claim_output,
    read_journals,
    sha256_file,
    verified_entry,
)
from medsynth.synthesis.procedural import IntensityStats, SynthSegConfig

Method = Literal["synthseg", "classic", "gan", "ldm"]
METHODS: tuple[str, ...] = ("synthseg", "classic", "gan", "ldm")
SYNTHETIC_PREFIX = "syn_"
PROVENANCE_FILE = "provenance.jsonl"
JOB_FORMAT_VERSION = 1

# SeedSequence spawn-key tags: one independent stream per purpose
_TAG_SOURCE, _TAG_DONOR, _TAG_ATTEMPT = 0, 1, 2
_STREAM_DEFORM, _STREAM_EDIT, _STREAM_IMAGE = 0, 1, 2


# ------------------------------------------------------------------------------------ config


class QCConfig(BaseModel):
    """Quality control of each synthetic sample."""

    model_config = ConfigDict(extra="forbid")

    max_tries: int = Field(5, ge=1, le=100, description="Draws per case before the job fails.")
    range_margin: float = Field(
        0.5, ge=0, description="Intensities must lie in [min - m*r, max + m*r] of the real data (r = max - min)."
    )


class AugmentConfig(BaseModel):
    """The recipe of ``medsynth augment --config``: every section is optional."""

    model_config = ConfigDict(extra="forbid")

    deform: DeformConfig = Field(default_factory=DeformConfig)
    edits: EditConfig = Field(default_factory=EditConfig)
    synthseg: SynthSegConfig = Field(default_factory=SynthSegConfig)
    classic: ClassicConfig = Field(default_factory=ClassicConfig)
    qc: QCConfig = Field(default_factory=QCConfig)


def load_augment_config(path: str | Path | None) -> AugmentConfig:
    """Read an augment recipe (YAML). ``None``: the defaults. Every bad field is reported."""
    if path is None:
        return AugmentConfig()
    from medsynth.config import format_validation_error, read_yaml_mapping

    raw = read_yaml_mapping(Path(path))
    try:
        return AugmentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


# ------------------------------------------------------------------------------------ options / results


@dataclass
class AugmentOptions:
    """What ``medsynth augment`` was asked to do.

    input: MSD JSON, CSV or nnU-Net raw folder. out: output folder (same format as the input).
    num: synthetic cases to make. seed: job seed (>= 0). model: run folder for gan/ldm.
    workers: parallel CPU processes (results identical for any value).
    """

    input: Path
    out: Path
    method: Method
    num: int
    seed: int = 0
    model: Path | None = None
    resume: bool = False
    overwrite: bool = False
    synthetic_only: bool = False
    workers: int = 1
    dry_run: bool = False
    config: AugmentConfig = field(default_factory=AugmentConfig)
    progress: bool = False


@dataclass
class PlannedCase:
    """One synthetic case to make. Paths are relative to the output folder (POSIX)."""

    index: int
    case_id: str
    source: str
    donor: str | None
    images: list[str]
    label: str


@dataclass
class CaseResult:
    """What making one synthetic case produced: files (relative path -> sha256), provenance."""

    index: int
    case_id: str
    files: dict[str, str]
    provenance: dict[str, Any]
    redraws: int


@dataclass
class AugmentSummary:
    """The outcome of a job (or of a dry run, with ``manifest=None``)."""

    out: Path
    format: str
    method: str
    plan: list[PlannedCase]
    real_cases: int
    synthetic_cases: int
    manifest: Path | None = None
    generated: int = 0
    reused: int = 0
    redraws: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    dry_run: bool = False
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "format": self.format, "method": self.method,
            "manifest": None if self.manifest is None else str(self.manifest),
            "real_cases": self.real_cases, "synthetic_cases": self.synthetic_cases,
            "generated": self.generated, "reused": self.reused, "redraws": self.redraws,
            "seconds": round(self.seconds, 3), "generate_seconds": round(self.generate_seconds, 3), "dry_run": self.dry_run,
            "rank": self.rank, "world_size": self.world_size,
        }


# ------------------------------------------------------------------------------------ seeds


def case_seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    """The seed sequence of one purpose of one case: ``SeedSequence(seed, spawn_key=key)``."""
    return np.random.SeedSequence(entropy=seed, spawn_key=tuple(int(k) for k in key))


def source_index(seed: int, k: int, n_sources: int) -> int:
    """Source case of synthetic case ``k``: every ``n_sources`` consecutive cases use each real
    case once, in an order drawn from ``(seed, k // n_sources)``."""
    epoch, pos = divmod(k, n_sources)
    perm = np.random.default_rng(case_seed_sequence(seed, _TAG_SOURCE, epoch)).permutation(n_sources)
    return int(perm[pos])


def attempt_rngs(seed: int, k: int, attempt: int) -> tuple[np.random.Generator, ...]:
    """Independent generators (deform, edit, image) for draw ``attempt`` of case ``k``."""
    return tuple(
        np.random.default_rng(case_seed_sequence(seed, _TAG_ATTEMPT, k, attempt, s))
        for s in (_STREAM_DEFORM, _STREAM_EDIT, _STREAM_IMAGE)
    )


def attempt_int_seed(seed: int, k: int, attempt: int) -> int:
    """A 31-bit integer seed for draw ``attempt`` of case ``k`` (for ``Synthesizer.generate``)."""
    return int(case_seed_sequence(seed, _TAG_ATTEMPT, k, attempt, 99).generate_state(1)[0] & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------ dataset facts


@dataclass
class DatasetFacts:
    """What stage 4 learned from the training cases (all plain, picklable data)."""

    labels: list[int]
    stats: list[IntensityStats]
    present: dict[str, list[int]]
    spatial_ndim: int


def _load_manifest(path: Path, progress: bool = False) -> Any:
    """The dataset's manifest after full validation (every file decoded and checked)."""
    try:
        from medsynth.data.validate import load_valid_dataset
    except ImportError:  # validation module absent in this build: cases are checked as they are read
        from medsynth.data.manifest import read_manifest

        return read_manifest(path)
    return load_valid_dataset(path, progress=progress)


def _read_case_arrays(case: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    """(images (C, *spatial) float32, label (*spatial) int, affine (4, 4), spacing mm) of a case."""
    from medsynth.data.nifti import read_case_arrays

    arrays = read_case_arrays(case.images, case.label)
    return arrays.images, arrays.label, arrays.affine, arrays.spacing


def gather_facts(manifest: Any, sources: list[Any], progress: bool = False) -> DatasetFacts:
    """Read every source case once: intensity statistics per channel, label values per case."""
    from medsynth.synthesis.procedural import IntensityAccumulator

    accs = [IntensityAccumulator() for _ in range(manifest.num_channels)]
    present: dict[str, list[int]] = {}
    declared = None if manifest.labels is None else set(manifest.labels)
    ndims = set()
    with _progress_bar(progress, "reading real cases", len(sources)) as advance:
        for case in sources:
            images, label, _, _ = _read_case_arrays(case)
            ndims.add(label.ndim)
            values = [int(v) for v in np.unique(label)]
            if declared is not None and not set(values) <= declared:
                bad = sorted(set(values) - declared)
                raise DataError(f"{case.label}: label value(s) {bad} are not in the manifest's labels {sorted(declared)}")
            present[case.case_id] = values
            for c in range(images.shape[0]):
                accs[c].add(images[c], label)
            advance()
    if len(ndims) > 1:
        raise DataError(f"training cases mix 2D and 3D volumes ({sorted(ndims)}D)")
    labels = sorted(declared) if declared is not None else sorted({v for vs in present.values() for v in vs} | {0})
    return DatasetFacts(labels=labels, stats=[a.result() for a in accs], present=present, spatial_ndim=ndims.pop())


# ------------------------------------------------------------------------------------ output layout


@dataclass(frozen=True)
class Layout:
    """Where files go in the output folder for one format (paths relative to OUT, POSIX)."""

    format: str
    file_ending: str
    channels: int

    def synthetic_images(self, case_id: str) -> list[str]:
        if self.format == "nnunet":
            return [f"imagesTr/{case_id}_{c:04d}{self.file_ending}" for c in range(self.channels)]
        if self.channels == 1:
            return [f"imagesTr/{case_id}.nii.gz"]
        return [f"imagesTr/{case_id}_{c:04d}.nii.gz" for c in range(self.channels)]

    def synthetic_label(self, case_id: str) -> str:
        ending = self.file_ending if self.format == "nnunet" else ".nii.gz"
        return f"labelsTr/{case_id}{ending}"

    def manifest_name(self) -> str:
        return "dataset.csv" if self.format == "csv" else "dataset.json"


def _layout_for(manifest: Any) -> Layout:
    if manifest.format == "nnunet" and manifest.file_ending not in (".nii.gz", ".nii"):
        raise DataError(
            f"{manifest.source}: nnU-Net file_ending {manifest.file_ending!r} is not NIfTI; "
            "augment writes .nii.gz/.nii only (convert the dataset first)"
        )
    return Layout(format=manifest.format, file_ending=manifest.file_ending, channels=manifest.num_channels)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_location(out: Path, manifest: Any) -> None:
    """Refuse an output folder that is, or lies inside, an input folder, or contains an input."""
    out_r = Path(out).expanduser().resolve()
    source = Path(manifest.source).resolve()
    manifest_dir = source if source.is_dir() else source.parent
    files: list[Path] = [] if source.is_dir() else [source]
    for case in manifest.cases:
        files.extend(Path(p).resolve() for p in case.images)
        if case.label is not None:
            files.append(Path(case.label).resolve())
    folders = sorted({manifest_dir, *(f.parent for f in files)})
    for folder in folders:
        if _is_within(out_r, folder):
            raise JobError(
                f"--out {out} lies inside the input folder {folder}; choose a folder outside the dataset"
            )
    for f in [source, *files]:
        if _is_within(f, out_r):
            raise JobError(f"--out {out} contains the input {f}; choose another output folder")


# ------------------------------------------------------------------------------------ job settings / claim


def job_settings(options: AugmentOptions, manifest: Any, model_sha: str | None) -> dict[str, Any]:
    """The settings a resumed job must share with the original (stored in OUT/.medsynth_job.json)."""
    from medsynth import __version__

    source = Path(manifest.source)
    manifest_file = source / "dataset.json" if source.is_dir() else source
    settings = {
        "job_format": JOB_FORMAT_VERSION,
        "medsynth_version": __version__,
        "input": str(source),
        "input_format": manifest.format,
        "input_sha256": sha256_file(manifest_file),
        "method": options.method,
        "num": int(options.num),
        "seed": int(options.seed),
        "synthetic_only": bool(options.synthetic_only),
        "model": None if options.model is None else str(Path(options.model).resolve()),
        "model_sha256": model_sha,
        "config": options.config.model_dump(mode="json"),
    }
    return json.loads(json.dumps(settings))


# ------------------------------------------------------------------------------------ model (gan / ldm)


@dataclass
class RunInfo:
    """What augment needs from a trained run's ``model_card.json``."""

    path: Path
    family: str | None
    labels: list[int] | None
    channels: int | None
    class_key: str | None
    classes: list[str]
    weights: Path


def _card_labels(raw: Any) -> list[int] | None:
    if isinstance(raw, list):
        return sorted(int(x) for x in raw)
    if isinstance(raw, dict):  # {"0": "background"} or nnU-Net style {"background": 0}
        if all(str(k).strip().isdigit() for k in raw):
            return sorted(int(k) for k in raw)
        values: set[int] = set()
        for v in raw.values():
            values.update(int(x) for x in (v if isinstance(v, list) else [v]))
        return sorted(values)
    return None


def read_run(run: Path) -> RunInfo:
    """Read ``RUN/model_card.json`` (family, label set, channels, classes, weights file)."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"--model {run}: not a run folder")
    card_path = run / "model_card.json"
    if not card_path.is_file():
        raise CheckpointError(f"--model {run}: no model_card.json (has the training finished?)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        if not isinstance(card, dict):
            raise ValueError("not a JSON object")
        data = card.get("data") if isinstance(card.get("data"), dict) else {}
        model = card.get("model") if isinstance(card.get("model"), dict) else {}
        family = next((card[k] for k in ("family", "method", "kind") if isinstance(card.get(k), str)), None)
        labels = _card_labels(data.get("labels", card.get("labels")))
        channels = data.get("channels")
        classes = [str(c) for c in data.get("classes") or []]
        class_key = data.get("class_key")
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{card_path}: unreadable model card ({exc})") from None
    return RunInfo(
        path=run, family=family, labels=labels,
        channels=len(channels) if isinstance(channels, list) else None,
        class_key=str(class_key) if class_key else None, classes=classes,
        weights=run / str(model.get("weights", "model.safetensors")),
    )


def model_checksum(info: RunInfo) -> str:
    """sha256 of the run's weights file (``RUN/model.safetensors``): the provenance checksum."""
    if not info.weights.is_file():
        raise CheckpointError(f"--model {info.path}: no {info.weights.name} (has the training finished?)")
    return sha256_file(info.weights)


def check_model(info: RunInfo, method: str, labels: list[int], channels: int, sources: list[Any]) -> None:
    """Refuse a run that does not fit the method or the dataset (kind, label set, channels, classes)."""
    if info.family in METHODS and info.family != method:
        raise ConfigError(f"--method {method} but the run {info.path} is a {info.family} model")
    if info.labels is None:
        raise CheckpointError(f"{info.path}/model_card.json: no label set (data.labels)")
    if info.labels != sorted(labels):
        raise ConfigError(f"the run {info.path} was trained with labels {info.labels}, the dataset has {sorted(labels)}")
    if info.channels is not None and info.channels != channels:
        raise ConfigError(f"the run {info.path} makes {info.channels} image channel(s), the dataset has {channels}")
    if len(info.classes) > 1:
        missing = [c.case_id for c in sources if str(c.extra.get(info.class_key, "")) not in info.classes]
        if missing:
            raise DataError(
                f"the run {info.path} is conditioned on {info.class_key!r} ({info.classes}); training case(s) "
                f"{missing[:5]} lack a known value in the manifest's {info.class_key!r} field"
            )


_SYNTHESIZERS: dict[str, Any] = {}


def _synthesizer(run: Path) -> Any:
    """Load (once per process) ``Synthesizer.from_run(run)``."""
    key = str(run)
    if key not in _SYNTHESIZERS:
        try:
            from medsynth.synthesis.synthesizer import Synthesizer
        except ImportError as exc:
            raise ConfigError(f"--method gan/ldm needs medsynth.synthesis.synthesizer, which is not available ({exc})") from None
        import torch

        local_rank = os.environ.get("LOCAL_RANK")
        if local_rank is not None and torch.cuda.is_available():  # one GPU per torchrun process
            torch.cuda.set_device(int(local_rank) % torch.cuda.device_count())
        _SYNTHESIZERS[key] = Synthesizer.from_run(run)
    return _SYNTHESIZERS[key]


# ------------------------------------------------------------------------------------ one case


@dataclass
class JobContext:
    """Everything a worker needs to make cases (sent once to each worker process)."""

    out: Path
    method: str
    seed: int
    config: AugmentConfig
    layout: Layout
    facts: DatasetFacts
    sources: dict[str, Any]
    model: Path | None
    model_sha: str | None
    class_key: str | None = None


def qc_sample(
    images: np.ndarray,
    label: np.ndarray,
    *,
    shape: tuple[int, ...],
    affine: np.ndarray,
    source_affine: np.ndarray,
    labels: list[int],
    ranges: list[tuple[float, float]],
) -> str | None:
    """Check one sample; return None if it passes, else the first reason it fails.

    images: ``(C, *spatial)``; label ``(*spatial)``; ranges: allowed (low, high) per channel."""
    if label.dtype.kind not in "iu":
        return f"label dtype {label.dtype} is not integer"
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


def _draw_sample(
    ctx: JobContext, plan: PlannedCase, attempt: int, images: np.ndarray, label: np.ndarray,
    affine: np.ndarray, spacing: tuple[float, ...], donor: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One random draw for a case: (images (C, *spatial) float32, label, record)."""
    from medsynth.data import transforms as T

    cfg = ctx.config
    rng_deform, rng_edit, rng_image = attempt_rngs(ctx.seed, plan.index, attempt)
    stats = ctx.facts.stats
    if ctx.method == "classic":
        ranges = [(s.low, s.high) for s in stats]
        out_images, out_label, record = T.classic_pair(
            images, label, spacing, deform=cfg.deform, intensity=cfg.classic, ranges=ranges, rng=rng_deform
        )
        record["mask_edits"] = []
        return out_images, out_label, record
    # mask-conditioned methods: deform the mask, edit it, then make an image for it
    params = T.draw_spatial(label.shape, spacing, cfg.deform, rng_deform)
    new_label, _ = T.apply_spatial(params, label)
    edits = T.random_edits(new_label, cfg.edits, rng_edit, ctx.facts.labels, donor=donor, donor_id=plan.donor)
    new_label = edits.label
    record: dict[str, Any] = {"spatial": params.summary(), "mask_edits": edits.edits}
    if ctx.method == "synthseg":
        from medsynth.synthesis.procedural import synthseg_image

        out = [
            synthseg_image(new_label, rng=rng_image, config=cfg.synthseg, stats=s, labels=ctx.facts.labels)
            for s in stats
        ]
        return np.stack(out), new_label, record
    assert ctx.model is not None
    int_seed = attempt_int_seed(ctx.seed, plan.index, attempt)
    synth = _synthesizer(ctx.model)
    kwargs: dict[str, Any] = {}
    if ctx.class_key is not None:  # class-conditioned run: the source case's class
        kwargs["class_value"] = str(ctx.sources[plan.source].extra[ctx.class_key])
        record["class_value"] = kwargs["class_value"]
    if hasattr(synth, "generate_volume"):  # resamples to the run's spacing and back when they differ
        from medsynth.data.nifti import Volume

        generated = synth.generate_volume(Volume(array=new_label, affine=affine), seed=int_seed, **kwargs).array
    else:
        generated = synth.generate(new_label, seed=int_seed, **kwargs)
    generated = np.asarray(generated, dtype=np.float32)
    if generated.ndim == new_label.ndim:
        generated = generated[None]
    record["generator_seed"] = int_seed
    return generated, new_label, record


def make_case(ctx: JobContext, plan: PlannedCase) -> CaseResult:
    """Make, check (QC with bounded redraws) and write one synthetic case."""
    from medsynth.data.nifti import write_volume

    source = ctx.sources[plan.source]
    images, label, affine, spacing = _read_case_arrays(source)
    donor = None
    if plan.donor is not None:
        donor = _read_case_arrays(ctx.sources[plan.donor])[1]
    margin = ctx.config.qc.range_margin
    ranges = [s.plausible(margin) for s in ctx.facts.stats]
    failures: list[str] = []
    for attempt in range(ctx.config.qc.max_tries):
        out_images, out_label, record = _draw_sample(ctx, plan, attempt, images, label, affine, spacing, donor)
        reason = qc_sample(
            out_images, out_label, shape=label.shape, affine=affine, source_affine=affine,
            labels=ctx.facts.labels, ranges=ranges,
        )
        if reason is None:
            break
        failures.append(f"try {attempt}: {reason}")
    else:
        raise JobError(
            f"synthetic case {plan.case_id} (source {plan.source}) failed quality control "
            f"{ctx.config.qc.max_tries} times: {'; '.join(failures)}"
        )
    files: dict[str, str] = {}
    for c, rel in enumerate(plan.images):
        write_volume(ctx.out / rel, out_images[c], affine, kind="image")
        files[rel] = sha256_file(ctx.out / rel)
    write_volume(ctx.out / plan.label, out_label, affine, kind="label")
    files[plan.label] = sha256_file(ctx.out / plan.label)
    provenance = {
        "case_id": plan.case_id,
        "index": plan.index,
        "method": ctx.method,
        "seed": ctx.seed,
        "attempt": attempt,
        "redraws": attempt,
        "qc_failures": failures,
        "source": plan.source,
        "donor": plan.donor,
        "images": plan.images,
        "label": plan.label,
        "model": None if ctx.model is None else str(ctx.model),
        "model_sha256": ctx.model_sha,
        **record,
    }
    return CaseResult(plan.index, plan.case_id, files, json.loads(json.dumps(provenance)), attempt)


# worker-process plumbing (spawn): the context is sent once, then only plans travel
_WORKER_CTX: JobContext | None = None


def _worker_init(ctx: JobContext) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx
    if ctx.method != "synthseg":  # synthseg never imports torch: keep worker start-up light
        import torch

        torch.set_num_threads(1)


def _worker_make(plan: PlannedCase) -> CaseResult:
    assert _WORKER_CTX is not None
    return make_case(_WORKER_CTX, plan)


# ------------------------------------------------------------------------------------ progress / ranks


class _progress_bar:
    """``with _progress_bar(on, text, total) as advance: advance()`` (rich, to stderr)."""

    def __init__(self, enabled: bool, text: str, total: int) -> None:
        self.enabled, self.text, self.total = enabled, text, total
        self._progress: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), transient=False,
        )
        self._progress.start()
        task = self._progress.add_task(self.text, total=self.total)
        return lambda n=1: self._progress.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


@dataclass
class _Ranks:
    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _ranks_from_env() -> _Ranks:
    """Rank and world size under torchrun (``RANK``, ``WORLD_SIZE``); gloo is started if needed."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise JobError("WORLD_SIZE and RANK must be integers (set by torchrun)") from None
    if world <= 1:
        return _Ranks()
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            # generation on one rank can take hours while the others wait at the final barrier
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        except (RuntimeError, ValueError) as exc:
            raise JobError(f"cannot join the torchrun job (rank {rank} of {world}): {exc}") from None
    return _Ranks(rank=dist.get_rank(), world=dist.get_world_size())


# ------------------------------------------------------------------------------------ plan


def plan_cases(
    options: AugmentOptions, sources: list[Any], facts: DatasetFacts, layout: Layout
) -> list[PlannedCase]:
    """Source (and lesion donor) of each synthetic case, from ``(seed, k)`` only."""
    n = len(sources)
    cfg = options.config.edits
    pasting = options.method != "classic" and cfg.paste_prob > 0 and cfg.lesion_label is not None
    donors = [c.case_id for c in sources if pasting and cfg.lesion_label in facts.present.get(c.case_id, [])]
    plan = []
    for k in range(options.num):
        source = sources[source_index(options.seed, k, n)].case_id
        donor = None
        if donors:
            pool = [d for d in donors if d != source] or donors
            rng = np.random.default_rng(case_seed_sequence(options.seed, _TAG_DONOR, k))
            donor = pool[int(rng.integers(len(pool)))]
        cid = f"{SYNTHETIC_PREFIX}{k:05d}"
        plan.append(PlannedCase(k, cid, source, donor, layout.synthetic_images(cid), layout.synthetic_label(cid)))
    return plan


# ------------------------------------------------------------------------------------ the job


def _check_options(options: AugmentOptions) -> None:
    if options.method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {options.method!r}")
    if options.num < 1:
        raise ConfigError(f"--num must be at least 1, got {options.num}")
    if options.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {options.seed}")
    if options.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {options.workers}")
    if options.resume and options.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if options.method in ("gan", "ldm") and options.model is None:
        raise ConfigError(f"--method {options.method} needs --model RUN (a trained run folder)")
    if options.method not in ("gan", "ldm") and options.model is not None:
        raise ConfigError(f"--model is only used by --method gan or ldm, not {options.method}")


def _place_real_file(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (atomically, via a temp name); copy if linking fails."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _real_cases_out(manifest: Any, out: Path) -> list[tuple[Any, dict[str, Path]]]:
    """Real cases as they appear in the output manifest, with the files to place (nnU-Net)."""
    from medsynth.data.manifest import nnunet_image_path, nnunet_label_path

    result = []
    for case in manifest.cases:
        if manifest.format != "nnunet":
            result.append((case, {}))
            continue
        ending = manifest.file_ending
        images = [nnunet_image_path(out, case.case_id, c, ending, case.split) for c in range(len(case.images))]
        placed = {str(p.relative_to(out).as_posix()): Path(src) for p, src in zip(images, case.images)}
        label = None
        if case.label is not None:
            label = nnunet_label_path(out, case.case_id, ending, case.split)
            placed[label.relative_to(out).as_posix()] = Path(case.label)
        result.append((replace(case, images=images, label=label), placed))
    return result


def _synthetic_case(plan: PlannedCase, out: Path, fmt: str) -> Any:
    from medsynth.data.manifest import Case

    extra = {} if fmt == "nnunet" else {"synthetic": True, "source": plan.source}
    return Case(plan.case_id, [out / p for p in plan.images], out / plan.label, "train", extra)


def run_augment(options: AugmentOptions) -> AugmentSummary:
    """Run (or, with ``dry_run``, plan) an augment job. See the module docstring for the stages."""
    t0 = time.perf_counter()
    # 1. options
    _check_options(options)
    out = Path(options.out).expanduser().absolute()
    # 2. dataset: the manifest now (cheap), every file decoded and checked after the output checks
    from medsynth.data.manifest import read_manifest

    manifest = read_manifest(Path(options.input))
    layout = _layout_for(manifest)
    sources = [c for c in manifest.cases if c.label is not None and c.split == "train"]
    if not sources:
        raise DataError(f"{manifest.source}: no labelled training cases to augment from")
    clash = sorted(c.case_id for c in manifest.cases if c.case_id.startswith(SYNTHETIC_PREFIX))
    if clash:
        raise DataError(f"{manifest.source}: case id(s) {clash[:5]} use the prefix {SYNTHETIC_PREFIX!r} kept for synthetic cases")
    # 3. output location and state (read-only, before any work)
    check_output_location(out, manifest)
    model = None if options.model is None else Path(options.model).expanduser().resolve()
    run_info = None if model is None else read_run(model)
    model_sha = None if run_info is None else model_checksum(run_info)
    settings = job_settings(options, manifest, model_sha)
    state = check_output_state(out, settings, options.resume, options.overwrite)
    ranks = _ranks_from_env() if not options.dry_run else _Ranks()
    show = options.progress and ranks.rank == 0
    # 4. validate, then facts from the real data
    manifest = _load_manifest(Path(options.input), show)
    sources = [c for c in manifest.cases if c.label is not None and c.split == "train"]
    facts = gather_facts(manifest, sources, progress=show)
    if options.method != "classic":
        from medsynth.data.transforms import check_edit_labels

        check_edit_labels(options.config.edits, facts.labels)
    if run_info is not None:
        check_model(run_info, options.method, facts.labels, manifest.num_channels, sources)
    # 5. plan
    plan = plan_cases(options, sources, facts, layout)
    real = [] if options.synthetic_only else _real_cases_out(manifest, out)
    summary = AugmentSummary(
        out=out, format=manifest.format, method=options.method, plan=plan, real_cases=len(real),
        synthetic_cases=len(plan), dry_run=options.dry_run, rank=ranks.rank, world_size=ranks.world,
    )
    if options.dry_run:
        summary.seconds = time.perf_counter() - t0
        return summary
    # 6. claim the output folder (rank 0), everyone waits
    ranks.barrier()
    if ranks.rank == 0:
        claim_output(out, settings, state)
    ranks.barrier()
    journal = Journal(out, ranks.rank)
    done = read_journals(out)
    # 7. real cases in place (nnU-Net needs its files in its folders)
    if ranks.rank == 0:
        for case, placed in real:
            key = f"real:{case.case_id}"
            if not placed or verified_entry(out, done.get(key)) is not None:
                continue
            files = {}
            for rel, src in placed.items():
                _place_real_file(src, out / rel)
                files[rel] = sha256_file(out / rel)
            journal.append({"key": key, "files": files})
    # 8. synthetic cases of this rank that are missing or corrupt
    mine = [p for p in plan if p.index % ranks.world == ranks.rank]
    todo = [p for p in mine if verified_entry(out, done.get(f"syn:{p.case_id}")) is None]
    summary.reused = len(mine) - len(todo)
    ctx = JobContext(
        out=out, method=options.method, seed=options.seed, config=options.config, layout=layout, facts=facts,
        sources={c.case_id: c for c in sources}, model=model, model_sha=model_sha,
        class_key=run_info.class_key if run_info is not None and len(run_info.classes) > 1 else None,
    )
    error: BaseException | None = None
    t_gen = time.perf_counter()
    try:
        for result in _generate(ctx, todo, options.workers, show):
            journal.append({"key": f"syn:{result.case_id}", "files": result.files, "provenance": result.provenance})
            summary.generated += 1
            summary.redraws += result.redraws
    except BaseException as exc:  # let the other ranks reach the barrier, then fail
        error = exc
    summary.generate_seconds = time.perf_counter() - t_gen
    ranks.barrier()
    if error is not None:
        raise error
    # 9. rank 0: verify everything, provenance, then the manifest, last
    if ranks.rank == 0:
        summary.manifest = _finalize(out, manifest, layout, plan, real, summary)
    ranks.barrier()
    summary.seconds = time.perf_counter() - t0
    return summary


def _generate(ctx: JobContext, todo: list[PlannedCase], workers: int, show: bool) -> Iterator[CaseResult]:
    """Yield the results of making ``todo`` (in process, or in ``workers`` spawned processes)."""
    with _progress_bar(show, f"augment ({ctx.method})", len(todo)) as advance:
        if workers <= 1 or len(todo) <= 1:
            for plan in todo:
                yield make_case(ctx, plan)
                advance()
            return
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn"),
            initializer=_worker_init, initargs=(ctx,),
        )
        try:
            pending = {pool.submit(_worker_make, plan) for plan in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield fut.result()
                    advance()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _finalize(
    out: Path, manifest: Any, layout: Layout, plan: list[PlannedCase],
    real: list[tuple[Any, dict[str, Path]]], summary: AugmentSummary,
) -> Path:
    from medsynth.data.manifest import write_manifest

    entries = read_journals(out)
    missing, provenance = [], []
    for case, placed in real:
        if placed and verified_entry(out, entries.get(f"real:{case.case_id}")) is None:
            missing.append(case.case_id)
    for p in plan:
        entry = verified_entry(out, entries.get(f"syn:{p.case_id}"))
        if entry is None:
            missing.append(p.case_id)
        else:
            provenance.append(entry["provenance"])
    if missing:
        raise JobError(
            f"{len(missing)} case(s) are missing or do not match the journal ({', '.join(missing[:5])}); "
            "no manifest written; run again with --resume"
        )
    summary.redraws = sum(int(p.get("redraws", 0)) for p in provenance)  # over every synthetic case
    journal = Journal(out, 0)
    text = "".join(json.dumps(p, sort_keys=True) + "\n" for p in sorted(provenance, key=lambda p: p["index"]))
    atomic_write_text(out / PROVENANCE_FILE, text)
    journal.append({"key": f"final:{PROVENANCE_FILE}", "files": {PROVENANCE_FILE: sha256_file(out / PROVENANCE_FILE)}})
    cases = [c for c, _ in real] + [_synthetic_case(p, out, layout.format) for p in plan]
    result = replace(manifest, cases=cases, labels=manifest.labels, source=None, root=out)
    path = write_manifest(result, out / layout.manifest_name(), fmt=layout.format) if layout.format != "nnunet" \
        else write_manifest(result, out, fmt="nnunet")
    journal.append({"key": f"final:{path.name}", "files": {path.name: sha256_file(path)}})
    return path

