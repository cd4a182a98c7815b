"""The data path without copies and the losses without a sync per step: crops equal crops of the
padded volume, training batches are unchanged with one-hot made on the device, cases stay float32,
and metrics.jsonl holds the mean of the per-step losses as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medsynth.training.engine as engine
from medsynth.config import load_config
from medsynth.data.loader import (
    FOREGROUND_CROPS,
    build_training_data,
    crop_padded,
    make_loader,
    pad_to,
    with_one_hot,
)
from medsynth.data.manifest import read_manifest
from medsynth.errors import JobError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("sync") / "p3", dim=3, cases=2, size=16, seed=4)


def test_crop_padded_equals_crop_of_padded_array() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        shape = tuple(int(n) for n in rng.integers(3, 12, size=3))
        size = [int(s) for s in rng.integers(2, 14, size=3)]
        arr = rng.normal(size=(2, *shape)).astype(np.float32)
        padded = pad_to(arr, size, -1.0)
        starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(padded.shape[1:], size)]
        want = padded[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(starts, size))]
        np.testing.assert_array_equal(crop_padded(arr, starts, size, -1.0), want)


def _old_draw(data, case_idx: int, g: int) -> dict[str, np.ndarray]:
    """TrainingData.draw as it was: pad the whole volume, then crop (3D data)."""
    case, info = data.cases[case_idx], data.info
    rng = np.random.default_rng([data.seed, 2, g])
    shape = case.index.shape
    image, index = pad_to(case.image, info.size, 0.0), pad_to(case.index, info.size, 0)
    if len(case.fg_voxels) and rng.random() < FOREGROUND_CROPS:
        voxel = case.fg_voxels[rng.integers(len(case.fg_voxels))]
        offset = [max(0, s - n) // 2 for n, s in zip(shape, info.size)]
        starts = [int(np.clip(v + o - rng.integers(0, s), 0, n - s)) for v, o, s, n in zip(voxel, offset, info.size, index.shape)]
    else:
        starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(index.shape, info.size)]
    sl = tuple(slice(a, a + s) for a, s in zip(starts, info.size))
    return {"image": image[(slice(None),) + sl], "label_index": index[sl].astype(np.int64)}


def test_crops_and_batches_unchanged(data3d: Path) -> None:
    cfg = load_config(None, ["data.size=[8, 24, 16]"])  # axis 1 shorter than the crop: padded
    data = build_training_data(read_manifest(data3d), cfg.data, seed=3)
    assert all(c.image.dtype == np.float32 for c in data.cases)  # no float64 case in memory
    for g in range(12):
        new, old = data.sample(g), _old_draw(data, data.case_for(g), g)
        np.testing.assert_array_equal(new["image"].numpy(), old["image"])
        np.testing.assert_array_equal(new["label_index"].numpy(), old["label_index"])
    # the training loader's batches carry no one-hot; made on the device they equal collate's
    loader = make_loader(data, start_step=0, max_steps=2, batch_size=3)
    for step, batch in enumerate(loader):
        assert "label" not in batch
        want = data.collate([data.sample(g) for g in range(step * 3, step * 3 + 3)])
        got = with_one_hot(batch, data.info.num_labels)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert got["label"].dtype == torch.float32


def test_metrics_are_the_mean_of_per_step_losses(data3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    manifest = make_phantom_dataset(tmp_path / "p2", dim=2, cases=2, size=32, seed=0)
    steps: list[dict[str, float]] = []
    add = engine.add_losses

    def recording(sums, losses, device):  # type: ignore[no-untyped-def]
        steps.append({k: float(v) for k, v in losses.items()})  # what the engine logged per step before
        add(sums, losses, device)

    monkeypatch.setattr(engine, "add_losses", recording)
    over = [f"data.manifest={manifest}", "training.max_steps=5", "training.log_every=2",
            "training.preview_every=0", "training.checkpoint_every=5"]
    engine.train(load_config(ROOT / "configs/tiny/gan2d.yaml", over), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 5] and len(steps) == 5
    for rec, (a, b) in zip(train, [(0, 2), (2, 4), (4, 5)]):
        for k in steps[0]:
            assert rec[k] == pytest.approx(sum(s[k] for s in steps[a:b]) / (b - a), rel=1e-12, abs=1e-15)

    # divergence is still caught, at the next sync (here the log at step 2)
    def diverging(sums, losses, device):  # type: ignore[no-untyped-def]
        add(sums, {k: float("nan") for k in losses}, device)

    monkeypatch.setattr(engine, "add_losses", diverging)
    with pytest.raises(JobError, match="diverged by step 2"):
        engine.train(load_config(ROOT / "configs/tiny/gan2d.yaml", over), tmp_path / "run2", progress=False)
