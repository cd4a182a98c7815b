"""RandSyntheticPaird and SyntheticMixDataset: replacement, label sets, seeding, workers, mixing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from medsynth.data.nifti import write_volume
from medsynth.data.phantoms import make_phantom
from medsynth.errors import ConfigError
from medsynth.runcard import read_run_card
from medsynth.synthesis.online import RandSyntheticPaird, SyntheticMixDataset

# a deformation that only flips axis 0: its effect is np.flip, computed independently
FLIP0 = {"affine_prob": 0.0, "elastic_prob": 0.0, "flip_axes": [0], "flip_prob": 1.0}
NO_INTENSITY = {"bias_prob": 0.0, "gamma_prob": 0.0, "scale_prob": 0.0, "noise_prob": 0.0}


def phantom_sample(k: int = 0, dim: int = 3, size: int = 16) -> dict[str, MetaTensor]:
    """A MONAI-style sample: float32 MetaTensors (1, *spatial) with the phantom's affine."""
    p = make_phantom(dim, size, k)
    affine = torch.as_tensor(p.affine)
    return {
        "image": MetaTensor(torch.from_numpy(p.image[None].copy()), affine=affine),
        "label": MetaTensor(torch.from_numpy(p.label[None].astype(np.float32)), affine=affine),
    }


def numpy_sample(k: int = 0) -> dict[str, np.ndarray]:
    p = make_phantom(3, 16, k)
    return {"image": p.image[None].copy(), "label": p.label[None].copy()}


def arrays(d: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(d["image"]), np.asarray(d["label"])


# ------------------------------------------------------------------------------------ the transform


def test_prob_zero_leaves_samples_unchanged() -> None:
    t = RandSyntheticPaird(prob=0.0)
    t.set_random_state(0)
    for k in range(3):
        sample = phantom_sample(k)
        out = t(sample)
        assert out["image"] is sample["image"] and out["label"] is sample["label"]


@pytest.mark.parametrize("method", ["synthseg", "classic"])
def test_prob_one_always_replaces_with_valid_pair(method: str) -> None:
    t = RandSyntheticPaird(prob=1.0, method=method)
    t.set_random_state(3)
    for k in range(3):
        sample = phantom_sample(k)
        img_in, lab_in = arrays(sample)
        out = t(sample)
        img, lab = arrays(out)
        assert isinstance(out["image"], MetaTensor) and isinstance(out["label"], MetaTensor)
        assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.float32
        assert img.shape == img_in.shape and lab.shape == lab_in.shape
        assert torch.equal(out["image"].affine, sample["image"].affine)
        assert torch.equal(out["label"].affine, sample["label"].affine)
        assert np.all(np.isfinite(img))
        assert not np.array_equal(img, img_in)
        assert not np.array_equal(lab, lab_in)  # the label was deformed
        assert set(np.unique(lab)) <= set(np.unique(lab_in))
        assert np.array_equal(lab, np.round(lab))
        if method == "synthseg":  # scaled into the real image's range
            assert img.min() == pytest.approx(float(img_in.min()), rel=1e-5, abs=1e-4)
            assert img.max() == pytest.approx(float(img_in.max()), rel=1e-5)


def test_numpy_input_keeps_kind_and_dtype() -> None:
    sample = numpy_sample(1)
    out = RandSyntheticPaird(prob=1.0).set_random_state(0)(sample)
    assert type(out["image"]) is np.ndarray and out["image"].dtype == np.float32
    assert type(out["label"]) is np.ndarray and out["label"].dtype == np.uint8
    assert out["label"].shape == sample["label"].shape
    assert set(np.unique(out["label"])) <= set(np.unique(sample["label"]))
    plain = {"image": torch.from_numpy(sample["image"]), "label": torch.from_numpy(sample["label"]).long()}
    out = RandSyntheticPaird(prob=1.0).set_random_state(0)(plain)
    assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32
    assert type(out["label"]) is torch.Tensor and out["label"].dtype == torch.int64


def test_flip_deformation_matches_numpy_flip() -> None:
    """With a flip-only deformation the new label (synthseg) and the pair (classic, no intensity
    change) equal np.flip of the inputs."""
    sample = phantom_sample(2)
    img_in, lab_in = arrays(sample)
    out = RandSyntheticPaird(prob=1.0, method="synthseg", deform=FLIP0).set_random_state(0)(sample)
    assert np.array_equal(np.asarray(out["label"]), np.flip(lab_in, axis=1))
    out = RandSyntheticPaird(prob=1.0, method="classic", deform=FLIP0, classic=NO_INTENSITY).set_random_state(0)(sample)
    assert np.array_equal(np.asarray(out["label"]), np.flip(lab_in, axis=1))
    np.testing.assert_allclose(np.asarray(out["image"]), np.flip(img_in, axis=1), rtol=1e-5, atol=1e-3)


def test_same_seed_same_output_different_seed_different() -> None:
    def run(seed: int) -> list[np.ndarray]:
        t = RandSyntheticPaird(prob=0.5)
        t.set_random_state(seed)
        outs = []
        for k in range(4):
            img, lab = arrays(t(phantom_sample(k)))
            outs += [img, lab]
        return outs

    a, b, c = run(11), run(11), run(12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dataloader_two_workers_is_reproducible() -> None:
    data = [phantom_sample(k, dim=2, size=32) for k in range(8)]

    def run(seed: int) -> list[dict]:
        ds = Dataset(data, transform=Compose([RandSyntheticPaird(prob=0.5, flag_key="synthetic")]))
        loader = DataLoader(ds, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(seed))
        return list(loader)

    a, b, c = run(5), run(5), run(6)
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["synthetic"], y["synthetic"])
    flags = torch.cat([x["synthetic"] for x in a])
    assert flags.any() and not flags.all()  # fixed by the seed: a mix of replaced and untouched
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, c))
    for x, k in zip(torch.cat([x["image"] for x in a]), range(8)):  # untouched samples are the originals
        if not flags[k]:
            assert torch.equal(x, data[k]["image"])


