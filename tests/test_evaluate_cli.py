"""``medsynth evaluate``: the JSON equals the API, datasets pair by case id, bad inputs fail cleanly,
``--out`` writes files that read back, ``--unpaired`` reports distribution metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import medsynth
from medsynth.cli import app
from medsynth.data.nifti import read_volume, write_volume

AFFINE = np.array([[1.2, 0, 0, -10.0], [0, 1.0, 0, 4.0], [0, 0, 2.0, 7.5], [0, 0, 0, 1]])
SHAPE = (18, 16, 14)


def volume(seed: int, shape=SHAPE, noise: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    body = np.sin(grid[0] / 3.0) * np.cos(grid[1] / 4.0) * 300.0 + grid[2] * 20.0
    return (body + rng.normal(0, 10.0 + noise, shape)).astype(np.float32)


def invoke(*args: object):
    result = CliRunner().invoke(app, ["evaluate", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def make_dataset(root: Path, ids: list[str], seed: int, noise: float = 0.0, shape=SHAPE) -> Path:
    """An MSD dataset.json with images and labels written by write_volume."""
    entries = []
    for k, cid in enumerate(ids):
        img = root / "imagesTr" / f"{cid}.nii.gz"
        lab = root / "labelsTr" / f"{cid}.nii.gz"
        noisy = volume(100 + k, shape, noise=0.0) + np.random.default_rng(seed + k).normal(0, 1 + noise, shape)
        write_volume(img, noisy, AFFINE, kind="image")
        label = np.zeros(shape, np.uint8)
        label[4:14, 3:13, 3:11] = 1
        write_volume(lab, label, AFFINE, kind="label")
        entries.append({"image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz"})
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"name": "t", "labels": {"0": "bg", "1": "body"}, "modality": {"0": "MR"},
                                    "training": entries}))
    return manifest


@pytest.fixture()
def pair_files(tmp_path: Path) -> tuple[Path, Path]:
    ref = write_volume(tmp_path / "ref.nii.gz", volume(1), AFFINE, kind="image")
    cand = write_volume(tmp_path / "cand.nii.gz", volume(1) + np.random.default_rng(9).normal(0, 25, SHAPE), AFFINE, kind="image")
    return ref, cand


def test_pair_json_equals_api(pair_files):
    ref_path, cand_path = pair_files
    result = invoke(ref_path, cand_path, "--data-range", "auto", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # the CLI works in float64, as nibabel's get_fdata() returns the data
    ref = nib.load(ref_path).get_fdata()
    cand = nib.load(cand_path).get_fdata()
    r = float(ref.max()) - float(ref.min())
    assert out["n_cases"] == 1 and out["data_range"] == "auto"
    case = out["cases"][0]
    assert case["data_range"] == pytest.approx(r)
    assert out["ssim"] == pytest.approx(medsynth.ssim(ref, cand, data_range=r), abs=1e-12)
    assert out["psnr"] == pytest.approx(medsynth.psnr(ref, cand, data_range=r), abs=1e-9)
    assert out["mae"] == pytest.approx(medsynth.mae(ref, cand, data_range=r), abs=1e-12)
    assert out["ms_ssim"] is None  # 18x16x14 is too small for five scales
    assert case["ssim"] == out["ssim"] and case["case_id"] == "cand"

    fixed = json.loads(invoke(ref_path, cand_path, "--data-range", "3000", "--json").stdout)
    assert fixed["psnr"] == pytest.approx(medsynth.psnr(ref, cand, data_range=3000.0), abs=1e-9)


def test_pair_with_mask_file(pair_files, tmp_path):
    ref_path, cand_path = pair_files
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:15, 2:12, 4:12] = 1
    mask_path = write_volume(tmp_path / "mask.nii.gz", mask, AFFINE, kind="label")
    out = json.loads(invoke(ref_path, cand_path, "--data-range", "1000", "--mask", mask_path, "--json").stdout)
    ref, cand = nib.load(ref_path).get_fdata(), nib.load(cand_path).get_fdata()
    d = ref[mask > 0] - cand[mask > 0]
    assert out["psnr"] == pytest.approx(10 * np.log10(1000.0**2 / np.mean(d * d)), abs=1e-4)
    assert out["ssim"] == pytest.approx(medsynth.ssim(ref, cand, data_range=1000.0, mask=mask), abs=1e-12)


def test_missing_file_fails_cleanly(pair_files, tmp_path):
    ref_path, _ = pair_files
    missing = tmp_path / "nope.nii.gz"
    result = invoke(ref_path, missing, "--data-range", "1")
    assert result.exit_code == 1
    assert "error:" in result.output and "nope.nii.gz" in result.output and "not found" in result.output
    proc = subprocess.run(
        [sys.executable, "-m", "medsynth", "evaluate", str(missing), str(ref_path), "--data-range", "1", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "nope.nii.gz" in proc.stderr and "Traceback" not in proc.stderr


def test_geometry_mismatch(pair_files, tmp_path):
    ref_path, _ = pair_files
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    moved = write_volume(tmp_path / "moved.nii.gz", volume(1), shifted, kind="image")
    result = invoke(ref_path, moved, "--data-range", "1000")
    assert result.exit_code == 1 and "geometry differs" in result.output and "affines" in result.output
    cropped = write_volume(tmp_path / "cropped.nii.gz", volume(1)[:, :, :12], AFFINE, kind="image")
    result = invoke(ref_path, cropped, "--data-range", "1000")
    assert result.exit_code == 1 and "geometry differs" in result.output and "shape" in result.output


def test_bad_options(pair_files, tmp_path):
    ref_path, cand_path = pair_files
    for bad in ("0", "-3", "nan", "abc"):
        result = invoke(ref_path, cand_path, "--data-range", bad)
        assert result.exit_code == 1 and "--data-range" in result.output
    assert invoke(ref_path, cand_path).exit_code == 2  # --data-range is required
    result = invoke(ref_path, make_dataset(tmp_path / "ds", ["a", "b"], 0), "--data-range", "1")
    assert result.exit_code == 1 and "both be image files or both be datasets" in result.output
    small = write_volume(tmp_path / "small.nii.gz", volume(1, (8, 16, 14)), AFFINE, kind="image")
    result = invoke(small, small, "--data-range", "1")
    assert result.exit_code == 1 and "11-voxel" in result.output


def test_datasets_pair_by_case_id_and_out_files(tmp_path):
    ref_m = make_dataset(tmp_path / "ref", ["c1", "c2", "c3", "c4"], seed=0)
    cand_m = make_dataset(tmp_path / "cand", ["c3", "c1", "c2"], seed=50, noise=20.0)
    out_dir = tmp_path / "report"
    result = invoke(ref_m, cand_m, "--data-range", "auto", "--json", "--out", out_dir)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [c["case_id"] for c in out["cases"]] == ["c3", "c1", "c2"]
    assert out["reference_cases_without_candidate"] == ["c4"]
    for case in out["cases"]:
        ref = read_volume(tmp_path / "ref" / "imagesTr" / f"{case['case_id']}.nii.gz").array.astype(np.float64)
        cand = read_volume(tmp_path / "cand" / "imagesTr" / f"{case['case_id']}.nii.gz").array.astype(np.float64)
        r = float(ref.max()) - float(ref.min())
        assert case["data_range"] == pytest.approx(r)
        assert case["ssim"] == pytest.approx(medsynth.ssim(ref, cand, data_range=r), abs=1e-12)
        assert case["psnr"] == pytest.approx(medsynth.psnr(ref, cand, data_range=r), abs=1e-9)
    assert out["ssim"] == pytest.approx(np.mean([c["ssim"] for c in out["cases"]]))
    assert out["psnr"] == pytest.approx(np.mean([c["psnr"] for c in out["cases"]]))

    # --out: the CSV and JSON read back to the same numbers; the PNGs are images
    with open(out_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case_id"] for r in rows] == ["c3", "c1", "c2"]
    for row, case in zip(rows, out["cases"]):
        assert float(row["ssim"]) == case["ssim"] and float(row["psnr"]) == case["psnr"]
        assert float(row["data_range"]) == case["data_range"] and row["ms_ssim"] == ""
    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert on_disk["cases"] == out["cases"] and on_disk["ssim"] == out["ssim"]
    for name in ("metrics.png", "montage.png"):
        with Image.open(out_dir / name) as im:
            im.verify()
        with Image.open(out_dir / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200

    # a candidate case id the reference lacks is an error listing it
    extra = make_dataset(tmp_path / "extra", ["c1", "zz9", "zz7"], seed=3)
    result = invoke(ref_m, extra, "--data-range", "auto")
    assert result.exit_code == 1 and "zz9" in result.output and "zz7" in result.output

    # files a manifest names but that are missing are all listed in one error
    (tmp_path / "cand" / "imagesTr" / "c1.nii.gz").unlink()
    (tmp_path / "cand" / "imagesTr" / "c2.nii.gz").unlink()
    result = invoke(ref_m, cand_m, "--data-range", "auto")
    assert result.exit_code == 1 and "2 file(s) not found" in result.output
    assert "c1.nii.gz" in result.output and "c2.nii.gz" in result.output
    cand_m = make_dataset(tmp_path / "cand", ["c3", "c1", "c2"], seed=50, noise=20.0)

    # --mask labels: each reference case's label map
    masked = json.loads(invoke(ref_m, cand_m, "--data-range", "500", "--mask", "labels", "--json").stdout)
    ref = read_volume(tmp_path / "ref" / "imagesTr" / "c3.nii.gz").array.astype(np.float64)
    cand = read_volume(tmp_path / "cand" / "imagesTr" / "c3.nii.gz").array.astype(np.float64)
    label = read_volume(tmp_path / "ref" / "labelsTr" / "c3.nii.gz", kind="label").array
    assert masked["cases"][0]["psnr"] == pytest.approx(medsynth.psnr(ref, cand, data_range=500.0, mask=label), abs=1e-9)


def test_unpaired(tmp_path):
    ref_m = make_dataset(tmp_path / "ref", [f"r{i}" for i in range(4)], seed=0, shape=(22, 22, 22))
    cand_m = make_dataset(tmp_path / "cand", [f"s{i}" for i in range(4)], seed=40, noise=60.0, shape=(22, 22, 22))
    # make one candidate an exact copy of a reference image: memorisation must flag it
    copy = read_volume(tmp_path / "ref" / "imagesTr" / "r2.nii.gz").array
    write_volume(tmp_path / "cand" / "imagesTr" / "s1.nii.gz", copy, AFFINE, kind="image")
    out_dir = tmp_path / "unpaired"
    result = invoke(ref_m, cand_m, "--data-range", "auto", "--unpaired", "--json", "--out", out_dir)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["mode"] == "unpaired" and out["n_reference"] == 4 and out["n_candidate"] == 4
    rad = out["radiomics"]
    assert rad["regions"] == [1] and rad["n_features"] == 14
    assert rad["frechet_distance"] >= 0 and rad["mmd2"] is not None
    assert out["diversity"]["pairs"] == 6 and 0 < out["diversity"]["mean"] <= 1
    mem = out["memorisation"]
    assert mem["flagged_cases"] == ["s1"]
    s1 = next(c for c in mem["cases"] if c["case_id"] == "s1")
    assert s1["nearest_id"] == "r2" and s1["max_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert out["fid"] is None
    names = sorted(p.name for p in out_dir.iterdir() if p.name != ".medsynth-owner.jsonl")  # the ownership ledger
    assert names == ["features.png", "memorisation.png", "metrics.csv", "montage.png", "summary.json"]
    with open(out_dir / "metrics.csv", newline="") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert rows["s1"]["flagged"] == "True" and rows["s1"]["nearest_reference"] == "r2"
    for name in ("features.png", "memorisation.png", "montage.png"):
        with Image.open(out_dir / name) as im:
            im.verify()
    result = invoke(ref_m, cand_m, "--data-range", "auto", "--unpaired", "--fid-weights", tmp_path / "none.pt")
    assert result.exit_code == 1 and "none.pt" in result.output and "not found" in result.output


def test_small_mask_on_large_images_keeps_ssim_and_psnr(tmp_path):
    """MS-SSIM is optional: when a small mask leaves no voxel at its coarsest scale, the case keeps its
    SSIM/PSNR/MAE (equal to the masked API values) and MS-SSIM is null with a note."""
    from medsynth import psnr, ssim

    rng = np.random.default_rng(0)
    ref = rng.random((256, 256)).astype(np.float32)
    cand = (ref + 0.05 * rng.standard_normal(ref.shape)).astype(np.float32)
    mask = np.zeros((256, 256), np.uint8)
    mask[40:80, 40:80] = 1  # an off-centre 40x40 lesion
    for name, a in (("ref", ref), ("cand", cand), ("mask", mask)):
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "ref.nii.gz"), str(tmp_path / "cand.nii.gz"),
                                      "--data-range", "1", "--mask", str(tmp_path / "mask.nii.gz"), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    case = out["cases"][0]
    assert case["ms_ssim"] is None and "MS-SSIM" in case["ms_ssim_note"]
    assert out["ssim"] == pytest.approx(ssim(ref.astype(np.float64), cand.astype(np.float64), data_range=1.0, mask=mask))
    assert out["psnr"] == pytest.approx(psnr(ref.astype(np.float64), cand.astype(np.float64), data_range=1.0, mask=mask))


# ------------------------------------------------------------------------------------ the report folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_refuses_a_non_empty_folder_unless_overwrite_which_keeps_other_files(pair_files, tmp_path):
    ref_path, cand_path = pair_files
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "summary.json").write_text('{"an": "earlier summary"}')
    result = invoke(ref_path, cand_path, "--data-range", "1000", "--out", out)
    assert result.exit_code == 1
    assert result.output == (f"error: --out {out} exists and is not empty; pass --overwrite to replace the files "
                             "`medsynth evaluate` wrote there (other files stay), or choose another folder\n")
    assert _files(out) == {"notes.txt": b"mine", "summary.json": b'{"an": "earlier summary"}'}
    # a summary.json evaluate did not make is never replaced, even with --overwrite
    result = invoke(ref_path, cand_path, "--data-range", "1000", "--out", out, "--overwrite")
    assert result.exit_code == 1
    assert result.output == (f"error: --out {out}: summary.json was not written by `medsynth evaluate`; it is never "
                             "replaced: move it away, or choose another folder\n")
    assert _files(out) == {"notes.txt": b"mine", "summary.json": b'{"an": "earlier summary"}'}
    (out / "summary.json").unlink()
    for _ in range(2):  # beside a user's file, then over its own report
        result = invoke(ref_path, cand_path, "--data-range", "1000", "--out", out, "--overwrite", "--json")
        assert result.exit_code == 0, result.output
        assert (out / "notes.txt").read_text() == "mine"
        on_disk = json.loads((out / "summary.json").read_text())
        assert on_disk["ssim"] == json.loads(result.stdout)["ssim"]
        assert sorted(_files(out)) == [".medsynth-owner.jsonl", "metrics.csv", "metrics.png", "montage.png",
                                       "notes.txt", "summary.json"]


def test_out_never_lies_in_an_input_datasets_folder(tmp_path):
    ref_m = make_dataset(tmp_path / "ref", ["c1", "c2"], seed=0)
    cand_m = make_dataset(tmp_path / "cand", ["c1", "c2"], seed=50, noise=20.0)
    before = {**_files(tmp_path / "ref"), **_files(tmp_path / "cand")}
    for out, dataset, folder in ((tmp_path / "ref", ref_m, tmp_path / "ref"),
                                 (tmp_path / "cand" / "report", cand_m, tmp_path / "cand"),
                                 (tmp_path / "ref" / "labelsTr", ref_m, tmp_path / "ref")):
        result = invoke(ref_m, cand_m, "--data-range", "auto", "--out", out, "--overwrite")
        assert result.exit_code == 1
        assert result.output.startswith(f"error: --out {out} lies inside the folder ")
        assert f"of the input dataset {dataset}; medsynth never writes into an input" in result.output
        assert str(folder) in result.output or str(folder / "labelsTr") in result.output
    assert {**_files(tmp_path / "ref"), **_files(tmp_path / "cand")} == before
    assert not (tmp_path / "cand" / "report").exists()


@pytest.mark.parametrize("values,problem", [
    (np.int16(-1), "label has negative value(s) -1"),
    (np.float32(0.5), "label has 1 non-integer value(s) (e.g. 0.5)"),
])
def test_mask_must_hold_label_values(pair_files, tmp_path, values, problem):
    ref_path, cand_path = pair_files
    arr = np.zeros(SHAPE, dtype=np.asarray(values).dtype)
    arr[2:10, 2:10, 2:10] = values
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE), str(mask))
    result = invoke(ref_path, cand_path, "--data-range", "1000", "--mask", mask)
    assert result.exit_code == 1 and result.output.startswith(f"error: {mask} (mask): {problem}")


FLOAT64_RUNNER = r"""
import resource, sys
limit = 3 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from typer.testing import CliRunner
from medsynth.cli import app
r = CliRunner().invoke(app, ["evaluate", sys.argv[1], sys.argv[1], "--data-range", "1", "--no-progress"])
print(r.exit_code)
print(r.output)
"""


def test_images_are_checked_as_float64_before_they_are_read(tmp_path):
    """uint8 files whose float64 copies exceed the memory limit (a quarter of RLIMIT_AS 3 GiB = 768 MiB),
    although each file's own claim (120 MB) is below it: refused before anything is read."""
    import struct
    import zlib

    shape = (1000, 1000, 120)
    head = bytearray(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)).to_bytes()[:352])
    struct.pack_into("<8h", head, 40, 3, *shape, 1, 1, 1, 1)
    co = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunks = [co.compress(bytes(head))] + [co.compress(bytes(1000 * 1000)) for _ in range(shape[2])] + [co.flush()]
    big = tmp_path / "big.nii.gz"
    big.write_bytes(b"".join(chunks))
    proc = subprocess.run([sys.executable, "-c", FLOAT64_RUNNER, str(big)], capture_output=True, text=True, timeout=120)
    code, output = proc.stdout.split("\n", 1)
    claim = 2 * 1000 * 1000 * 120 * 8
    assert code == "1" and "Traceback" not in proc.stdout + proc.stderr
    assert output.startswith(f"error: {big}: the case's files claim 1.79 GiB ({claim} bytes) of voxel data together as "
                             "8-byte values"), output
    assert "above the memory limit of " in output  # 768 MiB, or less under a smaller cgroup limit
