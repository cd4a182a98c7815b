"""The inputs of ``medsynth downstream``: the real training set, the test set, the synthetic sets.

:func:`load_inputs` validates every dataset first (:func:`medsynth.data.validate.load_valid_dataset`,
every file decoded), reads every case into memory and checks the datasets against each other:

- the same spatial dimensionality (2D or 3D) and number of image channels everywhere;
- one label set: every declared label set (``labels`` of an MSD or nnU-Net ``dataset.json``) equals
  the training set's, and every label value found in a file belongs to it;
- a test set with at least one labelled case, none of them a training case (same image file);
- a synthetic set as ``medsynth augment`` writes it: its synthetic cases are the ones its
  ``provenance.jsonl`` lists (without one: cases marked ``synthetic`` in the manifest, or named
  ``syn_*``); the real cases it also lists are dropped (they are the training set's, not counted twice).
  When those real cases (or, for a ``--synthetic-only`` set, the provenance's source cases) are not
  the training set's, the comparison is not paired: a warning, not an error.

Each mistake is one :class:`~medsynth.errors.DataError` naming the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsynth.augment.provenance import read_provenance
from medsynth.errors import DataError

if TYPE_CHECKING:
    from medsynth.data.manifest import Case, Manifest


class DownstreamWarning(UserWarning):
    """A downstream input that works but weakens the comparison (not paired, possible leakage)."""


@dataclass
class LoadedCase:
    """One labelled case in memory.

    image: ``(C, *spatial)`` float32 in the dataset's intensity units; label: ``(*spatial)`` int64
    label values; spacing: mm per spatial axis; source: for a synthetic case, the id of the real
    case it was made from (None when unknown).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, ...]
    source: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.label.shape)


@dataclass
class SyntheticSet:
    """The synthetic cases of one augmented dataset. name: the augment method (or folder name)."""

    name: str
    path: Path
    cases: list[LoadedCase]
    real_ids: list[str]
    declared_labels: dict[int, str] | None = None


@dataclass
class DownstreamData:
    """Everything the comparison trains and tests on, checked.

    labels: label value -> name, background 0 included (the training set's label set).
    ranges: per channel, the training set's robust intensity range (low, high) in dataset units
    (mean of each case's p0.5 and p99.5), as the ``classic`` chain of ``medsynth augment`` uses it.
    test: None without a test set (K-fold over the training cases).
    """

    train_path: Path
    train: list[LoadedCase]
    test_path: Path | None
    test: list[LoadedCase] | None
    synthetic: list[SyntheticSet]
    labels: dict[int, str]
    spatial_dims: int
    channels: int
    ranges: list[tuple[float, float]]
    warnings: list[str] = field(default_factory=list)

    @property
    def foreground(self) -> list[int]:
        return [v for v in sorted(self.labels) if v != 0]


# ------------------------------------------------------------------------------------ reading


def _read_cases(cases: list[Case], root: Path | None, sources: dict[str, str | None] | None = None
                ) -> list[LoadedCase]:
    """root: the manifest's folder, where a MetaImage/NRRD header's data file must lie (as augment and
    training read it)."""
    from medsynth.data.nifti import read_case_arrays

    out = []
    for case in cases:
        assert case.label is not None
        arrays = read_case_arrays(case.images, case.label, root=root)
        source = None if sources is None else sources.get(case.case_id)
        out.append(LoadedCase(case.case_id, arrays.images, arrays.label, arrays.spacing, source))
    return out


def _validated(path: Path, progress: bool) -> Manifest:
    from medsynth.data.validate import load_valid_dataset

    return load_valid_dataset(Path(path), progress=progress)


def _is_marked_synthetic(case: Case) -> bool:
    from medsynth.augment import SYNTHETIC_PREFIX

    flag = case.extra.get("synthetic")
    return flag is True or str(flag).lower() == "true" or case.case_id.startswith(SYNTHETIC_PREFIX)


