"""Bounded before parsed: YAML alias bombs, huge values in error messages, 100k-entry manifests, case
paths that resolve to one file, and the memory ceiling counted in decoded bytes (NIfTI scl_slope, DICOM
Rescale Slope, MetaImage/NRRD as SimpleITK decodes them).

Each test is one reproduction from issue 19; time is measured with a wall clock and memory with
tracemalloc, and the expected numbers come from a hand count (9 ** 9 values in the bomb, 8 bytes a
scaled voxel).
"""

from __future__ import annotations

import gzip
import json
import os
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from test_dicom import write_series
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.config import load_config, short_repr
from medsynth.data.dicom import keep_locale
from medsynth.data.export import _check_no_collisions
from medsynth.data.formats import get_format
from medsynth.data.manifest import Case, read_manifest
from medsynth.data.nifti import check_case_size, claimed_bytes, read_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.data.validate import validate_dataset
from medsynth.errors import ConfigError, DataError
from medsynth.safe_yaml import MAX_YAML_NODES, expanded_size, load_yaml

MiB = 1 << 20
runner = CliRunner()


def billion_laughs(flow: bool = False) -> str:
    """Nine anchors, each a list of nine aliases of the one before: 9 ** 9 = 387,420,489 values."""
    names = "abcdefghi"
    items = ["&a [x,x,x,x,x,x,x,x,x]"] + [f"&{cur} [{','.join([f'*{prev}'] * 9)}]" for prev, cur in zip(names, names[1:])]
    if flow:
        return "[" + ", ".join(items) + "]"
    return "\n".join(f"{name}: {item}" for name, item in zip(names, items))


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# ------------------------------------------------------------------------------------ YAML


def test_the_bomb_is_a_bomb() -> None:
    """The composed graph is small; expanded it holds 1 + 9 + ... nodes with 9 ** 9 leaves."""
    text = billion_laughs()
    assert len(text) < 330
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    size = expanded_size(node, limit=10**12)
    leaves = 9**9
    assert size > leaves > 1000 * MAX_YAML_NODES


@pytest.mark.parametrize("flow", [False, True])
def test_yaml_alias_bomb_is_refused_at_load_time_fast_and_small(flow: bool) -> None:
    text = billion_laughs(flow)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=f"bomb.yaml: refused: the YAML expands to more than {MAX_YAML_NODES}"):
            load_yaml(text, "bomb.yaml")
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 0.5, seconds
    assert peak < 2 * MiB, peak


def test_yaml_bomb_in_recipes_set_and_augment_config_is_one_error_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=2, seed=0, size=24)
    runs = [
        ["train", str(bomb), "--out", str(tmp_path / "run1")],
        ["train", "tiny/gan2d", "--out", str(tmp_path / "run2"), "--set", f"data.size={billion_laughs(flow=True)}"],
        ["augment", str(data), "--method", "classic", "--num", "1", "--out", str(tmp_path / "aug"),
         "--config", str(bomb)],
    ]
    for args in runs:
        start = time.perf_counter()
        line = one_error_line(runner.invoke(app, args))
        assert time.perf_counter() - start < 5.0
        assert f"expands to more than {MAX_YAML_NODES}" in line and len(line) < 300
    assert not any((tmp_path / name).exists() for name in ("run1", "run2", "aug"))


def test_deep_nesting_and_recursive_aliases_are_refused() -> None:
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_yaml("[" * 5000, "deep")  # PyYAML alone: RecursionError
    with pytest.raises(ConfigError, match="alias that refers to a list or mapping containing it"):
        load_yaml("a: &a [1, *a]", "loop")
    assert load_yaml("a: &a [1, 2]\nb: *a\nc: {<<: {d: 1}}", "ok") == {"a": [1, 2], "b": [1, 2], "c": {"d": 1}}


def test_oversized_recipe_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(64 * MiB)  # sparse: refusing it must not read it
    with pytest.raises(ConfigError, match=r"big.yaml: 67108864 bytes; a YAML config may be at most 1048576"):
        load_config(big)


# ------------------------------------------------------------------------------------ error messages


def test_validation_errors_show_values_cut_to_80_characters() -> None:
    long_list = "[" + ", ".join(["'" + "x" * 200 + "'"] * 20_000) + "]"  # 4 MB of text, 20k nodes
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"training.max_steps={long_list}", f"training.seed={'9' * 4000}"])
    message = str(info.value)
    assert len(message) < 800, len(message)
    lines = message.splitlines()
    steps = next(ln for ln in lines if "training.max_steps" in ln)
    got = steps[steps.index("(got ") + 5: -1]
    assert len(got) <= 80 and got.startswith("['xxx") and got.endswith("...")
    seed = next(ln for ln in lines if "training.seed" in ln)
    assert f"(got <an integer of {int('9' * 4000).bit_length()} bits>)" in seed


