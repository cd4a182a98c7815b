"""The augment job: grow a segmentation dataset with synthetic image/label pairs.

``run_augment(AugmentOptions(...))`` reads a dataset (any registered manifest format), makes ``num``
new masks from real ones (random spatial deformation, optional per-structure edits), an image for
each (a training-free method, or a trained family's run through the ``Synthesizer``), checks every
sample (QC), and writes them beside the real cases in the input's format, with a manifest, a
provenance record per synthetic case and a journal. One case is made by the synthetic-pair core,
:mod:`medsynth.synthesis.pairs`.

Stages, in order (nothing is written before stage 6):

1. check options (``--num`` at most :data:`~medsynth.augment.options.NUM_MAX`); 2. load and validate
the dataset; 3. refuse an output folder that is, or lies inside, an input folder, or that contains an
input; take the output folder's lock (:func:`medsynth.journal.output_lock`: one job per folder, held
until the job ends; not in a dry run) and check its state: a resume needs the same settings and the
same inputs (the sha256 of every input file, :func:`input_files`), and the cases still to make must
fit the free disk space (:func:`check_disk_space`); 4. read the training cases once (intensity
statistics per channel for synthesis and QC, the label set, which labels each case has);
5. plan: for synthetic case ``k`` the source case (and a lesion donor) follow from ``(seed, k)``
(a dry run plans only the first :data:`DRY_RUN_SHOWN` cases and counts the rest);
6. claim the output folder (new, ``--resume`` with identical settings, or ``--overwrite`` of a
folder this job made) and store the settings in ``OUT/.medsynth_job.json``; 7. place real cases
in the output folder (``--real``: hard links, or copies; or none for ``reference``); 8. make the missing or corrupt
synthetic cases (in process, in ``workers`` processes, and/or sharded over torchrun ranks), each
file written atomically and recorded with its sha256 in ``OUT/.journal.jsonl``; 9. rank 0 checks
every file against the journal, writes ``provenance.jsonl`` and then, last, the manifest.

Every random draw of case ``k`` comes from ``numpy.random.SeedSequence(seed, spawn_key=(...k...))``,
so the bytes written do not depend on workers, ranks, or on a kill followed by ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medsynth import __version__
from medsynth.augment.case import JobContext
from medsynth.augment.facts import gather_facts
from medsynth.augment.layout import (
    OutputLayout,
    RealCase,
    check_output_location,
    check_real_mode,
    place_real_file,
    real_cases_out,
    synthetic_case,
    write_output_manifest,
)
from medsynth.augment.model import check_model, class_key, fill_warning, model_digest, model_inputs, read_model
from medsynth.augment.options import AugmentOptions, check_options
from medsynth.augment.plan import SYNTHETIC_PREFIX, PlannedCase, growth_settings, plan_cases
from medsynth.augment.preview import PREVIEW_FILE, write_preview
from medsynth.augment.provenance import PROVENANCE_FILE
from medsynth.augment.workers import Ranks, generate, join_ranks
from medsynth.data.atomic import atomic_write_text
from medsynth.data.formats import get_format
from medsynth.data.limits import format_bytes
from medsynth.data.manifest import Case, Manifest, read_manifest
from medsynth.data.transforms import check_edit_labels
from medsynth.data.validate import load_valid_dataset
from medsynth.distributed import torchrun_env
from medsynth.errors import DataError, JobError
from medsynth.journal import (
    INPUTS_KEY,
    Journal,
    check_out_path,
    check_output_state,
    claim_output,
    dataset_inputs,
    journaled_bytes,
    output_lock,
    read_journals,
    sha256_file,
    verified_entry,
)
from medsynth.registration.bank import BANK_FILE, AnatomyBank, open_bank
from medsynth.runcard import RunCard

#: 2: the settings hold the sha256 of every input file
JOB_FORMAT_VERSION = 2
#: planned cases a dry run lists (it counts the rest without planning them)
DRY_RUN_SHOWN = 20


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
    estimated_bytes: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out), "format": self.format, "method": self.method,
            "manifest": None if self.manifest is None else str(self.manifest),
            "real_cases": self.real_cases, "synthetic_cases": self.synthetic_cases,
            "generated": self.generated, "reused": self.reused, "redraws": self.redraws,
            "seconds": round(self.seconds, 3), "generate_seconds": round(self.generate_seconds, 3),
            "dry_run": self.dry_run, "rank": self.rank, "world_size": self.world_size,
            "estimated_bytes": self.estimated_bytes,
        }


def _input_sha(path: Path) -> str | None:
    """sha256 of an input file; None for one that is missing or not a regular file (validation,
    which runs next, names its problem)."""
    try:
        return sha256_file(path)
    except (DataError, OSError):
        return None


def _size(path: Path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def input_files(manifest: Manifest, card: RunCard | None) -> dict[str, dict[str, str | None]]:
    """sha256 of every input file the job uses: ``{"case ID": {path: sha256}, ..., "manifest": {...},
    "model": {...}}`` (the cases in manifest order). Stored with the settings, so that a resume notices
    a changed input (:func:`medsynth.journal.check_output_state`)."""
    inputs = dataset_inputs(manifest)
    if card is not None:
        inputs["model"] = dict(model_inputs(card))
    return inputs


def job_settings(options: AugmentOptions, manifest: Manifest, card: RunCard | None,
                 bank: AnatomyBank | None = None) -> dict[str, object]:
    """The settings a resumed job must share with the original (stored in OUT/.medsynth_job.json),
    with the sha256 of every input file (:func:`input_files`) and of the anatomy bank's ``bank.json``."""
    source = Path(manifest.source or ".")
    inputs = input_files(manifest, card)
    if bank is not None:
        inputs["anatomy bank"] = {str(bank.root / BANK_FILE): _input_sha(bank.root / BANK_FILE)}
    settings = {
        "job_format": JOB_FORMAT_VERSION,
        "medsynth_version": __version__,
        "input": str(source),
        "input_format": manifest.format,
        "method": options.method,
        "num": int(options.num),
        "seed": int(options.seed),
        "synthetic_only": bool(options.synthetic_only),
        "real": options.real,
        "model": None if options.model is None else str(Path(options.model).resolve()),
        "model_sha256": None if card is None else model_digest({k: str(v) for k, v in inputs["model"].items()}),
        "config": options.config.model_dump(mode="json"),
        "anatomy": options.anatomy,
        INPUTS_KEY: inputs,
    }
    if options.labels is not None:  # a bundle's label mapping (jobs without one keep their settings as before)
        settings["labels"] = str(Path(options.labels).resolve())
    result: dict[str, object] = json.loads(json.dumps(settings))
    return result


