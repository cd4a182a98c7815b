"""Latent diffusion with a per-case fill (``model.appearance: per_case``): each training image's fill,
the autoencoder's residual and the UNet's fill channels come from its own case's label means, and
``generate(appearance=...)`` paints the means asked for; the helpers against hand calculations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.config import load_config
from medsynth.data.nifti import read_volume
from medsynth.errors import ConfigError
from medsynth.models.conditioning import fill_image, fill_means_of
from medsynth.synthesis.synthesizer import Synthesizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _train(data: Path, out: Path, *extra: str) -> Path:
    args = ["train", str(CONFIGS / "tiny/ldm2d.yaml"), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--no-progress", "--set", "training.batch_size=2", "--force", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medsynth.data.phantoms import make_phantom_dataset

    base = tmp_path_factory.mktemp("ldm_app")
    data = make_phantom_dataset(base / "ds", dim=2, cases=4, seed=0, size=32)
    return {"data": data, "per_case": _train(data, base / "per_case", "--set", "model.appearance=per_case"),
            "pooled": _train(data, base / "pooled")}


def test_a_per_case_run_paints_the_appearance_asked_for(runs: dict[str, Path]) -> None:
    """Two training steps leave the residual autoencoder's output near zero (it starts at zero), so the
    image is the fill of the asked means: each label's interior mean is the training case's own label
    mean (dataset units, recomputed from that case's files), for case 0 and case 1 alike."""
    card = json.loads((runs["per_case"] / "model_card.json").read_text())
    assert card["model"]["appearance"]["fill"] == "per_case" and card["model"]["appearance"]["num_cases"] == 4
    assert json.loads((runs["pooled"] / "model_card.json").read_text())["model"]["appearance"] == {"fill": "pooled"}
    synth = Synthesizer.from_run(runs["per_case"], device="cpu")
    cases = sorted((runs["data"].parent / "labelsTr").glob("*.nii.gz"))
    mask = read_volume(cases[0], kind="label").array
    span = float(synth.info.normalization.hi[0] - synth.info.normalization.lo[0])
    checked = 0
    for k in (0, 1):
        lab = read_volume(cases[k], kind="label").array
        img = read_volume(cases[k].parent.parent / "imagesTr" / cases[k].name, kind="image").array.astype(np.float64)
        lo, hi = synth.info.normalization.lo[0], synth.info.normalization.hi[0]
        clipped = np.clip(img, lo, hi)  # the run's units clip at its percentiles
        image = synth.generate(mask, seed=0, steps=2, appearance=k)
        for v in synth.labels:
            inner = (mask == v) & np.pad(np.ones((28, 28), bool), 2)  # off the image border
            inner &= np.abs(np.gradient((mask == v).astype(float))[0]) == 0  # off the label's edge
            if inner.sum() < 20 or not (lab == v).any():
                continue
            assert abs(image[inner].mean() - clipped[lab == v].mean()) < 0.06 * span, (k, v)
            checked += 1
    assert checked >= 4
    a, b = synth.generate(mask, seed=0, steps=2, appearance=0), synth.generate(mask, seed=0, steps=2, appearance=1)
    assert np.abs(a - b).mean() > 0.005 * span
    drawn = [synth.generate(mask, seed=s, steps=2) for s in (1, 2)]
    assert not np.array_equal(*drawn)
    with pytest.raises(ConfigError, match="per-case fill"):
        Synthesizer.from_run(runs["pooled"], device="cpu").generate(mask, seed=0, steps=2, appearance=0)


def test_fill_helpers_by_hand() -> None:
    rng = np.random.default_rng(0)
    index = rng.integers(0, 3, (2, 6, 5))
    index[1][index[1] == 2] = 1  # the second sample lacks label 2
    onehot = torch.nn.functional.one_hot(torch.from_numpy(index), 3).permute(0, 3, 1, 2).float()
    image = torch.from_numpy(rng.random((2, 1, 6, 5))).float()
    pooled = torch.tensor([[0.1, 0.5, 0.9]])
    own = fill_means_of(image, onehot, pooled)
    for n in range(2):
        for v in range(3):
            expect = image[n, 0].numpy()[index[n] == v].mean() if (index[n] == v).any() else 0.9
            assert own[n, 0, v].item() == pytest.approx(expect, abs=1e-6)
    per_sample = fill_image(onehot, own)
    for n in range(2):
        np.testing.assert_allclose(per_sample[n].numpy(), fill_image(onehot[n : n + 1], own[n])[0].numpy(), atol=1e-7)
        np.testing.assert_allclose(per_sample[n, 0].numpy(), own[n, 0].numpy()[index[n]], atol=1e-7)


def test_per_case_needs_a_fill() -> None:
    with pytest.raises(ConfigError, match="per_case"):
        load_config(CONFIGS / "tiny/ldm2d.yaml", ["model.appearance=per_case", "model.fill=none"])
