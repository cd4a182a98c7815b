"""The memory model of ``medsynth train --dry-run``: parameters and saved activations from a training
step on the meta device, checked against networks built for real and against a stated device memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


_MEASURE = """
import json, sys
import torch
from medsynth.config import load_config
from medsynth.recipes import recipe_path
from medsynth.training.memory import estimate_memory, measure_step_memory
torch.set_num_threads(1)
recipe, stage = sys.argv[1], (None if sys.argv[2] == "-" else sys.argv[2])
cfg = load_config(recipe_path(recipe))
(estimate,) = [e for e in estimate_memory(cfg) if e.stage == stage]
print(json.dumps([measure_step_memory(cfg, stage, steps=2).peak_bytes, estimate.peak_bytes]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is reset through Linux's /proc")
@pytest.mark.parametrize(("recipe", "stage"), [("tiny/gan2d", None), ("tiny/gan3d", None),
                                                ("tiny/ldm2d", "autoencoder"), ("tiny/ldm3d", "autoencoder")])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak_rss(recipe: str, stage: str | None) -> None:
    # a fresh process each: its peak RSS growth over one training step's family, batch and 2 steps;
    # glibc returns every freed block over 64 KiB, so the RSS follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, recipe, stage or "-"], env=env, capture_output=True,
                         text=True, timeout=180, check=True, cwd=ROOT)
    measured, estimated = json.loads(out.stdout.splitlines()[-1])
    assert measured > 2**20
    assert abs(estimated / measured - 1) <= 0.25, (recipe, measured, estimated)
