"""Training data: normalisation, one-hot labels, slices/patches, and a data order that is a function of
(seed, step) and shards by rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import load_config
from medsynth.data.loader import Normalization, StepBatchSampler, build_training_data, one_hot
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume
from medsynth.errors import DataError


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("d3") / "p3", dim=3, cases=3, size=16, seed=2)


def _data(manifest: Path, *overrides: str, seed: int = 0):
    cfg = load_config(None, [*overrides])
    return build_training_data(read_manifest(manifest), cfg.data, seed=seed)


def test_engine_data_order_is_a_function_of_seed_and_index(data3d: Path) -> None:
    a = _data(data3d, "data.size=[8, 8, 8]")
    b = _data(data3d, "data.size=[8, 8, 8]")
    for g in (0, 1, 7, 1000):
        sa, sb = a.sample(g), b[g]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    n = len(a)
    for epoch in range(3):  # each epoch visits every case once, in a seeded order
        assert sorted(a.case_for(epoch * n + i) for i in range(n)) == list(range(n))
    other = _data(data3d, "data.size=[8, 8, 8]", seed=1)
    assert any(not torch.equal(a.sample(g)["image"], other.sample(g)["image"]) for g in range(6))
    assert a.sample(0)["image"].shape == (1, 8, 8, 8) and a.sample(0)["label_index"].dtype == torch.int64


def test_engine_data_rank_shards_cover_the_global_batch() -> None:
    single = list(StepBatchSampler(3, 6, batch_size=4, rank=0, world_size=1))
    r0 = list(StepBatchSampler(3, 6, batch_size=2, rank=0, world_size=2))
    r1 = list(StepBatchSampler(3, 6, batch_size=2, rank=1, world_size=2))
    assert len(single) == len(r0) == 3
    for s, a, b in zip(single, r0, r1):
        assert sorted(a + b) == s and not set(a) & set(b)
    assert single[0] == [12, 13, 14, 15]  # step 3 of a global batch of 4


def test_engine_data_slices_from_volumes_along_the_axis(data3d: Path) -> None:
    data = _data(data3d, "data.dim=2", "data.size=[16, 16]", "data.slice_axis=0")
    for g in range(6):
        s = data.sample(g)
        assert s["image"].shape == (1, 16, 16)
        case = data.cases[data.case_for(g)]
        # the slice equals the volume's slice k along axis 0 for some k with foreground
        matches = [k for k in range(16) if np.array_equal(case.index[k], s["label_index"].numpy())
                   and np.array_equal(case.image[0, k], s["image"][0].numpy())]
        assert matches and (s["label_index"] != 0).any()


def test_engine_data_normalisation_and_one_hot(data3d: Path) -> None:
    ct = Normalization("ct_window", [-100.0], [100.0])
    x = np.array([[-200.0, -100.0, 0.0, 50.0, 300.0]])
    np.testing.assert_allclose(ct.to_unit(x), [[0.0, 0.0, 0.5, 0.75, 1.0]])
    np.testing.assert_allclose(ct.from_unit(np.array([[0.0, 0.25, 1.0]])), [[-100.0, -50.0, 100.0]])
    data = _data(data3d, "data.size=[16, 16, 16]", "data.mri_percentiles=[1, 99]")
    cases = read_manifest(data3d).cases
    images = [read_volume(c.images[0]).array for c in cases]
    labels = [read_volume(c.label, kind="label").array for c in cases]
    # the upper MRI percentile on the foreground (label > 0): background air does not pull it down; the lower
    # over every voxel, so the background stays the darkest value
    lo = np.percentile(np.concatenate([a.ravel() for a in images]), 1)
    hi = np.percentile(np.concatenate([a[lab > 0] for a, lab in zip(images, labels)]), 99)
    assert data.info.normalization.lo[0] == pytest.approx(lo) and data.info.normalization.hi[0] == pytest.approx(hi)
    assert all(c.image.min() >= 0.0 and c.image.max() <= 1.0 for c in data.cases)
    idx = torch.tensor([[[0, 2], [1, 2]]])
    want = np.eye(3, dtype=np.float32)[idx.numpy()].transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(one_hot(idx, 3).numpy(), want)
    batch = data.collate([data.sample(0), data.sample(1)])
    assert batch["label"].shape == (2, len(data.info.labels), 16, 16, 16)
    assert torch.equal(batch["label"].argmax(1), batch["label_index"])


def test_engine_data_spacing_and_dimension_checks(data3d: Path, tmp_path: Path) -> None:
    data = _data(data3d, "data.size=[8, 8, 8]", "data.spacing=[2.0, 2.0, 2.4]")  # phantoms: 1 x 1 x 1.2 mm
    assert data.cases[0].image.shape == (1, 8, 8, 8) and data.cases[0].index.shape == (8, 8, 8)
    from medsynth.data.phantoms import make_phantom_dataset

    flat = make_phantom_dataset(tmp_path / "p2", dim=2, cases=2, size=16, seed=0)
    with pytest.raises(DataError, match="data.dim is 3 but the volumes are 2D"):
        _data(flat, "data.size=[8, 8, 8]")
    m = read_manifest(flat)
    m.labels = {0: "background", 1: "skull"}  # the volumes hold more labels than declared
    cfg = load_config(None, ["data.dim=2", "data.size=[16, 16]"])
    with pytest.raises(DataError, match=r"label values \[2, 3"):
        build_training_data(m, cfg.data, seed=0)


@pytest.mark.parametrize(("spacing", "target"), [(1.0, 3.0), (0.5, 1.5), (3.0, 1.0)])
def test_resampled_labels_stay_aligned_with_resampled_images(spacing: float, target: float) -> None:
    """Labels (nearest) and images (linear) sample the same voxel centres: no half-voxel drift."""
    from medsynth.data.loader import resample, target_shape

    n = 30
    index = np.arange(n, dtype=np.float64)
    image = index[None, :, None] * np.ones((1, n, 4))  # value = source voxel index along axis 0
    label = (index[:, None] * np.ones((n, 4))).astype(np.int32)
    shape = target_shape((n, 4), (spacing, 1.0), [target, 1.0])
    img = resample(image, shape, label=False)[0][:, 0]
    lab = resample(label[None], shape, label=True)[0][:, 0]
    # each output label voxel takes the source voxel nearest to where the image sampled
    assert np.all(np.abs(lab - img) <= 0.5 + 1e-9), (lab[:6], img[:6])


def _disk_labels(manifest: Path) -> list[np.ndarray]:
    return [np.asarray(read_volume(c.label, kind="label").array) for c in read_manifest(manifest).cases]


def test_preview_batch_holds_the_middle_foreground_slice_of_whole_cases(data3d: Path) -> None:
    """2D run on 3D volumes: each preview sample is a whole slice (not a crop) of a training case,
    the middle one of the slices with foreground along slice_axis, padded with background to a
    multiple of 32."""
    from medsynth.training.engine import full_size_batch

    data = _data(data3d, "data.dim=2", "data.size=[8, 8]", "data.slice_axis=0")
    batch = full_size_batch(data, 2, 32)
    assert batch["image"].shape == (2, 1, 32, 32) and batch["label"].shape == (2, 7, 32, 32)
    middles = []
    for lab in _disk_labels(data3d):
        fg = np.nonzero((lab != 0).any(axis=(1, 2)))[0]
        middles.append(lab[fg[len(fg) // 2]])
    for j in range(2):
        sample = batch["label_index"][j].numpy()
        inner = sample[8:24, 8:24]  # 16 voxels centred in 32
        assert not sample[:8].any() and not sample[24:].any() and not sample[:, :8].any()
        assert any(np.array_equal(inner, m) for m in middles)
    assert not torch.equal(batch["label_index"][0], batch["label_index"][1])  # two different cases


def test_preview_batch_of_a_3d_run_is_a_slab_through_the_whole_volume(data3d: Path) -> None:
    from medsynth.training.engine import full_size_batch

    data = _data(data3d, "data.size=[8, 8, 8]")
    batch = full_size_batch(data, 1, 8)
    assert batch["image"].shape == (1, 1, 16, 16, 8)  # whole in-plane extent, data.size deep
    sample = batch["label_index"][0].numpy()
    found = [(lab, a) for lab in _disk_labels(data3d) for a in range(9) if np.array_equal(lab[:, :, a:a + 8], sample)]
    assert found
    lab, a = found[0]
    fg = np.nonzero((lab != 0).any(axis=(0, 1)))[0]
    assert fg[0] <= a + 4 <= fg[-1]  # the slab's middle slice (the one previews show) holds foreground
