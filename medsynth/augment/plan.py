"""The plan of a job: for synthetic case ``k``, its source case, lesion donor, files and seed.

Everything follows from ``(seed, k)`` through :func:`medsynth.seeds.seed_sequence` with the
:class:`medsynth.seeds.CaseTag` streams, so a plan does not depend on workers, ranks or a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsynth.augment.facts import DatasetFacts
from medsynth.augment.layout import OutputLayout
from medsynth.augment.options import AugmentOptions
from medsynth.data.manifest import Case
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


def source_index(seed: int, k: int, n_sources: int) -> int:
    """Source case of synthetic case ``k``: every ``n_sources`` consecutive cases use each real
    case once, in an order drawn from ``(seed, k // n_sources)``."""
    epoch, pos = divmod(k, n_sources)
    perm = np.random.default_rng(seed_sequence(seed, CaseTag.SOURCE, epoch)).permutation(n_sources)
    return int(perm[pos])


def pair_seed(seed: int, k: int) -> np.random.SeedSequence:
    """The seed of synthetic case ``k``'s pair (its attempts draw below it)."""
    return seed_sequence(seed, CaseTag.ATTEMPT, k)


def plan_cases(options: AugmentOptions, sources: list[Case], facts: DatasetFacts, layout: OutputLayout) -> list[PlannedCase]:
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
            rng = np.random.default_rng(seed_sequence(options.seed, CaseTag.DONOR, k))
            donor = pool[int(rng.integers(len(pool)))]
        cid = f"{SYNTHETIC_PREFIX}{k:05d}"
        plan.append(PlannedCase(k, cid, source, donor, layout.synthetic_images(cid), layout.synthetic_label(cid)))
    return plan

