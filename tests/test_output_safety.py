"""Output folders: one job at a time (an OS lock), an overwrite removes only what a job made, and
file-system errors and bad seeds end in one ``error:`` line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from medsynth import journal as J
from medsynth.cli import app, user_errors
from medsynth.data.atomic import temp_path_for
from medsynth.errors import JobError

HOLD = """
import sys, time
from medsynth.journal import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock on ``out`` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------------------------------ the lock


def test_second_job_is_refused_naming_the_holder_then_the_kernel_releases_a_killed_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _holder(out)
    try:
        assert (out / J.LOCK_FILE).read_text().strip() == str(proc.pid)
        with pytest.raises(JobError) as err, J.output_lock(out):
            pass
        assert str(err.value).startswith(f"{out} is in use by another medsynth job (PID {proc.pid});")
        assert J.lock_holder(out) == str(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert J.lock_holder(out) is None  # the lock file is still there, but nobody holds it
    with J.output_lock(out):
        assert (out / J.LOCK_FILE).read_text().strip() == str(os.getpid())
        assert J.lock_holder(out) is None  # held by this process
    assert not (out / J.LOCK_FILE).exists()


def test_the_same_process_cannot_take_the_lock_twice(tmp_path: Path) -> None:
    held = rf"in use by another medsynth job \(PID {os.getpid()} \(this process\)\)"
    with J.output_lock(tmp_path / "out"), pytest.raises(JobError, match=held), J.output_lock(tmp_path / "out"):
        pass


def test_lock_leaves_no_trace_when_the_job_fails_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "new"
    with pytest.raises(RuntimeError), J.output_lock(out):
        assert J.check_output_state(out, {"a": 1}, resume=False, overwrite=False) == "new"  # lock file ignored
        raise RuntimeError("the job failed")
    assert not out.exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with J.output_lock(existing):
        pass
    assert existing.is_dir() and not any(existing.iterdir())


def test_lock_refuses_a_dangling_symlink_and_a_file(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(JobError, match="is a symbolic link to a missing target"), J.output_lock(tmp_path / "dangling"):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobError, match="exists and is not a folder"), J.output_lock(tmp_path / "file"):
        pass


# ------------------------------------------------------------------------------------ overwrite


def _fake_job(out: Path) -> dict[str, str]:
    """A finished job in ``out``: two case files and a manifest, journaled, and its job file."""
    J.claim_output(out, {"method": "classic", "seed": 0}, "new")
    made = {}
    journal = J.Journal(out)
    for rel, text in (("imagesTr/syn_0.nii.gz", "image"), ("labelsTr/syn_0.nii.gz", "label")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
        made[rel] = J.sha256_file(out / rel)
    journal.append({"key": "syn:syn_0", "files": made})
    (out / "dataset.json").write_text("{}")
    journal.append({"key": "final:dataset.json", "files": {"dataset.json": J.sha256_file(out / "dataset.json")}})
    return made


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_empty_job_file_never_deletes_user_files(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.docx").write_text("x")
    (out / J.JOB_FILE).touch()
    with pytest.raises(JobError, match=r"its job file .medsynth_job.json is unreadable .* touches nothing"):
        J.check_output_state(out, {"seed": 0}, resume=False, overwrite=True)
    with pytest.raises(JobError, match="touches nothing"):
        J.claim_output(out, {"seed": 0}, "overwrite")
    (out / J.JOB_FILE).write_text("[]")
    with pytest.raises(JobError, match="empty or not one written by medsynth"):
        J.check_output_state(out, {"seed": 0}, resume=False, overwrite=True)
    assert (out / "thesis.docx").read_text() == "x"


def test_empty_job_file_through_the_cli(tmp_path: Path) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "ds", dim=2, cases=2, size=16, seed=0)
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.docx").write_text("x")
    (out / J.JOB_FILE).touch()
    result = CliRunner().invoke(app, ["augment", str(data), "--method", "classic", "--num", "1", "--out", str(out),
                                      "--overwrite", "--no-progress"])
    assert result.exit_code == 1 and result.output.startswith(f"error: cannot overwrite {out}: its job file")
    assert _tree(out) == [J.JOB_FILE, "thesis.docx"] and (out / "thesis.docx").read_text() == "x"


def test_overwrite_removes_only_what_the_job_made(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fake_job(out)
    (out / "notes.txt").write_text("mine")
    (out / "mywork").mkdir()
    (out / "mywork" / "model.pt").write_text("weights")
    (out / "labelsTr" / "extra.nii.gz").write_text("a label I added")
    stray = temp_path_for(out / "imagesTr" / "syn_1.nii.gz")
    stray.write_text("half-written")
    with J.output_lock(out):  # stray temp files are removed only under the lock
        assert J.check_output_state(out, {"seed": 1}, resume=False, overwrite=True) == "overwrite"
        J.claim_output(out, {"seed": 1}, "overwrite")
    assert _tree(out) == [J.JOB_FILE, "labelsTr", "labelsTr/extra.nii.gz", "mywork", "mywork/model.pt", "notes.txt"]
    assert json.loads((out / J.JOB_FILE).read_text()) == {"seed": 1}
    assert (out / "mywork" / "model.pt").read_text() == "weights"


def test_overwrite_refuses_a_changed_job_file_and_removes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fake_job(out)
    (out / "dataset.json").write_text('{"edited": "by hand"}')
    before = _tree(out)
    with pytest.raises(JobError, match="dataset.json was changed after medsynth wrote it .* Nothing was removed"):
        J.claim_output(out, {"seed": 1}, "overwrite")
    assert _tree(out) == before


def test_overwrite_refuses_a_journal_naming_files_outside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fake_job(out)
    (tmp_path / "thesis.docx").write_text("x")
    J.Journal(out).append({"key": "syn:evil", "files": {"../thesis.docx": J.sha256_file(tmp_path / "thesis.docx")}})
    with pytest.raises(JobError, match=r"its journal names '../thesis.docx', outside the folder"):
        J.check_output_state(out, {"seed": 1}, resume=False, overwrite=True)
    with pytest.raises(JobError, match="outside the folder"):
        J.claim_output(out, {"seed": 1}, "overwrite")
    assert (tmp_path / "thesis.docx").exists() and (out / "dataset.json").exists()


def test_strays_are_removed_only_under_this_jobs_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fake_job(out)
    stray = temp_path_for(out / "imagesTr" / "syn_1.nii.gz")
    stray.write_text("another job's file in flight")
    J.claim_output(out, {"method": "classic", "seed": 0}, "resume")  # nobody holds the lock: not proof enough
    assert stray.exists() and not J.held_here(out)
    proc = _holder(out)
    try:
        J.claim_output(out, {"method": "classic", "seed": 0}, "resume")
        assert stray.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with J.output_lock(out):
        J.claim_output(out, {"method": "classic", "seed": 0}, "resume")
    assert not stray.exists()


# ------------------------------------------------------------------------------------ error lines


def _cli_raising(exc: BaseException) -> typer.Typer:
    cli = typer.Typer()

    @cli.command()
    @user_errors
    def job() -> None:
        raise exc

    @cli.command()
    def other() -> None:  # a second command, so that typer keeps "job" as a subcommand
        pass

    return cli


@pytest.mark.parametrize("code,path,expected", [
    (errno.ENOSPC, "/data/out/imagesTr/syn_3.nii.gz", "error: /data/out/imagesTr/syn_3.nii.gz: No space left on device"),
    (errno.EROFS, "/mnt/ro/out", "error: /mnt/ro/out: Read-only file system"),
    (errno.EACCES, "/data/out", "error: /data/out: Permission denied"),
    (errno.EISDIR, "/data/out.nii.gz", "error: /data/out.nii.gz: Is a directory"),
    (errno.ENOSPC, None, "error: No space left on device"),
])
def test_file_system_errors_become_one_line(code: int, path: str | None, expected: str) -> None:
    exc = OSError(code, os.strerror(code)) if path is None else OSError(code, os.strerror(code), path)
    result = CliRunner().invoke(_cli_raising(exc), ["job"])
    assert result.exit_code == 1 and result.output == expected + "\n"


def test_programming_errors_keep_their_traceback() -> None:
    result = CliRunner().invoke(_cli_raising(AttributeError("'NoneType' object has no attribute 'x'")), ["job"])
    assert isinstance(result.exception, AttributeError)
    import io

    result = CliRunner().invoke(_cli_raising(io.UnsupportedOperation("not writable")), ["job"])
    assert isinstance(result.exception, io.UnsupportedOperation)


def test_dangling_symlink_and_file_as_out(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    result = CliRunner().invoke(app, ["phantoms", str(tmp_path / "dangling"), "--dim", "2", "--cases", "1"])
    assert result.exit_code == 1
    assert result.output == f"error: output folder {tmp_path / 'dangling'} is a symbolic link to a missing target\n"
    (tmp_path / "file").write_text("x")
    image = tmp_path / "img.nii.gz"
    import nibabel as nib
    import numpy as np

    nib.save(nib.Nifti1Image(np.arange(16 * 16, dtype=np.float32).reshape(16, 16), np.eye(4)), str(image))
    result = CliRunner().invoke(app, ["evaluate", str(image), str(image), "--data-range", "1",
                                      "--out", str(tmp_path / "file" / "sub")])
    assert result.exit_code == 1
    assert result.output == f"error: --out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file where a folder should be\n"


@pytest.mark.parametrize("args", [
    ["train", "tiny/gan2d", "--out", "RUN", "--seed", "99999999999999999999999"],
    ["train", "tiny/gan2d", "--out", "RUN", "--seed", str(2**63)],
    ["sample", "RUN", "--mask", "m.nii.gz", "--out", "o.nii.gz", "--seed", "-5"],
    ["augment", "DATA", "--method", "classic", "--num", "1", "--out", "OUT", "--seed", "-1"],
    ["phantoms", "OUT", "--seed", "-1"],
])
def test_seeds_out_of_range(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args)
    seed = args[args.index("--seed") + 1]
    assert result.exit_code == 1
    assert result.output == f"error: --seed {seed}: must be a whole number from 0 to 9223372036854775807 (2**63 - 1)\n"


def test_largest_seed_is_accepted(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["phantoms", str(tmp_path / "p"), "--dim", "2", "--cases", "1", "--size", "16",
                                      "--seed", str(2**63 - 1)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "dataset.json").is_file()
