"""File names a user's dataset may hold, through every command that reads or writes them (issue 19).

A case whose files are named with byte 0xff (not UTF-8: Python's surrogate escape ``c\\udcff``) goes
through every writer: its files are written as the file system has them (the same bytes), so is a
CSV manifest's file name; every text meant to be read (reports, tables, JSON, pictures, printed
lines) shows it escaped, ``c\\udcff`` (in JSON that is JSON's escape of the same name).
Then each of :data:`hostile.HOSTILE_NAMES` (spaces, a leading dash, unicode, ``..``, 255 bytes, a
newline, 0xff) as a case's file name through ``validate`` (success or its report of problems),
``augment --dry-run`` and ``export`` (success or one ``error:`` line), and nothing is written
outside ``--out``.
Every check re-reads the files from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import pytest
from hostile import HOSTILE_NAMES, hostile_dataset, snapshot
from typer.testing import CliRunner

from medsynth.cli import app

BAD = HOSTILE_NAMES["not_utf8"]  # "c\udcff"
BAD_BYTES = b"c\xff"
ESCAPED = "c\\udcff"  # how it is shown: the six characters \udcff


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args])


def succeeded(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 0, result.output
    return result.output


def ends_cleanly(result) -> None:  # type: ignore[no-untyped-def]
    """Success, or one ``error:`` line and a non-zero exit; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and not result.stdout.startswith("error:"), result.output


