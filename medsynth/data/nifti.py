"""Read and write volumes with their geometry.

NIfTI (``.nii``, ``.nii.gz``) is read with nibabel, fully decoded, keeping the affine.
MetaImage and NRRD (``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) are read with SimpleITK and
converted from ITK's LPS world to the RAS affine NIfTI uses.

Reads are bounded (:mod:`medsynth.data.limits`): only regular files are opened, and what a header
claims (shape x dtype) is checked against the bytes the file holds, read with a cap when compressed,
and against a memory ceiling per case, before anything of that size is allocated. MetaImage/NRRD
headers are parsed first (:mod:`medsynth.data.itk_header`): their data file must lie in the dataset.

Arrays are in file index order ``(i, j, k)``; a 2D volume stored as ``(H, W)`` or ``(H, W, 1)``
is returned as ``(H, W)``. The affine is always 4x4 (voxel index -> RAS millimetres).

There is one writer, :func:`write_volume`: atomic, explicit dtype (labels ``uint8`` if the
maximum is below 256 else ``uint16``, never scaled; images ``float32``), and a re-read of the
temp file proving that data and affine on disk equal what was meant before it takes its name.
Given the file the data came from (``like=``, a :class:`SourceHeader`), it follows one header rule:
the source's on-disk shape (trailing singleton axes restored: a slice stored ``(H, W, 1)`` is
written ``(H, W, 1)``), its sform/qform codes and matrices, pixdim, units, description and intent.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from medsynth.data.atomic import atomic_path
from medsynth.data.itk_header import ItkClaim, checked_itk_file, itk_claim
from medsynth.data.labels import as_label_array, label_problems
from medsynth.data.limits import CappedInflater, check_claimed_size, default_memory_limit, format_bytes, open_regular
from medsynth.errors import DataError

Kind = Literal["image", "label"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
GZIP_MAGIC = b"\x1f\x8b"
NIFTI2_HEADER_SIZE = 540  # the larger of the two fixed headers (NIfTI-1: 348)
#: the most bytes a NIfTI header with its extensions may take before the data (the memory ceiling
#: bounds the voxel data; this bounds what comes before it)
MAX_NIFTI_OFFSET = 64 << 20


@dataclass
class Volume:
    """A decoded volume.

    array: voxel data in file index order, ``(H, W)`` for 2D or ``(X, Y, Z)`` for 3D
        (a 4th axis only if the file has one that is not a trailing singleton).
    affine: ``(4, 4)`` float64 voxel -> RAS mm.
    header: raw facts the checks need (``sform_code``, ``qform_code``, ``qform``, ``sform``,
        ``slope``, ``inter``, ``disk_dtype``, ``zooms``, ``raw_shape``: the on-disk shape, trailing
        singleton axes included), ``kind`` (as read), and for NIfTI ``nifti_fields``: the header
        fields a file written from this one keeps (:data:`KEPT_FIELDS`, :func:`source_header`).
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spatial_ndim(self) -> int:
        return min(self.array.ndim, 3)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (norms of the affine's columns)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(v) for v in norms[: self.spatial_ndim])


def _file_name(path: str | Path) -> str:
    """``Path(path).name``, from the string (a manifest may name 100k files)."""
    return os.path.basename(os.fspath(path).rstrip("/"))


def volume_suffix(path: str | Path) -> str:
    name = _file_name(path).lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | Path) -> str:
    """The file name without its volume suffix (``c0.nii.gz`` -> ``c0``)."""
    name = _file_name(path)
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def _squeeze_trailing(array: np.ndarray) -> np.ndarray:
    # (H, W, 1) is 2D; (X, Y, Z, 1) is 3D; never squeeze a leading or middle axis.
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    return array


