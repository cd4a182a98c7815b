"""DICOM series in: one folder, one series, read with SimpleITK's series reader, bounded.

A DICOM volume arrives as a folder of files, one (or a few) slices each. :func:`read_dicom_series`
reads such a folder with the same rules as the other readers (:mod:`medsynth.data.limits`) before
GDCM opens anything:

1. every entry of the folder is a regular file (no FIFOs, devices or sockets); a symbolic link must
   resolve to a regular file inside the folder; sub-folders are not read;
2. the files' bytes together, and what their headers claim decoded (rows x columns x frames x bytes
   per value *after* Rescale Slope/Intercept, summed over the series: GDCM turns int16 slices with a
   slope of 0.5 into float64), are within the memory ceiling;
3. the folder holds exactly one series (``GetGDCMSeriesIDs``), its slices (``GetGDCMSeriesFileNames``,
   sorted by position) share one grid and pixel type and are evenly spaced (a missing slice is an
   error, not a silent stretch).

It returns the SimpleITK image (ITK's LPS world); :func:`medsynth.data.nifti.read_volume` converts it
to the RAS affine as it does for ``.mha``. DICOM SEG and RTSTRUCT label objects are not read: a label
map given as DICOM must be a series of label values, like an image.
"""

from __future__ import annotations

import locale
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medsynth.data.limits import check_claimed_size, default_memory_limit, format_bytes, regular_file_size
from medsynth.errors import DataError

__all__ = ["SeriesClaim", "read_dicom_series", "series_claim"]

#: relative tolerance on the gaps between slice positions (ITK's series reader only warns)
GAP_TOLERANCE = 1e-3
_POSITION = "0020|0032"  # Image Position (Patient)
_ORIENTATION = "0020|0037"  # Image Orientation (Patient)
_BITS_ALLOCATED = "0028|0100"
_PIXEL_REPRESENTATION = "0028|0103"  # 0 unsigned, 1 signed


_LOCALE_CATEGORIES = (locale.LC_CTYPE, locale.LC_NUMERIC, locale.LC_COLLATE, locale.LC_TIME, locale.LC_MONETARY)


@contextmanager
def keep_locale() -> Iterator[None]:
    """Restore the process's C locale after the block: GDCM (SimpleITK's DICOM reader and writer) sets it to
    ``"C"``, which turns Python's preferred encoding into ASCII for the rest of the process (a subprocess's
    UTF-8 output then fails to decode)."""
    saved = [(c, locale.setlocale(c)) for c in _LOCALE_CATEGORIES]
    try:
        yield
    finally:
        for category, value in saved:
            locale.setlocale(category, value)


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK's own warnings off (``No Series were found`` goes to stderr): the checks here report instead;
    the locale kept (:func:`keep_locale`)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        with keep_locale():
            yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _folder_files(folder: Path) -> dict[str, int]:
    """Path -> size in bytes of every file in ``folder``; DataError naming the first entry that is not
    a regular file or is a symbolic link leading outside the folder. Sub-folders are skipped."""
    real_folder = os.path.realpath(folder)
    files: dict[str, int] = {}
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                continue
            if entry.is_symlink():
                target = os.path.realpath(path)
                if os.path.commonpath([real_folder, target]) != real_folder:
                    raise DataError(f"{path}: is a symbolic link to {target}, outside the DICOM folder {folder}; "
                                    "a series is read from files inside its folder only")
            files[os.path.normpath(path)] = regular_file_size(path)
    return files


def _slice_info(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable DICOM file ({_last_line(exc)})") from None
    return reader


def _last_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


@dataclass(frozen=True)
class SeriesClaim:
    """What the headers of a folder's one DICOM series claim, before any voxel is decoded.

    files: the slice files in the reader's order; decoded_bytes: bytes of the volume the reader allocates
    (the pixel type *after* Rescale Slope/Intercept: GDCM turns int16 with slope 0.5 into float64);
    itemsize: bytes per decoded value; description: the grid and types, for messages.
    """

    files: list[str]
    decoded_bytes: int
    itemsize: int
    description: str


def _stored_type(info: sitk.ImageFileReader) -> str:
    """``"16-bit signed integer"`` from Bits Allocated / Pixel Representation ("" if either is missing)."""
    try:
        bits = int(info.GetMetaData(_BITS_ALLOCATED).strip())
        signed = int(info.GetMetaData(_PIXEL_REPRESENTATION).strip()) == 1
    except (RuntimeError, ValueError):
        return ""
    return f"{bits}-bit {'signed' if signed else 'unsigned'} integer"


def _series_claim(folder: Path, files: list[str]) -> SeriesClaim:
    """What the series' headers claim: one grid and pixel type, evenly spaced slices."""
    first = _slice_info(files[0])
    size, pixel, comps = first.GetSize(), first.GetPixelID(), first.GetNumberOfComponents()
    positions: list[np.ndarray] = []
    frames = 0
    for f in files:
        info = first if f == files[0] else _slice_info(f)
        if info.GetSize()[:2] != size[:2] or info.GetPixelID() != pixel or info.GetNumberOfComponents() != comps:
            kind = sitk.GetPixelIDValueAsString(info.GetPixelID())
            raise DataError(f"{folder}: {Path(f).name} has size {info.GetSize()} {kind}, {Path(files[0]).name} "
                            f"{size} {sitk.GetPixelIDValueAsString(pixel)}: the series' slices differ")
        depth = info.GetSize()[2] if info.GetDimension() > 2 else 1
        if depth > 1 and len(files) > 1:
            raise DataError(f"{folder}: {Path(f).name} holds {depth} frames in a series of {len(files)} files; a "
                            "multi-frame file must be a series of its own")
        frames += depth
        if info.HasMetaDataKey(_POSITION):
            positions.append(_numbers(info.GetMetaData(_POSITION), f, _POSITION))
    if len(files) > 1 and len(positions) == len(files) and first.HasMetaDataKey(_ORIENTATION):
        _check_gaps(folder, files, positions, _numbers(first.GetMetaData(_ORIENTATION), files[0], _ORIENTATION))
    # GDCM reports the pixel type after Rescale Slope/Intercept: what reading the series allocates
    itemsize = sitk.Image([1, 1], pixel).GetSizeOfPixelComponent()
    decoded = sitk.GetPixelIDValueAsString(pixel)
    stored = _stored_type(first)
    values = decoded if not stored or stored == decoded else f"{stored} rescaled (0028,1053/1052) to {decoded}"
    comp = f" x {comps} components" if comps > 1 else ""
    return SeriesClaim(files, size[0] * size[1] * frames * comps * itemsize, itemsize,
                       f"a series of {len(files)} files, {size[0]} x {size[1]} x {frames} voxels{comp} of {values}")


def _numbers(text: str, path: str, tag: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.strip().split("\\")], dtype=np.float64)
    except ValueError:
        raise DataError(f"{path}: DICOM tag {tag} is not a list of numbers ({text!r})") from None
    if not np.all(np.isfinite(values)):
        raise DataError(f"{path}: DICOM tag {tag} holds a non-finite number ({text!r})")
    return values