def test_short_repr_of_a_shared_bomb_costs_nothing() -> None:
    """A DAG of shared lists that stands for 9 ** 10 values (built past the YAML loader) shows in 80
    characters without visiting them."""
    value: object = ["x"] * 9
    for _ in range(9):
        value = [value] * 9
    start = time.perf_counter()
    shown = short_repr(value)
    assert time.perf_counter() - start < 0.1
    assert len(shown) <= 80 and shown.startswith("[[[")
    text = short_repr("a" * 10_000)
    assert len(text) <= 80 and text.startswith("'aaa") and "..." in text
    assert short_repr([1, 2]) == "[1, 2]"


def test_format_validation_error_still_lists_every_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.batch_size=-1", "training.max_steps=x"])
    assert "2 invalid settings" in str(info.value) and "(got -1)" in str(info.value) and "(got 'x')" in str(info.value)


# ------------------------------------------------------------------------------------ manifests


def _read_seconds(tmp_path: Path, n: int) -> float:
    """CPU seconds of reading an MSD manifest of ``n`` entries (CPU time: other jobs on the machine do not count)."""
    entries = [{"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(n)]
    manifest = tmp_path / f"dataset_{n}.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "a"}, "training": entries}))
    start = time.process_time()
    m = read_manifest(manifest)
    seconds = time.process_time() - start
    assert len(m.cases) == n and m.cases[-1].case_id == f"c{n - 1}"
    return seconds


def test_msd_manifest_of_100k_entries_reads_in_linear_time(tmp_path: Path) -> None:
    small, big = _read_seconds(tmp_path, 20_000), _read_seconds(tmp_path, 100_000)
    # 5x the entries: about 5x the time when linear, 25x when quadratic (the old duplicate check)
    assert big < 12 * small + 0.5, (small, big)
    assert big < 5.0, big
    # the duplicate check still finds the duplicates, in the same pass
    entries = [{"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(100_000)]
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"training": [*entries, entries[7], entries[3]]}))
    with pytest.raises(DataError, match=r"duplicate case ids \['c3', 'c7'\]"):
        read_manifest(manifest)


def _renamed_cases(data: Path, ids: list[str]) -> Path:
    manifest = data / "dataset.json"
    doc = json.loads(manifest.read_text())
    for entry, case_id in zip(doc["training"], ids):
        entry["case_id"] = case_id
    manifest.write_text(json.dumps(doc))
    return manifest


def test_case_ids_that_resolve_to_one_name_are_duplicates_and_export_writes_nothing(tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=4, seed=0, size=24)
    manifest = _renamed_cases(data.parent, ["a", "./a", "b", "x/../../labelsTr/b"])
    report = validate_dataset(manifest)
    messages = [p.message for p in report.problems if p.severity == "error"]
    assert "duplicate case ids: './a' and 'a' are one case ('a' once resolved)" in messages
    assert ("case id 'x/../../labelsTr/b' resolves to '../labelsTr/b', not a name inside the dataset folder; "
            "rename the case") in messages
    result = runner.invoke(app, ["validate", str(manifest), "--no-progress"])
    assert result.exit_code == 1 and "duplicate case ids" in result.output
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(manifest), "--out", str(out), "--format", "msd", "--no-progress"])
    assert result.exit_code != 0 and "error:" in result.output
    assert not out.exists() or not any(out.iterdir())


def test_files_that_resolve_to_one_file_are_one_case(tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=3, seed=0, size=24).parent
    doc = json.loads((data / "dataset.json").read_text())
    doc["training"][1]["image"] = "./imagesTr/../imagesTr/phantom_000.nii.gz"  # case 0's image, spelled otherwise
    doc["training"][1]["case_id"] = "phantom_001"
    os.symlink("phantom_000.nii.gz", data / "labelsTr" / "link.nii.gz")
    doc["training"][2]["label"] = "labelsTr/link.nii.gz"  # case 0's label through a symlink
    (data / "dataset.json").write_text(json.dumps(doc))
    problems = validate_dataset(data / "dataset.json").problems
    errors = [p for p in problems if p.severity == "error"]
    assert any("case phantom_001 reads the file that case phantom_000 reads as its image" in p.message
               for p in errors), problems
    warnings = [p.message for p in problems if p.severity == "warning"]
    assert any(m.startswith("label file used by cases phantom_000 and phantom_002 (it resolves to ") for m in warnings)


