"""The run report (RUN/report.md, RUN/curves.png, ``medsynth report``), the numbers a run reports,
TensorBoard scalars, CPU threads and sampling progress."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY2D = ROOT / "configs/tiny/gan2d.yaml"
# 6 steps, a record every 3, a checkpoint (and a report) at 3, previews at 0, 3, 6
FAST = ["--max-steps", "6", "--set", "training.log_every=3", "--set", "training.checkpoint_every=3",
        "--set", "training.preview_every=3", "--set", "training.batch_size=2", "--set", "training.threads=1"]


class Recorder:
    """Stands in for a TensorBoard SummaryWriter: keeps every scalar."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        self.closed = True


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("p") / "data", dim=3, cases=2, size=24, seed=0)


@pytest.fixture(scope="module")
def trained(data3d: Path, tmp_path_factory: pytest.TempPathFactory):
    """(run, CLI output, TensorBoard recorder): the tiny 2D GAN recipe on 3D volumes, through the CLI."""
    from medsynth.training import engine

    run = tmp_path_factory.mktemp("runs") / "gan"
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "_tensorboard_writer", lambda folder: recorder)
        res = CliRunner().invoke(app, ["train", str(TINY2D), "--data", str(data3d), "--out", str(run), *FAST])
    assert res.exit_code == 0, (res.output, res.exception)
    return run, res.output, recorder


def test_summary_line_prints_the_last_metrics_record(trained) -> None:
    run, output, _ = trained
    last = _records(run, "train")[-1]
    m = re.search(r"trained 6 steps: \S+ \((.*)\)", output)
    assert m, output
    printed = dict(kv.split("=") for kv in m.group(1).split())
    losses = {k: v for k, v in last.items() if k not in ("kind", "step", "samples_per_s")}
    assert set(printed) == set(losses) and {"g_l1", "d"} <= set(losses)
    assert all(float(printed[k]) == float(f"{v:.4g}") for k, v in losses.items())
    # the run card and the last checkpoint hold the same record, unrounded
    card = json.loads((run / "model_card.json").read_text())
    ckpt = torch.load(run / "checkpoints/step_00000006.pt", map_location="cpu", weights_only=True)
    assert card["final_losses"] == losses == ckpt["losses"]
    assert f"report: {run / 'report.md'}" in output
    # the progress line shows the same numbers; the 2D-on-3D warning comes once, before any step
    assert "gan: 6/6" in output and printed_line(output, "gan: 6/6").endswith(m.group(1))
    warning = "the recipe is 2D (data.dim: 2) and the volumes are 3D"
    assert output.count(warning) == 1 and output.index(warning) < output.index("gan: ")


def printed_line(output: str, start: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(start))


def test_a_record_is_the_mean_of_its_steps(trained, data3d: Path, tmp_path: Path) -> None:
    """The same run logged every step: each loss of the every-3-steps record is the mean of the 3
    single-step records (logging changes nothing else), and the last step alone differs from it."""
    run, _, _ = trained
    single = tmp_path / "single"
    res = CliRunner().invoke(app, ["train", str(TINY2D), "--data", str(data3d), "--out", str(single), *FAST,
                                   "--set", "training.log_every=1", "--no-progress"])
    assert res.exit_code == 0, res.output
    steps = _records(single, "train")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for rec in _records(run, "train"):
        window = [r for r in steps if rec["step"] - 3 < r["step"] <= rec["step"]]
        for key in set(rec) - {"kind", "step", "samples_per_s"}:
            assert rec[key] == pytest.approx(float(np.mean([r[key] for r in window])), rel=1e-9, abs=1e-12)
    assert steps[-1]["d"] != pytest.approx(_records(run, "train")[-1]["d"], rel=1e-6)


def test_report_and_curves_hold_every_logged_quantity(trained) -> None:
    import matplotlib.image as mpimg

    from medsynth.training.report import curve_panels, read_metrics

    run, _, _ = trained
    text = (run / "report.md").read_text()
    assert "| gan | 6 / 6 |" in text and "finished" in text
    assert "![gan preview, step 6](previews/step_00000006.png)" in text
    assert "2 training cases" in text and "slices along axis 2" in text and "1 scalp_skull" in text
    assert mpimg.imread(run / "curves.png").ndim == 3
    panels = {p.title: p for p in curve_panels(read_metrics(run))}
    train, evals = _records(run, "train"), _records(run, "eval")
    want = set(train[-1]) - {"kind", "step", "samples_per_s"} | {f"{k} (eval)" for k in evals[-1] if k not in
                                                                  ("kind", "step")}
    assert set(panels) == want and {"g_l1", "l1 (eval)"} <= want
    assert list(panels["g_l1"].values) == [r["g_l1"] for r in train] and list(panels["g_l1"].steps) == [3, 6]
    assert panels["l1 (eval)"].points and list(panels["l1 (eval)"].steps) == [0, 3, 6]
    assert list(panels["g_fm"].marks) == [r["step"] for r in evals]


