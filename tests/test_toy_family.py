"""A new model family is its own code plus one registration: this file defines a toy family (a
one-layer convolution from the one-hot mask to the image, trained with L1), registers it, and
trains, samples and augments with it through the public entry points only."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medsynth.config import Config, ModelSection
from medsynth.data.loader import DataInfo, one_hot
from medsynth.registry import Family, register_family, unregister_family
from medsynth.runcard import WEIGHTS_FILE, RunCard
from medsynth.training.engine import Batch, FamilyBase, Runtime

# ---------------------------------------------------------------------------- the toy family


class ToyModelConfig(ModelSection):
    """The recipe's ``model`` section of the toy family."""

    family: Literal["toy"] = "toy"
    kernel: int = Field(default=1, ge=1)


def build_toy(model: ToyModelConfig, info: DataInfo) -> nn.Module:
    """One convolution: one-hot mask ``(N, L, *spatial)`` -> image ``(N, C, *spatial)`` in [0, 1] units."""
    conv = nn.Conv2d if info.dim == 2 else nn.Conv3d
    return conv(info.num_labels, info.num_channels, model.kernel, padding=model.kernel // 2)


class ToyFamily(FamilyBase):
    name = "toy"

    def __init__(self, config: Config, info: DataInfo, rt: Runtime) -> None:
        super().__init__(config, info, rt)
        self.net = build_toy(config.model_as(ToyModelConfig), info).to(rt.device)
        self.modules = {"generator": self.net}
        self.optimizers = {"generator": self.make_optimizer(self.net.parameters(), config.training.lr)}
        self.net_train = rt.wrap(self.net)

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        with self.rt.autocast():
            fake = self.net_train(batch["label"])
        loss = F.l1_loss(fake.float(), batch["image"])
        self.clip_and_step("generator", loss)
        return {"l1": loss.item()}

    def preview(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"real": batch["image"], "generated": self.net(batch["label"]).clamp(0, 1)}

    def export(self, run_dir: Path) -> dict[str, object]:
        from medsynth.training.checkpoint import save_weights

        save_weights(run_dir / WEIGHTS_FILE, self.net.state_dict(), {"format": "toy"})
        return {"network": "Conv"}


class ToyBackend:
    size_multiple = 1

    def __init__(self, card: RunCard, device: torch.device) -> None:
        from safetensors.torch import load_file

        self.net = build_toy(ToyModelConfig.model_validate(card.model_section), card.data)
        self.net.load_state_dict(load_file(str(card.weights_path)))
        self.net.to(device).eval()
        self.device, self.num_labels = device, card.data.num_labels

    def generate(self, index: torch.Tensor, class_index: torch.Tensor, seeds: list[int],
                 options: Mapping[str, object]) -> torch.Tensor:
        with torch.no_grad():
            return self.net(one_hot(index.to(self.device), self.num_labels)).clamp(0, 1)


def load_toy_backend(card: RunCard, device: torch.device) -> ToyBackend:
    return ToyBackend(card, device)


@pytest.fixture(scope="module", autouse=True)
def toy_registered() -> Iterator[None]:
    register_family(Family(
        name="toy", summary="one convolution from the mask (a test family)",
        config=f"{__name__}:ToyModelConfig", trainer=f"{__name__}:ToyFamily", backend=f"{__name__}:load_toy_backend",
    ))
    yield
    unregister_family("toy")


# ---------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(manifest, run): 4 phantom slices, the toy trained by ``medsynth train`` on a recipe file."""
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.data.phantoms import make_phantom_dataset

    root = tmp_path_factory.mktemp("toy")
    manifest = make_phantom_dataset(root / "data", dim=2, cases=4, size=32, seed=0)
    recipe = root / "toy.yaml"
    recipe.write_text(
        "data: {dim: 2, size: [32, 32]}\n"
        "model: {family: toy, kernel: 1}\n"
        "training: {max_steps: 150, batch_size: 4, lr: 0.02, ema: null, log_every: 50, checkpoint_every: 150,"
        " preview_every: 0}\n")
    result = CliRunner().invoke(app, ["train", str(recipe), "--out", str(root / "run"), "--data", str(manifest),
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    return manifest, root / "run"


def _label_medians(manifest: Path) -> dict[int, float]:
    """Median real intensity of each label over the training cases, read back from the files."""
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume

    values: dict[int, list[np.ndarray]] = {}
    for case in read_manifest(manifest).cases:
        image, label = read_volume(case.images[0]).array, read_volume(case.label).array
        for v in np.unique(label):
            values.setdefault(int(v), []).append(image[label == v])
    return {v: float(np.median(np.concatenate(parts))) for v, parts in values.items()}


def test_toy_recipe_validates_with_its_own_config_class(trained: tuple[Path, Path]) -> None:
    from medsynth.config import load_config
    from medsynth.errors import ConfigError

    assert isinstance(load_config(None, ["model.family=toy"]).model, ToyModelConfig)
    with pytest.raises(ConfigError, match=r"model.kernel: Input should be greater than or equal to 1 \(got 0\)"):
        load_config(None, ["model.family=toy", "model.kernel=0"])


def test_toy_trains_and_samples_through_the_public_api(trained: tuple[Path, Path]) -> None:
    from medsynth import Synthesizer
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume
    from medsynth.runcard import read_run_card

    manifest, run = trained
    card = read_run_card(run)
    assert card.family == "toy" and card.steps == 150 and card.model == {"network": "Conv"}
    losses = [r["l1"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    # a 1x1 convolution trained with L1 predicts each label's median intensity
    synth = Synthesizer.from_run(run, device="cpu")
    assert synth.family == "toy"
    label = read_volume(read_manifest(manifest).cases[0].label)
    image = synth.generate(label.array, seed=0)
    assert image.shape == label.array.shape
    norm = card.data.normalization
    span = norm.hi[0] - norm.lo[0]
    for value, median in _label_medians(manifest).items():
        got = image[label.array == value]
        if got.size:
            expected = min(max(median, norm.lo[0]), norm.hi[0])
            assert abs(float(np.mean(got)) - expected) < 0.02 * span, (value, float(np.mean(got)), expected)


def test_toy_augments_through_the_augment_job(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from medsynth import AugmentOptions, run_augment
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume

    manifest, run = trained
    from medsynth.augment.options import AugmentConfig
    from medsynth.synthesis.pairs import QCConfig

    # the toy paints each label flat: the QC's texture floor (meant for real generators) is off for it
    summary = run_augment(AugmentOptions(input=manifest, out=tmp_path / "aug", method="toy", num=2, seed=0,
                                         model=run, config=AugmentConfig(qc=QCConfig(texture=False))))
    out = read_manifest(summary.manifest)
    synthetic = [c for c in out.cases if c.case_id.startswith("syn_")]
    assert len(synthetic) == 2 and len(out.cases) == 6
    for case in synthetic:
        image, label = read_volume(case.images[0]), read_volume(case.label)
        assert image.array.shape == label.array.shape and np.allclose(image.affine, label.affine)
        assert np.isfinite(image.array).all()