def test_export_refuses_cases_that_would_write_one_file() -> None:
    """Past validation (a manifest built in Python): two ids, one path; nothing is written."""
    fmt = get_format("msd")
    cases = [Case("a", [Path("/in/0.nii.gz")], Path("/in/l0.nii.gz")),
             Case("./a", [Path("/in/1.nii.gz")], Path("/in/l1.nii.gz"))]
    with pytest.raises(DataError, match=r"cases 'a' and './a' would both be written to /out/imagesTr/a.nii.gz"):
        _check_no_collisions(cases, 1, fmt, Path("/out"), None)
    _check_no_collisions(cases[:1] + [Case("b", [Path("/in/1.nii.gz")], None)], 1, fmt, Path("/out"), None)


# ------------------------------------------------------------------------------------ decoded bytes


def _scaled_nifti(path: Path, shape: tuple[int, ...], slope: float | None, like: Path | None = None) -> Path:
    """A uint8 NIfTI of ones (``like``: that file's values, rescaled to 0..255, and its affine)."""
    data, affine = np.ones(shape, np.uint8), np.eye(4)
    if like is not None:
        src = nib.load(like)
        values = np.asarray(src.dataobj, dtype=np.float64)
        data = np.round(255 * (values - values.min()) / np.ptp(values)).astype(np.uint8)
        affine = src.affine
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(np.uint8)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, path)
    return path


def test_memory_ceiling_counts_decoded_bytes_not_stored_bytes(tmp_path: Path) -> None:
    shape = (64, 64, 64)  # 256 KiB stored as uint8; 2 MiB once scl_slope makes it float64
    scaled = _scaled_nifti(tmp_path / "scaled.nii.gz", shape, slope=2.0)
    plain = _scaled_nifti(tmp_path / "plain.nii.gz", shape, slope=None)
    limit = 1 * MiB
    assert read_volume(plain, memory_limit=limit).array.nbytes == 64**3  # under the limit as stored
    with pytest.raises(DataError, match=r"scaled.nii.gz: header claims shape \(64, 64, 64\) uint8 scaled "
                                        r"\(scl_slope/scl_inter\) to float64 = 2 MiB \(2097152 bytes\) to decode"):
        read_volume(scaled, memory_limit=limit)
    # what is counted is what reading allocates
    decoded = read_volume(scaled, memory_limit=4 * MiB).array
    assert decoded.dtype == np.float64 and decoded.nbytes == claimed_bytes(scaled) == 8 * 64**3
    assert float(decoded.max()) == 2.0
    assert claimed_bytes(plain) == 64**3
    # a unit slope decodes as stored
    unit = _scaled_nifti(tmp_path / "unit.nii", shape, slope=1.0)
    assert read_volume(unit, memory_limit=limit).array.dtype == np.uint8 and claimed_bytes(unit) == 64**3


def test_validate_counts_decoded_bytes_per_case(tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=3, cases=2, seed=0, size=16).parent
    image = data / "imagesTr" / "phantom_001.nii.gz"
    args = ["validate", str(data / "dataset.json"), "--no-progress", "--memory-limit", "20KiB"]
    original = tmp_path / "original.nii.gz"
    image.rename(original)
    _scaled_nifti(image, (16, 16, 16), slope=None, like=original)  # 4 KiB image + 4 KiB label: under 20 KiB
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    _scaled_nifti(image, (16, 16, 16), slope=2.0, like=original)  # still 4 KiB stored, 32 KiB decoded
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert ("the case's files claim 36 KiB (36864 bytes) of voxel data together (imagesTr/phantom_001.nii.gz 32 KiB, "
            "labelsTr/phantom_001.nii.gz 4 KiB)") in result.output


def _metaimage(path: Path, data: np.ndarray, extra: str = "") -> Path:
    """A .mha with the voxels after the header (x fastest, as MetaIO stores them)."""
    etype = {np.dtype(np.uint8): "MET_UCHAR", np.dtype(np.int16): "MET_SHORT"}[data.dtype]
    dims = " ".join(str(s) for s in data.shape)
    head = f"ObjectType = Image\nNDims = {data.ndim}\nDimSize = {dims}\nElementType = {etype}\n{extra}ElementDataFile = LOCAL\n"
    path.write_bytes(head.encode() + np.asfortranarray(data).tobytes(order="F"))
    return path


