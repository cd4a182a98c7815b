"""Recipe switches measured on a GPU before they become defaults: ``training.channels_last`` trains the same
model up to float rounding (the networks and batches in the channels-last format), ``training.compile``
hands the step a compiled module (not run here: compiling on the CPU takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsynth.config import load_config
from medsynth.training import run_training
from medsynth.training.engine import Runtime

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("sw") / "ds", dim=2, cases=2, seed=0, size=32)


def test_channels_last_trains_the_same_model(data2d: Path, tmp_path: Path) -> None:
    losses = {}
    for on in (False, True):
        cfg = load_config(CONFIGS / "tiny/ldm2d.yaml", [f"data.manifest={json.dumps(str(data2d))}", "training.max_steps=2",
                                                        "training.log_every=2", f"training.channels_last={str(on).lower()}"])
        losses[on] = run_training(cfg, tmp_path / f"run{on}", progress=False).losses
    assert set(losses[True]) == set(losses[False]) == {"mse"}
    assert losses[True]["mse"] == pytest.approx(losses[False]["mse"], rel=1e-4)


@pytest.mark.parametrize("dim", [2, 3])
def test_the_switches_reach_the_module_and_the_batch(dim: int, tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / f"tiny/gan{dim}d.yaml", ["training.channels_last=true", "training.compile=true"])
    rt = Runtime(config=cfg, run_dir=tmp_path, device=torch.device("cpu"))
    conv = (torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d)(2, 4, 3)
    wrapped = rt.wrap(conv)
    assert isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule) and wrapped._orig_mod is conv
    fmt = torch.channels_last if dim == 2 else torch.channels_last_3d
    assert conv.weight.is_contiguous(memory_format=fmt) and not conv.weight.is_contiguous()
    index = torch.randint(0, 3, (2, *[6] * dim))
    batch = rt.prepare({"image": torch.rand(2, 2, *[6] * dim), "label_index": index}, 3)
    assert batch["image"].is_contiguous(memory_format=fmt) and batch["label"].is_contiguous(memory_format=fmt)
    assert torch.equal(batch["label"].argmax(1), index)