def test_bad_arguments_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match="method"):
        RandSyntheticPaird(method="magic")
    with pytest.raises(ConfigError, match="prob"):
        RandSyntheticPaird(prob=1.5)
    with pytest.raises(ConfigError, match="prob"):
        RandSyntheticPaird(prob=-0.1)
    with pytest.raises(ConfigError, match="deform.rotate_deg"):
        RandSyntheticPaird(deform={"rotate_deg": -3})
    with pytest.raises(ConfigError, match="edits.structures"):
        RandSyntheticPaird(labels=[0, 1, 2], edits={"structures": [9], "grow_prob": 0.5})
    with pytest.raises(ConfigError, match="model"):
        RandSyntheticPaird(method="gan")
    with pytest.raises(ConfigError, match="ratio"):
        SyntheticMixDataset([numpy_sample(0)], ratio=1.2)
    with pytest.raises(ConfigError, match="method"):
        SyntheticMixDataset([numpy_sample(0)], method="nope")


# ------------------------------------------------------------------------------------ the dataset


def real_cases(n: int = 6) -> list[dict]:
    return [{**numpy_sample(k), "case_id": f"c{k}"} for k in range(n)]


def test_mix_ratio_is_exact_and_real_cases_each_once() -> None:
    real = real_cases(6)
    ds = SyntheticMixDataset(real, ratio=0.25, seed=1)
    assert len(ds) == 8  # round(6 / (1 - 0.25))
    items = [ds[i] for i in range(len(ds))]
    flags = [it["synthetic"] for it in items]
    assert sum(flags) == 2  # round(8 * 0.25)
    real_sources = sorted(it["source"] for it in items if not it["synthetic"])
    assert real_sources == [f"c{k}" for k in range(6)]
    by_id = {c["case_id"]: c for c in real}
    for it in items:
        src = by_id[it["source"]]
        assert it["image"].shape == src["image"].shape and it["label"].shape == src["label"].shape
        assert it["label"].dtype == src["label"].dtype
        if it["synthetic"]:
            assert set(np.unique(it["label"])) <= set(np.unique(src["label"]))
            assert not np.array_equal(it["image"], src["image"])
        else:
            assert np.array_equal(it["image"], src["image"]) and np.array_equal(it["label"], src["label"])
    ds4 = SyntheticMixDataset(real, ratio=0.5, length=10, seed=1)
    assert sum(ds4.is_synthetic(i) for i in range(10)) == 5


