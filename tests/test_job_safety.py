"""Jobs stay bounded and safe: one job per output folder, workers die with their job, a changed input
stops a resume, plans are bounded (``--num``, free disk space, recipe sizes, model cards), file-system
errors and bad options end in one ``error:`` line. Each test is a reproduction of a reported failure."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth import journal as J
from medsynth.augment import AugmentOptions, run_augment
from medsynth.augment import job as augment_job
from medsynth.cli import app
from medsynth.data.limits import format_bytes
from medsynth.errors import CheckpointError, ConfigError, JobError

REPO = Path(__file__).resolve().parents[1]


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), journals excluded."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(J.JOURNAL_PREFIX)}


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("ds") / "data", dim=2, cases=3, size=16, seed=0)


def _copy_dataset(data: Path, dest: Path) -> Path:
    shutil.copytree(data.parent, dest)
    return dest / data.name


def _journal_cases(out: Path) -> int:
    path = out / ".journal.jsonl"
    return path.read_text().count('"key": "syn:') if path.exists() else 0


def _start_job(data: Path, out: Path, num: int, *extra: str) -> subprocess.Popen[bytes]:
    """``medsynth augment`` in its own process group, returned once it has journaled a case."""
    cmd = [sys.executable, "-m", "medsynth", "augment", str(data), "--method", "synthseg", "--num", str(num),
           "--out", str(out), "--no-progress", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while _journal_cases(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"the job ended early: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ------------------------------------------------------------------------------------ one job per folder


def test_second_job_into_a_running_jobs_folder_is_refused_naming_its_pid(data2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_job(data2d, out, 400)
    try:
        held = (f"error: {out} is in use by another medsynth job (PID {proc.pid}); wait for it to finish, "
                "or stop it first\n")
        for flag in ("--resume", "--overwrite"):
            code, output = cli("augment", data2d, "--method", "synthseg", "--num", 400, "--out", out, flag,
                               "--no-progress")
            assert (code, output) == (1, held)
        assert proc.poll() is None and J.lock_holder(out) == str(proc.pid)
    finally:
        _stop(proc)
    assert J.lock_holder(out) is None  # the kernel let go of the killed job's lock
    with J.output_lock(out):
        assert J.held_here(out)


def _children(pid: int) -> dict[int, str]:
    """PID -> command line of every process whose parent is ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _alive(pid: int) -> bool:
    """True for a running process (a zombie waiting to be reaped holds no memory and counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return [p for p in pids if _alive(p)]


def test_kill_9_of_a_job_leaves_no_worker_behind(data2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start_job(data2d, out, 400, "--workers", "2")
    children = _children(proc.pid)
    try:
        workers = [pid for pid, cmd in children.items() if "spawn_main" in cmd]
        assert len(workers) == 2, children
        os.kill(proc.pid, signal.SIGKILL)  # the job's process only, as `kill -9 PID` does
        proc.wait()
        deadline = time.time() + 20
        while any(_alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _alive(pid)], "processes of the killed job are still running"
        assert _mentioning(str(out)) == []
    finally:
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        _stop(proc)


def test_an_orphaned_worker_exits_at_once() -> None:
    code = ("import os; from medsynth.augment.workers import die_with_parent; die_with_parent(os.getppid() + 1); "
            "print('still here')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (1, "")


# ------------------------------------------------------------------------------------ inputs that change


def _edit_label(path: Path) -> None:
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0] = 1 if arr[0, 0] != 1 else 2
    nib.save(nib.Nifti1Image(arr, img.affine, img.header), str(path))


def test_resume_after_an_input_label_changed_is_refused_naming_it(data2d: Path, tmp_path: Path) -> None:
    data = _copy_dataset(data2d, tmp_path / "data")
    out = tmp_path / "out"
    run_augment(AugmentOptions(input=data, out=out, method="synthseg", num=4, seed=0))
    # what a kill leaves: the last case and the manifest missing
    (out / "dataset.json").unlink()
    (out / "imagesTr" / "syn_00003.nii.gz").unlink()
    label = data.parent / "labelsTr" / "phantom_001.nii.gz"
    before = J.sha256_file(label)
    _edit_label(label)
    after = J.sha256_file(label)
    code, output = cli("augment", data, "--method", "synthseg", "--num", 4, "--out", out, "--resume", "--no-progress")
    assert code == 1
    assert output == (f"error: cannot resume {out}: input case phantom_001: {label} has changed (sha256 {before[:12]}..., "
                      f"now {after[:12]}...) since the job started, so its files would mix old and new inputs; restore "
                      "the input, or pass --overwrite to start again from the new one\n")
    # --overwrite starts over: the result is a fresh job's on the new input
    code, output = cli("augment", data, "--method", "synthseg", "--num", 4, "--out", out, "--overwrite", "--no-progress")
    assert code == 0, output
    fresh = tmp_path / "fresh"
    run_augment(AugmentOptions(input=data, out=fresh, method="synthseg", num=4, seed=0))
    assert tree(out) == tree(fresh)


def test_changed_inputs_are_named(tmp_path: Path) -> None:
    old = {"inputs": {"case a": {"/d/a.nii.gz": "1" * 64}, "manifest": {"/d/dataset.json": "2" * 64},
                      "model": {"/r/model.safetensors": "3" * 64}}}
    out = tmp_path / "out"
    J.claim_output(out, old, "new")

    def refusal(new: dict[str, dict[str, str]]) -> str:
        with pytest.raises(JobError) as err:
            J.check_output_state(out, {"inputs": new}, resume=True, overwrite=False)
        return str(err.value).split(": ", 1)[1].split(" since the job started")[0]

    assert refusal({**old["inputs"], "model": {"/r/model.safetensors": "4" * 64}}) == (
        "input model: /r/model.safetensors has changed (sha256 333333333333..., now 444444444444...)")
    assert refusal({"case b": {"/d/b.nii.gz": "5" * 64}, **old["inputs"]}) == "input case b is new"
    assert refusal({"manifest": old["inputs"]["manifest"], "model": old["inputs"]["model"]}) == (
        "input case a is no longer in the dataset")
    assert refusal({**old["inputs"], "case a": {"/d/a2.nii.gz": "1" * 64}}) == "input case a: /d/a2.nii.gz is new"
    assert J.check_output_state(out, old, resume=True, overwrite=False) == "resume"


# ------------------------------------------------------------------------------------ bounded plans


def test_absurd_num_is_refused_and_a_large_dry_run_plans_only_what_it_shows(data2d: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    code, output = cli("augment", data2d, "--method", "synthseg", "--num", 10**12, "--out", out, "--dry-run")
    assert (code, output) == (1, "error: --num 1000000000000: must be from 1 to 1,000,000 synthetic cases per job\n")
    monkeypatch.setattr(augment_job.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 50, used=0, free=1 << 50))
    t0 = time.perf_counter()
    tracemalloc.start()
    try:
        summary = run_augment(AugmentOptions(input=data2d, out=out, method="synthseg", num=10**6, dry_run=True))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 30 and peak < 64 << 20  # the old dry run: 21 s, 525 MB
    assert summary.synthetic_cases == 10**6 and len(summary.plan) == augment_job.DRY_RUN_SHOWN
    assert [p.index for p in summary.plan] == list(range(augment_job.DRY_RUN_SHOWN)) and not out.exists()
    code, output = cli("augment", data2d, "--method", "synthseg", "--num", 10**6, "--out", out, "--dry-run",
                       "--no-progress")
    assert code == 0 and output.endswith("... and 999980 more synthetic cases\ndry run: nothing written\n")


def test_num_is_checked_against_the_free_disk_space(data2d: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.data.manifest import read_manifest

    cases = read_manifest(data2d).cases
    per_case = sum(os.path.getsize(p) for c in cases for p in [*c.images, c.label]) // len(cases)  # all train
    free = 10 * per_case
    monkeypatch.setattr(augment_job.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 40, used=0, free=free))
    out = tmp_path / "out"
    with pytest.raises(JobError) as err:
        run_augment(AugmentOptions(input=data2d, out=out, method="synthseg", num=500))
    assert str(err.value) == (f"--num 500: the new files need about {format_bytes(500 * per_case)} (500 case(s) x "
                              f"~{format_bytes(per_case)}, the mean size of a source case's files), but {out} "
                              f"has {format_bytes(free)} free; free some space or lower --num")
    assert not out.exists()
    done = run_augment(AugmentOptions(input=data2d, out=out, method="synthseg", num=3))  # 3 cases fit
    assert done.estimated_bytes == 3 * per_case
    monkeypatch.setattr(augment_job.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 40, used=0, free=0))
    again = run_augment(AugmentOptions(input=data2d, out=out, method="synthseg", num=3, resume=True))
    assert (again.reused, again.estimated_bytes) == (3, 0)  # a resume needs room for the missing cases only


@pytest.mark.parametrize("override,field,got", [
    ("training.batch_size=100000000", "training.batch_size", "less than or equal to 4096 (got 100000000)"),
    ("data.size=[100000, 100000]", "data.size.0", "less than or equal to 4096 (got 100000)"),
    ("training.seed=99999999999999999999999", "training.seed",
     "less than or equal to 9223372036854775807 (got 99999999999999999999999)"),
    ("model.generator.channels=[3000, 3000, 3000]", "model.generator.channels.0", "less than or equal to 2048 (got 3000)"),
])
def test_recipe_sizes_out_of_range_are_clear_errors(override: str, field: str, got: str, tmp_path: Path) -> None:
    code, output = cli("train", "tiny/gan2d", "--out", tmp_path / "run", "--set", override)
    assert code == 1 and output.startswith("error: ") and f"{field}: Input should be {got}" in output
    if "invalid setting " in output:  # one problem: one line
        assert f"invalid setting {field}: Input should be {got}" in output and output.count("\n") <= 1, output
    assert not (tmp_path / "run").exists()


def test_memory_estimate_is_a_hand_checked_lower_bound(tmp_path: Path) -> None:
    from medsynth.config import load_config, memory_estimate
    from medsynth.training.memory import check_memory

    cfg = load_config(REPO / "configs/tiny/gan2d.yaml")  # generator [16, 16, 8], discriminator 8, batch 4, 32x32
    params = 9 * (16 * 16 + 16 * 16 + 8 * 8) + 9 * 8 * 8
    assert memory_estimate(cfg) == (params * 16 + 4 * 32 * 32 * 8 * 8, params)
    big = load_config(REPO / "configs/tiny/gan2d.yaml", ["training.batch_size=4096", "data.size=[4096, 4096]"])
    needed = 4096 * 4096 * 4096 * 8 * 8 + params * 16
    with pytest.raises(ConfigError, match=re.escape(f"needs at least {format_bytes(needed)} (about 5,760 parameters")):
        check_memory(big, 8 << 30, "GPU")
    code, output = cli("train", "tiny/gan2d", "--out", tmp_path / "run", "--set", "training.batch_size=4096",
                       "--set", "data.size=[4096, 4096]", "--set", "training.device=cpu")
    assert code == 1 and output.startswith(f"error: gan2d-tiny: training this recipe needs at least {format_bytes(needed)}")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ file systems


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path | None]:
    """A 64 KiB tmpfs (None where this process may not mount one)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_error_line_naming_the_file(data2d: Path, tmpfs: Path | None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if tmpfs is None:  # no tmpfs: a full disk as os.replace reports it (an OSError without a file name)
        real = os.replace

        def full(src: object, dst: object) -> None:
            if "syn_00002" in str(dst):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "replace", full)
        tmpfs = tmp_path
    out = tmpfs / "out"
    code, output = cli("augment", data2d, "--method", "synthseg", "--num", 30, "--out", out, "--no-progress")
    assert code == 1
    assert output.startswith(f"error: {out}/") and output.endswith(": No space left on device\n")
    assert output.count("\n") == 1 and not list(out.rglob(".*.tmp-*"))