def _set_name(manifest: Manifest, path: Path, provenance: dict[str, dict[str, object]] | None,
              ids: list[str]) -> str:
    methods = sorted({str(provenance[i].get("method")) for i in ids if provenance and provenance[i].get("method")})
    anatomy = sorted({str(a.get("source")) for i in ids if provenance and isinstance(a := provenance[i].get("anatomy"), dict)
                      and a.get("source") not in (None, "deform")})
    if len(methods) == 1:  # the method, and where its masks came from when not from deformed labelled masks
        return methods[0] + (f" on {anatomy[0]} masks" if len(anatomy) == 1 and methods[0] != "pseudo" else "")
    folder = Path(manifest.root) if manifest.root is not None else path.parent
    return folder.name or path.stem


def read_synthetic_set(path: Path, train_ids: set[str], progress: bool = False) -> tuple[SyntheticSet, list[str]]:
    """One augmented dataset's synthetic cases and the warnings about it (see the module docstring)."""
    manifest = _validated(path, progress)
    labelled = [c for c in manifest.cases if c.label is not None and c.split != "test"]
    provenance = read_provenance(manifest)
    if provenance is not None:
        syn = [c for c in labelled if c.case_id in provenance]
    else:
        syn = [c for c in labelled if _is_marked_synthetic(c)]
    if not syn:
        how = "provenance.jsonl lists none of its cases" if provenance is not None else \
            "it has no provenance.jsonl and no case is marked synthetic (extra field 'synthetic' or a 'syn_' id)"
        raise DataError(f"{path}: no synthetic cases ({how}); pass a dataset written by `medsynth augment`")
    syn_ids = {c.case_id for c in syn}
    real_ids = [c.case_id for c in labelled if c.case_id not in syn_ids]
    sources: dict[str, str | None] = {}
    for c in syn:
        rec = provenance.get(c.case_id, {}) if provenance is not None else {}
        src = rec.get("source", c.extra.get("source"))
        anatomy = rec.get("anatomy")
        if isinstance(anatomy, dict) and anatomy.get("source") == "unlabelled":
            src = None  # made from an unlabelled image of an anatomy bank, not from a training case
        sources[c.case_id] = None if src in (None, "") else str(src)
    name = _set_name(manifest, path, provenance, sorted(syn_ids))
    notes = []
    if real_ids:
        if set(real_ids) != train_ids:
            extra = sorted(set(real_ids) - train_ids)
            missing = sorted(train_ids - set(real_ids))
            notes.append(f"{path}: its real cases are not the training set's ({len(extra)} not in it, e.g. "
                         f"{extra[:3]}; {len(missing)} training case(s) missing, e.g. {missing[:3]}): "
                         "the comparison is not paired")
    else:
        unknown = sorted({s for s in sources.values() if s is not None} - train_ids)
        if unknown:
            notes.append(f"{path}: synthetic cases were made from case(s) not in the training set (e.g. "
                         f"{unknown[:3]}): the comparison is not paired")
    return SyntheticSet(name=name, path=Path(path), cases=_read_cases(syn, manifest.root, sources), real_ids=real_ids,
                        declared_labels=manifest.labels), notes


# ------------------------------------------------------------------------------------ checks


def _observed(cases: list[LoadedCase]) -> set[int]:
    values: set[int] = set()
    for c in cases:
        values.update(int(v) for v in np.unique(c.label))
    return values


