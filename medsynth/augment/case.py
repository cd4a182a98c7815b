"""Making one synthetic case: read its source, make a pair with the synthetic-pair core, write it.

Every file is written atomically (:func:`medsynth.data.nifti.write_volume`, with the source label
map's affine, and like its source file: the same on-disk shape, codes and header fields) and its
sha256 returned for the journal, with the case's provenance record.

A case is computed on one torch thread (:func:`one_torch_thread`), in this process as in a worker:
torch's CPU kernels split some float reductions by thread count (a 1x1x1 ``Conv3d`` on a 40^3
volume differs by ~1e-6 between 1 and 2 threads, ~6e-5 after a generator's output is mapped to
intensity units), so a case's bytes would otherwise depend on ``--workers`` and the machine.
Parallelism comes from ``--workers`` (and torchrun ranks) instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsynth.augment.facts import DatasetFacts, read_case
from medsynth.augment.options import PSEUDO
from medsynth.augment.plan import PlannedCase, pair_seed
from medsynth.data.manifest import Case
from medsynth.data.nifti import CaseArrays, write_volume
from medsynth.distributed import torchrun_env
from medsynth.journal import sha256_file
from medsynth.registration import scale_field, warp_image, warp_labels
from medsynth.registration.bank import AnatomyBank
from medsynth.registry import is_model_method
from medsynth.synthesis.pairs import GenerateOptions, PairSettings, PairSource, load_synthesizer, make_pair

if TYPE_CHECKING:
    from medsynth.synthesis.synthesizer import Synthesizer


@dataclass
class JobContext:
    """Everything a worker needs to make cases (sent once to each worker process).

    out: the output folder; seed: the job seed; settings: the pair core's settings; facts: what the
    real cases showed; sources: case id -> the real case; model / model_sha: the run folder of a
    family method and its weights' sha256; class_key: the manifest field with a case's class
    (class-conditioned runs only); root: the input dataset's folder.
    """

    out: Path
    seed: int
    settings: PairSettings
    facts: DatasetFacts
    sources: dict[str, Case]
    model: Path | None
    model_sha: str | None
    class_key: str | None = None
    #: the dataset root: MetaImage/NRRD data files must resolve inside it
    root: Path | None = None
    #: ``--anatomy bank:`` / ``unlabelled:``: the anatomy bank, and the ``--anatomy`` value
    bank: AnatomyBank | None = None
    anatomy: str = "deform"
    #: a MAISI bundle as ``model``: its label mapping file
    labels: Path | None = None

    @property
    def method(self) -> str:
        return self.settings.method


@dataclass
class CaseResult:
    """What making one synthetic case produced: files (relative path -> sha256), provenance."""

    index: int
    case_id: str
    files: dict[str, str]
    provenance: dict[str, object]
    redraws: int


def job_synthesizer(run: Path, labels: Path | None = None) -> Synthesizer:
    """The run's synthesizer for this process (a bundle's, with ``labels`` its mapping): under torchrun on
    GPUs, one GPU per local rank."""
    import torch

    env = torchrun_env()
    if env.distributed and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    return load_synthesizer(run, labels=labels)


@contextlib.contextmanager
def one_torch_thread(needed: bool) -> Iterator[None]:
    """Run the block with one torch intra-op thread (restored after); ``needed=False``: leave torch
    alone (a method that never imports it keeps worker start-up light)."""
    if not needed:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_case(ctx: JobContext, plan: PlannedCase) -> CaseResult:
    """Make, check (QC with bounded redraws) and write one synthetic case, on one torch thread."""
    with one_torch_thread(ctx.method != "synthseg"):
        return _make_case(ctx, plan)


def _bank_warp(ctx: JobContext, source: CaseArrays, atlas: str, target: str, alpha: float) -> CaseArrays:
    """``source`` (a labelled case) warped by the bank field ``atlas -> target`` scaled by ``alpha``, on the
    target image's grid: labels without blending, images linearly (``--anatomy bank:``)."""
    assert ctx.bank is not None
    reg = scale_field(ctx.bank.read_field(atlas, target), alpha)
    label = warp_labels(source.label, source.affine, reg)
    images = np.stack([warp_image(ch, source.affine, reg) for ch in source.images]).astype(np.float32)
    return CaseArrays(images=images, label=label.astype(np.int64), affine=reg.fixed_affine,
                      label_header=source.label_header, image_headers=source.image_headers)


def _make_case(ctx: JobContext, plan: PlannedCase) -> CaseResult:
    # 1. the source case (and the lesion donor's label map); a bank's unlabelled image lies outside the dataset
    case = ctx.sources[plan.source]
    source = read_case(case, None if "anatomy" in case.extra else ctx.root)
    anatomy: dict[str, object] = {"source": ctx.anatomy.partition(":")[0]}
    if plan.field is not None:
        target, alpha = str(plan.field["target"]), float(plan.field["alpha"])
        source = _bank_warp(ctx, source, plan.source, target, alpha)
        anatomy.update(bank=str(ctx.bank.root) if ctx.bank else None, atlas=plan.source, target=target, alpha=alpha)
    elif "anatomy" in case.extra:
        anatomy.update(case.extra["anatomy"])
    donor = None if plan.donor is None else read_case(ctx.sources[plan.donor], ctx.root).label
    options = GenerateOptions()
    if ctx.class_key is not None:  # class-conditioned run: the source case's class
        options["class_value"] = str(ctx.sources[plan.source].extra[ctx.class_key])
    synthesizer = None
    if is_model_method(ctx.method) and ctx.model is not None:
        synthesizer = job_synthesizer(ctx.model, ctx.labels)
    # 2. the pair, through QC (pseudo: the unlabelled image itself with its propagated mask)
    if ctx.method == PSEUDO:
        images, label, attempt, qc_failures = source.images, source.label, 0, []
        record: dict[str, object] = {"pseudo_labelled": True}
    else:
        pair = make_pair(
            PairSource(source.images, source.label, source.affine, donor=donor, donor_id=plan.donor),
            ctx.settings, stats=ctx.facts.stats, labels=ctx.facts.labels, seq=pair_seed(ctx.seed, plan.index),
            synthesizer=synthesizer, generate_options=options,
            where=f"synthetic case {plan.case_id} (source {plan.source})",
        )
        images, label, attempt, qc_failures, record = pair.images, pair.label, pair.attempt, pair.qc_failures, pair.record
    # 3. the files, then what was made
    files: dict[str, str] = {}
    for c, rel in enumerate(plan.images):
        write_volume(ctx.out / rel, images[c], source.affine, kind="image", like=source.image_header(c))
        files[rel] = sha256_file(ctx.out / rel)
    write_volume(ctx.out / plan.label, label, source.affine, kind="label", like=source.label_header)
    files[plan.label] = sha256_file(ctx.out / plan.label)
    provenance = {
        "case_id": plan.case_id,
        "index": plan.index,
        "method": ctx.method,
        "seed": ctx.seed,
        "attempt": attempt,
        "redraws": attempt,
        "qc_failures": qc_failures,
        "source": plan.source,
        "donor": plan.donor,
        "images": plan.images,
        "label": plan.label,
        "model": None if ctx.model is None else str(ctx.model),
        "model_sha256": ctx.model_sha,
        **({"labels": str(ctx.labels)} if ctx.labels is not None else {}),
        "anatomy": anatomy,
        **record,
    }
    return CaseResult(plan.index, plan.case_id, files, json.loads(json.dumps(provenance)), attempt)
