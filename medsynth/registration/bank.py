"""The anatomy bank: labelled cases registered to unlabelled images, their labels propagated and fused.

``fit_bank(BankOptions(...))`` (``medsynth anatomy``) registers every labelled training case (an *atlas*)
to every unlabelled image, warps the atlas's label map onto that image's grid and fuses the propagated
maps into one mask per unlabelled image (majority vote, or locally weighted voting), with a per-voxel
agreement map. It also registers the labelled cases to each other: each one, fused from the others, is a
leave-one-out measurement of how good a propagated mask is (Dice per label against the true labels,
beside identity and affine-only). What it writes into ``OUT``:

- ``bank.json``: the bank's facts: the sha256 of every input file and the label set (a bank is refused
  with another dataset), the settings, one record per unlabelled image (agreement, atlases used and
  skipped, folding, similarity), the leave-one-out table;
- ``masks/ID.nii.gz`` (the propagated label map, on the unlabelled image's grid and with its affine and
  codes), ``agreement/ID.nii.gz`` (float32 in [0, 1]: the share of the vote the winning label got);
- ``fields/ATLAS__ID.npy`` (with ``keep_fields``): each displacement field (float32, ``(*grid, ndim)``,
  RAS mm on the unlabelled image's grid; :class:`~medsynth.registration.Registration`), which
  ``augment --anatomy bank:BANK`` scales to make in-between anatomies;
- ``report.md`` with ``propagated.png`` (propagated masks over their images, lowest agreement first).

Each unlabelled image is one unit of work; its files are recorded with their sha256 in
``.bank_journal.jsonl`` when they are complete, so a killed run resumes (``resume=True``) where it
stopped. A pair whose registration fails or folds is skipped with a warning and counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import io
import json
import multiprocessing
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import SimpleITK as sitk

from medsynth.data.atomic import atomic_write_text, atomic_write_with
from medsynth.data.manifest import Case, Manifest, read_manifest
from medsynth.data.nifti import CaseArrays, read_case_arrays, read_volume, write_volume
from medsynth.data.unlabelled import UnlabelledImage, read_unlabelled_image, unlabelled_cases
from medsynth.data.validate import load_valid_dataset
from medsynth.errors import ConfigError, DataError, JobError
from medsynth.journal import output_lock, sha256_file
from medsynth.progress import progress_bar
from medsynth.registration import (
    Registration,
    RegistrationError,
    RegistrationSettings,
    fuse_labels,
    local_weights,
    register,
    warp_image,
    warp_labels,
)
from medsynth.registration.refine import intensity_fusion

__all__ = ["BANK_FILE", "AnatomyBank", "BankOptions", "BankSummary", "dice_per_label", "fit_bank", "open_bank"]

BANK_FILE = "bank.json"
BANK_JOURNAL = ".bank_journal.jsonl"
BANK_FORMAT = 1
#: workers per usable core, at most (each holds its atlases in memory)
WORKERS_MAX = 16
Fusion = Literal["majority", "weighted", "intensity"]
#: the fusions, in the order ``--fusion`` lists them (intensity: chosen by leave-one-out Dice, RESULTS.md)
FUSIONS: tuple[str, ...] = ("intensity", "majority", "weighted")


@dataclass
class BankOptions:
    """What ``medsynth anatomy`` is asked to do.

    dataset: the labelled dataset (any manifest format; its unlabelled cases join the pool).
    out: the bank folder. unlabelled: ``--unlabelled`` (a manifest or a folder of images), or None.
    registration: the settings of every pair. fusion: ``intensity`` (the votes as a prior times a Gaussian
    intensity model per label fitted on the target, :mod:`medsynth.registration.refine`), ``majority`` or
    ``weighted`` (locally weighted voting). loo: also measure leave-one-out accuracy on the labelled cases.
    keep_fields: store each atlas -> image displacement field (for ``augment --anatomy bank:``). workers: processes.
    """

    dataset: Path
    out: Path
    unlabelled: Path | None = None
    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    fusion: Fusion = "intensity"
    loo: bool = True
    keep_fields: bool = True
    workers: int = 1
    resume: bool = False
    overwrite: bool = False
    progress: bool = False


@dataclass
class BankSummary:
    """The outcome of :func:`fit_bank`."""

    out: Path
    targets: int
    fitted: int
    reused: int
    skipped_pairs: int
    loo: dict[str, dict[str, float]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "targets": self.targets, "fitted": self.fitted, "reused": self.reused,
                "skipped_pairs": self.skipped_pairs, "loo": self.loo, "seconds": round(self.seconds, 2)}


# ---------------------------------------------------------------------------- measures


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice of each label value (NaN where neither map has it)."""
    out = {}
    for v in labels:
        a, b = pred == v, truth == v
        denom = int(a.sum()) + int(b.sum())
        out[int(v)] = float("nan") if denom == 0 else 2.0 * int((a & b).sum()) / denom
    return out