def _check_gaps(folder: Path, files: list[str], positions: list[np.ndarray], orientation: np.ndarray) -> None:
    """DataError unless the slices, in the reader's order, are evenly spaced along the slice normal."""
    if orientation.size != 6 or any(p.size != 3 for p in positions):
        raise DataError(f"{folder}: DICOM position {_POSITION} or orientation {_ORIENTATION} has the wrong number "
                        "of values (3 and 6)")
    normal = np.cross(orientation[:3], orientation[3:])
    depth = np.array([float(p @ normal) for p in positions])
    gaps = np.diff(depth)
    mean = float(np.mean(gaps))
    if abs(mean) < 1e-6 or np.any(np.abs(gaps - mean) > GAP_TOLERANCE * abs(mean) + 1e-4):
        k = int(np.argmax(np.abs(gaps - mean)))
        raise DataError(f"{folder}: the slices are not evenly spaced: {Path(files[k]).name} to "
                        f"{Path(files[k + 1]).name} is {abs(gaps[k]):.4g} mm, the mean gap {abs(mean):.4g} mm "
                        f"({len(files)} slices); a slice is missing or repeated")


def _series_files(folder: Path, files: dict[str, int]) -> list[str]:
    """The files of the one series in ``folder`` (checked by :func:`_folder_files`), in the reader's order."""
    ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))) if files else []
    if not ids:
        count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
        raise DataError(f"{folder}: is a folder with no DICOM series in it ({count}); expected a volume file, "
                        "or a folder holding one DICOM series")
    series = {i: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), i)) for i in ids}
    if len(ids) > 1:
        shown = ", ".join(f"{i} ({len(f)} files)" for i, f in series.items())
        raise DataError(f"{folder}: holds {len(ids)} DICOM series ({shown}); put each series in a folder of its own")
    names = [os.path.normpath(f) for f in series[ids[0]]]
    stray = [f for f in names if f not in files]
    if stray or not names:
        raise DataError(f"{folder}: the series lists files that were not checked ({', '.join(stray[:3])})")
    return names


def series_claim(folder: str | Path) -> SeriesClaim:
    """What the one DICOM series in ``folder`` claims (files checked, headers read, no voxel decoded);
    DataError naming the folder (or file) if it is not one clean series."""
    folder = Path(folder)
    files = _folder_files(folder)
    with _quiet_itk():
        return _series_claim(folder, _series_files(folder, files))


def read_dicom_series(folder: str | Path, *, memory_limit: int | None = None) -> sitk.Image:
    """Read the one DICOM series in ``folder``; DataError naming the folder (or file) otherwise.

    memory_limit: the most bytes the series may hold on disk and decode to (``None``:
        :func:`~medsynth.data.limits.default_memory_limit`), checked before anything is decoded; the decoded
        size counts the pixel type after Rescale Slope/Intercept.
    Returns the volume as SimpleITK reads it: ``(x, y, z)`` with ITK's LPS geometry.
    """
    folder = Path(folder)
    # 1. the folder's files: regular, inside it, and not more bytes than may be held
    files = _folder_files(folder)
    total = sum(files.values())
    limit = default_memory_limit() if memory_limit is None else memory_limit
    if total > limit:
        raise DataError(f"{folder}: its {len(files)} files hold {format_bytes(total)} ({total} bytes), above the memory "
                        f"limit of {format_bytes(limit)} ({limit} bytes) per case; if the series is genuine, raise the "
                        "limit (medsynth validate --memory-limit, or memory_limit= in Python)")
    with _quiet_itk():
        # 2. one series; 3. what its headers claim, decoded, before the voxels are decoded
        claim = _series_claim(folder, _series_files(folder, files))
        check_claimed_size(folder, claim.decoded_bytes, claim.description, memory_limit)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(claim.files)
        reader.SetImageIO("GDCMImageIO")
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(f"{folder}: DICOM series cannot be read ({_last_line(exc)})") from None
    if math.prod(image.GetSize()) == 0:
        raise DataError(f"{folder}: has a zero-size axis (size {image.GetSize()})")
    if image.GetSizeOfPixelComponent() != claim.itemsize:
        raise DataError(f"{folder}: decoded {image.GetSizeOfPixelComponent()}-byte values, the headers claim "
                        f"{claim.itemsize}-byte values ({claim.description})")
    return image