def read_volume(
    path: str | Path, *, kind: Kind = "image", memory_limit: int | None = None, root: str | Path | None = None
) -> Volume:
    """Read and fully decode one volume. Raises :class:`DataError` naming the file.

    ``kind`` only chooses how the data is returned: labels keep their on-disk integer dtype
    when no scaling is stored; images come back as stored (callers cast).
    memory_limit: the most bytes of voxel data the file may claim (``None``:
        :func:`~medsynth.data.limits.default_memory_limit`); checked before anything of that size
        is allocated, as is the claim against the bytes the file really holds.
    root: the folder a MetaImage/NRRD header's data file must lie in (default: the header's folder).
    A folder is read as the one DICOM series it holds (:func:`medsynth.data.dicom.read_dicom_series`).
    Only regular files are read (no FIFOs, devices or sockets, also not through a symlink).
    """
    path = Path(path)
    if "\x00" in str(path):
        raise DataError(f"{path!r}: a file name cannot contain a NUL byte")
    if not path.exists():
        raise DataError(f"{path}: file not found" + (" (dangling symbolic link)" if path.is_symlink() else ""))
    if path.is_dir():  # a folder of one DICOM series, in RAS like .mha
        # imported here, as SimpleITK is: `medsynth --help` reads the format list, which imports this module
        from medsynth.data.dicom import read_dicom_series

        volume = _itk_volume(read_dicom_series(path, memory_limit=memory_limit), path)
        volume.header["kind"] = kind
        return volume
    suffix = volume_suffix(path)
    if not suffix:
        raise DataError(
            f"{path}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if suffix in NIFTI_SUFFIXES:
        volume = _read_nifti(path, suffix, memory_limit)
    else:
        claim = checked_itk_file(path, suffix, memory_limit=memory_limit, root=None if root is None else Path(root))
        volume = _read_itk(path, suffix, claim)
    volume.header["kind"] = kind
    return volume


def _nifti_class(raw: bytes, path: Path) -> Any:
    """NIfTI-1 or NIfTI-2 image class from ``sizeof_hdr`` (348 or 540, either byte order)."""
    import nibabel as nib

    if len(raw) < 4:
        raise DataError(f"{path}: too short to be a NIfTI file ({len(raw)} bytes)")
    for order in ("little", "big"):
        size = int.from_bytes(raw[:4], order)
        if size == 348:
            return nib.Nifti1Image
        if size == 540:
            return nib.Nifti2Image
    raise DataError(f"{path}: not a NIfTI file (header size field is not 348 or 540)")


@contextmanager
def _quiet_nibabel() -> Iterator[None]:
    # nibabel logs header fixes ("setting 0 dims to 1") to stderr; the raw facts are kept in
    # Volume.header and reported by validation instead.
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class _NiftiClaim:
    """What a NIfTI header says about the data after it: where it starts and how many bytes it is."""

    klass: Any
    shape: tuple[int, ...]
    dtype: np.dtype  # as stored
    offset: int  # bytes before the voxel data (header, extensions)
    decoded: np.dtype  # after scl_slope / scl_inter: what reading allocates (float64 for scaled integers)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data in the file."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the decoded array (the memory ceiling counts these)."""
        return math.prod(self.shape) * self.decoded.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.data_bytes

    def stored(self) -> str:
        return f"shape {self.shape} {self.dtype}"

    def describe(self) -> str:
        scaled = "" if self.decoded == self.dtype else f" scaled (scl_slope/scl_inter) to {self.decoded}"
        return f"{self.stored()}{scaled}"


def _decoded_dtype(hdr: Any, dtype: np.dtype, path: Path) -> np.dtype:
    """The dtype nibabel decodes the data to: as stored without scaling, else the stored type
    promoted with float64 (``uint8`` -> ``float64``: 8 bytes a voxel)."""
    try:
        slope, inter = hdr.get_slope_inter()
    except Exception as exc:  # nibabel raises HeaderDataError and others for odd scaling fields
        raise DataError(f"{path}: unreadable scl_slope/scl_inter ({type(exc).__name__}: {exc})") from None
    if slope is None or (slope, inter) == (1.0, 0.0) or dtype.kind not in "biufc":
        return dtype  # unscaled, or a type nibabel does not scale (RGB, void): reading reports it
    return np.result_type(dtype, np.float64)


def _nifti_claim(head: bytes, path: Path) -> _NiftiClaim:
    """Parse the fixed header (first 348 or 540 bytes) without touching the data."""
    klass = _nifti_class(head, path)
    size = klass.header_class.sizeof_hdr
    if len(head) < size:
        raise DataError(f"{path}: truncated: {len(head)} bytes, shorter than the {size}-byte NIfTI header")
    with _quiet_nibabel():
        try:
            hdr = klass.header_class(head[:size], check=False)
            shape = tuple(int(s) for s in hdr.get_data_shape())
            vox_offset = float(hdr["vox_offset"])
        except Exception as exc:  # nibabel raises many types for a bad header
            raise DataError(f"{path}: not a readable NIfTI header ({type(exc).__name__}: {exc})") from None
        try:
            dtype = np.dtype(hdr.get_data_dtype())
        except Exception:  # an unknown code: KeyError or HeaderDataError
            raise DataError(f"{path}: unknown NIfTI datatype code {int(hdr['datatype'])}") from None
        decoded = _decoded_dtype(hdr, dtype, path)
    if len(shape) == 0 or any(s == 0 for s in shape):
        raise DataError(f"{path}: has a zero-size axis (shape {shape})")
    if any(s < 0 for s in shape):
        raise DataError(f"{path}: header has a negative dimension (shape {shape})")
    if dtype.itemsize == 0:
        raise DataError(f"{path}: header data type {dtype} has no size")
    minimum = size + 4  # the header, then 4 extension-flag bytes
    if not math.isfinite(vox_offset) or vox_offset != int(vox_offset) or vox_offset < minimum:
        raise DataError(f"{path}: vox_offset {vox_offset:g} is not a whole number of bytes >= {minimum} "
                        "(the data must start after the header)")
    if vox_offset > MAX_NIFTI_OFFSET:
        raise DataError(f"{path}: vox_offset {vox_offset:.0f} claims {format_bytes(int(vox_offset))} of header "
                        f"extensions before the data; more than {format_bytes(MAX_NIFTI_OFFSET)} is refused")
    return _NiftiClaim(klass=klass, shape=shape, dtype=dtype, offset=int(vox_offset), decoded=decoded)


def _read_nifti_bytes(path: Path, suffix: str, memory_limit: int | None) -> tuple[bytes, _NiftiClaim]:
    """The file's bytes (decompressed), exactly up to the end of the data its header claims.

    The claim is checked against the file size (``.nii``) or read through a capped inflate
    (``.nii.gz``) and against the memory ceiling before the data is read."""
    fh, size = open_regular(path)
    with fh:
        if size == 0:
            raise DataError(f"{path}: file is empty")
        magic = fh.read(2)
        compressed = magic == GZIP_MAGIC
        if suffix == ".nii.gz" and not compressed:
            raise DataError(f"{path}: named .nii.gz but is not gzip-compressed (rename it to .nii)")
        if suffix == ".nii" and compressed:
            raise DataError(f"{path}: named .nii but is gzip-compressed (rename it to .nii.gz)")
        fh.seek(0)
        if not compressed:
            claim = _nifti_claim(fh.read(NIFTI2_HEADER_SIZE), path)
            if claim.end > size:
                raise DataError(f"{path}: truncated or corrupt data: header claims {claim.stored()} = {claim.data_bytes} bytes "
                                f"of voxel data from byte {claim.offset}, the file holds {size} bytes")
            if claim.end < size:
                raise DataError(f"{path}: {size - claim.end} bytes after the {claim.data_bytes} bytes of voxel "
                                f"data the header claims ({claim.stored()}); the header does not describe this file")
            check_claimed_size(path, claim.decoded_bytes, claim.describe(), memory_limit)
            fh.seek(0)
            raw = _read_all(fh, size, path)
            return raw, claim
        # The whole stream, trailer included: a cut file or a bad CRC fails here, even when the cut
        # only removed bytes nibabel would never read. Nothing beyond the claimed end is inflated.
        stream = CappedInflater(fh, path, wbits=31)
        head = stream.read(NIFTI2_HEADER_SIZE)
        claim = _nifti_claim(head, path)
        check_claimed_size(path, claim.decoded_bytes, claim.describe(), memory_limit)
        what = f"{claim.stored()} = {claim.data_bytes} bytes of voxel data from byte {claim.offset}"
        if len(head) >= claim.end:
            raw = head[: claim.end]
            if len(head) > claim.end:
                raise DataError(f"{path}: the decompressed data goes on after what the header claims ({what}); "
                                "the header does not describe this file")
        else:
            raw = head + stream.read_exact(claim.end - len(head), f"header claims {what}")
        stream.expect_end(what)
        return raw, claim


def _claim_of(path: Path, root: str | Path | None) -> tuple[int, int]:
    """(bytes of decoded voxel data, bytes per decoded value) the header of ``path`` claims (after a
    NIfTI's scl_slope/scl_inter: a scaled uint8 volume counts 8 bytes a voxel)."""
    path = Path(path)
    if "\x00" in str(path):
        raise DataError(f"{path!r}: a file name cannot contain a NUL byte")
    if path.is_dir():  # a DICOM series: its pixel type after Rescale Slope/Intercept
        from medsynth.data.dicom import series_claim  # SimpleITK, as in read_volume

        series = series_claim(path)
        return series.decoded_bytes, series.itemsize
    suffix = volume_suffix(path)
    if suffix in ITK_SUFFIXES:  # SimpleITK decodes MetaImage/NRRD as stored (no intensity scaling)
        itk = itk_claim(path, suffix, root=None if root is None else Path(root))
        return itk.data_bytes, itk.itemsize
    fh, _ = open_regular(path)
    with fh:
        if fh.read(2) == GZIP_MAGIC:
            fh.seek(0)
            claim = _nifti_claim(CappedInflater(fh, path).read(NIFTI2_HEADER_SIZE), path)
        else:
            fh.seek(0)
            claim = _nifti_claim(fh.read(NIFTI2_HEADER_SIZE), path)
    return claim.decoded_bytes, claim.decoded.itemsize


def claimed_bytes(path: str | Path, *, root: str | Path | None = None) -> int:
    """Bytes of decoded voxel data the header of ``path`` claims; only the header is read.

    DataError if the file cannot be opened or its header parsed (as :func:`read_volume`)."""
    return _claim_of(Path(path), root)[0]


def check_case_size(paths: list[Path], memory_limit: int | None = None, *, root: str | Path | None = None,
                    itemsize: int | None = None) -> None:
    """DataError naming the files if, together, the headers of one case's files claim more decoded
    bytes than ``memory_limit`` (``None``: :func:`~medsynth.data.limits.default_memory_limit`).

    itemsize: the bytes per value the caller converts the data to (8 for float64): each file then
    counts as its number of values x ``itemsize`` (a single file too); ``None``: as stored, and a
    single file is left to :func:`read_volume`'s own check.
    A file whose header cannot be read is skipped here; reading it reports the problem."""
    limit = default_memory_limit() if memory_limit is None else memory_limit
    claims = []
    for p in paths:
        try:
            data, stored = _claim_of(Path(p), root)
        except DataError:
            continue
        claims.append((Path(p), data if itemsize is None else data // stored * itemsize))
    total = sum(n for _, n in claims)
    if total > limit and (len(claims) > 1 or itemsize is not None):
        parts = ", ".join(f"{'/'.join(p.parts[-2:])} {format_bytes(n)}" for p, n in claims)
        held = "" if itemsize is None else f" as {itemsize}-byte values"
        raise DataError(f"{claims[0][0]}: the case's files claim {format_bytes(total)} ({total} bytes) of voxel data "
                        f"together{held} ({parts}), above the memory limit of {format_bytes(limit)} ({limit} bytes) "
                        "per case; if the files are genuine, raise the limit (medsynth validate --memory-limit, or "
                        "memory_limit= in Python)")


def _read_all(fh: Any, size: int, path: Path) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise DataError(f"{path}: file changed while it was read ({len(data)} of {size} bytes)")
    return data


def _read_nifti(path: Path, suffix: str, memory_limit: int | None = None) -> Volume:
    raw, claim = _read_nifti_bytes(path, suffix, memory_limit)
    klass = claim.klass
    with _quiet_nibabel():
        try:
            # The header as stored (nibabel's loader silently replaces a zero pixdim by 1).
            stored = klass.header_class.from_fileobj(io.BytesIO(raw), check=False)
            img = klass.from_bytes(raw)
        except Exception as exc:  # nibabel raises many types for a bad header
            raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    hdr = img.header
    raw_shape = tuple(int(s) for s in img.shape)
    if raw_shape != claim.shape or int(getattr(img.dataobj, "offset", claim.offset)) != claim.offset:
        raise DataError(f"{path}: header read two ways disagrees (shape {raw_shape} vs {claim.shape})")
    try:
        # Decode every byte now: a short file must fail here, not read as zeros later.
        array = np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: truncated or corrupt data ({type(exc).__name__}: {exc})") from None
    if array.size != int(np.prod(raw_shape)):
        raise DataError(f"{path}: decoded {array.size} voxels, header says shape {raw_shape}")
    try:
        sform, sform_code = hdr.get_sform(coded=True)
        qform, qform_code = hdr.get_qform(coded=True)
        affine = np.asarray(img.affine, dtype=np.float64)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:  # e.g. a quaternion of norm > 1
        raise DataError(f"{path}: invalid orientation in the header ({exc})") from None
    dataobj = img.dataobj
    header = {
        "format": "nifti",
        "sform_code": int(sform_code) if sform_code is not None else 0,
        "qform_code": int(qform_code) if qform_code is not None else 0,
        "sform": None if sform is None else np.asarray(sform, dtype=np.float64),
        "qform": None if qform is None else np.asarray(qform, dtype=np.float64),
        "slope": float(getattr(dataobj, "slope", 1.0)),
        "inter": float(getattr(dataobj, "inter", 0.0)),
        "disk_dtype": np.dtype(hdr.get_data_dtype()).name,
        "zooms": tuple(float(z) for z in hdr.get_zooms()),
        "raw_shape": raw_shape,
        # as stored in the file, before nibabel's fixes (0 -> 1, negative -> absolute value)
        "pixdim": tuple(float(v) for v in stored["pixdim"][1 : 1 + len(raw_shape)]),
        # as nibabel reads them (its fixes applied, so that they give ``affine``), for files written from this one
        "nifti_fields": {name: np.array(hdr[name]) for name in KEPT_FIELDS},
    }
    return Volume(array=_squeeze_trailing(array), affine=affine, path=path, header=header)


def _read_itk(path: Path, suffix: str, claim: ItkClaim) -> Volume:
    """Read a MetaImage/NRRD file with SimpleITK, after :func:`checked_itk_file` bounded it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    # the ImageIO is named, so SimpleITK reads the format whose header was checked, never another
    reader.SetImageIO("MetaImageIO" if suffix in (".mha", ".mhd") else "NrrdImageIO")
    try:
        # what SimpleITK will allocate, before it does: the claim counted these bytes per value
        reader.ReadImageInformation()
        decoded = sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent()
        img = reader.Execute() if decoded == claim.itemsize else None
    except Exception as exc:  # SimpleITK raises RuntimeError with its own text
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable image ({first})") from None
    if img is None:
        raise DataError(f"{path}: SimpleITK would decode {decoded}-byte values, the header claims "
                        f"{claim.describe()}; the header does not describe this file")
    size = img.GetSize()
    if math.prod(size) * img.GetNumberOfComponentsPerPixel() != math.prod(claim.sizes) * claim.components:
        raise DataError(f"{path}: SimpleITK read size {size} x {img.GetNumberOfComponentsPerPixel()} components, "
                        f"the header says {claim.describe()}")
    if any(s == 0 for s in size):
        raise DataError(f"{path}: has a zero-size axis (size {size})")
    return _itk_volume(img, path)


def _itk_volume(img: Any, path: Path) -> Volume:
    """A SimpleITK image (ITK's LPS world) as a :class:`Volume` with a RAS affine."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    # SimpleITK arrays are (z, y, x[, components]); ours are (x, y, z[, components]).
    array = sitk.GetArrayFromImage(img)
    spatial = array.ndim if img.GetNumberOfComponentsPerPixel() == 1 else array.ndim - 1
    order = list(range(spatial))[::-1] + list(range(spatial, array.ndim))
    array = np.ascontiguousarray(np.transpose(array, order))
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:dim, :dim] = direction @ np.diag(spacing)
    lps[:dim, 3] = origin
    # ITK world is LPS; NIfTI's is RAS: negate the first two world axes.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    header = {
        "format": "itk",
        "sform_code": 1,
        "qform_code": 1,
        "sform": affine.copy(),
        "qform": affine.copy(),
        "slope": 1.0,
        "inter": 0.0,
        "disk_dtype": array.dtype.name,
        "zooms": tuple(float(s) for s in spacing),
        "raw_shape": tuple(int(s) for s in array.shape),
        "pixdim": tuple(float(s) for s in spacing),
    }
    return Volume(array=_squeeze_trailing(array), affine=affine, path=path, header=header)


#: the largest label value the writer can store (uint16, never scaled)
LABEL_MAX = 65535


def label_dtype(max_value: int) -> np.dtype:
    """The on-disk dtype for a label map: uint8 if max < 256, else uint16."""
    if max_value < 256:
        return np.dtype(np.uint8)
    if max_value <= LABEL_MAX:
        return np.dtype(np.uint16)
    raise DataError(f"label value {max_value} does not fit in uint16, the largest label type medsynth writes "
                    f"(values 0..{LABEL_MAX}); renumber the labels")


def _label_array(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` in its on-disk label dtype (:func:`label_dtype`); DataError ``"{path}: ..."`` listing
    its problems (:func:`medsynth.data.labels.label_problems`) or a value the writer cannot hold."""
    array = np.asarray(array)
    problems = label_problems(array)
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    max_value = int(array.max()) if array.size else 0
    try:
        dtype = label_dtype(max_value)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    return array.astype(dtype)


#: the NIfTI header fields that give a file its orientation: codes, sform rows, qform quaternion and
#: offset, and pixdim (qfac, voxel sizes, time step)
GEOMETRY_FIELDS = ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
                   "qoffset_x", "qoffset_y", "qoffset_z", "pixdim")
#: what else a written file keeps from its source: units, description and intent
DESCRIPTIVE_FIELDS = ("xyzt_units", "descrip", "intent_code", "intent_p1", "intent_p2", "intent_p3", "intent_name")
INTENT_FIELDS = ("intent_code", "intent_p1", "intent_p2", "intent_p3", "intent_name")
KEPT_FIELDS = GEOMETRY_FIELDS + DESCRIPTIVE_FIELDS


@dataclass(frozen=True, eq=False)
class SourceHeader:
    """What a file written from a read volume keeps from it (:func:`write_volume`'s ``like``).

    shape: the source's on-disk shape, trailing singleton axes included (``(H, W, 1)`` for a slice
        read as ``(H, W)``); affine: the ``(4, 4)`` voxel -> RAS mm the reader derived;
    codes: ``(sform_code, qform_code)``; kind: what the source held (``"image"`` or ``"label"``);
    fields: the source's NIfTI header fields (:data:`KEPT_FIELDS`; empty for MetaImage/NRRD).
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    codes: tuple[int, int] = (1, 1)
    kind: Kind = "image"
    fields: Mapping[str, np.ndarray] = field(default_factory=dict)


def source_header(volume: Volume) -> SourceHeader:
    """The header facts of a read volume that files written from it keep (see :func:`write_volume`)."""
    header = volume.header
    return SourceHeader(
        shape=tuple(int(s) for s in header.get("raw_shape", volume.shape)),
        affine=np.array(volume.affine, dtype=np.float64),
        codes=header_codes(volume),
        kind="label" if header.get("kind") == "label" else "image",
        fields=dict(header.get("nifti_fields", {})),
    )


def disk_shape(shape: tuple[int, ...], source_shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with the trailing singleton axes its source file had after it: ``(H, W)`` read from an
    ``(H, W, 1)`` file (or a channel of an ``(H, W, 1, C)`` one) -> ``(H, W, 1)``; unchanged when the
    source's shape does not begin with ``shape``."""
    shape, source_shape = tuple(shape), tuple(source_shape)
    if source_shape[: len(shape)] != shape:
        return shape
    extra = 0
    for size in source_shape[len(shape):]:
        if size != 1:
            break
        extra += 1
    return shape + (1,) * extra


def _same_affine(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to float32 precision (the tolerance the writer's re-read check uses)."""
    return bool(np.allclose(a, b, rtol=1e-6, atol=1e-4))


def _set_header(img: Any, affine: np.ndarray, like: SourceHeader | None, codes: tuple[int, int], kind: Kind) -> None:
    """The one header rule. With a source (``like``) whose affine is ``affine``: its orientation fields
    verbatim (codes, sform, qform, pixdim); on another grid: ``affine`` as sform and qform with the
    source's codes. Then its units and description, and its intent when it held the same ``kind``."""
    hdr = img.header
    fields = {} if like is None else like.fields
    if like is not None and fields and _same_affine(like.affine, affine):
        for name in GEOMETRY_FIELDS:
            hdr[name] = fields[name]
    else:
        sform_code, qform_code = (int(c) for c in (codes if like is None else like.codes))
        if (sform_code, qform_code) == (0, 0) and not _same_affine(hdr.get_base_affine(), affine):
            sform_code = qform_code = 1  # (0, 0) means the default affine: keep it only for that one
        img.set_sform(affine, code=sform_code)
        img.set_qform(affine, code=qform_code)
        if "pixdim" in fields:  # the non-spatial steps (time) stay the source's
            pixdim = hdr["pixdim"].copy()
            pixdim[4:] = fields["pixdim"][4:]
            hdr["pixdim"] = pixdim
    if fields:
        for name in DESCRIPTIVE_FIELDS:
            if name not in INTENT_FIELDS or like is None or like.kind == kind:
                hdr[name] = fields[name]
    else:
        hdr.set_xyzt_units("mm", "sec")


def write_volume(
    path: str | Path, array: np.ndarray, affine: np.ndarray, *, kind: Kind, like: Volume | SourceHeader | None = None,
    codes: tuple[int, int] = (1, 1),
) -> Path:
    """Write ``array`` with ``affine`` to ``path`` (``.nii.gz`` or ``.nii``) atomically.

    array: ``(H, W)`` or ``(X, Y, Z)``; labels non-negative integers, images finite.
    affine: ``(4, 4)`` voxel -> RAS mm; stored as both sform and qform.
    like: the file the data came from (a read :class:`Volume` or its :func:`source_header`): every
        writer passes it, and the file then keeps the source's on-disk shape (its trailing singleton
        axes restored, :func:`disk_shape`), its sform/qform codes, its sform/qform matrices and pixdim
        (when ``affine`` is the source's, to float32 precision; else ``affine`` with the source's codes),
        its xyzt units and description, and its intent if the source held the same ``kind``.
    codes: without ``like``, ``(sform_code, qform_code)`` to store. ``(0, 0)`` (no orientation) is kept
        only when ``affine`` is the header's default one (what a reader of such a file gets), else both
        become 1 (scanner).
    The temp file is re-read and compared (data exactly, affine to float32 precision)
    before it is moved to ``path``.
    """
    import nibabel as nib

    path = Path(path)
    if volume_suffix(path) not in NIFTI_SUFFIXES:
        raise DataError(f"{path}: the writer writes NIfTI only (.nii.gz or .nii)")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: affine must be a finite 4x4 matrix, got shape {affine.shape}")
    array = np.asarray(array)
    if array.ndim not in (2, 3) or array.size == 0:
        raise DataError(f"{path}: can only write 2D or 3D volumes, got shape {array.shape}")
    if kind == "label":
        data = _label_array(array, path)
    elif kind == "image":
        data = np.asarray(array, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            raise DataError(f"{path}: image data contains NaN or Inf")
    else:
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    source = source_header(like) if isinstance(like, Volume) else like
    if source is not None:
        data = data.reshape(disk_shape(data.shape, source.shape))

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    _set_header(img, affine, source, codes, kind)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
        _verify_written(tmp, path, data, affine)
    return path


def header_codes(volume: Volume) -> tuple[int, int]:
    """``(sform_code, qform_code)`` of a read volume's header (``(1, 1)`` when it has none)."""
    header = volume.header
    return int(header.get("sform_code", 1)), int(header.get("qform_code", 1))


def _verify_written(tmp: Path, final: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    back = cast("nib.Nifti1Image", nib.load(str(tmp)))  # written by this module as NIfTI
    on_disk = np.asarray(back.dataobj)
    if on_disk.dtype != data.dtype or on_disk.shape != data.shape or not np.array_equal(on_disk, data):
        raise DataError(f"{final}: re-read data differs from what was written (write aborted)")
    if not np.allclose(back.affine, affine, rtol=1e-6, atol=1e-4):
        raise DataError(f"{final}: re-read affine differs from what was written (write aborted)")


@dataclass
class CaseArrays:
    """A labelled case in memory.

    images: ``(C, *spatial)`` float32 in the dataset's intensity units, one channel per file.
    label: ``(*spatial)`` int64 label values. affine: the label map's ``(4, 4)`` voxel -> RAS mm.
    label_header, image_headers: what files written from this case keep from its label map and from
    each channel's file (:class:`SourceHeader`: on-disk shape, codes, header fields), for
    :func:`write_volume`'s ``like``; a channel of a multi-channel file has the label file's on-disk
    shape. ``None`` / ``()`` for a case made in memory.
    """

    images: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    label_header: SourceHeader | None = None
    image_headers: tuple[SourceHeader, ...] = ()

    @property
    def codes(self) -> tuple[int, int]:
        """The label map's ``(sform_code, qform_code)`` (``(1, 1)`` for a case made in memory)."""
        return (1, 1) if self.label_header is None else self.label_header.codes

    def image_header(self, channel: int) -> SourceHeader | None:
        """What a file written for image channel ``channel`` keeps (its source file's header), else the label's."""
        return self.image_headers[channel] if channel < len(self.image_headers) else self.label_header

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0)[: self.label.ndim])


def read_case_arrays(
    image_paths: list[Path], label_path: Path, *, memory_limit: int | None = None, root: Path | None = None
) -> CaseArrays:
    """Read a case's channels and label map; DataError unless the label is integer-valued 2D/3D and
    every channel is finite with the label's shape. (Full geometry checks are :mod:`validate`'s job.)

    memory_limit: bytes of voxel data the case's files may claim together (``None``: the default
    ceiling, :func:`~medsynth.data.limits.default_memory_limit`); root: as :func:`read_volume`."""
    check_case_size([*image_paths, label_path], memory_limit, root=root)
    lab = read_volume(label_path, kind="label", memory_limit=memory_limit, root=root)
    label = as_label_array(lab.array, str(label_path))
    if label.ndim not in (2, 3):
        raise DataError(f"{label_path}: label map has shape {label.shape}; expected a 2D or 3D volume")
    label_header = source_header(lab)
    channels, headers = [], []
    for p in image_paths:
        vol = read_volume(p, kind="image", memory_limit=memory_limit, root=root)
        arr = np.asarray(vol.array, dtype=np.float32)
        parts = split_channels(arr, label.shape)
        if parts is None:
            raise DataError(f"{p}: image shape {arr.shape} differs from its label's {label.shape} ({label_path})")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{p}: image contains NaN or Inf")
        channels.extend(parts)
        header = source_header(vol)
        if arr.shape != label.shape:  # a channel of a multi-channel file takes the label file's on-disk shape
            header = replace(header, shape=label_header.shape)
        headers.extend([header] * len(parts))
    return CaseArrays(images=np.stack(channels), label=label, affine=lab.affine, label_header=label_header,
                      image_headers=tuple(headers))


def split_channels(array: np.ndarray, spatial_shape: tuple[int, ...]) -> list[np.ndarray] | None:
    """The channels of one image file: ``[array]`` when it has the label's shape, its last axis split
    when it holds several channels (MSD's ``(X, Y, Z, C)``, or ``(H, W, 1, C)`` for 2D), else None."""
    spatial_shape = tuple(spatial_shape)
    if array.shape == spatial_shape:
        return [array]
    a = array
    if a.ndim == len(spatial_shape) + 2 and a.shape[-2] == 1:
        a = a[..., 0, :]
    if a.ndim == len(spatial_shape) + 1 and a.shape[:-1] == spatial_shape:
        return [np.ascontiguousarray(a[..., k]) for k in range(a.shape[-1])]
    return None