def _identity(fixed_shape: tuple[int, ...], fixed_affine: np.ndarray) -> Registration:
    """The zero field on a grid: resampling through it is resampling in world coordinates."""
    ndim = len(fixed_shape)
    return Registration(field=np.zeros((*fixed_shape, ndim), dtype=np.float32), fixed_affine=fixed_affine,
                        similarity_before=float("nan"), similarity_after=float("nan"), folding_fraction=0.0,
                        converged=True, seconds=0.0)


# ---------------------------------------------------------------------------- one target


@dataclass
class _Atlas:
    case_id: str
    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray


@dataclass
class _Target:
    case_id: str
    images: list[str]
    labelled: bool  # a labelled case, for leave-one-out (its label path is label)
    label: str | None = None


@dataclass
class _Task:
    """One unit of work, sent to a worker: a target and the atlases to fuse for it."""

    target: _Target
    atlases: list[str]
    out: str
    settings: RegistrationSettings
    fusion: Fusion
    keep_fields: bool
    channels: int
    ndim: int
    labels: list[int]
    root: str | None


_ATLASES: dict[str, _Atlas] = {}
_ATLAS_CASES: dict[str, tuple[list[str], str, str | None]] = {}


def _atlas(case_id: str) -> _Atlas:
    if case_id not in _ATLASES:
        images, label, root = _ATLAS_CASES[case_id]
        arrays: CaseArrays = read_case_arrays([Path(p) for p in images], Path(label),
                                              root=None if root is None else Path(root))
        _ATLASES[case_id] = _Atlas(case_id, arrays.images, arrays.label, arrays.affine)
    return _ATLASES[case_id]


def _init_worker(atlas_cases: dict[str, tuple[list[str], str, str | None]]) -> None:
    _ATLAS_CASES.update(atlas_cases)


def _fuse(target_images: np.ndarray, propagated: list[np.ndarray], warped: list[np.ndarray],
          fusion: Fusion) -> tuple[np.ndarray, np.ndarray]:
    if fusion == "intensity":
        return intensity_fusion(target_images, propagated)
    weights = local_weights(target_images[0], warped) if fusion == "weighted" else None
    return fuse_labels(propagated, weights=weights)


