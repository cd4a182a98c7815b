"""Distribution metrics: hand-computed distances, scikit-image features, SSIM sets, FID from a local file."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy import stats
from skimage.feature import graycomatrix, graycoprops

from medsynth.errors import CheckpointError, DataError
from medsynth.evaluation import distribution as D
from medsynth.evaluation.metrics import ssim


def phantom(rng: np.random.Generator, shape=(24, 26, 22), shift: float = 0.0, noise: float = 20.0):
    """A sphere (label 1) with a core (label 2), intensities ~0..600 plus noise; float32 image, uint8 labels."""
    grid = np.indices(shape, dtype=np.float64)
    centre = np.asarray(shape, dtype=np.float64)[:, None, None, None] / 2 + rng.uniform(-1.5, 1.5, (3, 1, 1, 1))
    r = np.sqrt(((grid - centre) ** 2).sum(0))
    label = np.zeros(shape, np.uint8)
    label[r < 9] = 1
    label[r < 4] = 2
    image = np.select([label == 2, label == 1], [600.0, 300.0], 0.0) + rng.normal(0, noise, shape) + shift * (label > 0)
    return image.astype(np.float32), label


# ------------------------------------------------------------------------------------ distances


def test_frechet_distance_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    assert D.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure mean shift of 1 in every feature: |d mu|^2 = 5, the covariance terms cancel
    assert D.frechet_distance(a, a + 1.0) == pytest.approx(5.0, abs=1e-6)
    # 1D: (mu1 - mu2)^2 + (s1 - s2)^2 with sample standard deviations
    x, y = rng.normal(0, 1, (30, 1)), rng.normal(2, 3, (25, 1))
    hand = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert D.frechet_distance(x, y) == pytest.approx(hand, rel=1e-8)
    # fewer samples than features: singular covariances are handled
    few = rng.normal(size=(4, 10))
    assert math.isfinite(D.frechet_distance(few, few + 0.5))


def test_mmd_by_hand_and_behaviour():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(5, 2))
    sigma = 0.9
    k = lambda u, v: math.exp(-np.sum((u - v) ** 2) / (2 * sigma**2))  # noqa: E731
    kaa = sum(k(a[i], a[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    kbb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    kab = sum(k(u, v) for u in a for v in b) / 30
    assert D.mmd(a, b, bandwidth=sigma) == pytest.approx(kaa + kbb - 2 * kab, rel=1e-10)

    pooled = np.concatenate([a, b])
    dists = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(11) for j in range(i + 1, 11)]
    assert D.median_bandwidth(a, b) == pytest.approx(np.median(dists), rel=1e-10)

    x = rng.normal(size=(60, 4))
    same = D.mmd(x[:30], x[30:])
    shifted = D.mmd(x[:30], x[30:] + 1.5)
    assert abs(same) < 0.05
    assert shifted > 0.3


def test_distance_errors():
    with pytest.raises(DataError, match="at least 2"):
        D.frechet_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(DataError, match="same F"):
        D.mmd(np.ones((3, 3)), np.ones((5, 2)))
    with pytest.raises(DataError, match="NaN"):
        D.frechet_distance(np.full((3, 2), np.nan), np.ones((3, 2)))


# ------------------------------------------------------------------------------------ features


def test_first_order_and_glcm_equal_direct_computation_2d():
    rng = np.random.default_rng(2)
    image = rng.normal(100.0, 25.0, (30, 34)).astype(np.float32)
    label = np.ones(image.shape, np.uint8)  # the whole image as region 1
    lo, hi = 0.0, 200.0
    fs = D.radiomic_features([image], [label], regions=[1], intensity_range=(lo, hi), levels=16)
    got = dict(zip(fs.names, fs.values[0]))
    v = image.astype(np.float64).ravel()
    assert got["label1_mean"] == pytest.approx(v.mean())
    assert got["label1_std"] == pytest.approx(v.std())
    assert got["label1_skewness"] == pytest.approx(stats.skew(v), abs=1e-9)
    assert got["label1_kurtosis"] == pytest.approx(stats.kurtosis(v), abs=1e-9)
    assert got["label1_p90"] == pytest.approx(np.percentile(v, 90))
    assert got["label1_energy"] == pytest.approx(np.mean(v * v))
    hist, _ = np.histogram(np.clip(v, lo, hi - 1e-9), bins=16, range=(lo, hi))
    p = hist[hist > 0] / hist.sum()
    assert got["label1_entropy"] == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-9)
    q = np.clip(np.floor((image.astype(np.float64) - lo) / (hi - lo) * 16), 0, 15).astype(np.uint8)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = graycomatrix(q, [1], angles, levels=16, symmetric=True, normed=True)
    for prop in ("contrast", "homogeneity", "energy", "correlation", "dissimilarity"):
        assert got[f"label1_glcm_{prop}"] == pytest.approx(graycoprops(glcm, prop).mean(), rel=1e-9)


def test_features_3d_regions_and_foreground():
    rng = np.random.default_rng(3)
    image, label = phantom(rng)
    fs = D.radiomic_features([image], [label], regions=[1, 2], intensity_range=(-100.0, 700.0), slices_per_plane=2)
    assert fs.values.shape == (1, 28) and len(fs.names) == 28
    assert fs.names[0] == "label1_mean" and fs.names[14] == "label2_mean"
    assert np.all(np.isfinite(fs.values))
    got = dict(zip(fs.names, fs.values[0]))
    assert got["label2_mean"] == pytest.approx(float(image[label == 2].mean()), rel=1e-6)
    fg = D.radiomic_features([image], intensity_range=(-100.0, 700.0))
    assert fg.regions is None and fg.values.shape == (1, 14) and fg.names[0] == "fg_mean"
    with pytest.raises(DataError, match="region 3 has no voxels"):
        D.radiomic_features([image], [label], regions=[3], intensity_range=(0.0, 1.0))
    with pytest.raises(DataError, match="intensity_range"):
        D.radiomic_features([image], intensity_range=(5.0, 5.0))


def test_compare_radiomics_self_shifted_and_regions():
    rng = np.random.default_rng(4)
    ref = [phantom(rng) for _ in range(8)]
    same = [phantom(rng) for _ in range(8)]
    shifted = [phantom(rng, shift=150.0) for _ in range(8)]
    imgs = lambda s: [i for i, _ in s]  # noqa: E731
    labs = lambda s: [lab for _, lab in s]  # noqa: E731
    self_cmp = D.compare_radiomics(imgs(ref), imgs(ref), labs(ref), labs(ref))
    assert self_cmp.regions == [1, 2] and self_cmp.n_features == 28
    assert self_cmp.frechet_distance == pytest.approx(0.0, abs=1e-6)
    near = D.compare_radiomics(imgs(ref), imgs(same), labs(ref), labs(same))
    far = D.compare_radiomics(imgs(ref), imgs(shifted), labs(ref), labs(shifted))
    assert far.frechet_distance > 5 * near.frechet_distance
    assert far.mmd2 > near.mmd2 + 0.2
    d = far.to_dict()
    assert "reference_z" not in d and d["n_features"] == 28
    # reference features are z-normalised: mean 0 per feature (std 1 where not constant)
    np.testing.assert_allclose(far.reference_z.mean(axis=0), 0.0, atol=1e-9)


# ------------------------------------------------------------------------------------ SSIM sets


def test_pairwise_ssim_equals_ssim_and_memorisation_flags_a_copy():
    rng = np.random.default_rng(5)
    train = [phantom(rng)[0] for _ in range(3)]
    synthetic = [train[1].copy(), phantom(rng, noise=80.0)[0], phantom(rng, shape=(20, 20, 20))[0]]
    table = D.pairwise_ssim(synthetic, train, data_range=700.0)
    assert table.shape == (3, 3)
    for i in range(2):
        for j in range(3):
            assert table[i, j] == pytest.approx(ssim(synthetic[i], train[j], data_range=700.0), abs=1e-5)
    assert np.all(np.isnan(table[2]))  # different shape: not compared
    result = D.memorisation(synthetic, train, data_range=700.0, synthetic_ids=["s0", "s1", "s2"], training_ids=["t0", "t1", "t2"])
    c0, c1, c2 = result.cases
    assert c0.flagged and c0.nearest_id == "t1" and c0.max_ssim == pytest.approx(1.0, abs=1e-6)
    assert not c1.flagged and c1.max_ssim < 0.95
    assert c2.max_ssim is None and not c2.flagged
    assert result.flagged == ["s0"]
    assert result.to_dict()["flagged"] == 1
    with pytest.raises(DataError, match="threshold"):
        D.memorisation(synthetic, train, data_range=700.0, threshold=1.5)


def test_diversity():
    rng = np.random.default_rng(6)
    one = phantom(rng)[0]
    copies = D.diversity([one, one.copy(), one.copy()], data_range=700.0)
    assert copies.mean == pytest.approx(1.0, abs=1e-6) and copies.pairs == 3
    assert copies.metric == "ms_ssim" and copies.scales == 2  # 22 // 2 >= 11, 22 // 4 < 11
    varied = D.diversity([phantom(rng, noise=60.0)[0] for _ in range(5)], data_range=700.0, max_pairs=4, seed=1)
    assert varied.pairs == 4 and varied.mean < 0.9
    small = D.diversity([rng.random((16, 16)), rng.random((16, 16))], data_range=1.0)
    assert small.metric == "ssim"
    with pytest.raises(DataError, match="same shape"):
        D.diversity([rng.random((16, 16)), rng.random((16, 17))], data_range=1.0)


# ------------------------------------------------------------------------------------ FID


class TinyFeatures(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x / 600.0))


def test_fid_from_local_files(tmp_path):
    rng = np.random.default_rng(7)
    torch.manual_seed(0)  # only the network's initial weights
    net = TinyFeatures().eval()
    ref = [phantom(rng, shape=(14, 14, 14))[0] for _ in range(6)]
    shifted = [im + 200.0 for im in ref]
    weights = tmp_path / "weights.pt"
    torch.save(net.state_dict(), weights)
    assert D.fid(ref, ref, feature_weights=weights, model=TinyFeatures()) == pytest.approx(0.0, abs=1e-6)
    far = D.fid(ref, shifted, feature_weights=weights, model=TinyFeatures())
    assert far > 1e-3
    # the same state dict as safetensors
    tensors = tmp_path / "weights.safetensors"
    save_file(net.state_dict(), str(tensors))
    assert D.fid(ref, shifted, feature_weights=tensors, model=TinyFeatures()) == pytest.approx(far, rel=1e-6)
    # by hand: the features are the spatial means of the network's output
    with torch.no_grad():
        feats = [net(torch.from_numpy(im.astype(np.float32))[None, None]).flatten(2).mean(-1)[0].double().numpy()
                 for im in [*ref, *shifted]]
    assert far == pytest.approx(D.frechet_distance(np.stack(feats[:6]), np.stack(feats[6:])), rel=1e-6)
    with pytest.raises(DataError, match="not found"):
        D.fid(ref, ref, feature_weights=tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="names no FID network"):
        D.fid(ref, ref, feature_weights=weights)  # a state dict with neither a network name nor model=
    narrow = TinyFeatures()
    narrow.conv = torch.nn.Conv3d(1, 3, 3)
    with pytest.raises(CheckpointError, match=r"weights.pt: key 'conv.weight' has shape \(4, 1, 3, 3, 3\)"):
        D.fid(ref, ref, feature_weights=weights, model=narrow)


# ------------------------------------------------------------------------------------ honest small sets


def test_small_sets_get_a_warning_an_interval_and_the_noise_level():
    rng = np.random.default_rng(0)
    ref = [phantom(rng) for _ in range(4)]
    cand = [phantom(rng) for _ in range(5)]
    cmp = D.compare_radiomics([i for i, _ in ref], [i for i, _ in cand], [lab for _, lab in ref],
                              [lab for _, lab in cand], bootstrap=50)
    assert cmp.n_features == 28
    assert "4 reference and 5 candidate images for 28 features" in cmp.warning
    assert "2 x 28 = 56" in cmp.warning
    lo, hi = cmp.frechet_ci
    assert 0 <= lo <= hi and cmp.mmd2_ci[0] <= cmp.mmd2_ci[1] and cmp.frechet_null > 0
    # two sets of one distribution: the distance is of the size sampling noise alone gives, not significant;
    # the same sizes with a real intensity shift are
    assert 0.2 < cmp.frechet_distance / cmp.frechet_null < 5 and cmp.frechet_p > 0.05 and cmp.mmd2_p > 0.05
    shifted = [phantom(rng, shift=150.0) for _ in range(5)]
    far = D.compare_radiomics([i for i, _ in ref], [i for i, _ in shifted], [lab for _, lab in ref],
                              [lab for _, lab in shifted], bootstrap=50)
    assert far.frechet_p < 0.05 and far.mmd2_p < 0.05 and far.frechet_distance > 100 * far.frechet_null
    d = cmp.to_dict()
    assert d["warning"] == cmp.warning and d["frechet_ci"] == [lo, hi] and d["bootstrap"] == 50
    off = D.compare_radiomics([i for i, _ in ref], [i for i, _ in cand], bootstrap=0)
    assert off.frechet_ci is None and off.frechet_null is None
    assert D.small_sample_warning(56, 60, 28) is None and D.small_sample_warning(55, 60, 28) is not None


def test_bootstrap_interval_holds_the_known_distance_and_separates_a_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 2))
    b = rng.standard_normal((200, 2)) + np.array([1.0, 0.0])  # true Frechet distance |mu|^2 = 1
    boot = D.bootstrap_distances(a, b, rounds=50, seed=0, normalise=False)
    assert boot.frechet_ci[0] < 1.0 < boot.frechet_ci[1] and boot.frechet_ci[1] - boot.frechet_ci[0] < 1.0
    assert boot.frechet_null < 0.1 and boot.frechet_p == pytest.approx(1 / 51) and boot.mmd2_p == pytest.approx(1 / 51)
    # small sets (6 samples, 10 features): the distance alone says little, the null and p-value tell
    small_a = rng.standard_normal((6, 10))
    small_b = rng.standard_normal((6, 10))
    same = D.bootstrap_distances(small_a, small_b, rounds=100, seed=1, normalise=False)
    shifted = D.bootstrap_distances(small_a, small_b + 3.0, rounds=100, seed=1, normalise=False)
    assert D.frechet_distance(small_a, small_b) > 5  # far from the true 0
    assert same.frechet_p > 0.05 and shifted.frechet_p < 0.05 and shifted.frechet_ci[0] > same.frechet_null
    with pytest.raises(DataError, match="rounds"):
        D.bootstrap_distances(a, b, rounds=0)


# ------------------------------------------------------------------------------------ model vs mask variety


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def test_seed_diversity_is_the_variety_for_one_mask():
    masks = [np.pad(np.ones((8 + k, 8), np.int64), ((5, 7 - k), (6, 6))) for k in range(2)]  # 20 x 20

    def noisy(mask: np.ndarray, seed: int) -> np.ndarray:
        return mask * 100.0 + np.random.default_rng(seed).normal(0.0, 20.0, mask.shape)

    result = D.seed_diversity(noisy, masks, seeds=[0, 1], data_range=150.0, mask_ids=["a", "b"])
    assert result.metric == "ssim" and result.pairs == 2 and result.seeds == [0, 1]
    for mid, mask in zip(["a", "b"], masks):
        assert result.per_mask[mid] == pytest.approx(_skimage_ssim(noisy(mask, 0), noisy(mask, 1), 150.0), abs=1e-5)
    # a model that ignores its seed has no variety of its own, however different its masks are
    fixed = D.seed_diversity(lambda mask, seed: mask * 100.0 + 1.0, masks, seeds=[0, 1, 2], data_range=150.0)
    assert fixed.mean == pytest.approx(1.0, abs=1e-9) and fixed.pairs == 6
    images = [mask * 100.0 + 1.0 for mask in masks] + [np.roll(masks[0], 4, axis=1) * 100.0 + 1.0]
    assert D.diversity(images, data_range=150.0).mean < 0.9  # ... while the set as a whole looks varied
    grouped = D.grouped_diversity([*images, noisy(masks[1], 3)], ["x", "y", "x", "z"], data_range=150.0)
    assert grouped.pairs == 1 and grouped.mean == pytest.approx(_skimage_ssim(images[0], images[2], 150.0), abs=1e-5)
    with pytest.raises(DataError, match="two different seeds"):
        D.seed_diversity(noisy, masks, seeds=[3, 3], data_range=150.0)
    with pytest.raises(DataError, match="a group with at least two images"):
        D.grouped_diversity(images, ["p", "q", "r"], data_range=150.0)


# ------------------------------------------------------------------------------------ warped copies


def test_a_warped_copy_of_the_source_is_flagged(tmp_path):
    import json

    from medsynth.augment import AugmentOptions, run_augment
    from medsynth.augment.plan import pair_seed
    from medsynth.data import transforms as T
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.seeds import PairStream
    from medsynth.synthesis.pairs import attempt_streams, warp_from_record

    data = make_phantom_dataset(tmp_path / "d", dim=3, cases=3, size=24, seed=1)
    out = tmp_path / "aug"
    run_augment(AugmentOptions(input=data, out=out, method="synthseg", num=2, seed=3, synthetic_only=True))
    prov = {r["case_id"]: r for r in map(json.loads, (out / "provenance.jsonl").read_text().splitlines())}
    reals = {c.case_id: read_volume(c.images[0]).array.astype(np.float64) for c in read_manifest(data).cases}
    syn = {cid: read_volume(out / r["images"][0]).array.astype(np.float64) for cid, r in prov.items()}
    # the copy: syn_00000's source warped by syn_00000's deformation, drawn as the pair core draws it
    rec = prov["syn_00000"]
    stream = attempt_streams(pair_seed(3, 0), rec["attempt"])[PairStream.DEFORM]
    params = T.draw_spatial(reals[rec["source"]].shape, read_volume(data.parent / "imagesTr" / f"{rec['source']}.nii.gz").spacing,
                            T.DeformConfig(), np.random.default_rng(stream))
    _, warped_copy = T.apply_spatial(params, np.zeros(params.shape, np.int64), reals[rec["source"]][None])
    candidates = [warped_copy[0].astype(np.float64), syn["syn_00001"]]
    ids = ["syn_00000", "syn_00001"]  # the copy poses as syn_00000
    r = 900.0
    plain = D.memorisation(candidates, list(reals.values()), data_range=r, synthetic_ids=ids, training_ids=list(reals))
    assert plain.flagged == [] and plain.cases[0].max_ssim < 0.95  # as it is, it resembles no real image
    warped = D.warped_sources(prov, ids, reals)
    assert all(w is not None and w.shape == candidates[0].shape for w in warped)
    result = D.memorisation(candidates, list(reals.values()), data_range=r, synthetic_ids=ids,
                            training_ids=list(reals), warped=warped)
    assert result.flagged == ["syn_00000"]
    assert result.cases[0].warped_source_ssim == pytest.approx(1.0, abs=1e-4)
    assert result.cases[1].warped_source_ssim < 0.95  # a genuine synthseg image is not its warped source
    assert result.to_dict()["warped_source_checked"] == 2
    # a record from another medsynth (other draws) or without the warp is refused, not silently used
    tampered = {**rec, "spatial": {**rec["spatial"], "offset_vox": [0.0, 0.0, 0.0]}}
    with pytest.raises(DataError, match="differs from the one recorded"):
        warp_from_record(tampered)
    with pytest.raises(DataError, match="no \"warp\" entry"):
        warp_from_record({k: v for k, v in rec.items() if k != "warp"})
    assert D.warped_sources({}, ids, reals) == [None, None]