def case_bytes(sources: list[Case]) -> int:
    """The mean size in bytes of a source case's files (images and label): what one synthetic case
    is estimated to take on disk."""
    sizes = []
    for case in sources:
        paths = [*case.images, *([case.label] if case.label is not None else [])]
        sizes.append(sum(_size(Path(p)) for p in paths))
    return int(sum(sizes) / max(len(sizes), 1))


def _existing_folder(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (where its files would land)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk_space(out: Path, options: AugmentOptions, sources: list[Case], state: str) -> int:
    """JobError when the cases still to make need more space than ``out``'s file system has free.

    The estimate: ``cases x`` :func:`case_bytes`; a resume counts only the cases its journal does not
    list, an overwrite counts the space its removals free. Returns the estimate in bytes."""
    remaining = int(options.num)
    free = shutil.disk_usage(_existing_folder(out)).free
    if state == "resume":
        listed = sum(1 for key in read_journals(out) if key.startswith("syn:"))
        remaining = max(remaining - listed, 0)
    elif state == "overwrite":
        free += journaled_bytes(out)
    per_case = case_bytes(sources)
    needed = remaining * per_case
    if needed > free:
        raise JobError(
            f"--num {options.num}: the new files need about {format_bytes(needed)} ({remaining} case(s) x "
            f"~{format_bytes(per_case)}, the mean size of a source case's files), but {_existing_folder(out)} has "
            f"{format_bytes(free)} free; free some space or lower --num"
        )
    return needed


def run_augment(options: AugmentOptions) -> AugmentSummary:
    """Run (or, with ``dry_run``, plan) an augment job. See the module docstring for the stages."""
    t0 = time.perf_counter()
    # 1. options
    check_options(options)
    out = Path(options.out).expanduser().absolute()
    check_out_path(out)  # a broken link or a file as --out: one clear error before anything resolves it
    # 2. dataset: the manifest now (cheap), every file decoded and checked after the output checks
    manifest = read_manifest(Path(options.input))
    sources = [c for c in manifest.cases if c.label is not None and c.split == "train"]
    if not sources:
        raise DataError(f"{manifest.source}: no labelled training cases to augment from")
    clash = sorted(c.case_id for c in manifest.cases if c.case_id.startswith(SYNTHETIC_PREFIX))
    if clash:
        raise DataError(f"{manifest.source}: case id(s) {clash[:5]} use the prefix {SYNTHETIC_PREFIX!r} kept for synthetic cases")
    # 3. output location; then, holding the output folder (rank 0 of a real job), its state
    check_output_location(out, manifest)
    check_real_mode(options.real, get_format(manifest.format))
    model = None if options.model is None else Path(options.model).expanduser().resolve()
    card = None if model is None else read_model(model, options.labels)
    bank_path = options.anatomy_source[1]
    bank = None if bank_path is None else open_bank(bank_path)
    settings = job_settings(options, manifest, card, bank)
    with contextlib.ExitStack() as stack:
        if not options.dry_run and torchrun_env().is_main:
            stack.enter_context(output_lock(out))  # one job per output folder, until this one ends
        state = check_output_state(out, growth_settings(out, settings, options.resume), options.resume,
                                   options.overwrite)
        estimate = check_disk_space(out, options, sources, state)
        summary = _run(options, out, card, settings, state, t0, bank)
        summary.estimated_bytes = estimate
        return summary


def anatomy_sources(options: AugmentOptions, bank: AnatomyBank | None, sources: list[Case],
                    ) -> tuple[list[Case], dict[str, list[str]] | None]:
    """The cases synthetic masks start from, and (``--anatomy bank:``) the bank images each labelled source
    has a field to. ``deform``: the labelled sources. ``unlabelled:``: the bank's unlabelled images with their
    propagated masks (agreement at least ``anatomy.min_agreement``)."""
    kind = options.anatomy_source[0]
    if bank is None or kind == "deform":
        return sources, None
    if kind == "bank":
        if not bank.facts["settings"].get("keep_fields"):
            raise DataError(f"{bank.root}: this bank keeps no displacement fields (fitted with --no-fields); "
                            "--anatomy bank: needs them")
        fields = {c.case_id: sorted(t for t, rec in bank.targets.items() if c.case_id in rec["atlases"]) for c in sources}
        lacking = [k for k, v in fields.items() if not v]
        if lacking:
            raise DataError(f"{bank.root}: no usable field from labelled case(s) {', '.join(lacking[:5])}")
        return sources, fields
    floor = options.config.anatomy.min_agreement
    cases = [Case(case_id=t, images=bank.image_paths(t), label=bank.mask_path(t), split="train",
                  extra={"anatomy": {"bank": str(bank.root), "image": str(bank.image_paths(t)[0]),
                                     "agreement": rec.get("agreement"), "atlases": rec.get("atlases")}})
             for t, rec in sorted(bank.targets.items()) if float(rec.get("agreement", 0.0)) >= floor]
    if not cases:
        raise DataError(f"{bank.root}: no propagated mask has a mean agreement of {floor} or more "
                        "(lower anatomy.min_agreement)")
    return cases, None


def _run(options: AugmentOptions, out: Path, card: RunCard | None, settings: dict[str, object], state: str,
         t0: float, bank: AnatomyBank | None = None) -> AugmentSummary:
    """Stages 4-9 of :func:`run_augment` (the output folder checked and, for a real job, held)."""
    ranks = join_ranks() if not options.dry_run else Ranks()
    show = options.progress and ranks.rank == 0
    model = None if card is None else card.run_dir.resolve()
    model_sha = None if card is None else str(settings["model_sha256"])
    # 4. validate, then facts from the real data
    manifest = load_valid_dataset(Path(options.input), progress=show)
    layout = OutputLayout.for_manifest(manifest)
    sources = [c for c in manifest.cases if c.label is not None and c.split == "train"]
    facts = gather_facts(manifest, sources, progress=show)
    if options.method != "classic":
        check_edit_labels(options.config.edits, facts.labels)
    if card is not None:
        check_model(card, options.method, facts.labels, manifest.num_channels, sources)
        weak = fill_warning(card)
        if weak is not None and ranks.rank == 0:
            warnings.warn(weak, stacklevel=2)
    if bank is not None:
        bank.check_dataset(manifest, sources)
    starts, fields = anatomy_sources(options, bank, sources)
    # 5. plan (a dry run plans the first cases only: case k depends on (seed, k) alone)
    shown = replace(options, num=min(options.num, DRY_RUN_SHOWN)) if options.dry_run else options
    plan = plan_cases(shown, starts, facts, layout, fields)
    real = [] if options.synthetic_only else real_cases_out(manifest, out, layout, options.real)
    summary = AugmentSummary(
        out=out, format=manifest.format, method=options.method, plan=plan, real_cases=len(real),
        synthetic_cases=options.num, dry_run=options.dry_run, rank=ranks.rank, world_size=ranks.world,
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
    # 7. real cases into the output folder (--real), so that it can be moved
    if ranks.rank == 0:
        for r in real:
            key = f"real:{r.case.case_id}"
            if not r.placed or verified_entry(out, done.get(key)) is not None:
                continue
            files = {}
            for rel, src in r.placed.items():
                place_real_file(src, out / rel, options.real)
                files[rel] = sha256_file(out / rel)
            journal.append({"key": key, "files": files})
    # 8. synthetic cases of this rank that are missing or corrupt
    mine = [p for p in plan if p.index % ranks.world == ranks.rank]
    todo = [p for p in mine if verified_entry(out, done.get(f"syn:{p.case_id}")) is None]
    summary.reused = len(mine) - len(todo)
    ctx = JobContext(
        out=out, seed=options.seed, settings=options.pair_settings(), facts=facts,
        sources={c.case_id: c for c in starts}, model=model, model_sha=model_sha,
        labels=None if options.labels is None else Path(options.labels).resolve(),
        class_key=None if card is None else class_key(card), root=manifest.root, bank=bank, anatomy=options.anatomy,
    )
    error: BaseException | None = None
    t_gen = time.perf_counter()
    try:
        for result in generate(ctx, todo, options.workers, show):
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
        summary.manifest = _finalize(out, manifest, layout, plan, real, summary, ctx.sources)
    ranks.barrier()
    summary.seconds = time.perf_counter() - t0
    return summary


def _finalize(out: Path, manifest: Manifest, layout: OutputLayout, plan: list[PlannedCase],
              real: list[RealCase], summary: AugmentSummary, sources: dict[str, Case]) -> Path:
    """Check every file against the journal, write ``provenance.jsonl`` and ``preview.png``, then the manifest."""
    entries = read_journals(out)
    missing: list[str] = []
    provenance: list[dict[str, Any]] = []  # JSON records read back from the journal
    for r in real:
        if r.placed and verified_entry(out, entries.get(f"real:{r.case.case_id}")) is None:
            missing.append(r.case.case_id)
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
    text = "".join(json.dumps(p, sort_keys=True) + "\n" for p in sorted(provenance, key=lambda p: int(p["index"])))
    atomic_write_text(out / PROVENANCE_FILE, text)
    journal.append({"key": f"final:{PROVENANCE_FILE}", "files": {PROVENANCE_FILE: sha256_file(out / PROVENANCE_FILE)}})
    synthetic = [synthetic_case(p.case_id, p.images, p.label, p.source, out) for p in plan]
    if (out / PREVIEW_FILE).exists() and f"final:{PREVIEW_FILE}" not in entries:  # not this job's: leave it
        warnings.warn(f"{out / PREVIEW_FILE} was not made by this job; no preview written", stacklevel=3)
    elif synthetic:
        write_preview(out / PREVIEW_FILE, synthetic, sources, summary.method, manifest.labels)
        journal.append({"key": f"final:{PREVIEW_FILE}", "files": {PREVIEW_FILE: sha256_file(out / PREVIEW_FILE)}})
    path = write_output_manifest(manifest, [r.case for r in real] + synthetic, out, layout)
    journal.append({"key": f"final:{path.name}", "files": {path.name: sha256_file(path)}})
    return path
