"""Tiled GAN inference: tiles with the volume's norm statistics equal the whole-volume forward, and
the blend leaves no seam; a batch of masks equals generating them one by one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from medsynth.config import load_config
from medsynth.data.loader import one_hot
from medsynth.data.nifti import read_volume
from medsynth.errors import ConfigError, DataError
from medsynth.models.gan import SpadeGenerator
from medsynth.synthesis.synthesizer import Synthesizer
from medsynth.synthesis.tiling import TileSettings, plan_tiles, receptive_radius, tiled_forward
from medsynth.training.engine import train

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 64)
LABELS = 4


def _tiny_generator() -> SpadeGenerator:
    """The tiny 3D recipe's generator (channels [16, 8], noise 4, hidden 8), random weights, no fill:
    every instance norm matters."""
    torch.manual_seed(0)
    return SpadeGenerator(3, LABELS, 1, [16, 8], 4, 8, num_labels=LABELS, fill="none").eval()


def _inputs(net: SpadeGenerator) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, LABELS, (1, 4, 4, 16), generator=g)
    index = blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return index, torch.randn((1, *net.noise_shape(SHAPE)), generator=g)


def _forward(net: SpadeGenerator, index: torch.Tensor, noise: torch.Tensor, settings: TileSettings | None) -> np.ndarray:
    def run(box: tuple[slice, ...]) -> torch.Tensor:
        crop = tuple(slice(b.start * m // n, b.stop * m // n) for b, m, n in zip(box, noise.shape[2:], SHAPE))
        return net(one_hot(index[(slice(None),) + box], LABELS), noise[(slice(None), slice(None)) + crop])

    with torch.no_grad():
        if settings is None:
            return run(tuple(slice(0, s) for s in SHAPE))[0, 0].numpy()
        radius = receptive_radius(len(net.blocks), net.fill_sigma)
        return tiled_forward(net, run, SHAPE, net.factor, settings, radius)[0, 0].numpy()


def _seam(image: np.ndarray, planes: list[int]) -> float:
    """Mean |gradient| along the tiled axis (the last) between plane p and p + 1, over ``planes``."""
    grad = np.abs(np.diff(image, axis=-1))
    return float(grad[..., planes].mean())


def test_tiled_equals_whole_and_leaves_no_seam() -> None:
    net = _tiny_generator()
    index, noise = _inputs(net)
    whole = _forward(net, index, noise, None)
    radius = receptive_radius(len(net.blocks), 0.0)
    assert radius == 14  # hand count: conv_out 1, block 1 (s=1) 3, block 0 (s=2) 6, conv_in + cell 4
    settings = TileSettings(max_voxels=48**3, blend=8)
    plan = plan_tiles(SHAPE, net.factor, settings, radius)
    assert len(plan.boxes) == 3 and all(b[-1].stop - b[-1].start == 48 for b in plan.boxes)
    tiled = _forward(net, index, noise, settings)
    # 1. the volume's statistics and a halo of the receptive radius: equal up to float rounding
    assert float(np.abs(tiled - whole).max()) < 1e-4
    assert structural_similarity(tiled, whole, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False) > 0.9999
    # 2. no seam: across the blend zones the gradient is the whole volume's there (not above the interior's),
    # and the error field does not jump
    zones = [p for b in plan.boxes[1:] for p in range(b[-1].start + 14, b[-1].start + 22)]
    assert _seam(tiled, zones) <= _seam(whole, zones) + 1e-5
    assert _seam(tiled, zones) <= float(np.abs(np.diff(tiled, axis=-1)).mean(axis=(0, 1)).max())
    assert _seam(tiled - whole, zones) < 1e-5
    # 3. the measurement can fail: per-tile statistics with no halo and no blend leave seams where a
    # tile's border enters (tile 1 starts at 16, tile 0 ends at 48): the error jumps there
    crude = TileSettings(max_voxels=48**3, halo=0, blend=0, norm_stats="tile")
    bad = _forward(net, index, noise, crude)
    assert float(np.abs(bad - whole).max()) > 1e-2
    others = [p for p in range(SHAPE[-1] - 1) if p not in (15, 47)]
    assert _seam(bad - whole, [15, 47]) > 5 * _seam(bad - whole, others)
    # per-tile statistics alone, with halo and blend: close, but not equal (the reason for volume statistics)
    blended = _forward(net, index, noise, dataclasses.replace(settings, norm_stats="tile"))
    assert 1e-4 < float(np.abs(blended - whole).max()) < 0.5


def test_tile_settings_refuse_tiles_too_small() -> None:
    with pytest.raises(ConfigError, match="halo of 14"):
        plan_tiles(SHAPE, 2, TileSettings(max_voxels=32**3), 14)
    with pytest.raises(ConfigError, match="norm_stats"):
        TileSettings(norm_stats="global")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def run3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medsynth.data.phantoms import make_phantom_dataset

    base = tmp_path_factory.mktemp("tile3d")
    manifest = make_phantom_dataset(base / "data", dim=3, cases=2, size=16, seed=0)
    cfg = load_config(ROOT / "configs/tiny/gan3d.yaml", [f"data.manifest={manifest}", "training.max_steps=2",
                                                         "training.preview_every=0"])
    train(cfg, base / "run", progress=False)
    return base / "run", manifest.parent


def test_synthesizer_tiles_large_volumes_and_batches(run3d: tuple[Path, Path]) -> None:
    run, data = run3d
    label = read_volume(data / "labelsTr/phantom_000.nii.gz", kind="label").array
    long_mask = np.concatenate([label, label[:, :, ::-1], label, label[:, ::-1]], axis=2)[:, :, :60]  # 16x16x60
    whole = Synthesizer.from_run(run, device="cpu").generate(long_mask, seed=3)
    tiles = Synthesizer.from_run(run, device="cpu", tile_voxels=48**3)
    assert tiles.backend.tiling.max_voxels == 48**3  # type: ignore[attr-defined]
    tiled = tiles.generate(long_mask, seed=3)
    assert tiled.shape == long_mask.shape
    span = float(whole.max() - whole.min())
    assert float(np.abs(tiled - whole).max()) < 1e-4 * span
    # a batch: a list or a (B, X, Y, Z) array, equal to one by one (one seed per mask, or one for all)
    synth = Synthesizer.from_run(run, device="cpu")
    masks = [label, label[::-1].copy(), label[:, ::-1].copy()]
    batch = synth.generate(masks, seed=[5, 6, 7])
    assert batch.shape == (3, *label.shape)
    for b, (m, s) in enumerate(zip(masks, [5, 6, 7])):
        np.testing.assert_allclose(batch[b], synth.generate(m, seed=s), rtol=0, atol=1e-5 * span)
    same_seed = synth.generate(np.stack(masks), seed=5)
    np.testing.assert_allclose(same_seed[0], batch[0], rtol=0, atol=1e-5 * span)
    np.testing.assert_allclose(same_seed[1], synth.generate(masks[1], seed=5), rtol=0, atol=1e-5 * span)
    with pytest.raises(DataError, match="share one shape"):
        synth.generate([label, label[:8]], seed=0)
    with pytest.raises(ConfigError, match="one seed per mask"):
        synth.generate(masks, seed=[1, 2])


def test_batch_with_per_case_appearance_equals_one_by_one(tmp_path: Path) -> None:
    """A run with a per-case fill draws each mask's appearance from its own seed, in a batch as alone."""
    from medsynth.data.phantoms import make_phantom_dataset

    manifest = make_phantom_dataset(tmp_path / "data", dim=2, cases=4, size=32, seed=0)
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml", [
        f"data.manifest={manifest}", "training.max_steps=2", "training.preview_every=0",
        "model.generator.level_noise=true", "model.generator.appearance=per_case"])
    train(cfg, tmp_path / "run", progress=False)
    synth = Synthesizer.from_run(tmp_path / "run", device="cpu")
    label = read_volume(manifest.parent / "labelsTr/phantom_000.nii.gz", kind="label").array
    masks = [label, label[::-1].copy()]
    batch = synth.generate(masks, seed=[1, 2])
    for b, s in enumerate([1, 2]):
        np.testing.assert_allclose(batch[b], synth.generate(masks[b], seed=s), rtol=0, atol=1e-4)
    assert not np.allclose(batch[0], synth.generate(masks[0], seed=2), atol=1e-3)  # the seed matters
