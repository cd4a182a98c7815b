"""What the job learns from the real training cases before it makes anything (read once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth.data.manifest import Case, Manifest
from medsynth.data.nifti import CaseArrays, read_case_arrays
from medsynth.errors import DataError
from medsynth.progress import progress_bar
from medsynth.synthesis.procedural import IntensityAccumulator, IntensityStats


@dataclass
class DatasetFacts:
    """labels: the dataset's label values (sorted); stats: intensity facts per image channel;
    present: case id -> label values it holds; spatial_ndim: 2 or 3 (all plain, picklable data)."""

    labels: list[int]
    stats: list[IntensityStats]
    present: dict[str, list[int]]
    spatial_ndim: int


def read_case(case: Case, root: Path | None = None) -> CaseArrays:
    """A labelled case's arrays: images ``(C, *spatial)`` float32, label ``(*spatial)`` int64, affine.
    ``root``: the dataset folder that MetaImage/NRRD data files must resolve inside."""
    if case.label is None:
        raise DataError(f"case {case.case_id} has no label map")
    return read_case_arrays(case.images, case.label, root=root)


def gather_facts(manifest: Manifest, sources: list[Case], progress: bool = False) -> DatasetFacts:
    """Read every source case once: intensity statistics per channel, label values per case."""
    accs = [IntensityAccumulator() for _ in range(manifest.num_channels)]
    present: dict[str, list[int]] = {}
    declared = None if manifest.labels is None else set(manifest.labels)
    ndims = set()
    with progress_bar("reading real cases", len(sources), enabled=progress) as bar:
        for case in sources:
            arrays = read_case(case, manifest.root)
            ndims.add(arrays.label.ndim)
            values = [int(v) for v in np.unique(arrays.label)]
            if declared is not None and not set(values) <= declared:
                bad = sorted(set(values) - declared)
                raise DataError(f"{case.label}: label value(s) {bad} are not in the manifest's labels {sorted(declared)}")
            present[case.case_id] = values
            for c in range(arrays.images.shape[0]):
                accs[c].add(arrays.images[c], arrays.label)
            bar.advance()
    if len(ndims) > 1:
        raise DataError(f"training cases mix 2D and 3D volumes ({sorted(ndims)}D)")
    labels = sorted(declared) if declared is not None else sorted({v for vs in present.values() for v in vs} | {0})
    return DatasetFacts(labels=labels, stats=[a.result() for a in accs], present=present, spatial_ndim=ndims.pop())
