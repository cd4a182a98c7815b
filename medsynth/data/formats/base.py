"""Dataset records and what every manifest format provides.

:class:`Case` and :class:`Manifest` are the one in-memory form of a dataset, whatever file it came
from. :class:`ManifestFormat` is the interface of one format (MSD JSON, nnU-Net raw folder, CSV):
how to recognise it, read it, write it, and where a case's files go in an output folder. The
formats themselves live beside this module and are listed in :mod:`medsynth.data.formats`.
"""

from __future__ import annotations

import json
import os
import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from medsynth.errors import DataError


@dataclass
class Case:
    """One labelled case.

    case_id: unique name within the dataset.
    images: one path per channel (absolute).
    label: the label map's path (absolute), or None for an unlabelled case.
    split: ``"train"``, ``"val"`` or ``"test"`` (free text is kept).
    extra: any other fields the manifest had for this case (kept on round trips by formats that
        store per-case fields).
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """A dataset: its cases and the facts its manifest declares.

    format: the name of the :class:`ManifestFormat` it was read as (or is to be written as).
    labels: label value -> name (background 0 included), or None when the format has no list.
    channels: channel index -> name (modality), one per image channel.
    file_ending: the volume file suffix of the dataset (nnU-Net declares it).
    source: the file or folder it was read from; root: the folder relative paths resolve against.
    meta: other top-level fields, kept on round trips.
    """

    format: str
    cases: list[Case]
    labels: dict[int, str] | None = None
    channels: list[str] = field(default_factory=lambda: ["image"])
    name: str = "dataset"
    file_ending: str = ".nii.gz"
    source: Path | None = None
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def training_cases(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None and c.split != "test"]

    def with_cases(self, cases: list[Case]) -> Manifest:
        return replace(self, cases=list(cases))


class FormatNote(NamedTuple):
    """A format-specific finding about a dataset, for ``medsynth validate``."""

    severity: Literal["error", "warning"]
    file: Path
    message: str


class ManifestFormat(ABC):
    """One manifest format: recognise, read, write, and lay out output files.

    name: the value of ``Manifest.format`` and of ``--format``.
    manifest_name: the manifest's file name inside an output folder.
    places_cases: the written manifest only works when every case's files lie at
        :meth:`image_paths` / :meth:`label_path` inside its folder (nnU-Net), so a job that copies a
        dataset must put the real cases there too.
    declares_labels: the format can list the label values (CSV cannot).
    """

    name: ClassVar[str]
    manifest_name: ClassVar[str]
    places_cases: ClassVar[bool] = False
    declares_labels: ClassVar[bool] = True

    # ------------------------------------------------------------------ reading

    @abstractmethod
    def sniff(self, path: Path) -> bool:
        """Whether ``path`` (an existing file or folder) is a manifest of this format."""

    @abstractmethod
    def read(self, path: Path) -> Manifest:
        """Read the manifest at ``path``; DataError naming the file and the problem."""

    def manifest_file(self, source: Path) -> Path:
        """The file holding the manifest of a dataset read from ``source``."""
        return Path(source)

    def check(self, manifest: Manifest) -> list[FormatNote]:
        """Format rules beyond reading (declared counts, stray files); none by default."""
        return []

    # ------------------------------------------------------------------ writing

    @abstractmethod
    def text(self, manifest: Manifest, root: Path) -> str:
        """The manifest file's text, paths relative to ``root`` (the manifest's folder)."""

    def manifest_path(self, out: Path) -> Path:
        """The file :meth:`text` goes to for ``out``: a manifest file path, or an output folder."""
        out = Path(out)
        return out if out.suffix.lower() == Path(self.manifest_name).suffix else out / self.manifest_name

    def dataset_path(self, folder: Path) -> Path:
        """What to pass to ``read_manifest`` for a dataset written into ``folder``."""
        return Path(folder) / self.manifest_name

    # ------------------------------------------------------------------ output layout

    def output_name(self, manifest: Manifest, folder: Path) -> str:
        """The dataset name a dataset like ``manifest`` written into ``folder`` declares (default: its own)."""
        return manifest.name

    def output_ending(self, manifest: Manifest) -> str:
        """The suffix of new volume files written into a dataset like ``manifest``."""
        return ".nii.gz"

    @abstractmethod
    def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
        """Where a case's image files go under ``root`` (one per channel)."""

    @abstractmethod
    def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
        """Where a case's label map goes under ``root``."""

    # ------------------------------------------------------------------ exporting (medsynth export)

    def export_ending(self, manifest: Manifest) -> str | None:
        """The one file ending every volume of a dataset exported to this format gets (a file with
        another is converted to NIfTI), or None: each file keeps its own."""
        return None

    def export_manifest(self, manifest: Manifest, folder: Path, name: str | None) -> Manifest:
        """``manifest``'s facts as a dataset of this format in ``folder`` (its cases are set by the
        export): the format, the name (``name``, else the input's), the file ending. ConfigError or
        DataError for what this format cannot hold."""
        ending = self.export_ending(manifest)
        return replace(manifest, format=self.name, name=name or self.output_name(manifest, folder), cases=[], source=None,
                       root=Path(folder), file_ending=ending or manifest.file_ending)


# ---------------------------------------------------------------------------- one case, one name, one file


