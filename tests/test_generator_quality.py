"""Generators that follow the mask: a trained latent diffusion model moves its structure with the
mask, one trained without its condition is caught by QC and by the end-of-training yardstick, whose
numbers are recomputed here from the files."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from medsynth.config import load_config
from medsynth.data.nifti import read_volume, write_volume
from medsynth.synthesis.qc import LabelIntensityStats, check_label_agreement

TINY_LDM = Path(__file__).resolve().parents[1] / "configs/tiny/ldm2d.yaml"
SIZE = 24
BRIGHT, DARK = 200.0, 40.0


def square_mask(y: int, x: int) -> np.ndarray:
    lab = np.zeros((SIZE, SIZE), np.uint8)
    lab[y : y + 8, x : x + 8] = 1
    return lab


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 cases of 24x24: a bright 8x8 square (label 1) at a random place on a dark background."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(12):
        lab = square_mask(*(int(v) for v in rng.integers(2, SIZE - 10, 2)))
        img = np.where(lab == 1, BRIGHT, DARK) + rng.normal(0, 3, lab.shape)
        write_volume(root / f"imagesTr/c{i:02d}.nii.gz", img.astype(np.float32), np.eye(4), kind="image")
        write_volume(root / f"labelsTr/c{i:02d}.nii.gz", lab, np.eye(4), kind="label")
        entries.append({"image": f"imagesTr/c{i:02d}.nii.gz", "label": f"labelsTr/c{i:02d}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "squares", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "square"},
        "numTraining": len(entries), "training": entries}))
    return root / "dataset.json"


def _train(data: Path, out: Path, cond_dropout: float) -> list[warnings.WarningMessage]:
    """The tiny 2D latent diffusion recipe without the fill (the UNet must learn the mask itself)."""
    from medsynth.training import run_training

    cfg = load_config(TINY_LDM, [
        f"data.manifest={data}", f"data.size=[{SIZE},{SIZE}]", "model.fill=none",
        f"model.diffusion.cond_dropout={cond_dropout}", "model.autoencoder.channels=[8,16]",
        "model.diffusion.channels=[16,32]", "model.autoencoder.adv_weight=0", "model.autoencoder.max_steps=30",
        "model.diffusion.max_steps=100", "training.max_steps=100", "training.preview_every=0",
        "training.checkpoint_every=100", "training.log_every=50"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(cfg, out, progress=False)
    return caught


@pytest.fixture(scope="module")
def conditioned(squares: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    run = tmp_path_factory.mktemp("cond") / "run"
    return run, _train(squares, run, cond_dropout=0.1)


@pytest.fixture(scope="module")
def unconditioned(squares: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Trained with every condition dropped: it never learns what the mask means."""
    run = tmp_path_factory.mktemp("uncond") / "run"
    return run, _train(squares, run, cond_dropout=1.0)


def _bright_centre(image: np.ndarray) -> np.ndarray:
    """Centre of mass of the intensity above the midpoint of the two tissue intensities."""
    w = np.clip(image - (BRIGHT + DARK) / 2, 0, None)
    grid = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(w * g).sum() / w.sum() for g in grid])


def test_shifting_the_mask_shifts_the_generated_structure(conditioned) -> None:
    from medsynth.synthesis.synthesizer import Synthesizer

    synth = Synthesizer.from_run(conditioned[0], device="cpu")
    for seed in (0, 1):
        centres = [_bright_centre(synth.generate(square_mask(4 + dy, 6), seed=seed)) for dy in (0, 8)]
        moved = centres[1] - centres[0]
        assert abs(moved[0] - 8) < 2 and abs(moved[1]) < 1.5, (seed, centres)
        assert abs(centres[0][0] - 7.5) < 2  # and it sits on the square (rows 4..11)


def test_qc_rejects_an_unconditioned_model_and_passes_real_images(unconditioned, squares: Path) -> None:
    from medsynth.runcard import read_run_card
    from medsynth.synthesis.synthesizer import Synthesizer

    run, _ = unconditioned
    reference = LabelIntensityStats.from_info(read_run_card(run).data)
    synth = Synthesizer.from_run(run, device="cpu")
    for i, (y, x) in enumerate([(2, 2), (12, 12), (2, 14), (14, 3)]):
        mask = square_mask(y, x)
        result = check_label_agreement(synth.generate(mask, seed=i), mask, reference)
        assert not result.passed and result.reasons, result
    image = read_volume(squares.parent / "imagesTr/c00.nii.gz", kind="image").array
    mask = read_volume(squares.parent / "labelsTr/c00.nii.gz", kind="label").array
    assert check_label_agreement(image, mask, reference).passed


