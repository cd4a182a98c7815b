"""The run card: one writer, one reader; foreign, old, new and broken cards are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsynth.data.loader import DataInfo, Normalization
from medsynth.errors import CheckpointError
from medsynth.runcard import CARD_FILE, RunCard, StageRecord, read_run_card, write_run_card


def _card(run: Path) -> RunCard:
    info = DataInfo(dim=2, slice_axis=2, volume_ndim=3, size=[32, 32], labels=[0, 1, 3],
                    label_names={0: "background", 1: "a", 3: "c"}, channels=["T1", "T2"], classes=["x", "y"],
                    spacing=[1.0, 1.0, 2.5], normalization=Normalization("mri_percentiles", [0.0, 1.0], [5.0, 9.0],
                                                                         [0.5, 99.5]),
                    fingerprint="ab" * 32, num_cases=4, class_key="site")
    return RunCard(run_dir=run, family="ldm", config={"name": "r", "model": {"family": "ldm"}}, data=info,
                   steps=7, final_losses={"mse": 0.25}, model={"weights": "model.safetensors", "scale_factor": 1.5},
                   stages={"autoencoder": StageRecord(5, {"l1": 0.5}), "diffusion": StageRecord(7, {"mse": 0.25})})


def _write_raw(run: Path, raw: object) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / CARD_FILE).write_text(json.dumps(raw))


def test_round_trip_and_the_fields_consumers_use(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    card = _card(run)
    path = write_run_card(run, card)
    assert path == run / "model_card.json"
    raw = json.loads(path.read_text())  # the file as written: the documented layout
    assert raw["format"] == "medsynth-model-card" and raw["version"] == 1 and raw["family"] == "ldm"
    assert raw["data"]["labels"] == [0, 1, 3] and raw["stages"]["autoencoder"] == {"steps": 5, "final_losses": {"l1": 0.5}}
    back = read_run_card(run)
    assert back.labels == [0, 1, 3] and back.channels == 2 and back.classes == ["x", "y"]
    assert back.class_key == "site" and back.weights_path == run / "model.safetensors"
    assert back.steps == 7 and back.final_losses == {"mse": 0.25} and back.stages == card.stages
    assert back.data.normalization.hi == [5.0, 9.0] and back.model_section == {"family": "ldm"}
    assert back.medsynth_version != ""
    assert [p.name for p in run.iterdir()] == ["model_card.json"]  # no temp file left behind


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d.update(format="something-else"), r"not a medsynth model card \(field 'format'"),
    (lambda d: d.update(version=2), r"field 'version' is 2: written by a newer medsynth"),
    (lambda d: d.update(version=0), r"field 'version' is 0: an older card layout"),
    (lambda d: d.update(version="1"), r"field 'version' must be an integer"),
    (lambda d: d.pop("data"), r"field 'data' is missing"),
    (lambda d: d["data"].pop("labels"), r"field 'data.labels' is missing"),
    (lambda d: d["data"]["normalization"].pop("hi"), r"field 'data.normalization.hi' is missing"),
    (lambda d: d["data"].update(labels=[]), r"field 'data.labels' is empty"),
    (lambda d: d["data"].update(size="big"), r"field 'data' is malformed"),
    (lambda d: d.update(steps=-3), r"field 'steps' must be a non-negative integer"),
    (lambda d: d["final_losses"].update(mse="low"), r"field 'final_losses.mse' must be a finite number"),
    (lambda d: d["config"]["model"].update(family="gan"), r"field 'config.model.family' is 'gan', the card says 'ldm'"),
    (lambda d: d["model"].update(weights="../../elsewhere.safetensors"), r"field 'model.weights'"),
    (lambda d: d.update(stages={"autoencoder": 5}), r"field 'stages.autoencoder'"),
])
def test_bad_cards_are_refused_naming_file_and_field(tmp_path: Path, edit, expected: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    raw = _card(run).to_dict()
    edit(raw)
    _write_raw(run, raw)
    with pytest.raises(CheckpointError, match=expected) as info:
        read_run_card(run)
    assert str(run / "model_card.json") in str(info.value)


def test_missing_and_unreadable_cards(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run folder"):
        read_run_card(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_card.json"):
        read_run_card(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / CARD_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable model card"):
        read_run_card(tmp_path / "bad")
    _write_raw(tmp_path / "list", [1, 2])
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_run_card(tmp_path / "list")
