"""``OUT/preview.png`` of an augment job: a few synthetic cases, each with its label map outlined,
beside the image it was made from (a real labelled case, or the unlabelled image of an anatomy bank
for ``--anatomy unlabelled:BANK`` / ``pseudo``).

Drawn with :func:`medsynth.plots.case_preview` (the demo's figure of augmented cases is the same
picture); 3D cases show their middle slice along the last axis, channel 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsynth.data.manifest import Case
from medsynth.data.nifti import read_volume
from medsynth.plots import CasePair, case_preview, middle_slice

__all__ = ["PREVIEW_CASES", "PREVIEW_FILE", "preview_pairs", "write_preview"]

PREVIEW_FILE = "preview.png"
#: synthetic cases shown (the first ones, in plan order)
PREVIEW_CASES = 6


def _slice(path: Path, kind: str = "image") -> np.ndarray:
    array = np.asarray(read_volume(path, kind="label" if kind == "label" else "image").array)
    while array.ndim > 3:  # channels last: keep the first
        array = array[..., 0]
    return middle_slice(array)


def preview_pairs(cases: Sequence[Case], sources: Mapping[str, Case], method: str) -> list[CasePair]:
    """One :class:`~medsynth.plots.CasePair` per synthetic case: its image and label map (middle
    slices), and its source's image when ``sources`` knows the case's ``extra["source"]`` id."""
    pairs = []
    for case in cases:
        if case.label is None:
            continue
        source = sources.get(str(case.extra.get("source", "")))
        anatomy = None if source is None else source.extra.get("anatomy")
        src_title = "no source" if source is None else (
            f"{source.case_id} (unlabelled)" if isinstance(anatomy, dict) else source.case_id)
        pairs.append(CasePair(
            title=f"{case.case_id} ({method})", image=_slice(case.images[0]), label=_slice(case.label, "label"),
            source=None if source is None else _slice(source.images[0]), source_title=src_title,
        ))
    return pairs


def write_preview(path: Path, cases: Sequence[Case], sources: Mapping[str, Case], method: str,
                  labels: Mapping[int, str] | None) -> Path:
    """Draw the first :data:`PREVIEW_CASES` of ``cases`` (synthetic Case records) into ``path``
    (PNG). labels: value -> name for the legend (None: the values found in the shown label maps)."""
    pairs = preview_pairs(list(cases)[:PREVIEW_CASES], sources, method)
    if labels is None:
        found = sorted({int(v) for p in pairs for v in np.unique(p.label)})
        labels = {v: "" for v in found}
    return case_preview(pairs, labels, path)