def case_id_key(case_id: str) -> str:
    """The case id as a path inside a dataset folder, ``.`` and ``..`` resolved: ``./a`` and ``a`` are
    one case; ``x/../../labelsTr/b`` is ``../labelsTr/b``, outside its folder."""
    return posixpath.normpath(case_id.replace("\\", "/")) if case_id else case_id


def duplicate_notes(manifest: Manifest) -> list[FormatNote]:
    """Cases that are one and the same once names and paths are resolved, in one pass over the cases
    (linear, so a manifest of 100k cases checks in moments):

    - case ids equal once resolved (:func:`case_id_key`), and ids that resolve outside the folder
      their files go to (errors: written out, they would land on each other or elsewhere);
    - files that resolve (``..``, ``./``, symbolic links followed) to one file: an image of two cases,
      or one case's image as another's label, is an error; a label map shared by cases a warning."""
    src = Path(manifest.source or manifest.root or ".")
    notes: list[FormatNote] = []
    names: dict[str, list[str]] = {}
    for case in manifest.cases:
        key = case_id_key(case.case_id)
        names.setdefault(key, []).append(case.case_id)
        if key in ("", ".", "..") or key.startswith(("../", "/")):
            notes.append(FormatNote("error", src, f"case id {case.case_id!r} resolves to {key!r}, not a name inside "
                                    "the dataset folder; rename the case"))
    exact = sorted(key for key, ids in names.items() if len(ids) > 1 and len(set(ids)) == 1)
    if exact:
        notes.append(FormatNote("error", src, f"duplicate case ids: {', '.join(exact)}"))
    for key, ids in sorted(names.items()):
        if len(set(ids)) > 1:
            shown = " and ".join(repr(i) for i in sorted(set(ids)))
            notes.append(FormatNote("error", src, f"duplicate case ids: {shown} are one case ({key!r} once resolved)"))
    owner: dict[str, tuple[str, str]] = {}  # real path -> (case id, "image" or "label")
    for case in manifest.cases:
        files = [(p, "image") for p in dict.fromkeys(case.images)]
        files += [] if case.label is None else [(case.label, "label")]
        for path, role in files:
            try:
                real = os.path.realpath(path)
            except (OSError, ValueError):  # a NUL byte, a symlink loop: reading the file reports it
                real = os.path.normpath(path)
            first = owner.setdefault(real, (case.case_id, role))
            if first[0] == case.case_id:
                continue
            same = "" if real == os.path.normpath(path) else f" (it resolves to {real})"
            if role == "label" and first[1] == "label":
                notes.append(FormatNote("warning", Path(path), f"label file used by cases {first[0]} and "
                                        f"{case.case_id}{same}"))
            else:
                notes.append(FormatNote("error", Path(path), f"case {case.case_id} reads the file that case {first[0]} "
                                        f"reads as its {first[1]}{same}: one case listed twice"))
    return notes


# ---------------------------------------------------------------------------- helpers for formats


def _no_constant(path: Path, name: str) -> float:
    raise DataError(f"{path}: {name} is not valid JSON (write a number, or null)")


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; DataError naming the file, line and column otherwise."""
    try:
        # NaN and Infinity are not JSON: Python's parser accepts them unless told not to
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"), parse_constant=lambda name: _no_constant(path, name))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be a manifest") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def parse_channels(raw: object, path: Path) -> list[str]:
    """``{"0": "T1", "1": "FLAIR"}`` -> ``["T1", "FLAIR"]``; absent: ``["image"]``."""
    if isinstance(raw, dict) and raw:
        items = []
        for k, v in raw.items():
            try:
                items.append((int(k), str(v)))
            except (TypeError, ValueError):
                raise DataError(f"{path}: channel key {k!r} is not an integer (expected {{\"0\": \"T1\", ...}})") from None
        items.sort(key=lambda kv: kv[0])
        if [i for i, _ in items] != list(range(len(items))):
            raise DataError(f"{path}: channel keys {[i for i, _ in items]} must be 0, 1, 2, ...")
        return [v for _, v in items]
    return ["image"]


def resolve(root: Path, value: str) -> Path:
    """A manifest's path ``value`` (relative to ``root`` unless absolute), normalised so that
    ``"../x"`` written for a file outside the folder reads back as the same Path."""
    text = os.path.expanduser(value)  # strings, not Path objects: a manifest may list 100k files
    return Path(os.path.normpath(text if os.path.isabs(text) else os.path.join(root, text)))


def relative(p: Path, root: Path) -> str:
    """``p`` relative to ``root`` (POSIX), with ``..`` when it lies outside."""
    try:
        return Path(p).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(os.path.relpath(Path(p).resolve(), root.resolve())).as_posix()


def channel_files(root: Path, case_id: str, channels: int, ending: str, split: str) -> list[Path]:
    """``imagesTr/CASE<ending>`` for one channel, ``imagesTr/CASE_0000<ending>, ...`` for several
    (``imagesTs`` for the test split): the file layout of the MSD and CSV outputs."""
    sub = "imagesTs" if split == "test" else "imagesTr"
    if channels == 1:
        return [Path(root) / sub / f"{case_id}{ending}"]
    return [Path(root) / sub / f"{case_id}_{c:04d}{ending}" for c in range(channels)]


def label_file(root: Path, case_id: str, ending: str, split: str) -> Path:
    """``labelsTr/CASE<ending>`` (``labelsTs`` for the test split)."""
    return Path(root) / ("labelsTs" if split == "test" else "labelsTr") / f"{case_id}{ending}"