def test_mix_is_deterministic_per_index_and_epoch() -> None:
    real = real_cases(4)
    a = SyntheticMixDataset(real, ratio=0.5, seed=3)
    b = SyntheticMixDataset(real, ratio=0.5, seed=3)
    for i in reversed(range(len(a))):  # order of access does not matter
        x, y = a[i], b[i]
        assert x["synthetic"] == y["synthetic"] and x["source"] == y["source"]
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    layout0 = [a.is_synthetic(i) for i in range(len(a))]
    syn0 = [a[i]["image"] for i in range(len(a)) if layout0[i]]
    a.set_epoch(1)
    layout1 = [a.is_synthetic(i) for i in range(len(a))]
    syn1 = [a[i]["image"] for i in range(len(a)) if layout1[i]]
    assert sum(layout1) == sum(layout0) == 4
    assert layout1 != layout0 or not all(np.array_equal(x, y) for x, y in zip(syn0, syn1))
    a.set_epoch(0)
    assert [a.is_synthetic(i) for i in range(len(a))] == layout0


def test_mix_from_files_in_dataloader_with_workers(tmp_path: Path) -> None:
    entries = []
    for k in range(3):
        p = make_phantom(2, 32, k)
        write_volume(tmp_path / f"img{k}.nii.gz", p.image, p.affine, kind="image")
        write_volume(tmp_path / f"lab{k}.nii.gz", p.label, p.affine, kind="label")
        entries.append({"image": str(tmp_path / f"img{k}.nii.gz"), "label": str(tmp_path / f"lab{k}.nii.gz")})
    ds = SyntheticMixDataset(entries, ratio=0.5, method="classic", seed=0)
    direct = [ds[i] for i in range(len(ds))]
    affines = {f"lab{k}": torch.as_tensor(make_phantom(2, 32, k).affine) for k in range(3)}
    assert sum(it["synthetic"] for it in direct) == 3  # length round(3 / 0.5) = 6, half synthetic
    for it in direct:
        assert isinstance(it["image"], MetaTensor) and it["image"].shape == (1, 32, 32)
        assert it["label"].shape == (1, 32, 32) and it["source"] in affines
        for key in ("image", "label"):  # the grid is the source file's
            assert torch.allclose(it[key].affine.double(), affines[it["source"]].double(), atol=1e-4)
    loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    for it, batch in zip(direct, loader):
        assert torch.equal(batch["image"][0].as_tensor(), it["image"].as_tensor())
        assert torch.equal(batch["label"][0].as_tensor(), it["label"].as_tensor())
        assert bool(batch["synthetic"][0]) == it["synthetic"] and batch["source"][0] == it["source"]
    # the same cases through MONAI's loader (a torch Dataset of channel-first dicts) give the same items
    loaded = Dataset(entries, transform=Compose([LoadImaged(keys=["image", "label"]),
                                                 EnsureChannelFirstd(keys=["image", "label"])]))
    via_monai = SyntheticMixDataset(loaded, ratio=0.5, method="classic", seed=0)
    for i, it in enumerate(direct):
        other = via_monai[i]
        assert other["source"] == it["source"] and other["synthetic"] == it["synthetic"]
        np.testing.assert_allclose(np.asarray(other["image"]), np.asarray(it["image"]), rtol=1e-6, atol=1e-4)
        assert np.array_equal(np.asarray(other["label"]), np.asarray(it["label"]))


# ------------------------------------------------------------------------------------ a trained run


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.config import load_config
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.training import run_training

    root = tmp_path_factory.mktemp("gan")
    manifest = make_phantom_dataset(root / "data", dim=2, cases=2, size=32)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "gan2d.yaml"
    cfg = load_config(config, [f"data.manifest={manifest}", "training.max_steps=1", "training.checkpoint_every=1",
                               "training.preview_every=0", "training.batch_size=2"])
    run_training(cfg, root / "run", progress=False)
    return root / "run"


def test_gan_method_uses_the_run(gan_run: Path) -> None:
    sample = phantom_sample(0, dim=2, size=32)
    img_in, lab_in = arrays(sample)
    # a one-step GAN need not follow its masks yet: QC's label-agreement check is tested in test_pairs
    t = RandSyntheticPaird(prob=1.0, method="gan", model=gan_run, deform=FLIP0, qc={"label_agreement": False})
    a = t.set_random_state(0)(sample)
    b = t.set_random_state(0)(sample)
    img, lab = arrays(a)
    assert np.array_equal(lab, np.flip(lab_in, axis=1))
    assert np.array_equal(img, np.asarray(b["image"]))
    assert img.shape == img_in.shape and np.all(np.isfinite(img))
    norm = read_run_card(gan_run).data.normalization  # the run's units, not stretched to the real image's
    assert norm.lo[0] - 1e-3 <= img.min() and img.max() <= norm.hi[0] + 1e-3
    with pytest.raises(ConfigError, match="ldm"):
        RandSyntheticPaird(method="ldm", model=gan_run)


