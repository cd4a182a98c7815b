"""Latent diffusion end to end on tiny phantoms, through the CLI: the stages learn, samples keep the
mask's geometry, seeds decide samples, resume across the stage boundary is exact, a malicious
checkpoint is refused without running, bad data is refused before training."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.nifti import read_volume, write_volume

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--set", "training.batch_size=2", "--set", "model.autoencoder.adv_start=2", "--set", "training.log_every=1",
        "--set", "training.checkpoint_every=3", "--no-progress"]


def cli(*args: object, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def records(run: Path, kind: str, stage: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind and r.get("stage") == stage]


@pytest.mark.parametrize("shape", [(2, 1, 32, 24), (1, 2, 16, 16, 14)])
def test_ssim_loss_matches_the_metric(shape):
    from medsynth.evaluation.metrics import ssim
    from medsynth.training.ldm import ssim_loss

    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    y = (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1).requires_grad_(True)
    loss = ssim_loss(y, x)
    reference = ssim(x, y.detach(), data_range=1.0, spatial_dims=len(shape) - 2).mean()  # scikit-image setting
    assert abs((1 - loss.item()) - float(reference)) < 1e-4
    loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_kl_loss_is_the_closed_form():
    from medsynth.training.ldm import kl_loss

    mu = torch.tensor([[[0.5, -1.0]], [[0.0, 2.0]]])
    sigma = torch.tensor([[[1.0, 0.5]], [[2.0, 1.0]]])
    per_item = [0.5 * (0.25 + 0.0) + 0.5 * (1.0 + 0.25 - np.log(0.25) - 1.0),
                0.5 * (4.0 - np.log(4.0) - 1.0) + 0.5 * 4.0]
    assert abs(kl_loss(mu, sigma).item() - np.mean(per_item)) < 1e-5


@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("p2") / "ds", dim=2, cases=4, seed=0, size=32)


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("p3") / "ds", dim=3, cases=3, seed=0, size=20)


def _label(manifest: Path) -> Path:
    return sorted((manifest.parent / "labelsTr").glob("*.nii.gz"))[0]


def _odd_mask(src: Path, out: Path, shape: tuple[int, ...]) -> Path:
    """A crop of a phantom label map with a shape that is no multiple of 4 and a rotated, shifted affine."""
    lab = read_volume(src, kind="label").array[tuple(slice(0, s) for s in shape)]
    affine = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    affine[:2, :2] = [[0.9 * c, -0.9 * s], [0.9 * s, 0.9 * c]]
    affine[:3, 3] = [-12.5, 7.0, 3.25]
    return write_volume(out, lab, affine, kind="label")


def _check_sample(out: Path, mask: Path) -> np.ndarray:
    img, lab = nib.load(str(out)), nib.load(str(mask))
    data = np.asarray(img.dataobj)
    assert data.shape == lab.shape
    np.testing.assert_allclose(img.affine, lab.affine, atol=1e-5)
    assert np.all(np.isfinite(data)) and data.std() > 0
    return data


@pytest.fixture(scope="module")
def run2d(data2d, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 2D run trained stage by stage; returns it and the autoencoder stage's metrics."""
    run = tmp_path_factory.mktemp("r2") / "run"
    base = ["train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", run, *FAST]
    cli(*base, "--stage", "autoencoder", "--max-steps", 16)
    ae_records = records(run, "eval", "autoencoder")
    cli(*base, "--stage", "diffusion", "--max-steps", 24, "--set", "training.preview_every=4")
    return run, ae_records


def test_autoencoder_reconstruction_improves(run2d):
    _, evals = run2d
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 16
    # a fresh residual autoencoder decodes to the label-mean fill; training improves on it
    assert last["l1"] < 0.95 * first["l1"]
    assert last["ssim_loss"] < first["ssim_loss"]