def check_label_sets(entries: Sequence[tuple[Path, dict[int, str] | None, set[int]]]) -> dict[int, str]:
    """The one label set of several datasets, or DataError naming the file that disagrees.

    entries: ``(file, declared labels or None, label values found in its files)``, the training set
    first. The label set is the first declared one (the training set's when it declares one), else
    the values found in the training set (0 added). Every declared set must equal it and every value
    found must belong to it. Returns label value -> name.
    """
    first = next(((p, d) for p, d, _ in entries if d is not None), None)
    if first is not None:
        ref_path, names = first[0], dict(first[1])
    else:
        ref_path, names = entries[0][0], {v: str(v) for v in sorted(entries[0][2] | {0})}
    ref = set(names)
    for path, declared, found in entries:
        if declared is not None and set(declared) != ref:
            raise DataError(f"{path}: declares labels {sorted(declared)} but {ref_path} has {sorted(ref)}; "
                            "every dataset of the comparison needs the same label set")
        extra = sorted(found - ref)
        if extra:
            raise DataError(f"{path}: label value(s) {extra} are not in the label set {sorted(ref)} of {ref_path}")
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def _check_same_kind(named: Sequence[tuple[Path, list[LoadedCase]]]) -> tuple[int, int]:
    """(spatial dims, channels) shared by every dataset, else DataError naming the first that differs."""
    ref_path, ref_cases = named[0]
    dims, chans = ref_cases[0].label.ndim, ref_cases[0].image.shape[0]
    for path, cases in named:
        for c in cases:
            if c.label.ndim != dims:
                raise DataError(f"{path}: case {c.case_id} is {c.label.ndim}D but {ref_path} is {dims}D; "
                                "train, test and synthetic data need the same dimensionality")
            if c.image.shape[0] != chans:
                raise DataError(f"{path}: case {c.case_id} has {c.image.shape[0]} image channel(s) but "
                                f"{ref_path} has {chans}")
    return dims, chans


def _intensity_ranges(cases: list[LoadedCase]) -> list[tuple[float, float]]:
    from medsynth.synthesis.procedural import IntensityAccumulator

    accs = [IntensityAccumulator() for _ in range(cases[0].image.shape[0])]
    for c in cases:
        for k, acc in enumerate(accs):
            acc.add(c.image[k], c.label)
    return [(s.low, s.high) for s in (a.result() for a in accs)]


def load_inputs(train: Path, test: Path | None, synthetic: Sequence[Path], *, progress: bool = False) -> DownstreamData:
    """Validate, read and cross-check the datasets of a comparison (see the module docstring)."""
    # 1. the training set: its labelled, non-test cases
    train = Path(train)
    train_m = _validated(train, progress)
    train_cases = [c for c in train_m.training_cases()]
    if not train_cases:
        raise DataError(f"{train}: no labelled training cases")
    train_ids = {c.case_id for c in train_cases}
    # 2. the test set: every labelled case, none of them a training file
    test_m, test_cases = None, None
    if test is not None:
        test = Path(test)
        test_m = _validated(test, progress)
        test_cases = [c for c in test_m.cases if c.label is not None]
        if not test_cases:
            raise DataError(f"{test}: no labelled cases to test on")
        train_files = {Path(p).resolve() for c in train_cases for p in c.images}
        shared = [c.case_id for c in test_cases if any(Path(p).resolve() in train_files for p in c.images)]
        if shared:
            raise DataError(f"{test}: case(s) {shared[:5]} use the same image files as training cases of {train}; "
                            "a test set must be held out")
    # 3. the synthetic sets
    notes: list[str] = []
    sets = []
    for path in synthetic:
        syn_set, set_notes = read_synthetic_set(Path(path), train_ids, progress)
        sets.append(syn_set)
        notes += set_notes
    # 4. read everything, then check the datasets against each other
    loaded_train = _read_cases(train_cases, train_m.root)
    loaded_test = None if test_cases is None or test_m is None else _read_cases(test_cases, test_m.root)
    named: list[tuple[Path, list[LoadedCase]]] = [(train, loaded_train)]
    label_entries: list[tuple[Path, dict[int, str] | None, set[int]]] = [(train, train_m.labels, _observed(loaded_train))]
    if loaded_test is not None and test is not None and test_m is not None:
        named.append((test, loaded_test))
        label_entries.append((test, test_m.labels, _observed(loaded_test)))
    for s in sets:
        named.append((s.path, s.cases))
        label_entries.append((s.path, s.declared_labels, _observed(s.cases)))
    dims, channels = _check_same_kind(named)
    labels = check_label_sets(label_entries)
    if len(labels) < 2:
        raise DataError(f"{train}: only background (0) in the label set; nothing to segment")
    for note in notes:
        warnings.warn(note, DownstreamWarning, stacklevel=3)
    return DownstreamData(
        train_path=train, train=loaded_train, test_path=test, test=loaded_test, synthetic=sets, labels=labels,
        spatial_dims=dims, channels=channels, ranges=_intensity_ranges(loaded_train), warnings=notes,
    )

