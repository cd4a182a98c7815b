"""The engine and the GAN family: learning, run files, exact resume, refusals, CLI, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.config import load_config
from medsynth.data.nifti import read_volume, write_volume
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.training.engine import train

ROOT = Path(__file__).resolve().parents[1]
TINY2D = ROOT / "configs/tiny/gan2d.yaml"
TINY3D = ROOT / "configs/tiny/gan3d.yaml"


def _phantoms(out: Path, dim: int, cases: int, size: int) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(out, dim=dim, cases=cases, size=size, seed=0)


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("p2") / "data", 2, 4, 32)


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _phantoms(tmp_path_factory.mktemp("p3") / "data", 3, 3, 16)


def _cfg(manifest: Path, *overrides: str, recipe: Path = TINY2D):
    return load_config(recipe, [f"data.manifest={manifest}", *overrides])


@pytest.fixture(scope="module")
def run20(data2d: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny 2D recipe trained 20 steps straight."""
    return train(_cfg(data2d), tmp_path_factory.mktemp("runs") / "straight", progress=False)


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# ---------------------------------------------------------------------------- learning


def test_gan_generator_starts_at_the_fill_and_l1_to_real_drops(run20, data2d: Path) -> None:
    """The fresh generator paints the label-mean fill (per-label means of the training images,
    recomputed here); L1 of its output to the paired real images on a fixed batch: trained < initial."""
    from medsynth.data.loader import build_training_data
    from medsynth.data.manifest import read_manifest
    from medsynth.models.gan import condition_map
    from medsynth.training.engine import Runtime
    from medsynth.training.gan import GanFamily

    cfg = _cfg(data2d)
    data = build_training_data(read_manifest(data2d), cfg.data, seed=0)
    batch = data.fixed_batch(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed)  # as the engine builds it: the weights at step 0
        initial = GanFamily(cfg, data.info, Runtime(config=cfg, run_dir=Path("unused"), device=torch.device("cpu"))).G
    trained = run20.family.G
    cond = condition_map(batch["label"], batch["class_index"], 0)
    z = torch.randn((4, *trained.noise_shape((32, 32))), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        fresh = initial(cond, z) * 0.5 + 0.5
        l1 = [float((g(cond, z) * 0.5 + 0.5 - batch["image"]).abs().mean()) for g in (initial, trained)]
    images = np.concatenate([c.image[0].ravel() for c in data.cases])
    index = np.concatenate([c.index.ravel() for c in data.cases])
    means = np.array([images[index == j].mean() for j in range(len(data.info.labels))])
    from scipy.ndimage import gaussian_filter

    sigma = data.info.fill_sigma  # the fitted partial-volume width blurs the fill
    expected = [gaussian_filter(means[idx], sigma, mode="nearest") for idx in batch["label_index"].numpy()]
    np.testing.assert_allclose(fresh[:, 0].numpy(), np.stack(expected), atol=1e-5)
    assert l1[1] < 0.9 * l1[0], l1
    evals = _records(run20.run_dir, "eval")  # the engine's own log agrees in direction
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["l1"] < evals[0]["l1"]


def test_losses_and_networks_follow_spade() -> None:
    """Feature matching sums layers and averages scales (hand values); the discriminator's
    convolutions are spectrally normalised; the SPADE modulation is not instance-normalised; the EMA
    warms up as min(decay, (1 + n) / (10 + n))."""
    from medsynth.config import GanModelConfig
    from medsynth.data.loader import DataInfo, Normalization
    from medsynth.models.gan import SpadeNorm, build_discriminator
    from medsynth.training.engine import ema_warmup_fn
    from medsynth.training.gan import feature_matching_loss

    fake = [[torch.full((1, 2), 1.0), torch.full((1, 3), 3.0)], [torch.full((1, 1), 0.0)]]
    real = [[torch.full((1, 2), 0.5), torch.full((1, 3), 1.0)], [torch.full((1, 1), 4.0)]]
    # scale 0: |1 - 0.5| + |3 - 1| = 2.5; scale 1: 4; mean 3.25
    assert feature_matching_loss(fake, real).item() == pytest.approx(3.25)

    info = DataInfo(dim=2, slice_axis=2, volume_ndim=2, size=[32, 32], labels=[0, 1], label_names={},
                    channels=["mr"], classes=[], spacing=None, normalization=Normalization("x", [0.0], [1.0]))
    d = build_discriminator(GanModelConfig(discriminator={"num_d": 1, "num_layers": 2, "channels": 8}), info)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") and "weight" in m.parametrizations for m in convs)
    for _ in range(30):
        d(torch.rand(2, 3, 32, 32))  # power iterations run in training mode
    for conv in convs:  # each effective weight's largest singular value is about 1
        assert torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item() == pytest.approx(1.0, rel=0.05)
    norm = SpadeNorm(2, channels=4, cond_channels=2, hidden=8)
    cond = torch.zeros(1, 2, 8, 8)
    cond[:, 0, :, :4] = 1.0
    cond[:, 1, :, 4:] = 1.0
    h = norm.shared(cond)
    beta = norm.beta(h)  # a plain convolution of the map: its spatial mean is not forced to zero
    assert beta.mean(dim=(2, 3)).abs().max().item() > 1e-3
    ema, current = [torch.zeros(3)], [torch.ones(3)]
    update = ema_warmup_fn(0.999)
    update(ema, current, torch.tensor(1))  # decay min(0.999, 2 / 11)
    np.testing.assert_allclose(ema[0].numpy(), 1 - 2 / 11, rtol=1e-6)
    update(ema, current, torch.tensor(10_000))  # decay 0.999
    np.testing.assert_allclose(ema[0].numpy(), 1 - 0.999 * 2 / 11, rtol=1e-5)


def test_training_flips_move_image_and_mask_together() -> None:
    from medsynth.data.loader import one_hot
    from medsynth.training.engine import flip_batch

    g = torch.Generator().manual_seed(5)
    index = torch.randint(0, 3, (6, 5, 7), generator=g)
    batch = {"image": index[:, None].float() * 10 + torch.rand(6, 1, 5, 7, generator=g), "label_index": index,
             "label": one_hot(index, 3), "class_index": torch.zeros(6, dtype=torch.long)}
    out = flip_batch(batch, torch.Generator().manual_seed(1))
    draws = torch.rand((6, 2), generator=torch.Generator().manual_seed(1)) < 0.5  # the same draws
    for i in range(6):
        dims = [a for a in range(2) if draws[i, a]]
        expected = np.flip(index[i].numpy(), dims) if dims else index[i].numpy()
        np.testing.assert_array_equal(out["label_index"][i].numpy(), expected)
        np.testing.assert_array_equal(out["image"][i, 0].numpy(),
                                      np.flip(batch["image"][i, 0].numpy(), dims) if dims else batch["image"][i, 0].numpy())
        torch.testing.assert_close(out["label"][i], one_hot(out["label_index"][i : i + 1], 3)[0])
    assert draws.any() and not draws.all()
    assert out["class_index"] is batch["class_index"]


def test_gan_run_folder_contents(run20, data2d: Path) -> None:
    import matplotlib.image as mpimg
    from safetensors.torch import load_file

    from medsynth.config import Config

    run = run20.run_dir
    saved = Config.model_validate(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert saved == _cfg(data2d)
    assert [r["step"] for r in _records(run, "train")] == [5, 10, 15, 20]
    assert all(r["samples_per_s"] > 0 and np.isfinite(r["g_l1"]) for r in _records(run, "train"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010.pt", "step_00000020.pt"]
    pngs = sorted(p.name for p in (run / "previews").iterdir())
    assert pngs == ["step_00000000.png", "step_00000010.png", "step_00000020.png"]
    assert mpimg.imread(run / "previews" / pngs[-1]).ndim == 3
    card = json.loads((run / "model_card.json").read_text())
    assert card["family"] == "gan" and card["steps"] == 20
    assert card["data"]["labels"] == [0, 1, 2, 3, 4, 5, 6] and len(card["data"]["fingerprint"]) == 64
    norm = card["data"]["normalization"]
    images = [read_volume(p).array for p in sorted((data2d.parent / "imagesTr").glob("*.nii.gz"))]
    labels = [read_volume(p).array for p in sorted((data2d.parent / "labelsTr").glob("*.nii.gz"))]
    # the lower percentile over every voxel, the upper over the foreground (label > 0)
    lo = np.percentile(np.concatenate([a.ravel() for a in images]), 0.5)
    hi = np.percentile(np.concatenate([a[m > 0] for a, m in zip(images, labels)]), 99.5)
    assert norm["lo"][0] == pytest.approx(lo, rel=1e-6) and norm["hi"][0] == pytest.approx(hi, rel=1e-6)
    assert set(card["final_losses"]) >= {"g_l1", "g_adv", "g_fm", "d"}
    weights = load_file(str(run / "model.safetensors"))
    ema = run20.family.emas["generator"].module.state_dict()
    assert set(weights) == set(ema) and all(torch.equal(weights[k], ema[k]) for k in ema)


# ---------------------------------------------------------------------------- resume


def test_gan_exact_resume_10_plus_10_equals_20(run20, data2d: Path, tmp_path: Path) -> None:
    run = tmp_path / "resumed"
    train(_cfg(data2d, "training.max_steps=10"), run, progress=False)
    # the first run finished at 10; --resume with a larger max_steps continues it
    result = train(_cfg(data2d, "training.max_steps=20"), run, resume=True, progress=False)
    assert result.step == 20
    a = torch.load(run / "checkpoints/step_00000020.pt", map_location="cpu", weights_only=True)
    b = torch.load(run20.run_dir / "checkpoints/step_00000020.pt", map_location="cpu", weights_only=True)
    ta, tb = dict(_tensors(a["family_state"])), dict(_tensors(b["family_state"]))
    assert ta.keys() == tb.keys() and len(ta) > 50
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]
    assert (run / "model.safetensors").read_bytes() == (run20.run_dir / "model.safetensors").read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rs]  # noqa: E731
    assert strip(_records(run, "train")) == strip(_records(run20.run_dir, "train"))


def test_gan_run_refusals(run20, data2d: Path, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="run folder exists; pass --resume"):
        train(_cfg(data2d), run20.run_dir, progress=False)
    with pytest.raises(JobError, match=r"training.lr: 0.002 -> 0.001"):
        train(_cfg(data2d, "training.lr=0.001", "training.max_steps=30"), run20.run_dir, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no such run to resume"):
        train(_cfg(data2d), tmp_path / "nothing", resume=True, progress=False)
    with pytest.raises(ConfigError, match="data.manifest: no dataset given"):
        train(load_config(TINY2D), tmp_path / "nodata", progress=False)
    with pytest.raises(ConfigError, match="divisible by 4"):
        train(_cfg(data2d, "data.size=[30, 30]"), tmp_path / "badsize", progress=False)


def test_training_another_family_into_a_run_is_refused(run20, data2d: Path, tmp_path: Path) -> None:
    """An LDM resume (or one LDM stage) into a finished GAN run refuses before touching it."""
    from medsynth.training import run_training

    run = tmp_path / "gan_run"
    shutil.copytree(run20.run_dir, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    ldm = _cfg(data2d, recipe=ROOT / "configs/tiny/ldm2d.yaml")
    expected = rf"{run}: holds a 'gan' run and this recipe trains a 'ldm' model"
    with pytest.raises(JobError, match=expected):
        run_training(ldm, run, resume=True, progress=False)
    with pytest.raises(JobError, match=expected):
        run_training(ldm, run, stage="autoencoder", progress=False)
    with pytest.raises(JobError, match=expected):
        train(ldm, run, resume=True, stage="autoencoder", progress=False)
    result = CliRunner().invoke(app, ["train", str(ROOT / "configs/tiny/ldm2d.yaml"), "--out", str(run),
                                      "--data", str(data2d), "--resume"])
    assert result.exit_code == 1 and "holds a 'gan' run" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_gan_resume_skips_a_malicious_newest_checkpoint(run20, tmp_path: Path, data2d: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run20.run_dir, run)
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "medsynth-checkpoint", "x": Evil()}, run / "checkpoints/step_00000030.pt")
    with pytest.warns(UserWarning) as caught:
        result = train(_cfg(data2d, "training.max_steps=21"), run, resume=True, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("step_00000030.pt: refused" in m for m in messages)
    assert any("renamed the skipped checkpoint" in m for m in messages)
    assert result.step == 21 and not marker.exists()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000020.pt", "step_00000021.pt", "step_00000030.pt.rejected"]


# ---------------------------------------------------------------------------- CLI


def test_gan_cli_train_and_sample_3d(data3d: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run3d"
    res = runner.invoke(app, ["train", str(TINY3D), "--data", str(data3d), "--out", str(run),
                              "--max-steps", "4", "--set", "training.preview_every=0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "trained 4 steps" in res.output
    # a mask of another shape (odd sizes: padded to the generator's multiple and cropped back)
    label = read_volume(data3d.parent / "labelsTr/phantom_001.nii.gz", kind="label")
    affine = label.affine.copy()
    affine[:3, 3] += [5.0, -3.0, 2.0]
    mask_path = write_volume(tmp_path / "mask.nii.gz", label.array[1:16, 0:13, 2:16], affine, kind="label")
    out = tmp_path / "sample.nii.gz"
    res = runner.invoke(app, ["sample", str(run), "--mask", str(mask_path), "--out", str(out), "--seed", "4"])
    assert res.exit_code == 0, res.output
    img = read_volume(out)
    assert img.shape == (15, 13, 14)
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert np.all(np.isfinite(img.array)) and float(img.array.std()) > 0
    # refusals: existing run without --resume, existing output without --overwrite, no tracebacks
    res = runner.invoke(app, ["train", str(TINY3D), "--data", str(data3d), "--out", str(run)])
    assert res.exit_code == 1 and "run folder exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["sample", str(run), "--mask", str(mask_path), "--out", str(out)])
    assert res.exit_code == 1 and "--overwrite" in res.output


def test_gan_invalid_data_refused_before_training(data2d: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(data2d.parent, bad)
    img = read_volume(bad / "imagesTr/phantom_001.nii.gz")
    arr = img.array.astype(np.float32)
    arr[3, 4] = np.nan
    import nibabel as nib

    nib.save(nib.Nifti1Image(arr, img.affine), str(bad / "imagesTr/phantom_001.nii.gz"))
    lab = read_volume(bad / "labelsTr/phantom_002.nii.gz", kind="label")
    write_volume(bad / "labelsTr/phantom_002.nii.gz", lab.array[:30, :30], lab.affine, kind="label")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(TINY2D), "--data", str(bad / "dataset.json"), "--out", str(run)])
    assert res.exit_code == 1
    assert "phantom_001" in res.output and "NaN" in res.output
    assert "phantom_002" in res.output and "shape" in res.output
    assert "Traceback" not in res.output
    assert not run.exists()


# ---------------------------------------------------------------------------- losses and options


def test_gan_perceptual_loss_needs_local_file(data2d: Path, tmp_path: Path) -> None:
    from monai.networks.nets import resnet
    from safetensors.torch import save_file

    with pytest.raises(ConfigError, match="weights_path: .*missing.safetensors: file not found"):
        missing = f"model.loss.perceptual.weights_path={tmp_path}/missing.safetensors"
        train(_cfg(data2d, "model.loss.perceptual.weight=1", missing), tmp_path / "r0", progress=False)
    bias, shortcut = resnet.get_medicalnet_pretrained_resnet_args(10)
    net = resnet.resnet10(spatial_dims=2, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
                          bias_downsample=bias)
    save_file({f"module.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "r10.safetensors"))
    cfg = _cfg(data2d, "model.loss.perceptual.weight=1", f"model.loss.perceptual.weights_path={tmp_path}/r10.safetensors",
               "training.max_steps=2", "training.preview_every=0")
    result = train(cfg, tmp_path / "r1", progress=False)
    assert result.losses["g_perceptual"] > 0 and np.isfinite(result.losses["g_perceptual"])


def test_gan_class_conditioning(data2d: Path, tmp_path: Path) -> None:
    from medsynth.synthesis.synthesizer import Synthesizer

    spec = json.loads(data2d.read_text())
    for i, entry in enumerate(spec["training"]):
        entry["modality"] = "T1" if i % 2 == 0 else "T2"
    manifest = data2d.parent / "classes.json"
    manifest.write_text(json.dumps(spec))
    cfg = _cfg(manifest, "data.class_key=modality", "training.max_steps=3", "training.preview_every=0",
               "model.loss.adversarial=lsgan")
    train(cfg, tmp_path / "run", progress=False)
    synth = Synthesizer.from_run(tmp_path / "run")
    assert synth.info.classes == ["T1", "T2"]
    mask = read_volume(data2d.parent / "labelsTr/phantom_000.nii.gz", kind="label").array
    t1, t2 = synth.generate(mask, 0, class_value="T1"), synth.generate(mask, 0, class_value="T2")
    assert not np.array_equal(t1, t2)
    with pytest.raises(ConfigError, match="pass class_value"):
        synth.generate(mask, 0)
    with pytest.raises(ConfigError, match="not one of the run's classes"):
        synth.generate(mask, 0, class_value="CT")


# ---------------------------------------------------------------------------- torchrun


def test_gan_torchrun_two_ranks_end_with_equal_weights(data2d: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import hashlib, os, sys
        import torch
        torch.set_num_threads(1)
        from medsynth.config import load_config
        from medsynth.training.engine import train
        cfg = load_config({str(TINY2D)!r}, ["data.manifest={data2d}", "training.max_steps=4",
                          "training.batch_size=2", "training.preview_every=0", "training.checkpoint_every=4"])
        result = train(cfg, {str(tmp_path / "run")!r}, progress=False)
        h = hashlib.sha256()
        for name, module in sorted(result.family.modules.items()):
            for k, v in sorted(module.state_dict().items()):
                h.update(k.encode()); h.update(v.detach().contiguous().numpy().tobytes())
        rank = int(os.environ["RANK"])
        open(os.path.join({str(tmp_path)!r}, f"rank{{rank}}.sha"), "w").write(h.hexdigest())
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "--master_addr=127.0.0.1", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sums = [(tmp_path / f"rank{r}.sha").read_text() for r in (0, 1)]
    assert sums[0] == sums[1]
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and (run / "checkpoints/step_00000004.pt").exists()
    train_recs = _records(run, "train")  # rank 0 writes, once per log
    assert [r["step"] for r in train_recs] == [4]
    evals = _records(run, "eval")
    assert evals[-1]["l1"] < evals[0]["l1"]


def test_fill_and_residual_add_stay_float32_under_autocast() -> None:
    """Under bf16 autocast (as in training with amp) a fresh residual generator returns its fill in
    float32, equal to the fill painted by hand from the label means; bf16 would round them to ~3 digits."""
    from medsynth.models.gan import SpadeGenerator

    means = [[0.1234567, 0.7654321]]
    gen = SpadeGenerator(2, 2, 1, [8, 8], 4, 8, num_labels=2, fill="residual", label_means=means)
    cond = torch.zeros(2, 2, 8, 8)
    cond[:, 0, :, :5] = 1.0
    cond[:, 1, :, 5:] = 1.0
    noise = torch.randn(2, *gen.noise_shape([8, 8]), generator=torch.Generator().manual_seed(0))
    hand = torch.where(cond[:, 1:2] > 0, 0.7654321, 0.1234567) * 2.0 - 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fill = gen.fill_of(cond)
        out = gen(cond, noise)
    assert fill.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, hand, rtol=0, atol=1e-6)
    torch.testing.assert_close(gen(cond, noise), out, rtol=0, atol=0)  # inference in fp32: the same image
