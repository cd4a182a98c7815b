"""Bounded reads: a hostile file ends in one clear error naming it, fast, with no large allocation.

Each test is one reproduction: a symlink to /dev/zero, a FIFO named like a label, a gzip bomb, a tiny
header claiming gigabytes, MetaImage/NRRD headers pointing at devices, other files or bombs. Memory
is measured with tracemalloc (numpy and bytes allocations are traced), time with a wall clock.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.limits import MEMORY_LIMIT_CAP, default_memory_limit, parse_size
from medsynth.data.nifti import read_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.data.validate import validate_dataset
from medsynth.errors import DataError

MiB = 1 << 20


@contextmanager
def bounded(max_seconds: float = 5.0, max_bytes: int = 8 * MiB) -> Iterator[None]:
    """The block must finish within ``max_seconds`` (an alarm breaks a hang) and allocate at most
    ``max_bytes`` at its peak (tracemalloc)."""

    def hang(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {max_seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, max_seconds)
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
        assert peak <= max_bytes, f"peak allocation {peak} bytes"
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _nifti(shape: tuple[int, ...], dtype: type = np.uint8) -> bytes:
    """A valid single-file NIfTI-1 of zeros (header 348 + 4 extension bytes + data)."""
    return nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4)).to_bytes()


def _claim(raw: bytes, shape: tuple[int, ...]) -> bytes:
    """``raw`` with the header's dims replaced by ``shape`` (little endian NIfTI-1)."""
    b = bytearray(raw)
    struct.pack_into("<8h", b, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    return bytes(b)


def _gzip(parts: list[bytes], zeros: int = 0) -> bytes:
    """One gzip member holding ``parts`` then ``zeros`` zero bytes (compressed as they stream)."""
    co = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [co.compress(p) for p in parts]
    block = bytes(MiB)
    for _ in range(zeros // MiB):
        out.append(co.compress(block))
    out.append(co.flush())
    return b"".join(out)


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A valid 2D MSD dataset of 2 phantom cases; returns its dataset.json."""
    return make_phantom_dataset(tmp_path / "ds", dim=2, cases=2, size=16, seed=0)


def _label_file(manifest: Path, k: int = 1) -> Path:
    entry = json.loads(manifest.read_text())["training"][k]
    return manifest.parent / entry["label"]


def _set_label_voxel(label: Path, value: int, dtype: type) -> None:
    """Rewrite a label file as ``dtype`` with voxel (0, 0) set to ``value``."""
    img = nib.load(str(label))
    data = np.asarray(img.dataobj).astype(dtype)
    data[0, 0] = value
    nib.save(nib.Nifti1Image(data, img.affine), str(label))


def _errors(manifest: Path, **kwargs: int) -> list[str]:
    report = validate_dataset(manifest, **kwargs)
    return [f"{p.file}: {p.message}" for p in report.errors]


# ------------------------------------------------------------------------------------ not regular files


def test_symlink_to_dev_zero_as_label(dataset: Path) -> None:
    label = _label_file(dataset)
    label.unlink()
    label.symlink_to("/dev/zero")
    with bounded():
        errors = _errors(dataset)
    assert errors == [f"{label}: is a character device (through a symbolic link), not a regular file; "
                      "volumes are read from regular files only"]


def test_fifo_named_like_a_label_does_not_hang(dataset: Path) -> None:
    label = _label_file(dataset)
    label.unlink()
    os.mkfifo(label)
    with bounded():
        result = CliRunner().invoke(app, ["validate", str(dataset), "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"{label.name}: is a FIFO (named pipe), not a regular file" in result.output


# ------------------------------------------------------------------------------------ NIfTI claims


def test_tiny_nii_claiming_two_gigabytes(tmp_path: Path) -> None:
    path = tmp_path / "big.nii"
    path.write_bytes(_claim(_nifti((1, 1, 1)), (2000, 1000, 1000))[:352])
    assert path.stat().st_size == 352
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError) as err:
        read_volume(path)
    assert str(err.value) == (f"{path}: truncated or corrupt data: header claims shape (2000, 1000, 1000) uint8 = "
                              "2000000000 bytes of voxel data from byte 352, the file holds 352 bytes")


def test_nii_with_bytes_after_the_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "long.nii"
    path.write_bytes(_nifti((2, 3, 4)) + bytes(10))
    with pytest.raises(DataError, match="10 bytes after the 24 bytes of voxel data"):
        read_volume(path)


def test_gzip_zeros_after_the_data(tmp_path: Path) -> None:
    # the reproduction: a small .nii.gz whose stream goes on with zeros after the voxels it declares
    raw = _nifti((4, 4, 4))
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(_gzip([raw], zeros=64 * MiB))
    assert path.stat().st_size < MiB
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError, match="bomb.nii.gz: the decompressed data goes on"):
        read_volume(path)


def test_gzip_members_inflating_to_gigabytes(tmp_path: Path) -> None:
    # 1.6 GB of zeros in 100 gzip members after a valid volume: refused after reading a few bytes past it
    member = _gzip([], zeros=16 * MiB)
    path = tmp_path / "members.nii.gz"
    path.write_bytes(_gzip([_nifti((4, 4, 4))]) + member * 100)
    with bounded(max_seconds=2.0, max_bytes=4 * MiB), pytest.raises(DataError, match="goes on after"):
        read_volume(path)
    # the same members after a volume that claims them all: the memory ceiling refuses it first
    path.write_bytes(_gzip([_claim(_nifti((4, 4, 4)), (1600, 1024, 1024))]) + member * 100)
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError) as err:
        read_volume(path, memory_limit=1 << 30)
    assert "header claims shape (1600, 1024, 1024) uint8 = 1.56 GiB (1677721600 bytes) to decode" in str(err.value)
    assert "above the memory limit of 1 GiB (1073741824 bytes) per case" in str(err.value)


def test_gzip_stream_shorter_than_its_claim(tmp_path: Path) -> None:
    path = tmp_path / "short.nii.gz"
    path.write_bytes(_gzip([_claim(_nifti((4, 4, 4)), (400, 400, 400))]))
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError, match="short.nii.gz: truncated: header claims shape "
                                                              r"\(400, 400, 400\) uint8 = 64000000 bytes"):
        read_volume(path)


def test_memory_limit_refuses_a_genuine_large_case_and_reads_it_when_raised(tmp_path: Path) -> None:
    data = np.arange(64 * 64 * 32, dtype=np.float32).reshape(64, 64, 32)  # 512 KiB of voxels
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(DataError, match=r"shape \(64, 64, 32\) float32 = 512 KiB \(524288 bytes\) to decode, "
                                        r"above the memory limit of 256 KiB \(262144 bytes\)"):
        read_volume(tmp_path / "v.nii.gz", memory_limit=256 * 1024)
    np.testing.assert_array_equal(read_volume(tmp_path / "v.nii.gz", memory_limit=MiB).array, data)


def test_validate_memory_limit_is_per_case(dataset: Path) -> None:
    # each phantom case: a 16x16 float32 image (1024 bytes) + a uint8 label (256 bytes) = 1280 bytes
    assert _errors(dataset, memory_limit=1280) == []
    errors = _errors(dataset, memory_limit=1279)
    image = dataset.parent / "imagesTr" / "phantom_000.nii.gz"
    assert errors[0] == (f"{image}: the case's files claim 1.25 KiB (1280 bytes) of voxel data together "
                         "(imagesTr/phantom_000.nii.gz 1 KiB, labelsTr/phantom_000.nii.gz 256 bytes), above the memory "
                         "limit of 1.25 KiB (1279 bytes) per case; if the files are genuine, raise the limit "
                         "(medsynth validate --memory-limit, or memory_limit= in Python)")
    assert len(errors) == 2
    result = CliRunner().invoke(app, ["validate", str(dataset), "--no-progress", "--memory-limit", "1k"])
    assert result.exit_code == 1 and "above the memory limit of 1 KiB (1024 bytes) per case" in result.output


# ------------------------------------------------------------------------------------ MetaImage / NRRD


def _write_itk(path: Path, array: np.ndarray, compress: bool = False) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), compress)


def _edit_header(path: Path, old: str, new: str) -> None:
    raw = path.read_bytes()
    assert old.encode() in raw
    path.write_bytes(raw.replace(old.encode(), new.encode(), 1))


@pytest.mark.parametrize("name,compress", [("v.mha", False), ("v.mha", True), ("v.mhd", False), ("v.mhd", True),
                                           ("v.nrrd", False), ("v.nrrd", True), ("v.nhdr", False)])
def test_itk_formats_still_read(tmp_path: Path, name: str, compress: bool) -> None:
    zyx = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    _write_itk(tmp_path / name, zyx, compress)
    np.testing.assert_array_equal(read_volume(tmp_path / name).array, zyx.transpose(2, 1, 0))


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/passwd"])
def test_mhd_data_file_outside_the_dataset(tmp_path: Path, target: str) -> None:
    _write_itk(tmp_path / "v.mhd", np.zeros((2, 3, 4), np.uint8))
    _edit_header(tmp_path / "v.mhd", "DimSize = 4 3 2", "DimSize = 1500 1000 1000")
    _edit_header(tmp_path / "v.mhd", "ElementDataFile = v.raw", f"ElementDataFile = {target}")
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError) as err:
        read_volume(tmp_path / "v.mhd")
    assert str(err.value) == (f"{tmp_path / 'v.mhd'}: ElementDataFile {target!r} resolves to {target}, outside "
                              f"{tmp_path}; a header may only point to a data file inside the dataset")


def test_mhd_data_file_symlinked_or_fifo(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.mhd", np.zeros((2, 3, 4), np.uint8))
    (tmp_path / "v.raw").unlink()
    (tmp_path / "v.raw").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="resolves to /dev/zero, outside"):
        read_volume(tmp_path / "v.mhd")
    (tmp_path / "v.raw").unlink()
    os.mkfifo(tmp_path / "v.raw")
    with bounded(), pytest.raises(DataError, match=r"v.mhd: data file .*v.raw: is a FIFO \(named pipe\)"):
        read_volume(tmp_path / "v.mhd")


def test_mhd_data_file_size_must_match(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.mhd", np.zeros((2, 3, 4), np.uint16))  # 48 bytes of data
    _edit_header(tmp_path / "v.mhd", "DimSize = 4 3 2", "DimSize = 4 3 3")
    with pytest.raises(DataError, match=r"truncated: header claims size \(4, 3, 3\) of 2-byte values = 72 bytes"):
        read_volume(tmp_path / "v.mhd")
    _edit_header(tmp_path / "v.mhd", "DimSize = 4 3 3", "DimSize = 4 3 1")
    with pytest.raises(DataError, match="24 bytes after the size"):
        read_volume(tmp_path / "v.mhd")


def test_mhd_data_file_inside_a_given_root(tmp_path: Path) -> None:
    (tmp_path / "hdr").mkdir()
    (tmp_path / "raw").mkdir()
    _write_itk(tmp_path / "hdr" / "v.mhd", np.ones((2, 3, 4), np.uint8))
    (tmp_path / "hdr" / "v.raw").rename(tmp_path / "raw" / "v.raw")
    _edit_header(tmp_path / "hdr" / "v.mhd", "= v.raw", "= ../raw/v.raw")
    with pytest.raises(DataError, match="outside"):
        read_volume(tmp_path / "hdr" / "v.mhd")  # default root: the header's folder
    assert read_volume(tmp_path / "hdr" / "v.mhd", root=tmp_path).array.sum() == 24


def test_metaimage_header_read_as_metaio_reads_it(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.mha", np.zeros((2, 3, 4), np.uint8))
    raw = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "twice.mha").write_bytes(raw.replace(b"DimSize = 4 3 2", b"DimSize = 4 3 2\nDimSize = 40 3 2"))
    with pytest.raises(DataError, match="header sets DimSize twice"):
        read_volume(tmp_path / "twice.mha")
    (tmp_path / "lower.mha").write_bytes(raw.replace(b"DimSize", b"dimsize"))  # MetaIO keys are case-sensitive
    with pytest.raises(DataError, match="header has no DimSize"):
        read_volume(tmp_path / "lower.mha")
    (tmp_path / "ascii.mha").write_bytes(raw.replace(b"BinaryData = True", b"BinaryData = False"))
    with pytest.raises(DataError, match="ASCII voxel data is not supported"):
        read_volume(tmp_path / "ascii.mha")


def test_compressed_metaimage_bomb(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.mha", np.zeros((2, 3, 4), np.uint8), compress=True)
    head = (tmp_path / "v.mha").read_bytes().split(b"ElementDataFile = LOCAL\n")[0] + b"ElementDataFile = LOCAL\n"
    co = zlib.compressobj(1)
    body = co.compress(bytes(24)) + b"".join(co.compress(bytes(MiB)) for _ in range(64)) + co.flush()
    (tmp_path / "v.mha").write_bytes(head + body)
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError, match="goes on after what the header claims"):
        read_volume(tmp_path / "v.mha")


def test_gzipped_nrrd_bomb_and_claim(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.nrrd", np.zeros((2, 3, 4), np.uint8), compress=True)
    head = (tmp_path / "v.nrrd").read_bytes().split(b"\n\n")[0] + b"\n\n"
    body = _gzip([bytes(24)], zeros=64 * MiB)
    (tmp_path / "bomb.nrrd").write_bytes(head + body)
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError, match="bomb.nrrd: the decompressed data goes on"):
        read_volume(tmp_path / "bomb.nrrd")
    # the same stream under a header that claims 1.5 GB: over the ceiling, refused before inflating
    (tmp_path / "claim.nrrd").write_bytes(head.replace(b"sizes: 4 3 2", b"sizes: 1500 1000 1000") + body)
    with bounded(max_bytes=4 * MiB), pytest.raises(DataError, match=r"claim.nrrd: header claims size \(1500, 1000, 1000\) "
                                                              r"of 1-byte values = 1.4 GiB"):
        read_volume(tmp_path / "claim.nrrd", memory_limit=1 << 30)
    # within the ceiling, the stream is inflated with a cap and found short, never held whole
    with bounded(max_seconds=10, max_bytes=32 * MiB), pytest.raises(DataError, match="claim.nrrd: truncated"):
        read_volume(tmp_path / "claim.nrrd", memory_limit=2 << 30)


def test_nrrd_detached_data_outside_and_duplicate_fields(tmp_path: Path) -> None:
    _write_itk(tmp_path / "v.nhdr", np.zeros((2, 3, 4), np.uint8))
    text = (tmp_path / "v.nhdr").read_text()
    (tmp_path / "out.nhdr").write_text(text.replace("data file: v.raw", "data file: /etc/passwd"))
    with pytest.raises(DataError, match="'/etc/passwd' resolves to /etc/passwd, outside"):
        read_volume(tmp_path / "out.nhdr")
    (tmp_path / "dup.nhdr").write_text(text.replace("sizes: 4 3 2", "sizes: 4 3 2\nSizes: 400 3 2"))
    with pytest.raises(DataError, match="header sets field 'sizes' twice"):
        read_volume(tmp_path / "dup.nhdr")


# ------------------------------------------------------------------------------------ the ceiling


def test_default_memory_limit_is_a_quarter_of_the_memory_at_most_16_gib() -> None:
    meminfo = Path("/proc/meminfo").read_text().split()
    total = int(meminfo[meminfo.index("MemTotal:") + 1]) * 1024
    assert default_memory_limit() <= min(total // 4, MEMORY_LIMIT_CAP)
    # under an address-space limit of 2 GiB the limit is a quarter of it: 512 MiB exactly
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, resource.RLIM_INFINITY)); "
            "from medsynth.data.limits import default_memory_limit as d; print(d())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == 512 * MiB
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # this process untouched


@pytest.mark.parametrize("text,value", [("16GiB", 16 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29),
                                        ("1000", 1000), ("2 KiB", 2048)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_parse_size_refusals() -> None:
    for bad in ("", "abc", "0", "-5G", "5X"):
        with pytest.raises(DataError, match="--memory-limit"):
            parse_size(bad, what="--memory-limit")


# ------------------------------------------------------------------------------------ validate messages


def test_label_values_the_writer_cannot_hold(tmp_path: Path) -> None:
    manifest = make_phantom_dataset(tmp_path / "ds", dim=2, cases=2, size=16, seed=0, format="csv")
    label = tmp_path / "ds" / "labelsTr" / "phantom_001.nii.gz"
    _set_label_voxel(label, 70000, np.uint32)
    assert _errors(manifest) == [f"{label}: label value 70000 does not fit in uint16, the largest label type "
                                 "medsynth writes (values 0..65535); renumber the labels"]


def test_negative_int16_label_is_reported_as_itself(dataset: Path) -> None:
    label = _label_file(dataset)
    _set_label_voxel(label, -2, np.int16)
    assert _errors(dataset) == [f"{label}: label has negative value(s) -2"]


def test_nan_in_dataset_json_is_refused(dataset: Path) -> None:
    text = dataset.read_text()
    dataset.write_text(text.replace('"numTraining": 2', '"numTraining": NaN'))
    assert _errors(dataset) == [f"{dataset}: NaN is not valid JSON (write a number, or null)"]


def test_nnunet_num_training_as_a_string(tmp_path: Path) -> None:
    folder = make_phantom_dataset(tmp_path / "nn", dim=2, cases=2, size=16, seed=0, format="nnunet")
    folder = folder if folder.is_dir() else folder.parent
    meta = json.loads((folder / "dataset.json").read_text())
    meta["numTraining"] = "2"
    (folder / "dataset.json").write_text(json.dumps(meta))
    assert _errors(folder) == [f"{folder / 'dataset.json'}: numTraining must be a whole number, got '2' (str)"]
    meta["numTraining"] = 10**30
    (folder / "dataset.json").write_text(json.dumps(meta))
    assert _errors(folder) == [f"{folder / 'dataset.json'}: numTraining is {10**30} but imagesTr/ holds 2 cases"]


def test_itk_claim_counts_components(tmp_path: Path) -> None:
    rgb = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "v.mha"))
    assert read_volume(tmp_path / "v.mha").shape == (4, 3, 2, 3)
    with pytest.raises(DataError, match=r"size \(4, 3, 2\) x 3 components of 1-byte values = 72 bytes"):
        read_volume(tmp_path / "v.mha", memory_limit=71)
    assert math.prod((4, 3, 2, 3)) == 72


# ------------------------------------------------------------------------------------ one label check


@pytest.mark.parametrize("value,problem", [
    (70000, "label value 70000 does not fit in uint16, the largest label type medsynth writes (values 0..65535); "
            "renumber the labels"),
    (-2, "label has negative value(s) -2"),
    (0.5, "label has 1 non-integer value(s) (e.g. 0.5) stored as float64; round them explicitly first (resample "
          "labels with nearest neighbour)"),
])
def test_writing_a_label_names_the_file_and_its_problem(tmp_path: Path, value: float, problem: str) -> None:
    from medsynth.data.nifti import write_volume

    arr = np.zeros((4, 4), dtype=np.float64 if isinstance(value, float) else np.int64)
    arr[1, 1] = value
    with pytest.raises(DataError) as err:
        write_volume(tmp_path / "lab.nii.gz", arr, np.eye(4), kind="label")
    assert str(err.value) == f"{tmp_path / 'lab.nii.gz'}: {problem}"
    assert not list(tmp_path.iterdir())


def test_case_arrays_refuse_a_negative_label_naming_the_file(dataset: Path) -> None:
    from medsynth.data.nifti import read_case_arrays

    label = _label_file(dataset)
    _set_label_voxel(label, -2, np.int16)
    image = dataset.parent / json.loads(dataset.read_text())["training"][1]["image"]
    with pytest.raises(DataError) as err:
        read_case_arrays([image], label)
    assert str(err.value) == f"{label}: label has negative value(s) -2"


def test_case_size_counted_in_the_dtype_the_caller_converts_to(tmp_path: Path) -> None:
    from medsynth.data.nifti import check_case_size

    paths = []
    for name in ("a.nii", "b.nii"):
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 12), np.uint8), np.eye(4)), str(tmp_path / name))
        paths.append(tmp_path / name)
    check_case_size(paths, memory_limit=2 * 3072)  # 3072 bytes each, as stored
    with pytest.raises(DataError, match=r"claim 6 KiB \(6144 bytes\) of voxel data together \(.*limit of 6 KiB"):
        check_case_size(paths, memory_limit=6143)
    check_case_size(paths[:1], memory_limit=100)  # one file alone: read_volume's own check
    with pytest.raises(DataError, match=r"claim 24 KiB \(24576 bytes\) of voxel data together as 8-byte values"):
        check_case_size(paths[:1], memory_limit=24575, itemsize=8)
    check_case_size(paths, memory_limit=2 * 24576, itemsize=8)