def _nrrd_gzip(path: Path, data: np.ndarray) -> Path:
    sizes = " ".join(str(s) for s in data.shape)
    head = f"NRRD0004\ntype: uint8\ndimension: {data.ndim}\nsizes: {sizes}\nencoding: gzip\n\n"
    path.write_bytes(head.encode() + gzip.compress(data.tobytes(order="F")))
    return path


@pytest.mark.parametrize("kind", ["mha", "nrrd"])
def test_itk_formats_count_the_bytes_simpleitk_decodes(tmp_path: Path, kind: str) -> None:
    data = (np.arange(32**3) % 251).astype(np.uint8).reshape(32, 32, 32)  # 32 KiB, decoded as stored
    if kind == "mha":  # MetaIO's intensity slope is not applied by SimpleITK: still one byte a voxel
        path = _metaimage(tmp_path / "v.mha", data, "ElementToIntensityFunctionSlope = 8\n")
    else:
        path = _nrrd_gzip(tmp_path / "v.nrrd", data)
    volume = read_volume(path, memory_limit=32 * 1024)
    assert volume.array.dtype == np.uint8 and volume.array.nbytes == claimed_bytes(path) == 32**3
    assert np.array_equal(volume.array, data)
    with pytest.raises(DataError) as info:
        read_volume(path, memory_limit=32 * 1024 - 1)
    message = str(info.value)
    assert message.startswith(f"{path}: header claims size (32, 32, 32) of 1-byte values = 32 KiB (32768 bytes) ")
    assert "memory limit of 32 KiB (32767 bytes)" in message


DICOM_SHAPE = (64, 64, 8)  # 64 KiB stored as int16 (and ~1 KiB of header a slice); 256 KiB decoded as float64
DICOM_VOXELS = 64 * 64 * 8


def _dicom_with_slope(folder: Path, slope: str) -> Path:
    """An int16 series (2 bytes a voxel stored) whose Rescale Slope is ``slope``. GDCM's writer refuses a
    slope that is not a whole number for integer pixels, so a written ``2`` is replaced in the bytes."""
    write_series(folder, (np.arange(DICOM_VOXELS) % 50).astype(np.int16).reshape(DICOM_SHAPE), np.eye(4),
                 tags=(("0028|1053", "2"), ("0028|1052", "0")))
    written = b"(\x00S\x10\x02\x00\x00\x002 "  # implicit VR little endian: tag, length 2, "2 "
    value = slope.encode() + b" " * (len(slope) % 2)
    for f in folder.iterdir():
        raw = f.read_bytes()
        if raw.count(written) != 1:
            pytest.skip("GDCM wrote Rescale Slope in another form")
        f.write_bytes(raw.replace(written, b"(\x00S\x10" + len(value).to_bytes(4, "little") + value))
    return folder


def test_dicom_series_counts_the_pixel_type_after_rescale(tmp_path: Path) -> None:
    voxels = DICOM_VOXELS
    plain = tmp_path / "plain"
    write_series(plain, (np.arange(voxels) % 50).astype(np.int16).reshape(DICOM_SHAPE), np.eye(4))
    scaled = _dicom_with_slope(tmp_path / "scaled", "0.5")
    with keep_locale():  # the decoded type, from SimpleITK itself
        assert sitk.ReadImage(sorted(str(f) for f in scaled.iterdir())).GetPixelID() == sitk.sitkFloat64
    limit = 4 * voxels
    assert read_volume(plain, memory_limit=limit).array.dtype == np.int16
    assert claimed_bytes(plain) == 2 * voxels and claimed_bytes(scaled) == 8 * voxels
    with pytest.raises(DataError) as info:
        read_volume(scaled, memory_limit=limit)
    assert str(info.value).startswith(
        f"{scaled}: header claims a series of 8 files, 64 x 64 x 8 voxels of 16-bit signed integer rescaled "
        f"(0028,1053/1052) to 64-bit float = 256 KiB ({8 * voxels} bytes) to decode, above the memory limit of "
        f"128 KiB ({limit} bytes)")
    decoded = read_volume(scaled, memory_limit=8 * voxels).array
    assert decoded.dtype == np.float64 and decoded.nbytes == 8 * voxels
    # a case's files together (validate, unlabelled): the series counts decoded too
    label = _scaled_nifti(tmp_path / "label.nii.gz", DICOM_SHAPE, slope=None)
    with pytest.raises(DataError) as info:
        check_case_size([scaled, label], 8 * voxels)
    assert f"together ({tmp_path.name}/scaled 256 KiB, {tmp_path.name}/label.nii.gz 32 KiB)" in str(info.value)