def test_the_yardstick_is_recorded_recomputable_and_warns(conditioned, unconditioned, squares: Path) -> None:
    from medsynth.synthesis.synthesizer import Synthesizer

    for run, caught in (conditioned, unconditioned):
        card = json.loads((run / "model_card.json").read_text())
        y = card["yardstick"]
        # no labelled test cases: the last 4 training cases, not held out
        assert y["held_out"] is False and y["cases"] == ["c08", "c09", "c10", "c11"] and y["items"] == 4
        norm = card["data"]["normalization"]
        lo, hi = norm["lo"][0], norm["hi"][0]
        images = [read_volume(squares.parent / f"imagesTr/c{i:02d}.nii.gz", kind="image").array for i in range(12)]
        masks = [read_volume(squares.parent / f"labelsTr/c{i:02d}.nii.gz", kind="label").array for i in range(12)]
        units = [np.clip((im - lo) / (hi - lo), 0, 1) for im in images]
        means = [np.mean(np.concatenate([u[m == v] for u, m in zip(units, masks)])) for v in (0, 1)]
        synth = Synthesizer.from_run(run, device="cpu")
        fill_s, fill_p, model_s, model_p = [], [], [], []
        for u, m in zip(units[8:], masks[8:]):
            fill = np.where(m == 1, means[1], means[0])
            fake = np.clip((synth.generate(m, seed=0) - lo) / (hi - lo), 0, 1)
            for out_s, out_p, img in ((fill_s, fill_p, fill), (model_s, model_p, fake)):
                out_s.append(structural_similarity(u, img, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                                   use_sample_covariance=False))
                out_p.append(10 * np.log10(1.0 / np.mean((u - img) ** 2)))
        assert y["fill_ssim"] == pytest.approx(np.mean(fill_s), abs=1e-4)
        assert y["fill_psnr"] == pytest.approx(np.mean(fill_p), abs=1e-2)
        assert y["model_ssim"] == pytest.approx(np.mean(model_s), abs=1e-4)
        assert y["model_psnr"] == pytest.approx(np.mean(model_p), abs=1e-2)
        assert y["beats_fill"] == (y["model_ssim"] > y["fill_ssim"] and y["model_psnr"] > y["fill_psnr"])
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["model_psnr"] for r in logged if r["kind"] == "yardstick"] == [y["model_psnr"]]
        said = [str(w.message) for w in caught if "label-mean fill" in str(w.message)]
        assert bool(said) == (not y["beats_fill"]) and all("does NOT beat" in s for s in said)
        # the autoencoder's check on the same items, before the diffusion stage
        (heldout,) = [r for r in logged if r["kind"] == "heldout"]
        assert heldout["stage"] == "autoencoder" and heldout["heldout_items"] == 4
        assert card["model"]["heldout_recon_psnr"] == heldout["heldout_recon_psnr"]
    assert json.loads((unconditioned[0] / "model_card.json").read_text())["yardstick"]["beats_fill"] is False


def test_3d_crops_favour_the_foreground(tmp_path: Path) -> None:
    """A 40^3 volume with a 6^3 foreground cube: a uniform 12^3 crop holds foreground with probability
    (6 + 12 - 1)^3 / (40 - 12 + 1)^3 = 0.20; two thirds of the crops are drawn around a foreground
    voxel, so about 2/3 + 1/3 * 0.20 = 0.73 of them do."""
    from medsynth.config import DataConfig
    from medsynth.data.loader import build_training_data
    from medsynth.data.manifest import read_manifest

    lab = np.zeros((40, 40, 40), np.uint8)
    lab[5:11, 28:34, 17:23] = 1
    img = np.where(lab == 1, BRIGHT, DARK).astype(np.float32)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    write_volume(tmp_path / "imagesTr/c.nii.gz", img, np.eye(4), kind="image")
    write_volume(tmp_path / "labelsTr/c.nii.gz", lab, np.eye(4), kind="label")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "cube", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "cube"}, "numTraining": 1,
        "training": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz"}]}))
    cfg = DataConfig(dim=3, size=[12, 12, 12], ct_window=(0.0, 255.0))
    data = build_training_data(read_manifest(tmp_path / "dataset.json"), cfg, seed=0)
    hits = [bool((data.sample(g)["label_index"] > 0).any()) for g in range(300)]
    assert 0.63 < np.mean(hits) < 0.83, np.mean(hits)


def test_the_partial_volume_width_is_fitted_on_the_training_images(tmp_path: Path) -> None:
    """Images made as a label map's intensities blurred by sigma 1.0 (in-plane): the loader's width is
    the candidate whose blurred label-mean fill is nearest the images (recomputed here), near 1.0;
    the label means it stores are the images' own per-label means."""
    from scipy.ndimage import gaussian_filter

    from medsynth.config import DataConfig
    from medsynth.data.loader import build_training_data
    from medsynth.data.manifest import read_manifest

    rng = np.random.default_rng(3)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    entries, images, labels = [], [], []
    for i in range(3):
        lab = np.zeros((32, 32, 6), np.uint8)
        for _ in range(4):
            y, x = rng.integers(0, 24, 2)
            lab[y : y + 8, x : x + 8] = rng.integers(1, 3)
        img = gaussian_filter(np.array([10.0, 200.0, 120.0])[lab], (1.0, 1.0, 0.0), mode="nearest")
        write_volume(tmp_path / f"imagesTr/c{i}.nii.gz", img.astype(np.float32), np.eye(4), kind="image")
        write_volume(tmp_path / f"labelsTr/c{i}.nii.gz", lab, np.eye(4), kind="label")
        entries.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
        images.append(img)
        labels.append(lab)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "blur", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": 3, "training": entries}))
    cfg = DataConfig(dim=2, size=[32, 32], slice_axis=2, ct_window=(0.0, 250.0))
    info = build_training_data(read_manifest(tmp_path / "dataset.json"), cfg, seed=0).info
    values = np.concatenate([im.ravel() for im in images]) / 250.0
    index = np.concatenate([lab.ravel() for lab in labels])
    means = np.array(info.label_means[0])
    errors = {s: sum(np.mean((gaussian_filter(means[lab], (s, s, 0), mode="nearest") - im / 250.0) ** 2)
                     for im, lab in zip(images, labels)) for s in np.arange(9) * 0.25}
    assert info.fill_sigma == min(errors, key=errors.get)
    assert abs(info.fill_sigma - 1.0) <= 0.25
    np.testing.assert_allclose(info.label_means[0], [values[index == v].mean() for v in range(3)], rtol=1e-5)
    np.testing.assert_allclose(info.label_stds[0], [values[index == v].std() for v in range(3)], rtol=1e-4)