@contextlib.contextmanager
def _itk_threads(threads: int) -> Iterator[None]:
    """ITK's default thread count set to ``threads`` for the block (restored after): a filter the registration
    does not configure itself would otherwise split its work by the machine's cores, and the bytes of a bank
    would depend on where it ran (``--workers``)."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def _run_task(task: _Task) -> dict[str, Any]:
    """Register every atlas of ``task`` to its target, fuse, write the target's files (an unlabelled
    target) or measure Dice (a labelled one). Returns the journal record."""
    with _itk_threads(task.settings.threads):
        return _run_task_threads(task)


def _run_task_threads(task: _Task) -> dict[str, Any]:
    t0 = time.perf_counter()
    tgt = task.target
    root = None if task.root is None else Path(task.root)
    if tgt.labelled:
        assert tgt.label is not None
        arrays = read_case_arrays([Path(p) for p in tgt.images], Path(tgt.label), root=root)
        fixed = UnlabelledImage(tgt.case_id, arrays.images, arrays.affine, arrays.codes)
        truth: np.ndarray | None = arrays.label
    else:
        fixed = read_unlabelled_image(Case(tgt.case_id, [Path(p) for p in tgt.images]), channels=task.channels,
                                      spatial_ndim=task.ndim, root=root)
        truth = None
    image = fixed.images[0]
    propagated, warped, used, skipped, folding, sims = [], [], [], [], [], []
    affine_labels, identity_labels = [], []
    out = Path(task.out)
    files: dict[str, str] = {}
    for atlas_id in task.atlases:
        atlas = _atlas(atlas_id)
        try:
            reg = register(image, fixed.affine, atlas.images[0], atlas.affine, task.settings)
        except RegistrationError as exc:
            skipped.append({"atlas": atlas_id, "reason": str(exc)})
            continue
        propagated.append(warp_labels(atlas.label, atlas.affine, reg))
        warped.append(warp_image(atlas.images[0], atlas.affine, reg))
        used.append(atlas_id)
        folding.append(reg.folding_fraction)
        sims.append([reg.similarity_before, reg.similarity_after])
        if truth is not None:
            ident = _identity(image.shape, fixed.affine)
            identity_labels.append(warp_labels(atlas.label, atlas.affine, ident))
            try:
                aff = register(image, fixed.affine, atlas.images[0], atlas.affine,
                               replace(task.settings, transform="affine"))
                affine_labels.append(warp_labels(atlas.label, atlas.affine, aff))
            except RegistrationError:
                affine_labels.append(identity_labels[-1])
        elif task.keep_fields:
            rel = f"fields/{atlas_id}__{tgt.case_id}.npy"
            atomic_write_with(out / rel, functools.partial(_save_npy, array=reg.field))
            files[rel] = sha256_file(out / rel)
    record: dict[str, Any] = {"target": f"loo:{tgt.case_id}" if tgt.labelled else tgt.case_id,
                              "atlases": used, "skipped": skipped,
                              "folding_max": float(max(folding)) if folding else None,
                              "similarity": sims}
    if not propagated:
        record.update(failed=True, seconds=round(time.perf_counter() - t0, 3))
        return record
    fused, agreement = _fuse(fixed.images, propagated, warped, task.fusion)
    fg = (fused > 0) | np.any(np.stack(propagated) > 0, axis=0)
    record["agreement"] = float(agreement[fg].mean()) if fg.any() else 1.0
    if truth is not None:
        labels = [v for v in task.labels if v != 0]
        ident_fused = fuse_labels(identity_labels)[0]
        aff_fused = fuse_labels(affine_labels)[0]
        record["dice"] = {
            "identity": dice_per_label(ident_fused, truth, labels),
            "affine": dice_per_label(aff_fused, truth, labels),
            "deformable_majority": dice_per_label(fuse_labels(propagated)[0], truth, labels),
            "deformable": dice_per_label(fused, truth, labels),
            "deformable_single": {v: float(np.nanmean([dice_per_label(p, truth, [v])[v] for p in propagated]))
                                  for v in labels},
        }
    else:
        for rel, arr, kind in ((f"masks/{tgt.case_id}.nii.gz", fused, "label"),
                               (f"agreement/{tgt.case_id}.nii.gz", agreement.astype(np.float32), "image")):
            write_volume(out / rel, arr, fixed.affine, kind=kind, like=fixed.header,  # type: ignore[arg-type]
                         codes=fixed.codes)
            files[rel] = sha256_file(out / rel)
        record["shape"] = list(image.shape)
    record["files"] = files
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return record


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


# ---------------------------------------------------------------------------- the bank on disk


@dataclass
class AnatomyBank:
    """A bank read back (:func:`open_bank`): its folder and ``bank.json``."""

    root: Path
    facts: dict[str, Any]

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        return dict(self.facts.get("targets", {}))

    def mask_path(self, target: str) -> Path:
        return self.root / "masks" / f"{target}.nii.gz"

    def agreement_path(self, target: str) -> Path:
        return self.root / "agreement" / f"{target}.nii.gz"

    def field_path(self, atlas: str, target: str) -> Path:
        return self.root / "fields" / f"{atlas}__{target}.npy"

    def image_paths(self, target: str) -> list[Path]:
        return [Path(p) for p in self.facts["unlabelled"][target]["images"]]

    def read_field(self, atlas: str, target: str) -> Registration:
        """The stored displacement field of ``atlas`` -> ``target`` as a Registration on the target's grid."""
        path = self.field_path(atlas, target)
        try:
            field_ = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the bank's displacement field ({exc})") from None
        affine = np.asarray(self.facts["unlabelled"][target]["affine"], dtype=np.float64)
        rec = self.targets[target]
        if tuple(field_.shape) != (*rec["shape"], len(rec["shape"])) or field_.dtype != np.float32:
            raise DataError(f"{path}: field of shape {field_.shape} does not fit the grid {rec['shape']}")
        return Registration(field=field_, fixed_affine=affine, similarity_before=float("nan"),
                            similarity_after=float("nan"), folding_fraction=float(rec.get("folding_max") or 0.0),
                            converged=True, seconds=0.0)

    def check_dataset(self, manifest: Manifest, sources: Sequence[Case]) -> None:
        """DataError unless this bank was fitted on these labelled cases (same files, same label set)."""
        stored = self.facts.get("inputs", {}).get("labelled", {})
        now = _hashes(sources)
        if stored != now:
            changed = sorted(set(stored) ^ set(now)) or sorted(k for k in now if stored.get(k) != now[k])
            raise DataError(f"{self.root / BANK_FILE}: this anatomy bank was fitted on another dataset (labelled "
                            f"case(s) {', '.join(changed[:5])} differ from {manifest.source}); fit one with "
                            "`medsynth anatomy` for this dataset")