def test_atomic_writes_name_the_path_of_an_unnamed_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.data.atomic import atomic_write_text

    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError) as err:
        atomic_write_text(tmp_path / "a.txt", "x")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(tmp_path / "a.txt"))
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory, data2d: Path) -> Path:
    """A tiny GAN run (one step) on 32x32 phantom slices."""
    from medsynth.config import load_config
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.training.engine import train

    base = tmp_path_factory.mktemp("run")
    data = make_phantom_dataset(base / "p2", dim=2, cases=3, size=32, seed=1)
    cfg = load_config(REPO / "configs/tiny/gan2d.yaml",
                      [f"data.manifest={data}", "training.max_steps=1", "training.preview_every=0"])
    with pytest.warns(UserWarning):
        train(cfg, base / "run", progress=False)
    return base / "run"


def test_read_only_file_system_is_one_error_line(data2d: Path, run2d: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"needs a read-only file system; this process cannot mount one ({mounted.stderr.decode().strip()})")
    try:
        mask = run2d.parent / "p2" / "labelsTr" / "phantom_000.nii.gz"
        image = run2d.parent / "p2" / "imagesTr" / "phantom_000.nii.gz"
        for args, path in (
            (["augment", data2d, "--method", "synthseg", "--num", 2, "--out", mnt / "out", "--no-progress"], mnt / "out"),
            (["sample", run2d, "--mask", mask, "--out", mnt / "s.nii.gz", "--no-progress"], mnt / "s.nii.gz"),
            (["evaluate", image, image, "--data-range", "1", "--out", mnt / "rep", "--no-progress"], mnt / "rep"),
        ):
            code, output = cli(*args)
            assert (code, output) == (1, f"error: {path}: Read-only file system\n"), args[0]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ------------------------------------------------------------------------------------ sample and model cards