def test_diffusion_loss_falls(run2d):
    run, _ = run2d
    assert len(records(run, "train", "diffusion")) == 24
    evals = records(run, "eval", "diffusion")  # fixed noise and timesteps, every 4 steps
    assert [r["step"] for r in evals] == [4, 8, 12, 16, 20, 24]
    # (the default recipe diffuses the image's difference to the label-mean fill: little of it is
    # predictable on phantoms, so the loss falls slowly)
    assert evals[-1]["mse"] < 0.99 * evals[0]["mse"]
    assert evals[-1]["mse_ema"] < evals[0]["mse_ema"]
    assert len(list((run / "previews").glob("diffusion_step_*.png"))) == 6
    card = json.loads((run / "model_card.json").read_text())
    assert card["model"]["scale_factor"] > 0 and card["model"]["conditioning"] == "concat"
    assert set(card["stages"]) == {"autoencoder", "diffusion"}
    # starting the diffusion stage keeps the autoencoder stage's log
    assert records(run, "eval", "autoencoder") == run2d[1]


def test_previews_generate_whole_slices_while_evaluations_score_crops(data2d, tmp_path, monkeypatch):
    """Both 2D stages preview whole 32x32 phantom slices (the size multiple is 8) and return images of
    that size; the evaluations keep scoring the fixed 16x16 training crops."""
    from medsynth.training.ldm import LdmFamily

    seen: set[tuple] = set()
    preview, evaluate = LdmFamily.preview, LdmFamily.evaluate

    def spy_preview(self, batch):
        rows = preview(self, batch)
        seen.add((self.stage, "preview", tuple(batch["image"].shape), tuple(sorted((k, tuple(v.shape))
                                                                                for k, v in rows.items()))))
        return rows

    monkeypatch.setattr(LdmFamily, "preview", spy_preview)
    monkeypatch.setattr(LdmFamily, "evaluate", lambda self, b: (seen.add((self.stage, "eval", tuple(b["image"].shape))),
                                                                evaluate(self, b))[1])
    base = ["train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", tmp_path / "run", *FAST,
            "--set", "data.size=[16, 16]", "--set", "training.preview_every=1", "--max-steps", 1]
    cli(*base, "--stage", "autoencoder")
    cli(*base, "--stage", "diffusion")
    whole, crop = (2, 1, 32, 32), (2, 1, 16, 16)
    assert seen == {
        ("autoencoder", "preview", whole, (("real", whole), ("reconstruction", whole))),
        ("diffusion", "preview", whole, ()),  # step 0: no latent scale yet, nothing to sample
        ("diffusion", "preview", whole, (("generated", whole), ("real", whole))),
        ("autoencoder", "eval", crop), ("diffusion", "eval", crop),
    }
    assert [p.name for p in (tmp_path / "run" / "previews").glob("diffusion_step_*.png")] == ["diffusion_step_00000001.png"]
    assert "full-size slices" in (tmp_path / "run" / "report.md").read_text()


def test_2d_samples_keep_mask_geometry_and_follow_seeds(run2d, data2d, tmp_path):
    run, _ = run2d
    mask = _odd_mask(_label(data2d), tmp_path / "mask.nii.gz", (30, 27))
    outs = {}
    for name, extra in (("a", ["--seed", 1]), ("b", ["--seed", 1]), ("c", ["--seed", 2]),
                        ("ddpm", ["--sampler", "ddpm", "--steps", 2]), ("ddim", ["--sampler", "ddim", "--steps", 3]),
                        ("cfg", ["--seed", 1, "--guidance", 2.0])):
        out = tmp_path / f"{name}.nii.gz"
        cli("sample", run, "--mask", mask, "--out", out, "--steps", 4, "--device", "cpu", *extra)
        outs[name] = _check_sample(out, mask)
    assert np.array_equal(outs["a"], outs["b"])
    assert not np.array_equal(outs["a"], outs["c"])
    assert not np.array_equal(outs["a"], outs["cfg"])
    bad = cli("sample", run, "--mask", mask, "--out", tmp_path / "x.nii.gz", "--steps", 0, ok=False)
    assert bad.exit_code == 1 and "--steps" in bad.output and not (tmp_path / "x.nii.gz").exists()


