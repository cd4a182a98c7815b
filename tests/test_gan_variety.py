"""The GAN's variety from the seed (noise at every level, mode seeking) and its appearance that can
be sampled (per-case fill, drawn or given label means); old run cards still load and paint as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import GanModelConfig, load_config
from medsynth.data.nifti import read_volume
from medsynth.errors import ConfigError
from medsynth.models.appearance import AppearanceDistribution
from medsynth.models.gan import SpadeGenerator
from medsynth.synthesis.synthesizer import Synthesizer
from medsynth.training.engine import train
from medsynth.training.gan import mode_seeking_ratio

ROOT = Path(__file__).resolve().parents[1]
TINY2D = ROOT / "configs/tiny/gan2d.yaml"
SWITCHES = ["model.generator.level_noise=true", "model.generator.appearance=per_case",
            "model.loss.diversity_weight=10.0", "model.loss.diversity_clamp=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny 2D recipe, 30 steps, on 4 phantom cases: as shipped (old switches) and with the new ones."""
    from medsynth.data.phantoms import make_phantom_dataset

    base = tmp_path_factory.mktemp("variety")
    manifest = make_phantom_dataset(base / "data", dim=2, cases=4, size=32, seed=0)
    common = [f"data.manifest={manifest}", "training.max_steps=30", "training.preview_every=0",
              "training.checkpoint_every=30"]
    out = {"data": manifest.parent}
    for name, extra in (("old", []), ("new", SWITCHES)):
        train(load_config(TINY2D, [*common, *extra]), base / name, progress=False)
        out[name] = base / name
    return out


def _between_seed(run: Path, mask: np.ndarray, **kw: object) -> float:
    synth = Synthesizer.from_run(run)
    images = [synth.generate(mask, seed=s, **kw) for s in range(4)]
    return float(np.mean([np.abs(a - b).mean() for i, a in enumerate(images) for b in images[i + 1 :]]))


def test_new_switches_give_more_variety_between_seeds(runs) -> None:
    """Same data, steps and seeds: the mean absolute difference between two seeds' images of one mask
    is larger with level noise + mode seeking, even with the appearance held at the pooled means."""
    mask = read_volume(runs["data"] / "labelsTr/phantom_000.nii.gz", kind="label").array
    old = _between_seed(runs["old"], mask)
    new_noise_only = _between_seed(runs["new"], mask, appearance="pooled")
    new = _between_seed(runs["new"], mask)
    assert new_noise_only > 1.5 * old, (old, new_noise_only)
    assert new >= new_noise_only * 0.9, (new_noise_only, new)
    card = json.loads((runs["new"] / "model_card.json").read_text())
    assert card["model"]["level_noise"] is True
    assert card["model"]["appearance"]["fill"] == "per_case" and card["model"]["appearance"]["num_cases"] == 4
    assert card["model"]["appearance"]["draw"] == "mvn"
    assert json.loads((runs["old"] / "model_card.json").read_text())["model"]["appearance"] == {"fill": "pooled"}


def test_appearance_moves_label_means_the_way_asked(runs) -> None:
    """A higher mean for label k paints label k brighter (by about the asked amount, in dataset units) and
    leaves the other labels' means nearly where they were."""
    synth = Synthesizer.from_run(runs["new"])
    mask = read_volume(runs["data"] / "labelsTr/phantom_001.nii.gz", kind="label").array
    pooled = synth.info.normalization.from_unit(np.asarray(synth.info.label_means))[0]
    k = max((v for v in synth.labels if v != 0), key=lambda v: int((mask == v).sum()))
    j = synth.labels.index(k)
    span = float(synth.info.normalization.hi[0] - synth.info.normalization.lo[0])
    base = synth.generate(mask, seed=0, appearance="pooled")
    brighter = synth.generate(mask, seed=0, appearance={k: float(pooled[j]) + 0.2 * span})
    raised = pooled.copy()
    raised[j] -= 0.2 * span
    darker = synth.generate(mask, seed=0, appearance=list(raised))
    inside = mask == k
    shift_up = brighter[inside].mean() - base[inside].mean()
    shift_down = base[inside].mean() - darker[inside].mean()
    assert 0.1 * span < shift_up < 0.3 * span, (shift_up, span)
    assert 0.1 * span < shift_down < 0.3 * span, (shift_down, span)
    far = mask == 0
    assert abs(brighter[far].mean() - base[far].mean()) < 0.05 * span
    # a case's own statistics: case k's means, not the pooled ones; the mapping form equals the table form
    assert not np.allclose(synth.appearance_of(0, 0), synth.appearance_of("pooled", 0))
    np.testing.assert_allclose(synth.appearance_of({k: float(pooled[j])}, 0), synth.appearance_of("pooled", 0),
                               atol=1e-6)
    # drawn appearance: one per seed, repeatable
    np.testing.assert_array_equal(synth.appearance_of(None, 5), synth.appearance_of(None, 5))
    with pytest.raises(ConfigError, match="training case"):
        synth.appearance_of(99, 0)
    with pytest.raises(ConfigError, match="not the run's labels"):
        synth.appearance_of({42: 1.0}, 0)
    with pytest.raises(ConfigError, match="per-case fill"):
        Synthesizer.from_run(runs["old"]).generate(mask, seed=0, appearance="pooled")


