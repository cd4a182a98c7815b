"""Checkpoints are data: atomic writes, keep-last, RNG round trips, and refusal of code-running pickles."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.errors import CheckpointError
from medsynth.training import checkpoint as ck


def _payload(step: int) -> dict:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.5, 0.999))
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ck.make_payload(step=step, family="gan", stage=None,
                           family_state={"modules": {"g": net.state_dict()}, "optimizers": {"g": opt.state_dict()}},
                           config_json='{"name": "x"}', losses={"l1": 0.5},
                           data_order={"seed": 0, "next_step": step, "global_batch": 4})


class Evil:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_evil(path: Path, marker: Path) -> None:
    torch.save({"format": ck.FORMAT, "version": 1, "step": 99, "payload": Evil(marker)}, path,
               _use_new_zipfile_serialization=True)


def test_checkpoint_round_trip_keep_last_and_atomic(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    saved = {}
    for step in (5, 10, 15, 20):
        saved[step] = _payload(step)
        ck.save_checkpoint(folder, step, saved[step], keep_last=2)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["step_00000015.pt", "step_00000020.pt"]  # older ones deleted, no temp files left
    path, state = ck.load_latest_checkpoint(folder)
    assert path.name == "step_00000020.pt" and state["step"] == 20
    want = saved[20]["family_state"]["modules"]["g"]
    for k, v in state["family_state"]["modules"]["g"].items():
        assert torch.equal(v, want[k])
    assert state["family_state"]["optimizers"]["g"]["param_groups"][0]["betas"] == (0.5, 0.999)
    with pytest.raises(TypeError, match="not a tensor or plain type"):
        ck.save_checkpoint(folder, 25, {**saved[20], "bad": object()}, keep_last=2)
    assert not (folder / "step_00000025.pt").exists()


def test_checkpoint_rng_state_round_trip() -> None:
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    ck.check_plain(state)  # only tensors and plain types


def test_checkpoint_malicious_newest_is_refused_and_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    ck.save_checkpoint(folder, 10, _payload(10), keep_last=3)
    marker = tmp_path / "MARKER"
    _plant_evil(folder / "step_00000099.pt", marker)
    refused = r"refused: it holds objects that would run code when loaded \(it references (posix|nt).system\)"
    with pytest.raises(CheckpointError, match=refused):
        ck.load_checkpoint(folder / "step_00000099.pt")
    with pytest.warns(UserWarning, match="step_00000099.pt: refused"):
        path, state = ck.load_latest_checkpoint(folder)
    assert path.name == "step_00000010.pt" and state["step"] == 10
    assert not marker.exists()


def test_checkpoint_truncated_newest_falls_back_and_none_valid_errors(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    ck.save_checkpoint(folder, 10, _payload(10), keep_last=3)
    ck.save_checkpoint(folder, 20, _payload(20), keep_last=3)
    newest = folder / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="unreadable or truncated"):
        path, _ = ck.load_latest_checkpoint(folder)
    assert path.name == "step_00000010.pt"
    (folder / "step_00000010.pt").write_bytes(b"not a zip")
    torch.save({"hello": 1}, folder / "step_00000005.pt")  # loads, but is not ours
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no valid checkpoint") as err:
        ck.load_latest_checkpoint(folder)
    assert "not a medsynth checkpoint" in str(err.value)
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        ck.load_latest_checkpoint(tmp_path / "empty")


def test_checkpoint_refused_even_with_force_no_weights_only_env(tmp_path: Path) -> None:
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 must not turn our explicit weights_only=True off."""
    folder = tmp_path / "ckpts"
    ck.save_checkpoint(folder, 10, _payload(10), keep_last=3)
    marker = tmp_path / "MARKER"
    _plant_evil(folder / "step_00000099.pt", marker)
    code = textwrap.dedent(f"""
        import pathlib, warnings
        import torch
        from medsynth.training.checkpoint import load_latest_checkpoint
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            path, state = load_latest_checkpoint({str(folder)!r})
        print(path.name, state["step"], any("refused" in str(x.message) for x in w))
        print("marker after ours:", pathlib.Path({str(marker)!r}).exists())
        # the env var really changes torch's default: a plain torch.load runs the pickle's code
        torch.load({str(folder / "step_00000099.pt")!r})
        print("marker after plain:", pathlib.Path({str(marker)!r}).exists())
    """)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["step_00000010.pt", "10", "True"]
    assert lines[1] == "marker after ours: False"
    assert lines[2] == "marker after plain: True"


def test_save_weights_is_byte_reproducible_and_round_trips(tmp_path: Path) -> None:
    from safetensors import safe_open

    from medsynth.training.checkpoint import save_weights

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(4, dtype=torch.float16)}
    meta = {"format": "x", "ema": True, "scale_factor": 0.5, "conditioning": "concat", "z": [1, 2]}
    blobs = {save_weights(tmp_path / f"w{i}.safetensors", tensors, meta).read_bytes() for i in range(8)}
    assert len(blobs) == 1  # safetensors' own metadata map is hash-ordered; ours must not be
    with safe_open(str(tmp_path / "w0.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["medsynth"]) == meta
        assert torch.equal(f.get_tensor("b.weight"), tensors["b.weight"])