def test_report_command_rebuilds_the_same_files(trained, tmp_path: Path) -> None:
    run, _, _ = trained
    copy = tmp_path / "gan"  # the same folder name: the report names the folder, not its path
    shutil.copytree(run, copy)
    (copy / "report.md").unlink()
    (copy / "curves.png").unlink()
    res = CliRunner().invoke(app, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert (copy / "report.md").read_bytes() == (run / "report.md").read_bytes()
    assert (copy / "curves.png").read_bytes() == (run / "curves.png").read_bytes()


def test_report_mid_training_says_where_the_run_is(trained, tmp_path: Path) -> None:
    """A run cut after its first checkpoint (no run card, records up to step 3)."""
    run, _, _ = trained
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut / "model_card.json").unlink()
    kept = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    res = CliRunner().invoke(app, ["report", str(cut)])
    assert res.exit_code == 0, res.output
    text = (cut / "report.md").read_text()
    assert "in progress (step 3 of 6)" in text and "## Use it" not in text
    assert "trained 3 steps" in res.output


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 1 and "not a training run folder" in res.output
    assert "Traceback" not in res.output


def test_report_writing_draws_no_random_numbers(trained, tmp_path: Path) -> None:
    from medsynth.training.report import write_report

    run, _, _ = trained
    copy = tmp_path / "gan"
    shutil.copytree(run, copy)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    write_report(copy)
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2] == np_state[2]


def test_tensorboard_scalars_match_metrics(trained) -> None:
    run, _, recorder = trained
    got = {(tag, step): value for tag, value, step in recorder.scalars}
    for rec in _records(run, "train"):
        for key in set(rec) - {"kind", "step", "samples_per_s"}:
            assert got[(f"train/{key}", rec["step"])] == rec[key]
    for rec in _records(run, "eval"):
        assert got[("eval/l1", rec["step"])] == rec["l1"]
    assert recorder.closed


def test_tensorboard_is_off_without_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from medsynth.training import engine

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert engine._tensorboard_writer(tmp_path / "tb") is None
    assert not (tmp_path / "tb").exists()


def test_threads_are_set_said_recorded_and_restored(trained) -> None:
    from medsynth.training.engine import MAX_AUTO_THREADS, cpu_threads

    run, output, _ = trained
    assert "using 1 CPU thread (training.threads: 1)" in output
    assert [r["threads"] for r in _records(run, "start")] == [1]
    assert torch.get_num_threads() == 1  # the process's setting is back (conftest sets 1)
    assert cpu_threads(3, {"OMP_NUM_THREADS": "2"}) == 3
    assert cpu_threads(0, {"OMP_NUM_THREADS": "2"}) == 2
    assert cpu_threads(0, {}) == min(len(os.sched_getaffinity(0)), MAX_AUTO_THREADS)


def test_full_size_previews_when_the_family_generates_at_any_size(data3d: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The GAN generates at any size (preview_multiple: its factor): it previews whole 24x24 slices,
    while evaluations keep scoring the 16x16 training crops."""
    from medsynth.config import load_config
    from medsynth.training.engine import train
    from medsynth.training.gan import GanFamily

    seen: set[tuple[str, tuple[int, ...]]] = set()
    preview, evaluate = GanFamily.preview, GanFamily.evaluate
    monkeypatch.setattr(GanFamily, "preview", lambda self, b: (seen.add(("p", tuple(b["image"].shape))),
                                                               preview(self, b))[1])
    monkeypatch.setattr(GanFamily, "evaluate", lambda self, b: (seen.add(("e", tuple(b["image"].shape))),
                                                                evaluate(self, b))[1])
    cfg = load_config(TINY2D, [f"data.manifest={data3d}", "training.max_steps=1", "training.batch_size=2",
                               "training.preview_every=1", "data.size=[16, 16]", "model.discriminator.num_d=1"])
    train(cfg, tmp_path / "full", progress=False)
    assert seen == {("p", (2, 1, 24, 24)), ("e", (2, 1, 16, 16))}
    assert "full-size slices" in (tmp_path / "full" / "report.md").read_text()


def test_sample_shows_progress_over_slices(trained, data3d: Path, tmp_path: Path) -> None:
    import nibabel as nib

    run, _, _ = trained
    mask = next((data3d.parent / "labelsTr").glob("*.nii.gz"))
    # slices along axis 2 holding a label: the ones generated (the empty ones are painted background)
    busy = int((np.asarray(nib.load(mask).dataobj) != 0).any(axis=(0, 1)).sum())
    res = CliRunner().invoke(app, ["sample", str(run), "--mask", str(mask), "--out", str(tmp_path / "s.nii.gz")])
    assert res.exit_code == 0, res.output
    assert re.search(rf"generating \(slices\): {busy}/{busy} \([\d.]+/s\)", res.output), res.output
    assert "2D run given a 3D mask" in res.output
    quiet = CliRunner().invoke(app, ["sample", str(run), "--mask", str(mask), "--out", str(tmp_path / "q.nii.gz"),
                                     "--no-progress"])
    assert quiet.exit_code == 0 and "generating (slices)" not in quiet.output
