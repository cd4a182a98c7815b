"""The synthetic-pair core: ``medsynth augment``, ``RandSyntheticPaird`` and ``SyntheticMixDataset``
make the same pair from the same source, settings, intensity statistics and seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.augment import AugmentOptions, run_augment
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import Volume, read_volume
from medsynth.data.phantoms import LABELS, make_phantom, make_phantom_dataset
from medsynth.errors import ConfigError
from medsynth.seeds import CaseTag, PairStream, seed_sequence
from medsynth.synthesis.online import RandSyntheticPaird, SyntheticMixDataset, load_pair
from medsynth.synthesis.procedural import fit_intensity_stats

REPO = Path(__file__).resolve().parents[1]
SEED = 5


@pytest.fixture(scope="module")
def data2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("d2") / "data", dim=2, cases=2, size=32, seed=4)


@pytest.fixture(scope="module")
def gan_run(data2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GAN trained at 2 mm, so generating for the 1 mm phantoms resamples there and back."""
    from medsynth.config import load_config
    from medsynth.training import run_training

    cfg = load_config(REPO / "configs" / "tiny" / "gan2d.yaml",
                      [f"data.manifest={data2d}", "data.spacing=[2.0, 2.0]", "training.max_steps=1",
                       "training.batch_size=2", "training.amp=false", "training.preview_every=0"])
    run = tmp_path_factory.mktemp("gan") / "run"
    run_training(cfg, run, progress=False)
    return run


def _stats(manifest_path: Path) -> list:
    """The dataset's intensity statistics, computed here the way a user would (one channel)."""
    cases = read_manifest(manifest_path).cases
    return [fit_intensity_stats([(read_volume(c.images[0]).array, read_volume(c.label, kind="label").array)
                                 for c in cases])]


@pytest.mark.parametrize("method", ["synthseg", "classic", "gan"])
def test_augment_transform_and_dataset_make_the_same_pair(method: str, data2d: Path, gan_run: Path,
                                                          tmp_path: Path) -> None:
    model = gan_run if method == "gan" else None
    out = tmp_path / "aug"
    run_augment(AugmentOptions(input=data2d, out=out, method=method, num=2, seed=SEED, model=model))
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    stats = _stats(data2d)
    labels = sorted(LABELS)
    settings = dict(method=method, model=model, labels=labels, intensity_stats=stats)
    transform = RandSyntheticPaird(prob=1.0, **settings)
    dataset = SyntheticMixDataset.from_manifest(data2d, ratio=1.0, **settings)
    entries = {c.case_id: c for c in read_manifest(data2d).cases}
    order = [c.case_id for c in read_manifest(data2d).cases]
    for p in prov:
        written_image = read_volume(out / p["images"][0]).array
        written_label = read_volume(out / p["label"], kind="label").array
        seq = seed_sequence(SEED, CaseTag.ATTEMPT, p["index"])  # the seed of augment's case k
        src = entries[p["source"]]
        sample = load_pair({"image": str(src.images[0]), "label": str(src.label)})
        by_transform = transform.make_pair(sample, seq)
        by_dataset = dataset.make_pair(order.index(p["source"]), seq)
        for made in (by_transform, by_dataset):
            np.testing.assert_array_equal(np.asarray(made["image"])[0], written_image)
            np.testing.assert_array_equal(np.asarray(made["label"])[0], written_label)
        assert not np.array_equal(written_image, read_volume(src.images[0]).array)


def test_a_trained_run_is_resampled_and_never_stretched(data2d: Path, gan_run: Path) -> None:
    """The pair's image is the run's ``generate_volume`` of the new label with the seed of the
    MODEL stream, in the run's own intensity units (not rescaled to the real image's min/max)."""
    from medsynth.runcard import read_run_card
    from medsynth.synthesis.synthesizer import Synthesizer

    case = read_manifest(data2d).cases[0]
    sample = load_pair({"image": str(case.images[0]), "label": str(case.label)})
    seq = np.random.SeedSequence(entropy=[1, 2])
    # a one-step GAN need not follow its masks yet: this test is about units and resampling, not QC
    made = RandSyntheticPaird(prob=1.0, method="gan", model=gan_run, labels=sorted(LABELS),
                              qc={"label_agreement": False}).make_pair(sample, seq)
    label = np.asarray(made["label"])[0].astype(np.int64)
    affine = read_volume(case.label, kind="label").affine
    model_seed = int(np.random.SeedSequence(entropy=[1, 2], spawn_key=(0, int(PairStream.MODEL))).generate_state(1)[0]
                     & 0x7FFFFFFF)
    expected = Synthesizer.from_run(gan_run, device="cpu").generate_volume(Volume(array=label, affine=affine), model_seed)
    np.testing.assert_array_equal(np.asarray(made["image"])[0], expected.array)
    norm = read_run_card(gan_run).data.normalization
    image = np.asarray(made["image"])
    assert norm.lo[0] - 1e-3 <= image.min() and image.max() <= norm.hi[0] + 1e-3
    real = np.asarray(sample["image"])
    assert (image.min(), image.max()) != pytest.approx((real.min(), real.max()))