def open_bank(path: str | Path) -> AnatomyBank:
    """A bank folder written by :func:`fit_bank`; DataError naming the problem."""
    root = Path(path).expanduser()
    file = root / BANK_FILE
    if not file.is_file():
        raise DataError(f"{root}: not an anatomy bank (no {BANK_FILE}; make one with `medsynth anatomy`)")
    try:
        facts = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: unreadable ({exc})") from None
    if not isinstance(facts, dict) or facts.get("format") != BANK_FORMAT or not facts.get("complete"):
        raise DataError(f"{file}: not a complete anatomy bank of format {BANK_FORMAT} (run `medsynth anatomy "
                        "--resume` to finish it)")
    return AnatomyBank(root, facts)


def _hashes(cases: Sequence[Case]) -> dict[str, dict[str, str]]:
    return {c.case_id: {Path(p).name: sha256_file(Path(p)) for p in [*c.images, *([c.label] if c.label else [])]}
            for c in cases}


def _journal(out: Path) -> dict[str, dict[str, Any]]:
    path = out / BANK_JOURNAL
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and isinstance(rec.get("target"), str):
            done[rec["target"]] = rec
    return done


def _verified(out: Path, rec: dict[str, Any]) -> bool:
    try:
        return all(sha256_file(out / rel) == sha for rel, sha in rec.get("files", {}).items())
    except (OSError, DataError):
        return False


def _check_out(out: Path, options: BankOptions, settings: dict[str, Any]) -> None:
    """Refuse an output folder that is not new, empty, or this bank (resume / overwrite)."""
    if out.is_symlink():
        raise JobError(f"{out}: the bank folder is a symbolic link; name a real folder")
    if out.exists() and not out.is_dir():
        raise JobError(f"{out}: exists and is not a folder")
    entries = [p for p in out.iterdir() if p.name != ".medsynth.lock"] if out.is_dir() else []
    if not entries:
        return
    bank = out / BANK_FILE
    if not bank.is_file():
        raise JobError(f"{out}: not empty and not an anatomy bank; name a new folder")
    if options.overwrite:
        for rec in _journal(out).values():
            for rel in rec.get("files", {}):
                with contextlib.suppress(FileNotFoundError):
                    (out / rel).unlink()
        for name in (BANK_JOURNAL, "report.md", "propagated.png", BANK_FILE):
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
        return
    if not options.resume:
        raise JobError(f"{out}: holds an anatomy bank; pass --resume to finish it or --overwrite to fit it again")
    stored = json.loads(bank.read_text(encoding="utf-8"))
    for key in ("settings", "inputs"):
        if stored.get(key) != settings[key]:
            raise JobError(f"{out}: --resume with other {key} than the bank was started with; pass --overwrite "
                           "to fit it again")


def _usable_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _results(tasks: list[_Task], workers: int, atlas_cases: dict[str, tuple[list[str], str, str | None]],
             ) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(atlas_cases)
        for t in tasks:
            yield _run_task(t)
        return
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(atlas_cases,)) as pool:
        futures = [pool.submit(_run_task, t) for t in tasks]
        for fut in cf.as_completed(futures):
            yield fut.result()


