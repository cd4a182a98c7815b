"""Unlabelled images: the scans a dataset has no label maps for, as first-class input.

They come from the dataset's own manifest (MSD ``test`` entries and any case without a label, nnU-Net
``imagesTs``, CSV rows with an empty label) and from ``--unlabelled PATH``: another manifest of any
registered format, or a folder of image files (NIfTI, MetaImage, NRRD; several channels as nnU-Net
names them, ``CASE_0000``, ``CASE_0001``, ...). :func:`unlabelled_cases` gathers both;
:func:`read_unlabelled_image` reads one with the checks of a labelled case's images (decoded in full,
bounded by the memory ceiling, finite values, the channel count and dimensionality of the labelled
cases), so that a mismatch is one :class:`~medsynth.errors.DataError` naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth.data.formats import detect_format
from medsynth.data.formats.base import Case, Manifest
from medsynth.data.nifti import (
    SUPPORTED_SUFFIXES,
    SourceHeader,
    check_case_size,
    header_codes,
    read_volume,
    source_header,
    strip_suffix,
    volume_suffix,
)
from medsynth.errors import DataError

__all__ = ["UnlabelledImage", "read_unlabelled_image", "unlabelled_cases", "unlabelled_from"]

#: nnU-Net's channel suffix of an image file name: ``CASE_0000.nii.gz``
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class UnlabelledImage:
    """One unlabelled case in memory: images ``(C, *spatial)`` float32; affine ``(4, 4)`` voxel -> RAS mm
    of its first channel; codes: that file's ``(sform_code, qform_code)``; header: its header facts, for
    files written on its grid (:func:`medsynth.data.nifti.write_volume`'s ``like``)."""

    case_id: str
    images: np.ndarray
    affine: np.ndarray
    codes: tuple[int, int] = (1, 1)
    header: SourceHeader | None = None

    @property
    def spatial_ndim(self) -> int:
        return self.images.ndim - 1


def _folder_cases(folder: Path, channels: int) -> list[Case]:
    """The images of a plain folder: one case per file, or per ``CASE_XXXX`` group when ``channels`` > 1."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and volume_suffix(p) in SUPPORTED_SUFFIXES
                   and not p.name.startswith("."))
    if channels == 1:
        groups: dict[str, list[Path]] = {}
        for p in files:
            name = strip_suffix(p)
            m = _CHANNEL.match(name)
            key = m.group("case") if m and m.group("channel") == "0000" else name
            groups.setdefault(key, []).append(p)
        return [Case(case_id=k, images=v[:1], label=None, split="unlabelled") for k, v in sorted(groups.items())]
    groups = {}
    for p in files:
        m = _CHANNEL.match(strip_suffix(p))
        if m is None:
            raise DataError(f"{p}: the dataset has {channels} channels, so an unlabelled image's file name must end in "
                            "_0000, _0001, ... (nnU-Net's naming)")
        groups.setdefault(m.group("case"), []).append(p)
    cases = []
    for case_id, paths in sorted(groups.items()):
        if len(paths) != channels:
            raise DataError(f"{folder}: unlabelled case {case_id} has {len(paths)} channel file(s), the dataset has "
                            f"{channels}")
        cases.append(Case(case_id=case_id, images=sorted(paths), label=None, split="unlabelled"))
    return cases


def unlabelled_from(path: str | Path, channels: int = 1) -> tuple[list[Case], Path]:
    """The cases of ``--unlabelled PATH`` (every case of a manifest, its labels ignored; or every image
    of a plain folder) and the folder their files must lie in (for MetaImage/NRRD data files)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: --unlabelled not found (expected a manifest or a folder of images)")
    if path.is_dir() and not any((path / n).exists() for n in ("dataset.json", "imagesTr")):
        cases = _folder_cases(path, channels)
        if not cases:
            raise DataError(f"{path}: no image files ({', '.join(SUPPORTED_SUFFIXES)}) in this folder")
        return cases, path
    manifest = detect_format(path).read(path)
    cases = [Case(case_id=c.case_id, images=list(c.images), label=None, split="unlabelled") for c in manifest.cases]
    return cases, Path(manifest.root or path.parent)


def unlabelled_cases(manifest: Manifest, extra: str | Path | None = None) -> list[Case]:
    """The dataset's unlabelled cases, then those of ``extra`` (``--unlabelled``). A case id found twice,
    or an unlabelled image that is also a labelled case's image, is a DataError."""
    cases = [c for c in manifest.cases if c.label is None]
    if extra is not None:
        cases += unlabelled_from(extra, manifest.num_channels)[0]
    seen: dict[str, Path] = {}
    labelled = {p.resolve() for c in manifest.cases if c.label is not None for p in c.images}
    for c in cases:
        if c.case_id in seen:
            raise DataError(f"{c.images[0]}: unlabelled case id {c.case_id} is used twice (also {seen[c.case_id]})")
        seen[c.case_id] = c.images[0]
        if any(p.resolve() in labelled for p in c.images):
            raise DataError(f"{c.images[0]}: this unlabelled image is also a labelled case's image")
    return cases


def read_unlabelled_image(case: Case, *, channels: int, spatial_ndim: int | None = None,
                          memory_limit: int | None = None, root: Path | None = None) -> UnlabelledImage:
    """Read an unlabelled case's channels with a labelled case's checks; DataError naming the file when it
    is not ``channels`` channel(s) of one ``spatial_ndim``-D grid (None: 2D or 3D) or holds NaN/Inf."""
    check_case_size(list(case.images), memory_limit, root=root)
    arrays: list[np.ndarray] = []
    first = None
    for p in case.images:
        vol = read_volume(p, kind="image", memory_limit=memory_limit, root=root)
        arr = np.asarray(vol.array, dtype=np.float32)
        if first is None:
            first = vol
        if len(case.images) == 1 and arr.ndim == (spatial_ndim or 3) + 1 and channels > 1:
            parts = [np.ascontiguousarray(arr[..., k]) for k in range(arr.shape[-1])]
        else:
            parts = [arr]
        for part in parts:
            if not np.all(np.isfinite(part)):
                raise DataError(f"{p}: unlabelled image contains NaN or Inf")
        arrays.extend(parts)
    assert first is not None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"{case.images[0]}: the channels of unlabelled case {case.case_id} differ in shape {sorted(shapes)}")
    if len(arrays) != channels:
        raise DataError(f"{case.images[0]}: unlabelled case {case.case_id} has {len(arrays)} channel(s); the labelled "
                        f"cases have {channels}")
    ndim = arrays[0].ndim
    if ndim not in (2, 3):
        raise DataError(f"{case.images[0]}: unlabelled image has shape {arrays[0].shape}; expected a 2D or 3D volume")
    if spatial_ndim is not None and ndim != spatial_ndim:
        raise DataError(f"{case.images[0]}: unlabelled image is {ndim}D, the labelled cases are {spatial_ndim}D")
    return UnlabelledImage(case.case_id, np.stack(arrays), np.asarray(first.affine, dtype=np.float64),
                           header_codes(first), source_header(first))
