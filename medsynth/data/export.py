"""``medsynth export``: a dataset rewritten as another registered format, in a folder of its own.

``export_dataset(DATASET, OUT, "nnunet")`` validates the dataset, then puts every case where the
target format wants it (:meth:`ManifestFormat.image_paths` / :meth:`ManifestFormat.label_path`),
one file per image channel, and writes the target's manifest last. The format decides its own rules
through the registry (:meth:`ManifestFormat.export_manifest`, :meth:`ManifestFormat.export_ending`:
nnU-Net's ``DatasetNNN_Name`` folder, its labels 0, 1, 2, ... and one ``file_ending``), so a new
format exports without a change here.

A file that can go over unchanged is hard-linked (or copied: ``copy=True``, or across file
systems), so its bytes and header stay the input's. A file that cannot is rewritten as NIfTI like its
source (:func:`~medsynth.data.nifti.write_volume`'s ``like``: its on-disk shape, affine, codes and
header fields): a multi-channel file split into one file per channel (``CASE_0000``, ``CASE_0001``,
..., each with the label file's on-disk shape), a file whose ending differs from the one the format declares,
a MetaImage/NRRD header whose voxels lie in another file, a DICOM series folder. Images are then written as float32
(their values kept), labels as uint8/uint16.

The helpers that put a file into a dataset folder (:func:`place_file`, :func:`case_destinations`,
:func:`check_output_location`) are shared with ``medsynth augment``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medsynth.data.atomic import NAME_MAX, temp_path_for
from medsynth.data.formats import ManifestFormat, get_format
from medsynth.data.ledger import LOCK_FILE, check_out_path, own_output
from medsynth.data.manifest import Case, Manifest, write_manifest
from medsynth.data.nifti import (
    NIFTI_SUFFIXES,
    read_volume,
    source_header,
    split_channels,
    volume_suffix,
    write_volume,
)
from medsynth.errors import ConfigError, DataError, JobError

__all__ = [
    "DETACHED_SUFFIXES",
    "PLACE_MODES",
    "ExportSummary",
    "case_destinations",
    "check_output_location",
    "export_dataset",
    "place_file",
]

#: how a file is put into a dataset folder: a hard link, a copy, or a hard link where possible
PLACE_MODES = ("auto", "link", "copy")
#: volume files whose voxels lie in another file (a link to the header alone would be broken)
DETACHED_SUFFIXES = (".mhd", ".nhdr")


# ------------------------------------------------------------------------------------ placing files


def place_file(src: Path, dst: Path, mode: str = "auto") -> str:
    """Put ``src`` at ``dst`` (atomically, via a temp name in ``dst``'s folder): a hard link
    (``link``; JobError when the file system refuses), a copy (``copy``), or a hard link where the
    file system allows one, else a copy (``auto``). Returns ``"link"`` or ``"copy"``."""
    if mode not in PLACE_MODES:
        raise ConfigError(f"file placement must be one of {', '.join(PLACE_MODES)}, got {mode!r}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst)
    try:
        how = "copy"
        if mode in ("auto", "link"):
            try:
                os.link(src, tmp)
                how = "link"
            except OSError as exc:
                if mode == "link":
                    raise JobError(f"cannot hard-link {src} into {dst.parent} ({exc.strerror or exc}; a hard link "
                                   "needs both on one file system)") from None
        if how == "copy":
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
        return how
    finally:
        tmp.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _check_inside(paths: list[Path], root: Path, case_id: str) -> None:
    top = Path(os.path.normpath(root))
    for p in paths:
        norm = Path(os.path.normpath(p))
        if norm == top or not _inside(norm, top):
            raise DataError(f"case id {case_id!r} would put a file outside the output folder ({p}); rename the case")


def case_destinations(fmt: ManifestFormat, root: Path, case: Case, ending: str | None = None) -> tuple[list[Path], Path | None]:
    """Where ``case``'s files go, one to one, in a dataset of format ``fmt`` under ``root``: ``(images, label)``.

    ending: the ending of every file (a format that declares one, nnU-Net); None: each file keeps its
    own. DataError for a case id that would put a file outside ``root``."""
    n = len(case.images)
    images = [fmt.image_paths(root, case.case_id, n, ending or volume_suffix(src), case.split)[c]
              for c, src in enumerate(case.images)]
    label = None if case.label is None else fmt.label_path(root, case.case_id, ending or volume_suffix(case.label),
                                                           case.split)
    _check_inside([*images, *([label] if label is not None else [])], root, case.case_id)
    return images, label


def check_output_location(out: Path, manifest: Manifest) -> None:
    """Refuse an output folder that is, or lies inside, an input folder, or contains an input."""
    out_r = Path(out).expanduser().resolve()
    source = Path(manifest.source or manifest.root or ".").resolve()
    manifest_dir = source if source.is_dir() else source.parent
    files: list[Path] = [] if source.is_dir() else [source]
    for case in manifest.cases:
        files.extend(Path(p).resolve() for p in case.images)
        if case.label is not None:
            files.append(Path(case.label).resolve())
    folders = sorted({manifest_dir, *(f.parent for f in files)})
    for folder in folders:
        if _inside(out_r, folder):
            raise JobError(f"--out {out} lies inside the input folder {folder}; choose a folder outside the dataset")
    for f in [source, *files]:
        if _inside(f, out_r):
            raise JobError(f"--out {out} contains the input {f}; choose another output folder")


# ------------------------------------------------------------------------------------ export


@dataclass
class ExportSummary:
    """What an export wrote: the manifest, the cases, and how many files were hard-linked, copied, or
    rewritten (split into channels or converted to NIfTI)."""

    out: Path
    format: str
    name: str
    manifest: Path
    cases: int
    linked: int = 0
    copied: int = 0
    rewritten: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"out": str(self.out), "format": self.format, "name": self.name, "manifest": str(self.manifest),
                "cases": self.cases, "linked": self.linked, "copied": self.copied, "rewritten": self.rewritten}


def _labels_in_data(manifest: Manifest) -> dict[int, str]:
    """label value -> name for a dataset whose manifest lists none (CSV): the values its label maps hold."""
    values = {0}
    for case in manifest.cases:
        if case.label is not None:
            values |= {int(v) for v in np.unique(np.asarray(read_volume(case.label, kind="label").array))}
    return {v: ("background" if v == 0 else f"label_{v}") for v in sorted(values)}


def _reusable(src: Path, ending: str | None) -> bool:
    """Whether ``src`` can go over byte for byte (its own ending fits, its voxels are in it)."""
    suffix = volume_suffix(src)
    return suffix not in DETACHED_SUFFIXES and not Path(src).is_dir() and (ending is None or suffix == ending)


def _new_ending(src: Path, ending: str | None) -> str:
    """The ending of ``src``'s file in the export: the declared one, else its own when it can be
    kept, else NIfTI (``.nii.gz``)."""
    if ending is not None:
        return ending
    suffix = volume_suffix(src)
    return suffix if suffix not in DETACHED_SUFFIXES and not Path(src).is_dir() else ".nii.gz"  # DICOM: NIfTI


class _Writer:
    """Puts files into the export folder, counting links, copies and rewrites."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.counts = {"link": 0, "copy": 0, "rewrite": 0}

    def place(self, src: Path, dst: Path, kind: str, reusable: bool) -> None:
        if reusable:
            self.counts[place_file(src, dst, self.mode)] += 1
            return
        vol = read_volume(src, kind="label" if kind == "label" else "image")
        write_volume(dst, vol.array, vol.affine, kind="label" if kind == "label" else "image", like=vol)
        self.counts["rewrite"] += 1

    def split(self, src: Path, dsts: list[Path], spatial: tuple[int, ...], disk: tuple[int, ...] | None) -> None:
        """Write each channel of ``src`` (spatial shape ``spatial``) to its file in ``dsts``, with the
        on-disk shape ``disk`` (the label file's; None: the channel's own, trailing singletons kept)."""
        vol = read_volume(src, kind="image")
        parts = split_channels(np.asarray(vol.array), spatial)
        if parts is None or len(parts) != len(dsts):
            raise DataError(f"{src}: shape {vol.array.shape} does not hold {len(dsts)} channel(s) of {spatial}")
        like = source_header(vol) if disk is None else replace(source_header(vol), shape=disk)
        for part, dst in zip(parts, dsts):
            write_volume(dst, part, vol.affine, kind="image", like=like)
            self.counts["rewrite"] += 1


def _export_paths(case: Case, channels: int, fmt: ManifestFormat, out: Path,
                  ending: str | None) -> tuple[list[Path], Path | None]:
    """Where :func:`_export_case` writes ``case``'s files: ``(images, label)``; DataError for a case
    id that would put a file outside ``out``."""
    label = None if case.label is None else fmt.label_path(out, case.case_id, _new_ending(case.label, ending),
                                                           case.split)
    if len(case.images) == channels:
        images = [fmt.image_paths(out, case.case_id, channels, _new_ending(src, ending), case.split)[c]
                  for c, src in enumerate(case.images)]
    elif len(case.images) == 1:  # one multi-channel file, split
        images = fmt.image_paths(out, case.case_id, channels, ending or ".nii.gz", case.split)
    else:
        raise DataError(f"case {case.case_id}: {len(case.images)} image files for {channels} channel(s)")
    _check_inside([*images, *([label] if label is not None else [])], out, case.case_id)
    return images, label


def _check_no_collisions(cases: list[Case], channels: int, fmt: ManifestFormat, out: Path, ending: str | None) -> None:
    """Before anything is written: DataError if two cases would write one file (case ids that
    differ as strings but resolve to the same path, ``./a`` and ``a``), so an export never holds
    fewer cases than its input; or if a file's name would be longer than the file system allows
    (a 255-byte case name with nnU-Net's ``_0000``)."""
    owner: dict[str, str] = {}
    for case in cases:
        images, label = _export_paths(case, channels, fmt, out, ending)
        for path in [*images, *([label] if label is not None else [])]:
            if len(os.fsencode(path.name)) > NAME_MAX:
                raise DataError(f"case {case.case_id!r}: its file name in the export, {path.name}, would be "
                                f"{len(os.fsencode(path.name))} bytes, more than the {NAME_MAX} a file system allows; "
                                "rename the case")
            first = owner.setdefault(os.path.normcase(os.path.normpath(path)), case.case_id)
            if first != case.case_id:
                raise DataError(f"cases {first!r} and {case.case_id!r} would both be written to {path}; "
                                "rename one of them")


def _export_case(case: Case, channels: int, fmt: ManifestFormat, out: Path, ending: str | None, writer: _Writer) -> Case:
    """Put one case's files into ``out`` for ``fmt``; its record in the new dataset."""
    images, label = _export_paths(case, channels, fmt, out, ending)
    # 1. the label map (its grid also tells a multi-channel file's spatial shape)
    spatial: tuple[int, ...] | None = None
    if case.label is not None and label is not None:
        writer.place(case.label, label, "label", _reusable(case.label, ending))
    # 2. the images: one file per channel, one to one, or one multi-channel file split
    if len(case.images) == channels:
        for src, dst in zip(case.images, images):
            writer.place(src, dst, "image", _reusable(src, ending))
    else:
        src = case.images[0]
        disk: tuple[int, ...] | None = None
        if case.label is not None:
            lab = read_volume(case.label, kind="label")
            spatial, disk = tuple(lab.array.shape), tuple(lab.header["raw_shape"])
        else:
            spatial = tuple(read_volume(src, kind="image").array.shape[:-1])
        writer.split(src, images, spatial, disk)
    return replace(case, images=images, label=label)


def export_dataset(dataset: str | Path, out: str | Path, fmt: str, *, name: str | None = None, copy: bool = False,
                   progress: bool = False) -> ExportSummary:
    """Export ``dataset`` (any registered format) as format ``fmt`` into the new folder ``out``.

    name: the dataset name the new manifest declares (default: the format's choice, see
    :meth:`ManifestFormat.output_name`: nnU-Net takes the ``DatasetNNN_Name`` folder name).
    copy: copy every file instead of hard-linking it. The dataset is validated first
    (:func:`medsynth.data.validate.load_valid_dataset`); ``out`` must be new or empty and lie outside
    it. Files are written atomically and the manifest last.
    """
    from medsynth.data.validate import load_valid_dataset
    from medsynth.progress import progress_bar

    # 1. the target format and the output folder (before any work)
    target = get_format(fmt)
    out = Path(out).expanduser().absolute()
    check_out_path(out)
    if out.exists() and (not out.is_dir() or any(f.name != LOCK_FILE for f in out.iterdir())):  # a job's lock: own_output
        raise JobError(f"--out {out} exists and is not an empty folder; export into a new folder")
    # 2. the dataset, every file decoded and checked
    manifest = load_valid_dataset(Path(dataset), progress=progress)
    check_output_location(out, manifest)
    if manifest.labels is None and target.declares_labels:
        manifest = replace(manifest, labels=_labels_in_data(manifest))
    result = target.export_manifest(manifest, out, name)
    ending = target.export_ending(manifest)
    if ending is not None and ending not in NIFTI_SUFFIXES:
        raise ConfigError(f"format {target.name} declares file ending {ending!r}; medsynth export writes NIfTI only")
    _check_no_collisions(manifest.cases, manifest.num_channels, target, out, ending)
    # 3. the files, case by case, holding the folder's lock (a second job on it is refused); new or empty:
    # nothing there is replaced
    writer = _Writer("copy" if copy else "auto")
    cases = []
    with own_output(out, "export", inputs=[Path(dataset)]), \
            progress_bar(f"export ({target.name})", len(manifest.cases), enabled=progress) as bar:
        for case in manifest.cases:
            cases.append(_export_case(case, manifest.num_channels, target, out, ending, writer))
            bar.advance()
        # 4. the manifest, last
        path = write_manifest(replace(result, cases=cases), out, fmt=target.name)
    c = writer.counts
    return ExportSummary(out=out, format=target.name, name=result.name, manifest=path, cases=len(cases),
                         linked=c["link"], copied=c["copy"], rewritten=c["rewrite"])
