"""The memory model of ``medsynth train --dry-run``: parameters and saved activations from a training
step on the meta device, checked against networks built for real and against a stated device memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.config import load_config
from medsynth.errors import ConfigError
from medsynth.training.engine import Runtime, family_class
from medsynth.training.memory import BYTES_PER_PARAMETER, assumed_info, check_estimates, estimate_memory

ROOT = Path(__file__).resolve().parents[1]
TINY2D = ROOT / "configs/tiny/gan2d.yaml"


def test_meta_parameters_equal_the_networks_built_for_real(tmp_path: Path) -> None:
    cfg = load_config(TINY2D)
    info = assumed_info(cfg)
    (estimate,) = estimate_memory(cfg, info)
    rt = Runtime(config=cfg, run_dir=tmp_path, device=torch.device("cpu"))
    family = family_class("gan")(cfg, info, rt)
    real = sum(p.numel() for name in ("generator", "discriminator") for p in family.modules[name].parameters())
    assert estimate.parameters == real
    ema = sum(p.numel() for p in family.modules["generator"].parameters())  # the recipe keeps an EMA generator
    assert estimate.parameter_bytes == real * BYTES_PER_PARAMETER + ema * 4


def test_activations_grow_with_the_batch_and_the_crop() -> None:
    base = estimate_memory(load_config(TINY2D))[0]
    double = estimate_memory(load_config(TINY2D, ["training.batch_size=8"]))[0]
    bigger = estimate_memory(load_config(TINY2D, ["data.size=[64, 64]"]))[0]
    assert load_config(TINY2D).training.batch_size == 4
    # saved activations are per sample and per voxel: 2x the batch or 4x the voxels scale them alike
    assert double.activation_bytes == pytest.approx(2 * base.activation_bytes, rel=0.02)
    assert bigger.activation_bytes == pytest.approx(4 * base.activation_bytes, rel=0.02)
    assert bigger.parameters == base.parameters
    # a batch of 4 crops of 32^2 at 16 labels: image 4 B + index 8 B + one-hot 64 B per voxel
    assert base.batch_bytes == 4 * 32 * 32 * (4 + 8 + 4 * 16)
    with pytest.raises(ConfigError, match=r"gan2d-tiny: 63,955 parameters.*more than the 1 MiB of the GPU"):
        check_estimates([base], 1024**2, "GPU")


def test_train_dry_run_prints_and_refuses() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", "tiny/ldm2d", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "ldm2d-tiny (autoencoder):" in res.output and "parameters, estimated peak" in res.output
    assert "fits the 80 GiB of the default --device-memory" in res.output
    res = runner.invoke(app, ["train", "tiny/gan2d", "--dry-run", "--device-memory", "1MiB"])
    assert res.exit_code == 1 and "more than the 1 MiB of the --device-memory" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", "tiny/gan2d"])
    assert res.exit_code == 1 and "--out" in res.output
