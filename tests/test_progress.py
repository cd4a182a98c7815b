"""No silent phases: medsynth.progress lines appear *during* a slow phase (the heartbeat), and the
slow phases found on a 2-core machine (the end of training, one long volume, the bootstrap of the
distribution metrics) report through it with a stage name and an ETA."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import medsynth.progress
from medsynth.config import load_config
from medsynth.progress import ProgressBar

ROOT = Path(__file__).resolve().parents[1]


class _Pipe(io.StringIO):
    """A log file: not a terminal, so the bar writes plain lines."""

    def isatty(self) -> bool:
        return False


def _fast_bars(monkeypatch: pytest.MonkeyPatch, *modules: object) -> None:
    """Bars that write plain lines every 0.05 s (instead of 10 s) wherever ``progress_bar`` is looked up."""
    def fast(*args: object, **kw: object) -> ProgressBar:
        return ProgressBar(*args, **{**kw, "every_s": 0.05})  # type: ignore[arg-type]

    for module in (medsynth.progress, *modules):
        monkeypatch.setattr(module, "progress_bar", fast)


def test_a_long_unit_of_work_is_not_silent() -> None:
    out = _Pipe()
    with ProgressBar("slow phase", 2, every_s=0.05, stream=out) as bar:
        bar.note("part one")
        time.sleep(0.4)  # no update: only the heartbeat can speak
        during = out.getvalue()
        bar.advance(2)
    assert re.search(r"slow phase: 0/2 \(0\.00/s, \d+ s so far, ETA unknown\)  part one", during), during
    assert during.count("slow phase: 0/2") >= 2  # repeated, not once
    assert "slow phase: 2/2" in out.getvalue()


def test_a_disabled_bar_writes_nothing_and_stops_no_thread() -> None:
    out = _Pipe()
    with ProgressBar("quiet", 1, enabled=False, every_s=0.01, stream=out) as bar:
        time.sleep(0.05)
        bar.advance()
    assert out.getvalue() == ""


def test_end_of_training_reports_each_part_with_an_eta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The yardstick (minutes for a 3D run) made slow here: while it runs, stderr already names it."""
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.training import yardstick
    from medsynth.training.engine import train

    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=2, size=16, seed=0)
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml", [f"data.manifest={data}", "training.max_steps=1",
                                                         "training.preview_every=0", "training.checkpoint_every=1"])
    _fast_bars(monkeypatch)
    seen: dict[str, object] = {}

    def slow_yardstick(*args: object, bar: ProgressBar | None = None, **kw: object) -> None:
        time.sleep(0.4)
        seen["bar"] = bar
        seen["err"] = capsys.readouterr().err

    monkeypatch.setattr(yardstick, "record_yardstick", slow_yardstick)
    train(cfg, tmp_path / "run", progress=True)
    assert isinstance(seen["bar"], ProgressBar) and seen["bar"].description == "gan: finishing"
    during = str(seen["err"])
    assert re.search(r"gan: finishing: 2/4 \([\d.]+/s, ETA \d+ s\)  yardstick", during), during
    assert "gan: finishing: 4/4" in capsys.readouterr().err


def test_one_volume_reports_its_share_while_it_is_generated(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A 3D GAN makes a whole volume in one call: the backend's share done moves the bar meanwhile."""
    from medsynth.data.loader import DataInfo, Normalization
    from medsynth.models.gan import SpadeGenerator
    from medsynth.synthesis import synthesizer as S
    from medsynth.synthesis.gan import _block_progress

    # the GAN's shares: one per convolution, rising to 1, the full-resolution block weighing most
    net = SpadeGenerator(3, 3, 1, [8, 4, 4], 2, 4)
    shares: list[float] = []
    before_last: list[float] = []
    hook = net.blocks[-1].register_forward_pre_hook(lambda *_: before_last.append(shares[-1]))
    with _block_progress(net, shares.append):
        net(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 2, 2, 2, 2))
    hook.remove()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(shares) == len(convs) and shares == sorted(shares) and shares[-1] == pytest.approx(1.0)
    assert before_last[0] < 0.25
    assert not any(c._forward_hooks for c in convs)  # removed afterwards

    class SlowBackend:
        size_multiple = 1
        reports_progress = True

        def generate(self, index, class_index, seeds, options, progress=None):
            progress(0.5)
            time.sleep(0.3)
            seen.append(capsys.readouterr().err)
            return torch.zeros((index.shape[0], 1, *index.shape[1:]))

    seen: list[str] = []
    info = DataInfo(dim=3, slice_axis=2, volume_ndim=3, size=[8, 8, 8], labels=[0, 1], label_names={},
                    channels=["image"], classes=[], spacing=None,
                    normalization=Normalization("mri_percentiles", [0.0], [1.0]))
    synth = S.Synthesizer.__new__(S.Synthesizer)
    synth.backend, synth.info = SlowBackend(), info  # type: ignore[assignment]
    synth.card = type("Card", (), {"config": {}})()  # type: ignore[assignment]
    _fast_bars(monkeypatch, S)
    synth.generate(np.zeros((8, 8, 8), np.int64), progress=True)
    assert re.search(r"generating \(volume, %\): 50/100 \([\d.]+/s, ETA \d+ s\)", seen[0]), seen[0]


def test_bootstrap_distances_report_their_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's evaluate stage spends most of its time here (400 matrix square roots per comparison)."""
    from medsynth.evaluation.distribution import bootstrap_distances

    rng = np.random.default_rng(0)
    bootstrap_distances(rng.normal(size=(8, 3)), rng.normal(size=(8, 3)), rounds=5, progress=True)
    assert "bootstrap distances: 5/5" in capsys.readouterr().err