def validated(result) -> None:  # type: ignore[no-untyped-def]
    """``validate``: success, or its report of every problem (one line each) and exit 1; never a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == 0 or result.exit_code == 1 and "FAILED: " in result.output, result.output


def dataset_or_skip(root: Path, names: list[str]) -> Path:
    try:
        return hostile_dataset(root, names)
    except (OSError, UnicodeEncodeError) as exc:
        pytest.skip(f"this file system refuses the name ({exc})")


def names_in(folder: Path) -> set[bytes]:
    """The file names in ``folder`` as the file system has them (bytes)."""
    return set(os.listdir(bytes(folder)))


def strict_utf8(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # a surrogate written raw would fail here


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dataset_or_skip(tmp_path_factory.mktemp("bad") / "ds", [BAD])


# ------------------------------------------------------------------------------------ 0xff through every writer


def test_validate_shows_a_name_that_is_not_utf8_escaped(bad_data: Path, tmp_path: Path) -> None:
    succeeded(invoke("validate", bad_data, "--no-progress"))
    report = json.loads(succeeded(invoke("validate", bad_data, "--json")))
    assert report["ok"] is True
    # a problem in that case names its file, escaped, in one line among the report's
    (bad_data.parent / "labelsTr" / f"{BAD}.nii.gz").rename(tmp_path / "moved.nii.gz")
    try:
        result = invoke("validate", bad_data, "--no-progress")
    finally:
        (tmp_path / "moved.nii.gz").rename(bad_data.parent / "labelsTr" / f"{BAD}.nii.gz")
    validated(result)
    assert result.exit_code == 1 and f"labelsTr/{ESCAPED}.nii.gz" in result.output


def test_augment_writes_the_files_as_named_and_the_texts_escaped(bad_data: Path, tmp_path: Path) -> None:
    plan = succeeded(invoke("augment", bad_data, "--method", "classic", "--num", 2, "--out", tmp_path / "dry",
                            "--dry-run", "--no-progress"))
    assert f"source={ESCAPED}" in plan and not (tmp_path / "dry").exists()
    out = tmp_path / "aug"
    succeeded(invoke("augment", bad_data, "--method", "classic", "--num", 2, "--out", out, "--no-progress"))
    assert BAD_BYTES + b".nii.gz" in names_in(out / "imagesTr") and BAD_BYTES + b".nii.gz" in names_in(out / "labelsTr")
    manifest = strict_utf8(out / "dataset.json")
    assert f"imagesTr/{ESCAPED}.nii.gz" in manifest  # JSON's escape of the same name
    assert {e["image"] for e in json.loads(manifest)["training"]} >= {f"imagesTr/{BAD}.nii.gz"}
    provenance = strict_utf8(out / "provenance.jsonl")
    sources = {json.loads(line).get("source") for line in provenance.splitlines()}
    assert BAD in sources, sources
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    succeeded(invoke("validate", out / "dataset.json", "--no-progress"))  # the manifest names the real file


@pytest.mark.parametrize("fmt", ["nnunet", "csv"])
def test_export_writes_the_files_as_named(bad_data: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "Dataset001_Bad"
    succeeded(invoke("export", bad_data, "--format", fmt, "--out", out, "--no-progress"))
    image = BAD_BYTES + (b"_0000.nii.gz" if fmt == "nnunet" else b".nii.gz")
    assert image in names_in(out / "imagesTr") and BAD_BYTES + b".nii.gz" in names_in(out / "labelsTr")
    if fmt == "csv":  # a manifest's file names are file names: as the file system has them
        assert b"\n" + BAD_BYTES + b",imagesTr/" + BAD_BYTES + b".nii.gz," in (out / "dataset.csv").read_bytes()
    succeeded(invoke("validate", out if fmt == "nnunet" else out / "dataset.csv", "--no-progress"))


def test_anatomy_report_shows_the_name_escaped(bad_data: Path, tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    os.link(bad_data.parent / "imagesTr" / f"{BAD}.nii.gz", unlabelled / f"u{BAD}.nii.gz")
    out = tmp_path / "bank"
    succeeded(invoke("anatomy", bad_data, "--out", out, "--unlabelled", unlabelled, "--transform", "affine",
                     "--no-progress"))
    report = strict_utf8(out / "report.md")
    assert f"u{ESCAPED}" in report, report
    assert any(name.startswith(b"u" + BAD_BYTES) for name in names_in(out / "masks")), names_in(out)


def test_downstream_tables_show_the_name_escaped(bad_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "down"
    succeeded(invoke("downstream", bad_data, "--out", out, "--steps", 2, "--seeds", 1, "--folds", 2, "--batch-size", 2,
                     "--channels", 4, "--patch-size", 16, "--device", "cpu", "--no-progress", "--no-plain-sets"))
    rows = strict_utf8(out / "metrics.csv").splitlines()
    assert any(row.split(",")[3] == ESCAPED for row in rows[1:]), rows[:3]
    strict_utf8(out / "report.md")
    json.loads(strict_utf8(out / "summary.json"))


def test_train_and_report_on_a_dataset_with_the_name(bad_data: Path, tmp_path: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "configs/tiny/gan2d.yaml"
    run = tmp_path / "run"
    succeeded(invoke("train", recipe, "--data", bad_data, "--out", run, "--set", "training.max_steps=1",
                     "--no-progress"))
    assert f"report: {run / 'report.md'}" in succeeded(invoke("report", run))
    strict_utf8(run / "report.md")


def test_a_run_folder_whose_own_name_is_not_utf8_trains_and_samples(bad_data: Path, tmp_path: Path) -> None:
    """safetensors' own load_file/save_file take UTF-8 paths; medsynth writes and reads the run's weights
    through Python file objects there, so a run folder named with byte 0xff trains, samples and reports."""
    recipe = Path(__file__).resolve().parents[1] / "configs/tiny/gan2d.yaml"
    try:
        run = tmp_path / os.fsdecode(b"run\xff")
        run.mkdir()
        run.rmdir()
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    succeeded(invoke("train", recipe, "--data", bad_data, "--out", run, "--set", "training.max_steps=1",
                     "--no-progress"))
    assert (run / "model.safetensors").is_file()
    mask = next((bad_data.parent / "labelsTr").iterdir())
    out = tmp_path / "sample.nii.gz"
    succeeded(invoke("sample", run, "--mask", mask, "--out", out, "--seed", 0))
    assert nib.load(out).shape == nib.load(mask).shape


# ------------------------------------------------------------------------------------ every hostile name


@pytest.mark.parametrize("kind", list(HOSTILE_NAMES))
def test_hostile_case_names_end_cleanly_and_write_only_under_out(tmp_path: Path, kind: str) -> None:
    data = dataset_or_skip(tmp_path / "ds", [HOSTILE_NAMES[kind]])
    before = snapshot(tmp_path)
    validated(invoke("validate", data, "--no-progress"))
    ends_cleanly(invoke("augment", data, "--method", "classic", "--num", 2, "--out", tmp_path / "dry", "--dry-run",
                        "--no-progress"))
    assert snapshot(tmp_path) == before
    out = tmp_path / "out" / "Dataset001_Names"
    result = invoke("export", data, "--format", "nnunet", "--out", out, "--no-progress")
    ends_cleanly(result)
    after = {k: v for k, v in snapshot(tmp_path).items() if not (k == "out" or k.startswith("out/"))}
    assert after == before  # nothing outside --out, the input untouched
    refused = {"dots": "resolves to '..', not a name inside the dataset folder",
               "long": "_0000.nii.gz, would be 260 bytes, more than the 255 a file system allows"}
    if kind in refused:  # refused before anything is written
        assert refused[kind] in result.output and result.exit_code == 1 and not out.exists(), result.output
    else:  # what was exported is what the input holds
        assert result.exit_code == 0, result.output
        name = os.fsencode(HOSTILE_NAMES[kind])
        assert name + b"_0000.nii.gz" in names_in(out / "imagesTr")
        assert (out / "labelsTr" / f"{HOSTILE_NAMES[kind]}.nii.gz").read_bytes() == (
            data.parent / "labelsTr" / f"{HOSTILE_NAMES[kind]}.nii.gz").read_bytes()