# ------------------------------------------------------------------------------------ QC failures in a training loop


def _fail_qc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every draw fails QC (the pair core's check, wherever it is called from)."""
    import medsynth.synthesis.pairs as pairs

    monkeypatch.setattr(pairs, "qc_sample", lambda *args, **kwargs: "forced failure")


def test_a_qc_failure_keeps_the_real_pair_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_qc(monkeypatch)
    t = RandSyntheticPaird(prob=1.0, flag_key="synthetic", qc={"max_tries": 2})
    t.set_random_state(0)
    samples = [phantom_sample(k) for k in range(2)]
    with pytest.warns(UserWarning, match="failed quality control; the real pair was used"):
        outs = [t(s) for s in samples]
    for sample, out in zip(samples, outs):
        assert out["image"] is sample["image"] and out["label"] is sample["label"] and out["synthetic"] is False
    assert t.qc_fallbacks == 2


def test_a_training_loop_goes_on_through_qc_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_qc(monkeypatch)
    real = [numpy_sample(k) for k in range(3)]
    ds = SyntheticMixDataset(real, ratio=0.5, length=6, seed=0, qc={"max_tries": 1})
    with pytest.warns(UserWarning, match="failed quality control"):
        batches = list(torch.utils.data.DataLoader(ds, batch_size=2))  # a loop over every item: nothing raised
    assert len(batches) == 3
    fallback = torch.cat([b["qc_fallback"] for b in batches])
    assert int(fallback.sum()) == ds.num_synthetic == ds.qc_fallbacks == 3
    assert not any(bool(b["synthetic"].any()) for b in batches)
    with pytest.warns(UserWarning, match="failed quality control"):
        items = [ds[i] for i in range(6)]
    for i, item in enumerate(items):  # a fallback item is its source case, real
        assert np.array_equal(item["image"], real[ds.source_of(i)]["image"])


def _batch(k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [phantom_sample(j, dim=2, size=32) for j in range(k)]
    return (torch.stack([s["image"].as_tensor() for s in samples]),
            torch.stack([s["label"].as_tensor() for s in samples]))


def test_synthetic_batch_generates_every_mask_in_one_call(gan_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.seeds import MixTag, seed_sequence
    from medsynth.synthesis.online_batch import SyntheticBatch
    from medsynth.synthesis.pairs import attempt_streams, model_seed
    from medsynth.synthesis.synthesizer import Synthesizer

    image, label = _batch()
    batched = SyntheticBatch(gan_run, prob=1.0, device="cpu", seed=1, deform=FLIP0, qc={"label_agreement": False})
    calls: list[int] = []
    generate = Synthesizer.generate
    monkeypatch.setattr(Synthesizer, "generate", lambda self, mask, *a, **k: calls.append(len(mask)) or
                        generate(self, mask, *a, **k))
    out = batched(image, label, step=4)
    assert calls == [3] and bool(out.replaced.all()) and out.qc_fallbacks == 0
    assert torch.equal(out.label, label.flip(2))  # FLIP0 flips spatial axis 0
    for i in range(3):  # each image is the run's image of its flipped mask, made alone with its documented seed
        seed = model_seed(attempt_streams(seed_sequence(1, MixTag.BATCH, 4, i), 0))
        alone = generate(batched.synthesizer, np.flip(label[i, 0].numpy().astype(np.int64), 0), seed)
        np.testing.assert_allclose(out.image[i, 0].numpy(), alone, rtol=1e-5, atol=1e-4)
    none = SyntheticBatch(gan_run, prob=0.0, device="cpu")(image, label, step=4)
    assert none.image is image and not bool(none.replaced.any())


def test_synthetic_batch_keeps_real_pairs_that_fail_qc(gan_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.synthesis.online_batch import SyntheticBatch

    _fail_qc(monkeypatch)
    image, label = _batch()
    batched = SyntheticBatch(gan_run, prob=1.0, device="cpu", qc={"max_tries": 2})
    with pytest.warns(UserWarning, match="failed quality control"):
        out = batched(image, label, step=0)
    assert out.qc_fallbacks == 3 == batched.qc_fallbacks and not bool(out.replaced.any())
    assert torch.equal(out.image, image) and torch.equal(out.label, label)