def test_match_range_is_for_synthseg_only(gan_run: Path) -> None:
    with pytest.raises(ConfigError, match="match_range applies to method 'synthseg' only"):
        RandSyntheticPaird(method="gan", model=gan_run, match_range=True)
    with pytest.raises(ConfigError, match="match_range"):
        RandSyntheticPaird(method="synthseg", match_range=True, intensity_stats=[fit_intensity_stats(
            [(np.ones((4, 4), np.float32), np.zeros((4, 4), np.int64))])])
    p = make_phantom(2, 16, 0)
    out = RandSyntheticPaird(prob=1.0, method="synthseg").set_random_state(0)({"image": p.image[None],
                                                                            "label": p.label[None]})
    assert out["image"].min() == pytest.approx(float(p.image.min()), rel=1e-5, abs=1e-4)
    assert out["image"].max() == pytest.approx(float(p.image.max()), rel=1e-5)


def test_an_image_that_ignores_its_mask_is_redrawn_then_refused(data2d: Path, gan_run: Path) -> None:
    """QC compares a family method's image with the run's per-label training statistics: a generator
    that paints the mask's outline faintly (no per-label contrast) fails every try; the same run's
    label-mean fill of the mask is refused as untextured and passes with ``qc.texture`` off; with
    ``qc.label_agreement`` off only the range checks apply."""
    from medsynth.errors import JobError
    from medsynth.synthesis.pairs import PairSettings, PairSource, QCConfig, make_pair
    from medsynth.synthesis.synthesizer import Synthesizer

    run = Synthesizer.from_run(gan_run, device="cpu")
    case = read_manifest(data2d).cases[0]
    image, label = read_volume(case.images[0]).array, read_volume(case.label, kind="label").array.astype(np.int64)
    source = PairSource(images=image[None].astype(np.float32), label=label, affine=read_volume(case.label).affine)
    stats = _stats(data2d)

    class Painter:
        """The run's facts, but images of our choosing: ``fill`` paints each label its training mean."""

        def __init__(self, fill: bool) -> None:
            self.info, self.run_dir, self.fill = run.info, run.run_dir, fill

        def generate_volume(self, volume: Volume, seed: int, **_: object) -> Volume:
            lab = np.asarray(volume.array).astype(np.int64)
            if self.fill:
                lo, hi = run.info.normalization.lo[0], run.info.normalization.hi[0]
                table = {v: lo + m * (hi - lo) for v, m in zip(run.info.labels, run.info.label_means[0])}
                out = np.vectorize(table.get)(lab).astype(np.float32)
            else:  # mid-grey everywhere, a faint step at labels: ignores what each label should look like
                out = (np.full(lab.shape, float(np.mean(image)), np.float32) + (lab > 0) * 1.0).astype(np.float32)
            return Volume(array=out, affine=volume.affine)

    settings = PairSettings(method="gan")
    seq = np.random.SeedSequence(3)
    with pytest.raises(JobError, match="does not follow its mask"):
        make_pair(source, settings, stats=stats, labels=sorted(LABELS), seq=seq, synthesizer=Painter(False))  # type: ignore[arg-type]
    # the label-mean fill follows its mask but is flat: refused as untextured, accepted with qc.texture off
    with pytest.raises(JobError, match="untextured"):
        make_pair(source, settings, stats=stats, labels=sorted(LABELS), seq=seq, synthesizer=Painter(True))  # type: ignore[arg-type]
    flat_ok = PairSettings(method="gan", qc=QCConfig(texture=False))
    good = make_pair(source, flat_ok, stats=stats, labels=sorted(LABELS), seq=seq, synthesizer=Painter(True))  # type: ignore[arg-type]
    assert good.attempt == 0 and not good.qc_failures
    off = PairSettings(method="gan", qc=QCConfig(label_agreement=False))
    assert make_pair(source, off, stats=stats, labels=sorted(LABELS), seq=seq, synthesizer=Painter(False)).attempt == 0  # type: ignore[arg-type]
