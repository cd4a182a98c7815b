"""Nothing a user made is ever lost (issue 19, part B): one ownership rule for every command that
writes (medsynth.ownership), a lock and an input record for train, and one ``error:`` line for every
failure. Every test checks the files on disk after the command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from hostile import HOSTILE_OUTS, PATH_KINDS, hostile_out, snapshot
from typer.testing import CliRunner

from medsynth.cli import app, user_errors
from medsynth.data.ledger import LEDGER, claim_folder
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.errors import CheckpointError, JobError
from medsynth.journal import JOB_FILE, Journal, claim_output, sha256_file
from medsynth.training import checkpoint as ck

HOLD = """
import sys, time
from medsynth.journal import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _one_error(result, *fragments: str) -> None:
    """Exit 1 and exactly one line, ``error: ...`` holding every fragment; no traceback."""
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("own") / "data", dim=2, cases=4, size=16)


# ------------------------------------------------------------------------------------ demo


def test_demo_overwrite_never_deletes_a_folder_holding_a_report_md(tmp_path: Path) -> None:
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "report.md").write_text("# my thesis")
    (thesis / "chapter1.tex").write_text("\\chapter{One}")
    before = snapshot(tmp_path)
    _one_error(_invoke("demo", "--out", thesis, "--overwrite", "--quick"), "was not made by `medsynth demo`")
    assert snapshot(tmp_path) == before


def test_demo_overwrite_through_a_symlink_is_one_error_line_and_follows_nothing(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "report.md").write_text("a trained run's report")
    (tmp_path / "link").symlink_to(target)
    before = snapshot(tmp_path)
    _one_error(_invoke("demo", "--out", tmp_path / "link", "--overwrite", "--quick"), "was not made by")
    assert snapshot(tmp_path) == before