def fit_bank(options: BankOptions) -> BankSummary:
    """Fit an anatomy bank (module doc)."""
    t0 = time.perf_counter()
    if options.resume and options.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if not 1 <= options.workers <= WORKERS_MAX:
        raise ConfigError(f"--workers {options.workers}: must be from 1 to {WORKERS_MAX}")
    out = Path(options.out).expanduser().absolute()
    manifest = read_manifest(options.dataset)
    pool = unlabelled_cases(manifest, options.unlabelled)
    atlases = manifest.training_cases()
    if not atlases:
        raise DataError(f"{manifest.source}: no labelled training cases to propagate labels from")
    if not pool:
        raise DataError(f"{manifest.source}: no unlabelled images (the manifest lists none"
                        + (f" and {options.unlabelled} holds none" if options.unlabelled else "; pass --unlabelled PATH")
                        + ")")
    manifest = load_valid_dataset(options.dataset)  # every labelled file decoded and checked
    root = None if manifest.root is None else str(manifest.root)
    first = read_case_arrays(list(atlases[0].images), atlases[0].label or Path(), root=manifest.root)
    ndim, channels = first.label.ndim, manifest.num_channels
    # every unlabelled image read and checked before anything is written
    pool_facts: dict[str, dict[str, Any]] = {}
    for case in pool:
        img = read_unlabelled_image(case, channels=channels, spatial_ndim=ndim, root=None)
        pool_facts[case.case_id] = {"images": [str(Path(p).absolute()) for p in case.images],
                                    "affine": img.affine.tolist(), "shape": list(img.images.shape[1:])}
        if "/" in case.case_id or case.case_id.startswith("."):
            raise DataError(f"{case.images[0]}: unlabelled case id {case.case_id!r} cannot name a file")
    labels = sorted(manifest.labels) if manifest.labels else sorted(
        {int(v) for c in atlases for v in np.unique(read_volume(c.label, kind="label").array)} | {0})  # type: ignore[arg-type]
    settings: dict[str, Any] = {
        "format": BANK_FORMAT,
        "settings": json.loads(json.dumps({"registration": asdict(options.registration), "fusion": options.fusion,
                                           "keep_fields": options.keep_fields, "loo": options.loo})),
        "inputs": {"labelled": _hashes(atlases), "labels": labels,
                   "unlabelled": {c.case_id: {Path(p).name: sha256_file(Path(p)) for p in c.images} for c in pool}},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        _check_out(out, options, settings)
        for sub in ("masks", "agreement", *(("fields",) if options.keep_fields else ())):
            (out / sub).mkdir(parents=True, exist_ok=True)
        if not (out / BANK_FILE).is_file():
            atomic_write_text(out / BANK_FILE, json.dumps({**settings, "complete": False}, indent=1) + "\n")
        done = {k: v for k, v in _journal(out).items() if _verified(out, v)}
        atlas_cases = {c.case_id: ([str(p) for p in c.images], str(c.label), root) for c in atlases}
        ids = [c.case_id for c in atlases]
        tasks = []
        for case in pool:
            if case.case_id in done:
                continue
            tasks.append(_Task(_Target(case.case_id, [str(p) for p in case.images], False), ids, str(out),
                               options.registration, options.fusion, options.keep_fields, channels, ndim, labels, None))
        loo_tasks = []
        if options.loo and len(atlases) > 1:
            for c in atlases:
                key = f"loo:{c.case_id}"
                if key in done:
                    continue
                loo_tasks.append(_Task(_Target(c.case_id, [str(p) for p in c.images], True, str(c.label)),
                                       [i for i in ids if i != c.case_id], str(out), options.registration,
                                       options.fusion, False, channels, ndim, labels, root))
        workers = min(options.workers, _usable_cores() * 4)
        skipped = 0
        total = len(tasks) + len(loo_tasks)
        with progress_bar("registering", total, enabled=options.progress) as bar, \
                open(out / BANK_JOURNAL, "a", encoding="utf-8") as journal:
            for rec in _results(loo_tasks + tasks, workers, atlas_cases):
                for s in rec["skipped"]:
                    warnings.warn(f"{rec['target']}: atlas {s['atlas']} skipped ({s['reason']})", stacklevel=2)
                skipped += len(rec["skipped"])
                journal.write(json.dumps(rec, default=float) + "\n")
                journal.flush()
                done[rec["target"]] = rec
                bar.advance()
        failed = [k for k, v in done.items() if v.get("failed") and not k.startswith("loo:")]
        if failed:
            warnings.warn(f"{len(failed)} unlabelled image(s) had no usable registration and get no mask: "
                          f"{', '.join(failed[:5])}", stacklevel=2)
        targets = {k: {x: v[x] for x in ("atlases", "skipped", "agreement", "folding_max", "shape", "seconds") if x in v}
                   for k, v in done.items() if not k.startswith("loo:") and not v.get("failed")}
        loo = _loo_table([v["dice"] for k, v in done.items() if k.startswith("loo:") and "dice" in v], labels)
        facts = {**settings, "complete": True, "unlabelled": pool_facts, "targets": targets, "failed": failed,
                 "loo": loo, "label_names": {str(k): v for k, v in (manifest.labels or {}).items()}}
        write_report(out, facts, manifest)
        atomic_write_text(out / BANK_FILE, json.dumps(facts, indent=1, default=float) + "\n")
    reused = len(pool) - len(tasks)
    return BankSummary(out, len(targets), len(tasks), reused, skipped, loo, time.perf_counter() - t0)


def _loo_table(records: list[dict[str, dict[str, float]]], labels: Sequence[int]) -> dict[str, dict[str, float]]:
    """Mean leave-one-out Dice per method and label (``mean``: over the labels)."""
    table: dict[str, dict[str, float]] = {}
    for method in ("identity", "affine", "deformable_majority", "deformable", "deformable_single"):
        row = {}
        for v in labels:
            if v == 0:
                continue
            found = [r[method].get(str(v), r[method].get(v)) for r in records if method in r]  # type: ignore[call-overload]
            vals = [float(x) for x in found if x is not None and np.isfinite(x)]
            row[str(v)] = round(float(np.mean(vals)), 4) if vals else float("nan")
        finite = [x for x in row.values() if np.isfinite(x)]
        row["mean"] = round(float(np.mean(finite)), 4) if finite else float("nan")
        table[method] = row
    return table


# ---------------------------------------------------------------------------- report


def write_report(out: Path, facts: dict[str, Any], manifest: Manifest) -> Path:
    """``report.md`` and ``propagated.png``: the leave-one-out table, the targets by agreement (lowest
    first), and pictures of the propagated masks over their images."""
    from medsynth.plots import label_preview, middle_slice

    names = {int(k): v for k, v in facts.get("label_names", {}).items()}
    labels = [v for v in facts["inputs"]["labels"] if v != 0]
    targets = sorted(facts["targets"].items(), key=lambda kv: kv[1].get("agreement", 0.0))
    buf = io.StringIO()
    buf.write("# Anatomy bank\n\n")
    buf.write(f"{len(facts['inputs']['labelled'])} labelled case(s) registered to {len(facts['unlabelled'])} "
              f"unlabelled image(s); fusion: {facts['settings']['fusion']}. A propagated mask is each atlas's labels "
              "warped onto the unlabelled image, fused; agreement is the share of the vote its label got.\n\n")
    loo = facts.get("loo") or {}
    if loo:
        buf.write("## Leave-one-out accuracy (labelled cases fused from the others)\n\n")
        buf.write("| method | " + " | ".join(names.get(v, str(v)) for v in labels) + " | mean |\n")
        buf.write("|---|" + "---|" * (len(labels) + 1) + "\n")
        for method, row in loo.items():
            buf.write(f"| {method} | " + " | ".join(f"{row[str(v)]:.3f}" for v in labels) + f" | {row['mean']:.3f} |\n")
        buf.write("\n")
    buf.write("## Propagated masks, lowest agreement first\n\n| image | agreement | atlases | skipped | folding |\n"
              "|---|---|---|---|---|\n")
    for tid, rec in targets:
        buf.write(f"| {tid} | {rec.get('agreement', float('nan')):.3f} | {len(rec['atlases'])} | {len(rec['skipped'])} "
                  f"| {100 * (rec.get('folding_max') or 0.0):.3f} % |\n")
    if facts.get("failed"):
        buf.write(f"\nNo usable registration (no mask): {', '.join(facts['failed'])}\n")
    shown = targets[:8]
    if shown:
        masks, images = [], []
        for tid, _ in shown:
            mask = np.asarray(read_volume(out / "masks" / f"{tid}.nii.gz", kind="label").array)
            img = np.asarray(read_volume(Path(facts["unlabelled"][tid]["images"][0]), kind="image").array, dtype=np.float64)
            if mask.ndim == 3:
                mask, img = middle_slice(mask), middle_slice(img)
            lo, hi = np.percentile(img, [0.5, 99.5])
            masks.append(mask)
            images.append((img - lo) / max(hi - lo, 1e-6))
        legend = [names.get(v, str(v)) for v in range(max(labels, default=0) + 1)]
        label_preview(masks, {"image": images}, legend, out / "propagated.png")
        buf.write("\n![propagated masks, lowest agreement first](propagated.png)\n")
    return atomic_write_text(out / "report.md", buf.getvalue())