def test_old_run_cards_load_and_paint_as_before(runs, tmp_path: Path) -> None:
    """A card written before the switches existed (no level_noise / appearance / diversity fields)
    loads with them off, and its images are the old formula's: the coarse noise map of the seed alone."""
    import shutil

    from medsynth.data.loader import one_hot
    from medsynth.seeds import Stream, derive_seed

    old = tmp_path / "old"
    shutil.copytree(runs["old"], old)
    card_path = old / "model_card.json"
    card = json.loads(card_path.read_text())
    gen, loss = card["config"]["model"]["generator"], card["config"]["model"]["loss"]
    for key in ("level_noise", "appearance"):
        gen.pop(key)
    for key in ("diversity_weight", "diversity_clamp"):
        loss.pop(key)
    for key in ("level_noise", "appearance"):
        card["model"].pop(key)
    card_path.write_text(json.dumps(card))
    synth = Synthesizer.from_run(old)
    mask = read_volume(runs["data"] / "labelsTr/phantom_002.nii.gz", kind="label").array
    image = synth.generate(mask, seed=7)
    net = synth.backend.net  # type: ignore[attr-defined]
    assert net.noise_scales is None
    z = torch.randn(net.noise_shape(mask.shape), generator=torch.Generator().manual_seed(
        derive_seed(7, Stream.SYNTH_ITEM, 0)))[None]
    cond = one_hot(torch.from_numpy(synth.info.label_lut()[mask]).long()[None], synth.info.num_labels)
    with torch.no_grad():
        unit = (net(cond, z) * 0.5 + 0.5).clamp(0, 1).numpy()[0]
    np.testing.assert_allclose(image, synth.info.normalization.from_unit(unit)[0], rtol=1e-5, atol=1e-4)


def test_fresh_generator_paints_each_samples_own_fill() -> None:
    """With zero-initialised noise scales and output convolution, a fresh generator's image is the fill
    of the means given per sample (hand-built: label l painted with means[n, 0, l]), whatever the noise."""
    g = SpadeGenerator(2, 3, 1, [8, 8], 2, 4, num_labels=3, fill="residual",
                       label_means=[[0.1, 0.5, 0.9]], level_noise=True)
    index = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    cond = torch.nn.functional.one_hot(index, 3).permute(0, 3, 1, 2).float()
    means = torch.tensor([[[0.0, 0.2, 0.4]], [[0.3, 0.6, 1.0]]])
    z, levels = g.draw_noise(2, (8, 8), torch.Generator().manual_seed(1))
    assert [tuple(t.shape) for t in levels] == [(2, 1, 4, 4), (2, 1, 8, 8)]
    out = g(cond, z, levels, means) * 0.5 + 0.5
    expected = torch.stack([means[n, 0][index[n]] for n in range(2)])
    torch.testing.assert_close(out[:, 0], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="level_noise"):
        g(cond, z)


def test_mode_seeking_ratio_by_hand() -> None:
    """|f1 - f2| 0.3 everywhere, |z1 - z2| 2 on the map and 0 on a level map of the same size: 0.3 / 1."""
    f1, f2 = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.3)
    za, zb = [torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)], [torch.full((2, 1, 4, 4), 2.0), torch.ones(2, 1, 4, 4)]
    assert float(mode_seeking_ratio(f1, f2, za, zb)) == pytest.approx(0.3)


def test_appearance_distribution_and_its_fallbacks() -> None:
    """Many cases: the draws' mean and spread follow the cases', inside their range; 3 cases: a diagonal
    normal; 1 case: the pooled means; a label a case lacks takes the pooled mean."""
    rng = np.random.default_rng(0)
    cases = np.stack([[[0.1, 0.4 + 0.05 * t, 0.8 - 0.05 * t]] for t in rng.standard_normal(20)])
    pooled = cases.mean(axis=0)
    dist = AppearanceDistribution.from_cases(cases, pooled)
    assert dist.kind == "mvn" and dist.num_cases == 20
    draws = np.stack([dist.draw(np.random.default_rng(i)) for i in range(400)])
    np.testing.assert_allclose(draws.mean(axis=0), cases.mean(axis=0), atol=0.01)
    assert np.all(draws >= cases.min(axis=0) - 1e-6) and np.all(draws <= cases.max(axis=0) + 1e-6)
    assert np.corrcoef(draws[:, 0, 1], draws[:, 0, 2])[0, 1] < -0.9  # the covariance is kept
    assert AppearanceDistribution.from_cases(cases[:3], pooled).kind == "diagonal"
    one = AppearanceDistribution.from_cases(cases[:1], pooled)
    assert one.kind == "pooled"
    np.testing.assert_allclose(one.draw(np.random.default_rng(0)), pooled, atol=1e-6)
    holes = cases[:5].copy()
    holes[:, 0, 2] = np.nan
    assert np.all(AppearanceDistribution.from_cases(holes, pooled).draw(np.random.default_rng(0))[0, 2]
                  == np.float32(pooled[0, 2]))


def test_per_case_appearance_needs_a_fill() -> None:
    with pytest.raises(ValueError, match="needs a fill"):
        GanModelConfig.model_validate({"generator": {"fill": "none", "appearance": "per_case"}})