def test_3d_recipe_trains_both_stages_and_samples(data3d, tmp_path):
    run = tmp_path / "run"
    cli("train", CONFIGS / "tiny/ldm3d.yaml", "--data", data3d, "--out", run, "--max-steps", 4, *FAST,
        "--set", "model.diffusion.batch_size=3", "--set", "training.preview_every=4")
    ckpts = {p.relative_to(run / "checkpoints").as_posix() for p in (run / "checkpoints").rglob("*.pt")}
    assert ckpts == {"autoencoder/step_00000003.pt", "autoencoder/step_00000004.pt",
                     "diffusion/step_00000003.pt", "diffusion/step_00000004.pt"}  # --max-steps caps each stage
    for stage, batch in (("autoencoder", 2), ("diffusion", 3)):  # a stage's own batch size
        state = torch.load(run / "checkpoints" / stage / "step_00000004.pt", weights_only=True)
        assert state["data_order"]["global_batch"] == batch
    mask = _odd_mask(_label(data3d), tmp_path / "mask.nii.gz", (19, 20, 14))
    a = _check_sample(cli("sample", run, "--mask", mask, "--out", tmp_path / "a.nii.gz", "--steps", 4,
                          "--seed", 5) and tmp_path / "a.nii.gz", mask)
    b = _check_sample(cli("sample", run, "--mask", mask, "--out", tmp_path / "b.nii.gz", "--steps", 4,
                          "--seed", 5) and tmp_path / "b.nii.gz", mask)
    assert np.array_equal(a, b)
    # 3D latent diffusion previews the training crops, and its report says so (2D: whole slices, above)
    assert {r["previews"] for stage in ("autoencoder", "diffusion") for r in records(run, "start", stage)} == {"crops"}
    assert "the fixed training crops" in (run / "report.md").read_text()
    again = cli("train", CONFIGS / "tiny/ldm3d.yaml", "--data", data3d, "--out", run, "--max-steps", 4, ok=False)
    assert again.exit_code == 1 and "--resume" in again.output


def _final_state(run: Path, stage: str, step: int) -> dict:
    return torch.load(run / "checkpoints" / stage / f"step_{step:08d}.pt", weights_only=True)["family_state"]


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_across_the_stage_boundary_is_exact(data2d, tmp_path):
    def train(run: Path, steps: int, *extra: object):
        return cli("train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", run, "--max-steps", steps,
                   *FAST, *extra)

    straight, resumed, killed = tmp_path / "straight", tmp_path / "resumed", tmp_path / "killed"
    train(straight, 6)
    # a finished run of 3 resumed to 6: the autoencoder continues, the diffusion stage is retrained
    train(resumed, 3)
    out = train(resumed, 6, "--resume")
    assert "training the diffusion stage again" in out.output
    # a run stopped inside the diffusion stage: it continues from its checkpoint
    train(killed, 6, "--stage", "autoencoder")
    train(killed, 3, "--stage", "diffusion")
    out = train(killed, 6, "--resume")
    assert "again" not in out.output
    for run in (resumed, killed):
        for stage in ("autoencoder", "diffusion"):
            _assert_same(_final_state(straight, stage, 6), _final_state(run, stage, 6), f"{run.name}/{stage}")
        from safetensors.torch import load_file

        _assert_same(load_file(straight / "model.safetensors"), load_file(run / "model.safetensors"))


