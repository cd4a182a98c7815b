"""Manifests: MSD JSON, nnU-Net raw folders and CSV read -> write -> read give the same dataset;
relative paths resolve against the manifest's folder, not the working directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.data.manifest import (
    Case,
    Manifest,
    nnunet_image_path,
    nnunet_label_path,
    read_manifest,
    write_manifest,
)
from medsynth.errors import DataError


def _touch(*paths: Path) -> None:
    # The readers never open volumes, so empty files are enough here.
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _key(m: Manifest) -> list[tuple]:
    return [(c.case_id, [p.resolve() for p in c.images], c.label and c.label.resolve(), c.split, c.extra) for c in m.cases]


def test_msd_round_trip_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    raw = {
        "name": "Hippo",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "numTraining": 2,
        "tensorImageSize": "3D",
        "training": [
            {"image": "./imagesTr/h1.nii.gz", "label": "./labelsTr/h1.nii.gz"},
            {"image": "imagesTr/h2.nii.gz", "label": "labelsTr/h2.nii.gz", "case_id": "second", "site": "B"},
        ],
        "validation": [{"image": "imagesTr/h3.nii.gz", "label": "labelsTr/h3.nii.gz"}],
        "test": ["imagesTs/h9.nii.gz"],
    }
    src = folder / "my_hippocampus.json"  # any file name, not only dataset.json
    src.write_text(json.dumps(raw))
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    m = read_manifest(Path("data/my_hippocampus.json"))
    assert m.format == "msd" and m.name == "Hippo" and m.channels == ["MRI"]
    assert m.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert [c.case_id for c in m.cases] == ["h1", "second", "h3", "h9"]
    assert [c.split for c in m.cases] == ["train", "train", "val", "test"]
    assert m.cases[0].images == [folder.resolve() / "imagesTr/h1.nii.gz"]
    assert m.cases[1].label == folder.resolve() / "labelsTr/h2.nii.gz"
    assert m.cases[1].extra == {"site": "B"} and m.cases[3].label is None
    assert m.meta["tensorImageSize"] == "3D"

    out = write_manifest(m, tmp_path / "elsewhere" / "copy.json")  # paths rewritten relative to the new place
    written = json.loads(out.read_text())
    assert written["training"][0]["image"] == "../data/imagesTr/h1.nii.gz"
    assert written["numTraining"] == 2 and written["tensorImageSize"] == "3D"
    back = read_manifest(out)
    assert _key(back) == _key(m)
    assert back.labels == m.labels and back.channels == m.channels and back.name == m.name


def test_msd_multichannel_and_absent_labels_round_trip(tmp_path: Path) -> None:
    m = Manifest(
        format="msd",
        cases=[Case("a", [tmp_path / "a_t1.nii.gz", tmp_path / "a_t2.nii.gz"], tmp_path / "a_seg.nii.gz", split="fold3")],
        labels=None,
        channels=["T1", "T2"],
    )
    back = read_manifest(write_manifest(m, tmp_path / "ds.json"))
    assert back.labels is None and back.channels == ["T1", "T2"]
    assert _key(back) == _key(m)  # the free-text split survives too


def test_nnunet_multichannel_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "Dataset002_Brain"
    ids = ["BRATS_001", "BRATS_002"]
    for cid in ids:
        _touch(root / f"imagesTr/{cid}_0000.nii.gz", root / f"imagesTr/{cid}_0001.nii.gz", root / f"labelsTr/{cid}.nii.gz")
    _touch(root / "imagesTs/BRATS_100_0000.nii.gz", root / "imagesTs/BRATS_100_0001.nii.gz")
    meta = {
        "channel_names": {"0": "T1", "1": "FLAIR"},
        "labels": {"background": 0, "edema": 1, "tumor": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    m = read_manifest(root)
    assert m.format == "nnunet" and m.channels == ["T1", "FLAIR"]
    assert m.labels == {0: "background", 1: "edema", 2: "tumor"}
    assert [c.case_id for c in m.cases] == [*ids, "BRATS_100"]
    first = m.cases[0]
    assert first.images == [root / "imagesTr/BRATS_001_0000.nii.gz", root / "imagesTr/BRATS_001_0001.nii.gz"]
    assert first.label == nnunet_label_path(root, "BRATS_001")
    assert first.images[1] == nnunet_image_path(root, "BRATS_001", 1)
    assert m.cases[2].split == "test" and m.cases[2].label is None
    assert read_manifest(root / "dataset.json").cases == m.cases  # the JSON itself also works

    write_manifest(m, root)
    written = json.loads((root / "dataset.json").read_text())
    assert written["numTraining"] == 2 and written["channel_names"] == {"0": "T1", "1": "FLAIR"}
    assert written["overwrite_image_reader_writer"] == "NibabelIOWithReorient"
    back = read_manifest(root)
    assert _key(back) == _key(m) and back.labels == m.labels and back.channels == m.channels


def test_csv_round_trip_and_cross_format(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "sub" / "cases.csv"
    csv_path.write_text(
        "case_id,image_0000,image_0001,label,split,scanner\n"
        "p1,img/p1_t1.nii.gz,img/p1_t2.nii.gz,seg/p1.nii.gz,train,GE\n"
        "p2,/abs/p2_t1.nii.gz,/abs/p2_t2.nii.gz,,test,Siemens\n"
    )
    m = read_manifest(csv_path)
    assert m.format == "csv" and m.num_channels == 2
    assert m.cases[0].images[1] == (tmp_path / "sub/img/p1_t2.nii.gz").resolve()
    assert m.cases[1].images[0] == Path("/abs/p2_t1.nii.gz") and m.cases[1].label is None
    assert m.cases[0].extra == {"scanner": "GE"}
    back = read_manifest(write_manifest(m, tmp_path / "out.csv"))
    assert _key(back) == _key(m)

    # CSV -> MSD -> CSV keeps cases, channels and splits
    as_msd = read_manifest(write_manifest(m, tmp_path / "as_msd.json", fmt="msd"))
    assert [(c.case_id, c.split) for c in as_msd.cases] == [("p1", "train"), ("p2", "test")]
    assert [c.images for c in as_msd.cases] == [c.images for c in m.cases]

    simple = tmp_path / "simple.csv"
    simple.write_text("image,label\na.nii.gz,a_seg.nii.gz\n")
    s = read_manifest(simple)
    assert s.cases[0].case_id == "a" and s.cases[0].label == tmp_path.resolve() / "a_seg.nii.gz"


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("extra.csv", "image,label\na.nii.gz,b.nii.gz,c\n", "line 2 has more cells"),
        ("dupe.csv", "image,label\na.nii.gz,x.nii.gz\na.nii.gz,y.nii.gz\n", "repeats case id 'a'"),
        ("nolabel.csv", "image\na.nii.gz\n", "needs a \"label\" column"),
        ("mod.json", json.dumps({"modality": {"T1": "x"}, "training": []}), "channel key 'T1' is not an integer"),
        ("img.json", json.dumps({"training": [{"image": 3}]}), "\"image\" must be a path"),
        ("bad.json", "{nope", "not valid JSON"),
        ("lab.json", json.dumps({"labels": {"one": "x"}, "training": []}), "label key 'one'"),
    ],
)
def test_bad_manifests_raise_data_error(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_manifest(tmp_path / name)


def test_nnunet_missing_channel_file(tmp_path: Path) -> None:
    _touch(tmp_path / "imagesTr/c1_0000.nii.gz", tmp_path / "labelsTr/c1.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}))
    with pytest.raises(DataError, match="c1_0001.nii.gz"):
        read_manifest(tmp_path)


def test_example_manifests_parse(tmp_path: Path) -> None:
    examples = Path(__file__).resolve().parents[1] / "data_manifests"
    msd = read_manifest(examples / "example_msd.json")
    assert msd.format == "msd" and len(msd.training_cases()) == 3 and msd.labels[5] == "ventricles"
    assert msd.cases[0].images == [examples / "imagesTr/sub-01.nii.gz"]
    csv_m = read_manifest(examples / "example.csv")
    assert [c.split for c in csv_m.cases] == ["train", "train", "val", "test"]
    # the nnU-Net example is a dataset.json only; give it (empty) files to list
    root = tmp_path / "Dataset042_BrainExample"
    root.mkdir()
    (root / "dataset.json").write_text((examples / "example_nnunet/dataset.json").read_text())
    for cid in ("sub-01", "sub-02"):
        _touch(root / f"imagesTr/{cid}_0000.nii.gz", root / f"imagesTr/{cid}_0001.nii.gz", root / f"labelsTr/{cid}.nii.gz")
    nn = read_manifest(root)
    assert nn.channels == ["T1", "FLAIR"] and len(nn.cases) == 2 and nn.meta["declared_numTraining"] == 2


def test_msd_json_with_a_utf8_bom_reads(tmp_path: Path) -> None:
    """Windows editors save JSON with a byte-order mark; it is still the same manifest."""
    (tmp_path / "dataset.json").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"labels": {"0": "background", "1": "a"}, "training": [
            {"image": "imagesTr/c0.nii.gz", "label": "labelsTr/c0.nii.gz"}]}).encode())
    m = read_manifest(tmp_path / "dataset.json")
    assert m.labels == {0: "background", 1: "a"} and m.cases[0].label == tmp_path / "labelsTr" / "c0.nii.gz"


def test_nnunet_region_labels_survive_a_round_trip(tmp_path: Path) -> None:
    """nnU-Net region-based labels map one name to several values; writing must keep them all."""
    from medsynth.data.manifest import nnunet_image_path, nnunet_label_path
    from medsynth.data.nifti import write_volume

    src = tmp_path / "Dataset001_Regions"
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6], lab[3:5, 3:5, 3:5] = 1, 2
    write_volume(nnunet_image_path(src, "c0", 0), lab.astype(np.float32), np.eye(4), kind="image")
    write_volume(nnunet_label_path(src, "c0"), lab, np.eye(4), kind="label")
    regions = {"background": 0, "whole": [1, 2], "core": [2]}
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": regions,
                                                  "regions_class_order": [1, 2], "numTraining": 1,
                                                  "file_ending": ".nii.gz"}))
    m = read_manifest(src)
    assert sorted(m.labels) == [0, 1, 2]
    written = json.loads(write_manifest(m, src).read_text())
    assert written["labels"] == regions and written["regions_class_order"] == [1, 2]
    # labels edited by the caller (values no longer those declared): rebuilt, names kept unique
    m.labels = {0: "background", 1: "whole", 2: "whole", 3: "new"}
    rebuilt = json.loads(write_manifest(m, src).read_text())["labels"]
    assert sorted(rebuilt.values()) == [0, 1, 2, 3] and len(rebuilt) == 4