def test_sample_refusals_are_one_error_line(run2d: Path, tmp_path: Path) -> None:
    mask = run2d.parent / "p2" / "labelsTr" / "phantom_000.nii.gz"
    folder = tmp_path / "existing"
    folder.mkdir()
    dangling = tmp_path / "dangling.nii.gz"
    dangling.symlink_to(tmp_path / "missing" / "x.nii.gz")
    tiny = tmp_path / "tiny.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((1, 1), np.uint8), np.eye(4)), str(tiny))
    negative = tmp_path / "negative.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8), -2, np.int16), np.eye(4)), str(negative))
    out = tmp_path / "s.nii.gz"
    cases = [
        (["--out", folder, "--overwrite"], f"--out {folder} is a folder; name the image file to write, e.g. "
                                          f"{folder / 'image.nii.gz'}"),
        (["--out", dangling], f"{dangling}: is a symbolic link to a missing target"),
        (["--out", out, "--seed", "-5"], "--seed -5: must be a whole number from 0 to 9223372036854775807 (2**63 - 1)"),
        (["--out", out, "--guidance", "inf"], "--guidance inf: must be a finite number >= 0 (1: no guidance)"),
        (["--out", out, "--class", "T1"], f"--class 'T1': the run {run2d} is not class-conditioned (trained without "
                                         "data.class_key)"),
        (["--out", out, "--mask", tiny], f"{tiny}: a mask of shape (1, 1) is too small for this run; at least one side "
                                         "must be longer than 4 voxels (the run's size multiple)"),
        (["--out", out, "--mask", negative], f"{negative}: has label values [-2] that the run was not trained on "
                                             "(its labels: [0, 1, 2, 3, 4, 5, 6])"),
    ]
    for extra, message in cases:
        args = ["sample", run2d, "--mask", mask, "--no-progress", *extra]
        if "--mask" in extra:
            args = ["sample", run2d, "--no-progress", *extra]
        assert cli(*args) == (1, f"error: {message}\n"), extra
    assert not out.exists() and dangling.is_symlink() and list(folder.iterdir()) == []
    assert cli("sample", run2d, "--mask", mask, "--out", out, "--no-progress")[0] == 0 and out.is_file()