class _RunsCode:
    """Unpickling this calls Path.touch(sentinel): code that a safe loader must never run."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_malicious_checkpoint_is_refused_without_running(data2d, tmp_path, monkeypatch):
    run, sentinel = tmp_path / "run", tmp_path / "pwned"
    base = ["train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", run, "--max-steps", 3, *FAST]
    cli(*base)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    payload = {"format": "medsynth-checkpoint", "version": 1, "step": 9, "evil": _RunsCode(sentinel)}
    for stage in ("autoencoder", "diffusion"):
        with open(run / "checkpoints" / stage / "step_00000009.pt", "wb") as fh:
            pickle.dump(payload, fh)
        torch.save(payload, run / "checkpoints" / stage / "step_00000008.pt")
    # newest checkpoints refused with a warning; the run resumes from the valid ones
    out = cli(*base, "--resume")
    assert "refused" in out.output and not sentinel.exists()
    # only malicious autoencoder checkpoints: the diffusion stage cannot start, cleanly
    for p in (run / "checkpoints" / "autoencoder").glob("step_0000000[0-7].pt"):
        p.unlink()
    bad = cli(*base, "--stage", "diffusion", "--resume", ok=False)
    assert bad.exit_code == 1 and "error:" in bad.output and "Traceback" not in bad.output
    assert not sentinel.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


def test_bad_data_is_refused_before_training(data2d, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(data2d.parent, ds)
    img_path = sorted((ds / "imagesTr").glob("*.nii.gz"))[1]
    img = nib.load(str(img_path))
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[3, 4] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(img_path))
    run = tmp_path / "run"
    res = cli("train", CONFIGS / "tiny/ldm2d.yaml", "--data", ds / data2d.name, "--out", run, "--no-progress", ok=False)
    assert res.exit_code == 1 and img_path.name in res.output and "Traceback" not in res.output
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize("conditioning,scheduler", [("controlnet", "ddpm"), ("spade", "rflow")])
def test_other_conditionings_train_and_sample_through_the_api(data2d, tmp_path, conditioning, scheduler):
    from medsynth import Synthesizer

    run = tmp_path / "run"
    cli("train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", run, "--max-steps", 2, "--no-progress",
        "--set", f"model.diffusion.conditioning={conditioning}", "--set", f"model.diffusion.scheduler={scheduler}",
        "--set", "model.diffusion.sampler=ddim", "--set", "model.diffusion.prediction_type=v_prediction",
        "--set", "training.batch_size=2")
    synth = Synthesizer.from_run(run, device="cpu")
    mask = read_volume(_label(data2d), kind="label").array[:29, :31]
    a = synth.generate(mask, seed=3, steps=3, guidance=2.0)
    assert a.shape == mask.shape and np.isfinite(a).all() and a.std() > 0
    assert np.array_equal(a, synth.generate(mask, seed=3, steps=3, guidance=2.0))
    assert not np.array_equal(a, synth.generate(mask, seed=4, steps=3, guidance=2.0))
    assert not np.array_equal(a, synth.generate(mask, seed=3, steps=3, sampler="ddpm", guidance=2.0))


def test_torchrun_two_ranks_train_both_stages_in_one_process_group(data2d, tmp_path):
    """Under torchrun both stages train in one process group (the diffusion stage once hung re-creating
    it) and rank 0 alone reports. Equal weights across ranks are the engine's test (test_gan_train)."""
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1", "-m", "medsynth", "train", str(CONFIGS / "tiny/ldm2d.yaml"),
           "--data", str(data2d), "--out", str(run), "--max-steps", "2", "--no-progress", *FAST]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 steps") == 1, proc.stdout
    for stage in ("autoencoder", "diffusion"):
        assert (run / "checkpoints" / stage / "step_00000002.pt").exists()
    exported = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("unet.") for k in exported) and any(k.startswith("autoencoder.") for k in exported)
    card = json.loads((run / "model_card.json").read_text())
    assert set(card["stages"]) == {"autoencoder", "diffusion"}


def test_the_quality_gate_stops_the_diffusion_stage_unless_forced(data2d, tmp_path):
    """An autoencoder below model.autoencoder.target_psnr (60 dB: no 2-step autoencoder reaches it):
    one error line names the measured PSNR, the threshold and --force; no diffusion step ran; the report
    says so. With --resume --force the diffusion stage trains and the report says it was forced."""
    run = tmp_path / "run"
    base = ["train", CONFIGS / "tiny/ldm2d.yaml", "--data", data2d, "--out", run, "--max-steps", 2, *FAST,
            "--set", "model.autoencoder.target_psnr=60"]
    res = cli(*base, ok=False)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    psnr = records(run, "heldout", "autoencoder")[-1]["heldout_recon_psnr"]
    assert len(errors) == 1 and f"PSNR {psnr:.2f} dB" in errors[0] and "target_psnr 60 dB" in errors[0], res.output
    assert "--force" in errors[0] and "Traceback" not in res.output
    assert not records(run, "train", "diffusion") and not (run / "model.safetensors").exists()
    report = (run / "report.md").read_text()
    assert f"PSNR {psnr:.2f} dB, below model.autoencoder.target_psnr 60 dB: the diffusion stage was not started" in report
    cli(*base, "--resume", "--force")
    assert records(run, "train", "diffusion") and (run / "model.safetensors").is_file()
    assert "the diffusion stage was trained on it anyway (--force)" in (run / "report.md").read_text()