def test_an_overwrite_removes_only_recorded_unchanged_files(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    owned = claim_folder(out, "demo", overwrite=False)
    (out / "runs").mkdir()
    (out / "runs" / "made.txt").write_text("made by the demo")
    (out / "report.md").write_text("the demo's report")
    owned.record_new()
    (out / "runs" / "mine.txt").write_text("a user's notes")  # added later: never recorded
    # a recorded file changed since: refused, nothing removed
    (out / "report.md").write_text("edited by the user")
    before = snapshot(tmp_path)
    with pytest.raises(JobError, match="report.md was changed after `medsynth demo` wrote it"):
        claim_folder(out, "demo", overwrite=True)
    assert snapshot(tmp_path) == before
    (out / "report.md").unlink()
    owned = claim_folder(out, "demo", overwrite=True)
    assert sorted(snapshot(out)) == [LEDGER, "runs", "runs/mine.txt"]
    assert (out / "runs" / "mine.txt").read_text() == "a user's notes" and owned.before == {"runs/mine.txt"}


# ------------------------------------------------------------------------------------ augment, report, phantoms


def test_augment_overwrite_keeps_user_files_named_like_a_journal(tmp_path: Path) -> None:
    out = tmp_path / "aug"
    out.mkdir()
    (out / "syn_0.nii.gz").write_bytes(b"made")
    (out / JOB_FILE).write_text(json.dumps({"method": "classic"}))
    Journal(out).append({"key": "syn:syn_0", "files": {"syn_0.nii.gz": sha256_file(out / "syn_0.nii.gz")}})
    for name in (".journal-notes.jsonl", ".journal_backup.jsonl", ".journal.rank1.jsonl"):
        (out / name).write_text('{"a user": "file"}\n')
    claim_output(out, {"method": "classic"}, "overwrite")
    assert sorted(p.name for p in out.iterdir()) == [".journal-notes.jsonl", ".journal.rank1.jsonl",
                                                     ".journal_backup.jsonl", JOB_FILE]
    assert (out / ".journal-notes.jsonl").read_text() == '{"a user": "file"}\n'


def test_report_never_rewrites_a_folder_that_only_has_a_config_yaml(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: mine\nmodel: {family: gan}\n")
    (folder / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    (folder / "report.md").write_text("my own report")
    before = snapshot(tmp_path)
    _one_error(_invoke("report", folder), "not a training run folder made by `medsynth train`")
    assert snapshot(tmp_path) == before


def test_phantoms_overwrite_keeps_a_users_dataset_json_and_csv(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "dataset.json").write_text('{"name": "my dataset"}')
    (out / "dataset.csv").write_text("case_id,image\n")
    before = snapshot(tmp_path)
    _one_error(_invoke("phantoms", out, "--dim", "2", "--cases", "1", "--size", "16", "--overwrite"),
               "dataset.json was not written by `medsynth phantoms`")
    assert snapshot(tmp_path) == before
    # its own dataset is replaced, a user's file beside it stays
    made = tmp_path / "made"
    assert _invoke("phantoms", made, "--dim", "2", "--cases", "2", "--size", "16").exit_code == 0
    (made / "notes.txt").write_text("keep")
    result = _invoke("phantoms", made, "--dim", "2", "--cases", "1", "--size", "16", "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (made / "imagesTr").iterdir()) == ["phantom_000.nii.gz"]
    assert (made / "notes.txt").read_text() == "keep"


def test_phantoms_cases_are_bounded_and_checked_against_the_free_disk(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _one_error(_invoke("phantoms", tmp_path / "a", "--cases", "100001"), "cases must be a whole number from 1 to 100000")
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr("medsynth.data.phantoms.shutil.disk_usage", lambda path: free)
    _one_error(_invoke("phantoms", tmp_path / "b", "--cases", "10", "--dim", "2", "--size", "16"),
               "--cases 10: 10 phantoms of 16^2 voxels need about 10 KiB", "1000 bytes free")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ inputs are never written


def test_downstream_out_in_on_or_around_an_input_dataset_is_refused(data2d: Path, tmp_path: Path) -> None:
    root = data2d.parent
    before = snapshot(root.parent)
    for out, words in ((root, "lies inside the folder"), (root / "imagesTr", "lies inside the folder"),
                       (root / "report", "lies inside the folder"), (root.parent, "contains the folder")):
        _one_error(_invoke("downstream", data2d, "--out", out, "--overwrite", "--steps", "1", "--seeds", "1"),
                   words, "never writes")
        assert snapshot(root.parent) == before
    # through a symbolic link to the dataset, too
    (tmp_path / "link").symlink_to(root)
    _one_error(_invoke("downstream", data2d, "--out", tmp_path / "link", "--overwrite"), "lies inside the folder")
    assert snapshot(root.parent) == before


def test_export_and_evaluate_never_write_inside_an_input(data2d: Path, tmp_path: Path) -> None:
    root = data2d.parent
    before = snapshot(root.parent)
    _one_error(_invoke("export", data2d, "--format", "csv", "--out", root / "exported", "--no-progress"),
               "inside the input folder")
    _one_error(_invoke("evaluate", data2d, data2d, "--data-range", "1", "--out", root.parent, "--overwrite",
                       "--no-progress"),
               "contains the folder")
    assert snapshot(root.parent) == before


# ------------------------------------------------------------------------------------ hostile --out paths


COMMANDS = {
    "phantoms": lambda data, out: ["phantoms", out, "--dim", "2", "--cases", "1", "--size", "16"],
    "export": lambda data, out: ["export", data, "--format", "csv", "--out", out, "--no-progress"],
    "evaluate": lambda data, out: ["evaluate", data, data, "--data-range", "1", "--out", out, "--overwrite",
                                   "--no-progress"],
    "downstream": lambda data, out: ["downstream", data, "--out", out, "--overwrite", "--steps", "1", "--no-progress"],
    "demo": lambda data, out: ["demo", "--out", out, "--overwrite", "--quick"],
    "train": lambda data, out: ["train", "tiny/gan2d", "--data", data, "--out", out, "--resume", "--no-progress"],
    "augment": lambda data, out: ["augment", data, "--method", "classic", "--num", "1", "--out", out, "--overwrite",
                                  "--no-progress"],
}
#: commands that take the lock on a folder holding a user's file (export refuses a non-empty --out before)
LOCKED = ("evaluate", "downstream", "demo", "train", "augment", "phantoms")


@pytest.mark.parametrize(("command", "kind"), [(c, k) for c in sorted(COMMANDS) for k in sorted(HOSTILE_OUTS)
                                               if k in PATH_KINDS or c in LOCKED])
def test_hostile_out_is_one_error_line_and_changes_nothing(command: str, kind: str, data2d: Path,
                                                           tmp_path: Path) -> None:
    out, words = hostile_out(kind, tmp_path / "place")
    before = snapshot(tmp_path)
    _one_error(_invoke(*COMMANDS[command](data2d, out)), words)
    assert snapshot(tmp_path) == before


def test_file_system_errors_name_loops_and_files_where_folders_should_be(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "afile").write_text("x")
    cli = typer.Typer()

    @cli.command()
    @user_errors
    def job(which: str) -> None:
        if which == "loop":
            os.stat(tmp_path / "loop")
        os.mkdir(tmp_path / "afile")

    @cli.command()
    def other() -> None:
        pass

    result = CliRunner().invoke(cli, ["job", "loop"])
    _one_error(result, f"{tmp_path / 'loop'}: is a symbolic link loop")
    result = CliRunner().invoke(cli, ["job", "file"])
    assert result.output == f"error: {tmp_path / 'afile'}: is a file where a folder should be\n"


# ------------------------------------------------------------------------------------ train: lock, inputs, ENOSPC


def test_two_train_resumes_on_one_run_folder_the_second_is_refused_naming_the_holder(data2d: Path,
                                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        _one_error(_invoke("train", "tiny/gan2d", "--data", data2d, "--out", run, "--resume", "--no-progress"),
                   f"is in use by another medsynth job (PID {holder.pid})")
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["phantoms", "export"])
def test_phantoms_and_export_take_the_output_lock(command: str, data2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        before = snapshot(tmp_path)
        _one_error(_invoke(*COMMANDS[command](data2d, out)),
                   f"{out} is in use by another medsynth job (PID {holder.pid})")
        assert snapshot(tmp_path) == before  # nothing written, the holder's lock file as it was
    finally:
        holder.kill()
        holder.wait()
    # the lock let go (the killed holder's file stays, nobody holds it): the same command runs
    assert _invoke(*COMMANDS[command](data2d, out)).exit_code == 0
    manifest = out / ("dataset.json" if command == "phantoms" else "dataset.csv")
    assert manifest.is_file() and not (out / ".medsynth.lock").exists()


def test_train_resume_refuses_a_changed_case_by_name_unless_allowed(tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=3, size=16)
    run = tmp_path / "run"
    args = ["train", "tiny/gan2d", "--data", data, "--out", run, "--no-progress"]
    assert _invoke(*args, "--max-steps", "2").exit_code == 0
    recorded = json.loads((run / "inputs.json").read_text())["run"]
    assert sorted(recorded) == ["case phantom_000", "case phantom_001", "case phantom_002", "manifest"]
    assert (run / LEDGER).is_file()
    # one label map changes (a valid file still: one voxel gets another label)
    label = data.parent / "labelsTr" / "phantom_001.nii.gz"
    img = nib.load(label)
    values = np.asarray(img.dataobj).copy()
    values[8, 8] = 1 if values[8, 8] != 1 else 2
    nib.save(nib.Nifti1Image(values, img.affine, img.header), label)
    metrics = (run / "metrics.jsonl").read_bytes()
    _one_error(_invoke(*args, "--max-steps", "3", "--resume"), "input case phantom_001",
               str(label), "has changed", "--allow-changed-data")
    assert (run / "metrics.jsonl").read_bytes() == metrics
    result = _invoke(*args, "--max-steps", "3", "--resume", "--allow-changed-data")
    assert result.exit_code == 0, result.output
    starts = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in starts if r["kind"] == "start"] == [0, 2]


def test_a_checkpoint_write_that_fails_for_a_full_disk_is_a_named_error(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def full(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(ck.torch, "save", full)
    payload = ck.make_payload(step=1, family="gan", stage=None, family_state={"w": torch.zeros(2)},
                              config_json="{}", losses={}, data_order={})
    with pytest.raises(CheckpointError) as info:
        ck.save_checkpoint(tmp_path, 1, payload, keep_last=2)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'step_00000001.pt'}: cannot be written (PytorchStreamWriter failed "
                              "writing file data/0: file write failed;")
    assert "free there" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no temp file left behind
    monkeypatch.setattr(ck.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors stay bugs
        ck.save_checkpoint(tmp_path, 1, payload, keep_last=2)


# ------------------------------------------------------------------------------------ names that are not UTF-8


def test_evaluate_shows_case_names_that_are_not_utf8_escaped(tmp_path: Path) -> None:
    sets = []
    for name in ("ref", "cand"):
        root = make_phantom_dataset(tmp_path / name, dim=2, cases=2, size=16, format="nnunet")
        for folder, ending in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
            os.rename(root / folder / f"phantom_001{ending}", os.fsdecode(bytes(root / folder) + b"/ph\xff" + ending.encode()))
        sets.append(root)
    out = tmp_path / "report"
    result = _invoke("evaluate", *sets, "--data-range", "auto", "--out", out)
    assert result.exit_code == 0, result.output
    csv = (out / "metrics.csv").read_bytes().decode("utf-8")  # a table shows the name escaped, as UTF-8
    assert "\nph\\udcff," in csv and "\nphantom_000," in csv
    summary = json.loads((out / "summary.json").read_text(encoding="ascii"))
    assert {c["case_id"] for c in summary["cases"]} == {"ph\udcff", "phantom_000"}