def test_model_cards_with_a_future_version_or_absurd_sizes_are_refused_before_building(
        run2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medsynth.models.gan as gan_models
    from medsynth.synthesis.synthesizer import Synthesizer

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the network was built")

    monkeypatch.setattr(gan_models, "build_generator", never)
    for name, edit, message in (
        ("v99", lambda c: c.update(version=99), "field 'version' is 99: written by a newer medsynth"),
        ("wide", lambda c: c["config"]["model"]["generator"].update(channels=[3000, 3000, 3000]),
         "field 'config.model' asks for a network with channels [3000, 3000, 3000]; a recipe allows at most 8 levels "
         "of 1 to 2048 channels"),
        ("deep", lambda c: c["config"]["model"]["generator"].update(channels=[8] * 100),
         "field 'config.model' asks for a network with channels [8, 8, 8, 8, 8, 8, 8, 8, 8]"),
        ("huge", lambda c: c["config"]["data"].update(size=[100000, 100000]), "field 'config.data.size' is [100000, 100000]"),
    ):
        run = tmp_path / name
        shutil.copytree(run2d, run)
        card = json.loads((run / "model_card.json").read_text())
        edit(card)
        (run / "model_card.json").write_text(json.dumps(card))
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{run / 'model_card.json'}: {message}")):
            Synthesizer.from_run(run)
