"""The plan of a job: for synthetic case ``k``, its source case, lesion donor, files and seed.

Everything follows from ``(seed, k)`` through :func:`medsynth.seeds.seed_sequence` with the
:class:`medsynth.seeds.CaseTag` streams, so a plan does not depend on workers, ranks, a resume or
``num``: the plan of ``M`` cases starts with the plan of ``N < M`` cases, which is what lets
``--resume --num M`` grow a finished job (:func:`growth_settings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.augment.facts import DatasetFacts
from medsynth.augment.layout import OutputLayout
from medsynth.augment.options import AugmentOptions
from medsynth.data.manifest import Case
from medsynth.errors import JobError
from medsynth.journal import JOB_FILE
from medsynth.seeds import CaseTag, seed_sequence

SYNTHETIC_PREFIX = "syn_"


@dataclass
class PlannedCase:
    """One synthetic case to make. Paths are relative to the output folder (POSIX)."""

    index: int
    case_id: str
    source: str
    donor: str | None
    images: list[str]
    label: str
    #: ``--anatomy bank:``: the bank field that warps the source (``{"target": ID, "alpha": a}``), else None
    field: dict[str, Any] | None = None


def source_index(seed: int, k: int, n_sources: int) -> int:
    """Source case of synthetic case ``k``: every ``n_sources`` consecutive cases use each real
    case once, in an order drawn from ``(seed, k // n_sources)``."""
    epoch, pos = divmod(k, n_sources)
    perm = np.random.default_rng(seed_sequence(seed, CaseTag.SOURCE, epoch)).permutation(n_sources)
    return int(perm[pos])


def pair_seed(seed: int, k: int) -> np.random.SeedSequence:
    """The seed of synthetic case ``k``'s pair (its attempts draw below it)."""
    return seed_sequence(seed, CaseTag.ATTEMPT, k)


def draw_field(seed: int, k: int, targets: list[str], alpha: tuple[float, float]) -> dict[str, Any]:
    """The bank field of synthetic case ``k`` (``--anatomy bank:``): a target image drawn uniformly from
    ``targets`` (the bank's images the source was registered to) and a scale in ``alpha``, from ``(seed, k)``."""
    rng = np.random.default_rng(seed_sequence(seed, CaseTag.FIELD, k))
    target = targets[int(rng.integers(len(targets)))]
    lo, hi = alpha
    return {"target": target, "alpha": round(float(lo + (hi - lo) * rng.random()), 6)}


def plan_cases(options: AugmentOptions, sources: list[Case], facts: DatasetFacts, layout: OutputLayout,
               fields: dict[str, list[str]] | None = None) -> list[PlannedCase]:
    """Source (and lesion donor) of each synthetic case, from ``(seed, k)`` only. ``fields``: with
    ``--anatomy bank:``, source case id -> the bank images it has a field to (each case draws one)."""
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
            rng = np.random.default_rng(seed_sequence(options.seed, CaseTag.DONOR, k))
            donor = pool[int(rng.integers(len(pool)))]
        cid = f"{SYNTHETIC_PREFIX}{k:05d}"
        a = options.config.anatomy
        warp = None if not fields else draw_field(options.seed, k, fields[source], (a.alpha_min, a.alpha_max))
        plan.append(PlannedCase(k, cid, source, donor, layout.synthetic_images(cid), layout.synthetic_label(cid), warp))
    return plan



def growth_settings(out: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    """The settings a resumed job in ``out`` is compared with (``settings`` as they are, unless growing).

    ``--resume --num M`` on a job stored with ``num`` N < M grows it: the comparison uses N, so every
    other setting must still match, and the N cases made are kept (case ``k`` depends on
    ``(seed, k)`` only). M < N is refused: a job does not shrink. An unreadable job file is left to
    :func:`medsynth.journal.check_output_state`, which names the problem."""
    if not resume:
        return settings
    try:
        stored = json.loads((Path(out) / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    old = stored.get("num") if isinstance(stored, dict) else None
    new = settings.get("num")
    if not isinstance(old, int) or isinstance(old, bool) or not isinstance(new, int) or new == old:
        return settings
    if new < old:
        raise JobError(f"--resume --num {new}: the job in {out} was started with --num {old}; a job can grow "
                       f"(a larger --num) but not shrink. Pass --num {old} or more, or --overwrite to start again")
    return {**settings, "num": old}
