"""MetaImage and NRRD headers, read before SimpleITK sees the file.

SimpleITK trusts a header: ``ElementDataFile = /dev/zero`` with ``DimSize = 1500 1000 1000`` makes
it allocate 1.5 GB and read the device, ``ElementDataFile = /etc/passwd`` reads that file as voxels,
a small gzipped NRRD inflates to gigabytes. :func:`checked_itk_file` parses the header text itself
(the same fields, the same case rules as MetaIO and teem: MetaImage keys case-sensitive, NRRD
field names not, duplicates refused) and proves, before SimpleITK is called, that

- the data file is a regular file inside the dataset root (the header's folder unless given);
- its size (or, compressed, its inflated length, read with a cap) is exactly what
  ``DimSize x ElementNumberOfChannels x ElementType`` (NRRD: ``sizes x type``) claims;
- the claim is within the memory ceiling (:mod:`medsynth.data.limits`).

Forms that cannot be bounded this way are refused with a message: ASCII or hex voxel data, bzip2,
lists or patterns of data files, NRRD ``line skip``/``byte skip`` on compressed data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medsynth.data.limits import CappedInflater, check_claimed_size, format_bytes, open_regular, regular_file_size
from medsynth.errors import DataError

__all__ = ["ItkClaim", "checked_itk_file", "itk_claim"]

MAX_HEADER_BYTES = 1 << 20  # a header (comments included) longer than this is refused

_MET_TYPES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}

_NRRD_TYPES: dict[str, int] = {}
for _size, _names in (
    (1, "signed char,int8,int8_t,uchar,unsigned char,uint8,uint8_t"),
    (2, "short,short int,signed short,signed short int,int16,int16_t,ushort,unsigned short,"
        "unsigned short int,uint16,uint16_t"),
    (4, "int,signed int,int32,int32_t,uint,unsigned int,uint32,uint32_t,float"),
    (8, "longlong,long long,long long int,signed long long,signed long long int,int64,int64_t,ulonglong,"
        "unsigned long long,unsigned long long int,uint64,uint64_t,double"),
):
    for _name in _names.split(","):
        _NRRD_TYPES[_name] = _size


@dataclass(frozen=True)
class ItkClaim:
    """What a MetaImage/NRRD header says: the grid, the bytes per voxel, where the data lies.

    sizes: voxels per axis in file order (x fastest), without the component axis;
    components: values per voxel; itemsize: bytes per value; data_file: the file holding the voxels;
    offset: bytes before them in that file (``-1``: the data is the file's last bytes);
    compressed: zlib/gzip data (inflated with a cap).
    """

    sizes: tuple[int, ...]
    components: int
    itemsize: int
    data_file: Path
    offset: int
    compressed: bool

    @property
    def data_bytes(self) -> int:
        return math.prod(self.sizes) * self.components * self.itemsize

    def describe(self) -> str:
        comp = f" x {self.components} components" if self.components > 1 else ""
        return f"size {self.sizes}{comp} of {self.itemsize}-byte values"


def checked_itk_file(
    path: Path, suffix: str, *, memory_limit: int | None = None, root: Path | None = None
) -> ItkClaim:
    """Parse and bound a ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` file; DataError naming it if unsafe.

    root: the folder a separate data file must lie in (default: the header's folder).
    Returns the claim SimpleITK's result is compared with after reading.
    """
    path = Path(path)
    claim = itk_claim(path, suffix, root=root)
    check_claimed_size(path, claim.data_bytes, claim.describe(), memory_limit)
    try:
        _check_data_size(path, claim)
    except DataError as exc:
        if claim.data_file == path:
            raise
        raise DataError(f"{path}: data file {exc}") from None
    return claim


def itk_claim(path: Path, suffix: str, *, root: Path | None = None) -> ItkClaim:
    """What the header of ``path`` claims, from its text alone (the data file is not opened)."""
    return _metaimage_claim(path, root) if suffix in (".mha", ".mhd") else _nrrd_claim(path, root)


# ------------------------------------------------------------------------------------ header text


def _header_lines(
    path: Path, stop: Callable[[str], bool], last: str, *, end_of_file_ok: bool = False
) -> tuple[list[tuple[str, int]], int]:
    """Lines of the header (text, line number) up to and including the one ``stop(line)`` accepts
    (``last`` names it in the error), and the byte offset just after it. Reads at most
    :data:`MAX_HEADER_BYTES`; with ``end_of_file_ok`` the end of the file also ends the header."""
    fh, _ = open_regular(path)
    with fh:
        block = fh.read(MAX_HEADER_BYTES + 1)
    lines: list[tuple[str, int]] = []
    pos = 0
    while True:
        end = block.find(b"\n", pos)
        if end < 0:
            if len(block) > MAX_HEADER_BYTES:
                raise DataError(f"{path}: header longer than {format_bytes(MAX_HEADER_BYTES)} (or no end of header found)")
            end = len(block)
        raw = block[pos:end]
        try:
            text = raw.decode("latin-1").rstrip("\r")
        except UnicodeDecodeError:  # latin-1 decodes every byte; kept for clarity
            raise DataError(f"{path}: header line {len(lines) + 1} is not text") from None
        lines.append((text, len(lines) + 1))
        pos = end + 1
        if stop(text):
            return lines, min(pos, len(block))
        if end >= len(block):
            if end_of_file_ok:
                return lines, len(block)
            raise DataError(f"{path}: header ends without its last field ({last})")


def _positive_ints(path: Path, key: str, value: str, count: int | None = None) -> tuple[int, ...]:
    parts = value.split()
    try:
        ints = tuple(int(p) for p in parts)
    except ValueError:
        raise DataError(f"{path}: {key} {value!r} is not a list of whole numbers") from None
    if not ints or any(v <= 0 for v in ints):
        raise DataError(f"{path}: {key} {value!r} must list positive sizes (a zero-size axis or none at all)")
    if count is not None and len(ints) != count:
        raise DataError(f"{path}: {key} lists {len(ints)} values, the header declares {count} dimensions")
    return ints


def _data_path(path: Path, name: str, root: Path | None, key: str) -> Path:
    """The data file ``name`` of header ``path``: relative to the header's folder, inside ``root``."""
    if not name:
        raise DataError(f"{path}: {key} is empty")
    if name.upper() == "LIST" or "%" in name:
        raise DataError(f"{path}: {key} {name!r} names a list or pattern of files; medsynth reads one data file "
                        "(write the volume as a single .mha, .nrrd or .nii.gz)")
    candidate = Path(name) if os.path.isabs(name) else path.parent / name
    folder = Path(os.path.realpath(root if root is not None else path.parent))
    real = Path(os.path.realpath(candidate))
    if real != folder and folder not in real.parents:
        raise DataError(f"{path}: {key} {name!r} resolves to {real}, outside {folder}; a header may only point "
                        "to a data file inside the dataset")
    return candidate


# ------------------------------------------------------------------------------------ MetaImage


def _metaimage_claim(path: Path, root: Path | None) -> ItkClaim:
    def is_last(line: str) -> bool:
        return line.split("=", 1)[0].strip() == "ElementDataFile"

    lines, data_start = _header_lines(path, is_last, "ElementDataFile")
    fields: dict[str, str] = {}
    for text, number in lines:
        if not text.strip():
            continue
        if "=" not in text:
            raise DataError(f"{path}: header line {number} {text[:60]!r} is not 'Key = Value'")
        key, value = (s.strip() for s in text.split("=", 1))
        if key in fields:
            raise DataError(f"{path}: header sets {key} twice (line {number}); readers disagree on which one counts")
        fields[key] = value
    for key in ("NDims", "DimSize", "ElementType"):
        if key not in fields:
            raise DataError(f"{path}: header has no {key}")
    try:
        ndims = int(fields["NDims"])
    except ValueError:
        raise DataError(f"{path}: NDims {fields['NDims']!r} is not a whole number") from None
    if not 1 <= ndims <= 4:
        raise DataError(f"{path}: NDims {ndims}: expected 2, 3 or 4")
    sizes = _positive_ints(path, "DimSize", fields["DimSize"], ndims)
    etype = fields["ElementType"]
    if etype not in _MET_TYPES:
        raise DataError(f"{path}: ElementType {etype!r} is not one of {', '.join(_MET_TYPES)}")
    components = _positive_ints(path, "ElementNumberOfChannels", fields.get("ElementNumberOfChannels", "1"), 1)[0]
    if fields.get("BinaryData", "True").lower() != "true":
        raise DataError(f"{path}: BinaryData = {fields['BinaryData']}: ASCII voxel data is not supported "
                        "(write the volume with binary data)")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        if fields.get("HeaderSize", "0").strip() not in ("0", ""):
            raise DataError(f"{path}: HeaderSize with ElementDataFile = LOCAL is not supported")
        return ItkClaim(sizes, components, _MET_TYPES[etype], path, data_start, compressed)
    data_file = _data_path(path, name, root, "ElementDataFile")
    try:
        offset = int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise DataError(f"{path}: HeaderSize {fields['HeaderSize']!r} is not a whole number") from None
    if offset < -1 or (offset == -1 and compressed):
        raise DataError(f"{path}: HeaderSize {offset} is not supported here")
    return ItkClaim(sizes, components, _MET_TYPES[etype], data_file, offset, compressed)


# ------------------------------------------------------------------------------------ NRRD


def _nrrd_claim(path: Path, root: Path | None) -> ItkClaim:
    lines, data_start = _header_lines(path, lambda line: line == "", "a blank line", end_of_file_ok=True)
    if not lines or not lines[0][0].startswith("NRRD000"):
        raise DataError(f"{path}: not a NRRD file (no NRRD000x magic on the first line)")
    fields: dict[str, str] = {}
    for text, number in lines[1:]:
        if text == "":
            break
        if text.startswith("#") or ":=" in text.split(": ", 1)[0]:
            continue  # a comment, or a key:=value pair
        if ": " not in text:
            raise DataError(f"{path}: header line {number} {text[:60]!r} is not 'field: value'")
        key, value = text.split(": ", 1)
        key = key.strip().lower().replace(" ", "")
        if key in fields:
            raise DataError(f"{path}: header sets field {key!r} twice (line {number})")
        fields[key] = value.strip()
    for key in ("type", "dimension", "sizes", "encoding"):
        if key not in fields:
            raise DataError(f"{path}: header has no {key!r} field")
    try:
        ndim = int(fields["dimension"])
    except ValueError:
        raise DataError(f"{path}: dimension {fields['dimension']!r} is not a whole number") from None
    if not 1 <= ndim <= 5:
        raise DataError(f"{path}: dimension {ndim}: expected 2 to 4 (plus a vector axis)")
    sizes = _positive_ints(path, "sizes", fields["sizes"], ndim)
    itemsize = _NRRD_TYPES.get(fields["type"].lower())
    if itemsize is None:
        raise DataError(f"{path}: type {fields['type']!r} is not a supported scalar type")
    encoding = fields["encoding"].lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise DataError(f"{path}: encoding {fields['encoding']!r} is not supported (use raw or gzip)")
    compressed = encoding != "raw"
    skips = {}
    for key in ("lineskip", "byteskip"):
        try:
            skips[key] = int(fields.get(key, "0"))
        except ValueError:
            raise DataError(f"{path}: {key} {fields[key]!r} is not a whole number") from None
    name = fields.get("datafile")
    if name is None:
        data_file, offset = path, data_start
        if skips["lineskip"] or skips["byteskip"]:
            raise DataError(f"{path}: line skip / byte skip with data in the same file are not supported")
    else:
        data_file = _data_path(path, name, root, "data file")
        if skips["lineskip"] < 0 or skips["byteskip"] < -1 or (compressed and (skips["lineskip"] or skips["byteskip"])):
            raise DataError(f"{path}: line skip {skips['lineskip']} / byte skip {skips['byteskip']} are not "
                            "supported with this encoding")
        offset = _offset_after_lines(data_file, skips["lineskip"]) + max(skips["byteskip"], 0)
        if skips["byteskip"] == -1:
            offset = -1
    # the vector axis of a multi-component NRRD is one of the sizes: count it there
    return ItkClaim(sizes, 1, itemsize, data_file, offset, compressed)


def _offset_after_lines(data_file: Path, count: int) -> int:
    """Bytes taken by the first ``count`` lines of ``data_file`` (NRRD ``line skip``)."""
    if count == 0:
        return 0
    fh, _ = open_regular(data_file)
    with fh:
        seen, pos = 0, 0
        while seen < count:
            chunk = fh.read(1 << 20)
            if not chunk:
                raise DataError(f"{data_file}: has fewer than {count} lines to skip")
            idx = -1
            while seen < count:
                idx = chunk.find(b"\n", idx + 1)
                if idx < 0:
                    break
                seen += 1
            if seen == count:
                return pos + idx + 1
            pos += len(chunk)
    return pos


# ------------------------------------------------------------------------------------ data size


def _check_data_size(path: Path, claim: ItkClaim) -> None:
    """The data file holds exactly the claimed bytes (compressed: inflates to exactly them)."""
    where = "" if claim.data_file == path else f" (data file {claim.data_file})"
    what = f"{claim.describe()} = {claim.data_bytes} bytes of voxel data"
    if not claim.compressed:
        size = regular_file_size(claim.data_file)
        start = size - claim.data_bytes if claim.offset == -1 else claim.offset
        available = size - start
        if claim.offset == -1 and available < 0 or claim.offset >= 0 and available < claim.data_bytes:
            raise DataError(f"{path}: truncated: header claims {what}{where}, the file holds "
                            f"{max(size - max(claim.offset, 0), 0)} bytes of data")
        if claim.offset >= 0 and available > claim.data_bytes:
            raise DataError(f"{path}: {available - claim.data_bytes} bytes after the {what} the header claims{where}; "
                            "the header does not describe this file")
        return
    fh, _ = open_regular(claim.data_file)
    with fh:
        fh.seek(claim.offset)
        stream = CappedInflater(fh, claim.data_file, wbits=47)
        remaining = claim.data_bytes
        while remaining:  # inflate in 8 MiB slices, each dropped once counted
            got = stream.read_exact(min(remaining, 8 << 20), f"header {path.name} claims {what}")
            remaining -= len(got)
        stream.expect_end(what)
