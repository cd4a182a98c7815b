"""`medsynth downstream`: outputs, metrics against hand calculations, determinism, bad inputs.

Behaviour, not quality: 16x16 phantoms, a 3-level UNet with 4 base channels, a handful of steps.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app

SMALL = ["--seeds", "2", "--steps", "3", "--batch-size", "2", "--channels", "4", "--no-progress"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from medsynth.augment import AugmentOptions, run_augment
    from medsynth.data.phantoms import make_phantom_dataset

    root = tmp_path_factory.mktemp("downstream")
    train = make_phantom_dataset(root / "train", dim=2, cases=4, seed=0, size=16)
    test = make_phantom_dataset(root / "test", dim=2, cases=3, seed=1, size=16)
    aug = run_augment(AugmentOptions(input=train, out=root / "aug", method="synthseg", num=4, seed=0)).manifest
    assert aug is not None
    return {"root": root, "train": train, "test": test, "aug": aug}


@pytest.fixture(scope="module")
def cli_run(datasets: dict[str, Path]) -> Path:
    out = datasets["root"] / "out"
    result = CliRunner().invoke(app, ["downstream", str(datasets["train"]), "--test", str(datasets["test"]),
                                      "--synthetic", str(datasets["aug"]), "--out", str(out), *SMALL])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "real+synthseg+classic" in result.output
    return out


VARIANTS = ["real", "real+classic", "real+synthseg", "real+synthseg+classic"]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs_exist_and_parse(cli_run: Path) -> None:
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["kind"] == "medsynth-downstream"
    assert [v["name"] for v in summary["variants"]] == VARIANTS
    assert summary["seeds"] == [0, 1] and summary["test_cases"] == 3
    # one row per variant x seed x test case x foreground label (phantoms: labels 1..6)
    rows = _rows(cli_run)
    assert len(rows) == 4 * 2 * 3 * 6
    assert {(r["variant"], r["seed"], r["case_id"], r["label"]) for r in rows} == {
        (v, str(s), f"phantom_{c:03d}", str(lab)) for v in VARIANTS for s in (0, 1) for c in range(3) for lab in range(1, 7)}
    assert (cli_run / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (cli_run / "report.md").read_text()
    assert "](dice.png)" in report and all(f"`{v}`" in report for v in VARIANTS)
    # the synthetic set's 4 real cases are TRAIN's: not counted twice
    syn = next(v for v in summary["variants"] if v["name"] == "real+synthseg")
    assert syn["real_cases"] == 4 and syn["synthetic_cases"] == 4


def test_summary_numbers_recomputed_from_metrics_csv(cli_run: Path) -> None:
    summary = json.loads((cli_run / "summary.json").read_text())
    rows = _rows(cli_run)
    for v in summary["variants"]:
        for k, seed in enumerate(summary["seeds"]):
            per_case: dict[str, list[float]] = {}
            for r in rows:
                if r["variant"] == v["name"] and int(r["seed"]) == seed and r["dice"] != "":
                    per_case.setdefault(r["case_id"], []).append(float(r["dice"]))
            expected = sum(sum(d) / len(d) for d in per_case.values()) / len(per_case)
            assert v["dice"]["per_seed"][k] == pytest.approx(expected, abs=1e-9)
        # a label absent from a case's reference has an empty Dice cell and is counted
        absent = sum(1 for r in rows if r["variant"] == v["name"] and r["reference_voxels"] == "0")
        assert absent == v["absent_labels"] and all(
            r["dice"] == "" for r in rows if r["variant"] == v["name"] and r["reference_voxels"] == "0")


def test_dice_and_hd95_against_a_hand_calculation() -> None:
    from medsynth.evaluation.downstream.metrics import label_metrics

    ref = np.zeros((10, 12), dtype=np.int64)
    pred = np.zeros_like(ref)
    ref[1:5, 1:5] = 1  # 16 voxels
    pred[2:6, 1:5] = 1  # 16 voxels, 12 shared
    ref[7, 2] = 2  # one voxel each, 3 voxels apart along axis 1
    pred[7, 5] = 2
    ref[8, 9] = 4  # in the reference, never predicted
    m = label_metrics(pred, ref, [1, 2, 3, 4], spacing=(1.0, 2.0))
    assert m.dice[0] == pytest.approx(2 * 12 / (16 + 16))
    assert m.dice[1] == 0.0 and m.hd95[1] == pytest.approx(3 * 2.0)  # 3 voxels of 2 mm
    assert math.isnan(m.dice[2]) and math.isnan(m.hd95[2])  # absent from both
    assert m.dice[3] == 0.0 and math.isnan(m.hd95[3])  # missed: no predicted surface
    assert list(m.reference) == [16, 1, 0, 1] and list(m.predicted) == [16, 1, 0, 0]


def test_a_perfect_prediction_scores_dice_one_and_hd95_zero(datasets: dict[str, Path]) -> None:
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume
    from medsynth.evaluation.downstream.metrics import label_metrics

    case = read_manifest(datasets["test"]).cases[0]
    label = read_volume(case.label, kind="label").array.astype(np.int64)
    present = [v for v in range(1, 7) if (label == v).any()]
    m = label_metrics(label, label, present, spacing=(1.0, 1.0))
    assert np.all(m.dice == 1.0) and np.all(m.hd95 == 0.0)


def test_bootstrap_interval_contains_the_mean_and_repeats_by_seed() -> None:
    from medsynth.evaluation.downstream.metrics import paired_bootstrap

    diff = np.random.default_rng(3).normal(0.05, 0.1, size=(12, 3))
    mean, low, high = paired_bootstrap(diff, n_boot=2000, seed=7)
    assert mean == pytest.approx(diff.mean())
    assert low < mean < high
    assert paired_bootstrap(diff, n_boot=2000, seed=7) == (mean, low, high)
    assert paired_bootstrap(diff, n_boot=2000, seed=8) != (mean, low, high)
    # a constant difference has no spread; a row with NaN is left out
    const = np.full((5, 2), 0.25)
    const[0, 0] = np.nan
    assert paired_bootstrap(const, n_boot=500, seed=0) == pytest.approx((0.25, 0.25, 0.25))


def test_same_seed_same_summary_and_kfold_covers_every_case(datasets: dict[str, Path]) -> None:
    import medsynth

    def run() -> dict:
        s = medsynth.downstream(datasets["train"], seeds=[5], steps=2, batch_size=2, channels=4, folds=2)
        d = s.to_dict()
        for v in d["variants"]:
            v.pop("seconds")
        d.pop("seconds")
        return d

    first, second = run(), run()
    assert first == second
    assert first["folds"] == 2 and first["test_cases"] == 4  # every training case tested once
    assert first["variants"][0]["real_cases"] == 4  # 2 folds x 2 training cases


def test_kfold_leaves_out_synthetic_cases_of_held_out_sources() -> None:
    from medsynth.evaluation.downstream.data import DownstreamData, LoadedCase, SyntheticSet
    from medsynth.evaluation.downstream.run import _fold_synthetic, make_splits

    def case(cid: str, source: str | None = None) -> LoadedCase:
        return LoadedCase(cid, np.zeros((1, 4, 4), np.float32), np.zeros((4, 4), np.int64), (1.0, 1.0), source)

    real = [case(f"r{i}") for i in range(4)]
    syn = SyntheticSet("synthseg", Path("aug"), [case(f"s{i}", f"r{i}") for i in range(4)] + [case("s_x")], [])
    data = DownstreamData(Path("t"), real, None, None, [syn], {0: "bg", 1: "x"}, 2, 1, [(0.0, 1.0)])
    splits = make_splits(data, 2)
    assert sorted(c.case_id for s in splits for c in s.test) == [c.case_id for c in real]
    for split in splits:
        kept = {c.case_id for c in _fold_synthetic(syn, split)}
        assert kept == {f"s{i}" for i in range(4) if f"r{i}" not in split.held_out} | {"s_x"}


def test_3d_patches_smaller_than_the_volume_train_and_predict_full_size(tmp_path: Path) -> None:
    import medsynth
    from medsynth.data.phantoms import make_phantom_dataset

    train = make_phantom_dataset(tmp_path / "t3", dim=3, cases=2, seed=0, size=20)
    test = make_phantom_dataset(tmp_path / "v3", dim=3, cases=1, seed=1, size=20)
    s = medsynth.downstream(train, test, seeds=[0], steps=2, batch_size=2, channels=4, patch_size=12,
                            network="dynunet")
    assert s.spatial_dims == 3 and s.patch == [12, 12, 12] and "DynUNet" in s.segmenter
    assert all(v.dice.mean is not None for v in s.variants)
    # the sliding window covers a volume larger than the patch, and an odd-sized one
    from medsynth.evaluation.downstream.segmenter import plan_segmenter, predict

    spec = plan_segmenter("unet", 3, 1, 7, [(20, 20, 20)], base_channels=2, patch_size=12)
    net = spec.build().eval()
    for shape in ((20, 20, 20), (9, 23, 14)):
        index = predict(net, spec, np.zeros((1, *shape), np.float32), device="cpu", batch_size=2)
        assert index.shape == shape and index.min() >= 0 and index.max() < 7


def test_batches_depend_only_on_seed_fold_and_step(datasets: dict[str, Path]) -> None:
    from medsynth.evaluation.downstream.data import load_inputs
    from medsynth.evaluation.downstream.segmenter import TrainingPool

    data = load_inputs(datasets["train"], datasets["test"], [datasets["aug"]])

    def pool(classic: bool, seed: int = 0) -> TrainingPool:
        return TrainingPool(data.train, data.synthetic[0].cases, patch=(16, 16), labels=sorted(data.labels),
                            ranges=data.ranges, classic=classic, real_fraction=0.5, seed=seed, fold=0)

    images, index = pool(True).batch(4, 6)
    assert images.shape == (6, 1, 16, 16) and index.shape == (6, 1, 16, 16) and images.dtype == np.float32
    assert index.min() >= 0 and index.max() <= 6
    again = pool(True).batch(4, 6)
    assert np.array_equal(images, again[0]) and np.array_equal(index, again[1])
    assert not np.array_equal(images, pool(True, seed=1).batch(4, 6)[0])
    # without classic augmentation a real sample is the case itself, z-scored
    plain, _ = TrainingPool(data.train, [], patch=(16, 16), labels=sorted(data.labels), ranges=data.ranges,
                            classic=False, real_fraction=0.5, seed=0, fold=0).batch(0, 1)
    case = next(c for c in data.train if np.allclose((c.image - c.image.mean()) / c.image.std(), plain[0], atol=1e-5))
    assert case is not None


def test_a_synthetic_set_from_other_real_cases_warns(datasets: dict[str, Path]) -> None:
    from medsynth.augment import AugmentOptions, run_augment

    # the test slices under other case ids, then a synthetic set made from them
    data = json.loads(Path(datasets["test"]).read_text())
    for k, entry in enumerate(data["training"]):
        entry["case_id"] = f"other_{k}"
    other = _write_msd(Path(datasets["test"]).parent / "other_ids.json", data)
    aug = run_augment(AugmentOptions(input=other, out=datasets["root"] / "aug_other", method="synthseg", num=2,
                                     seed=0)).manifest
    out = datasets["root"] / "out_other"
    result = CliRunner().invoke(app, ["downstream", str(datasets["train"]), "--test", str(datasets["test"]),
                                      "--synthetic", str(aug), "--out", str(out), "--seeds", "1", "--steps", "1",
                                      "--batch-size", "2", "--channels", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "not paired" in result.output and str(aug) in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert any("not paired" in w for w in summary["warnings"])
    # its 3 real cases are not used: the variant trains on TRAIN's 4 real and the 2 synthetic cases
    variant = summary["variants"][2]
    assert (variant["real_cases"], variant["synthetic_cases"]) == (4, 2)


def _invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["downstream", *args])
    return result.exit_code, result.output


def _write_msd(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("problem", ["labels", "dimension", "empty", "missing"])
def test_bad_test_set_is_one_clean_error_and_writes_nothing(datasets: dict[str, Path], tmp_path: Path,
                                                             problem: str) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    test_json = json.loads(Path(datasets["test"]).read_text())
    root = Path(datasets["test"]).parent
    if problem == "labels":  # a label set with one more label than the training set's
        test_json["labels"]["7"] = "extra"
        bad = _write_msd(root / "labels7.json", test_json)
    elif problem == "dimension":
        bad = make_phantom_dataset(tmp_path / "vol", dim=3, cases=2, seed=0, size=16)
    elif problem == "empty":  # only unlabelled cases
        images = [e["image"] for e in test_json["training"]]
        bad = _write_msd(root / "unlabelled.json", {**test_json, "training": [], "test": images})
    else:
        bad = tmp_path / "nowhere" / "dataset.json"
    out = tmp_path / "out"
    code, output = _invoke([str(datasets["train"]), "--test", str(bad), "--out", str(out), *SMALL])
    assert code == 1 and "Traceback" not in output
    line = next(x for x in output.splitlines() if x.startswith("error: "))
    assert str(bad) in line
    expected = {"labels": "same label set", "dimension": "same dimensionality", "empty": "no labelled cases",
                "missing": "not found"}[problem]
    assert expected in output
    assert not out.exists()


def test_synthetic_set_with_other_labels_is_refused(datasets: dict[str, Path], tmp_path: Path) -> None:
    aug = Path(datasets["aug"])
    data = json.loads(aug.read_text())
    data["labels"]["9"] = "extra"
    bad = _write_msd(aug.parent / "labels9.json", data)
    code, output = _invoke([str(datasets["train"]), "--test", str(datasets["test"]), "--synthetic", str(bad),
                            "--out", str(tmp_path / "out"), *SMALL])
    assert code == 1 and "Traceback" not in output and str(bad) in output and "same label set" in output


def test_a_folder_that_is_not_empty_is_refused(datasets: dict[str, Path], cli_run: Path, tmp_path: Path) -> None:
    args = [str(datasets["train"]), "--test", str(datasets["test"]), *SMALL]
    # an earlier run's folder: refused without --overwrite, nothing changed
    before = {p.name: p.read_bytes() for p in cli_run.iterdir()}
    code, output = _invoke([*args, "--out", str(cli_run)])
    assert code == 1 and "--overwrite" in output and "Traceback" not in output
    assert {p.name: p.read_bytes() for p in cli_run.iterdir()} == before
    # a folder of someone else's files: refused even with --overwrite when a name would clash
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes")
    code, output = _invoke([*args, "--out", str(mine), "--overwrite"])
    assert code == 1 and "not written by `medsynth downstream`" in output
    assert (mine / "report.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["report.md"]


def test_overwrite_replaces_only_its_own_files(datasets: dict[str, Path], tmp_path: Path) -> None:
    import medsynth

    out = tmp_path / "run"
    medsynth.downstream(datasets["train"], datasets["test"], out=out, seeds=[0], steps=1, batch_size=2, channels=4)
    (out / "notes.txt").write_text("keep me")
    s = medsynth.downstream(datasets["train"], datasets["test"], out=out, seeds=[1], steps=1, batch_size=2,
                            channels=4, overwrite=True)
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "summary.json").read_text())["seeds"] == [1] == s.seeds


def test_the_public_function_and_the_package() -> None:
    import medsynth
    import medsynth.evaluation.downstream.metrics as metrics
    from medsynth.evaluation.downstream import downstream

    assert medsynth.downstream is downstream
    assert medsynth.evaluation.downstream.metrics is metrics
    assert medsynth.DownstreamSummary is medsynth.evaluation.downstream.DownstreamSummary


def test_variant_names_follow_the_method_and_stay_unique() -> None:
    from medsynth.evaluation.downstream.data import SyntheticSet
    from medsynth.evaluation.downstream.run import variant_names

    sets = [SyntheticSet(n, Path(p), [], []) for n, p in
            (("gan", "g/dataset.json"), ("classic", "c/dataset.json"), ("synthseg", "a/dataset.json"),
             ("synthseg", "b/dataset.json"))]
    names = [v.name for v in variant_names(sets)]
    assert names == ["real", "real+classic", "real+gan", "real+gan+classic", "real+classic-pairs",
                     "real+classic-pairs+classic", "real+synthseg(a)", "real+synthseg(a)+classic",
                     "real+synthseg(b)", "real+synthseg(b)+classic"]


def test_metaimage_data_files_anywhere_in_the_dataset_folder_are_read(tmp_path: Path) -> None:
    """A MetaImage header may name a data file elsewhere in its dataset's folder (validation and training
    accept it); downstream reads such a set too, and the arrays are the ones written."""
    import SimpleITK as sitk

    from medsynth.evaluation.downstream.data import load_inputs

    def dataset(root: Path, seed: int) -> tuple[Path, list[np.ndarray]]:
        (root / "raw").mkdir(parents=True)
        entries, labels = [], []
        rng = np.random.default_rng(seed)
        for i in range(3):
            label = np.zeros((16, 16), np.uint8)
            label[2 + i:10 + i, 3:12] = 1
            image = (label * 100 + rng.normal(0, 5, label.shape)).astype(np.float32)
            for kind, array in (("images", image), ("labels", label)):
                header = root / kind / f"c{i}.mhd"
                header.parent.mkdir(exist_ok=True)
                sitk.WriteImage(sitk.GetImageFromArray(array), str(header))
                (root / kind / f"c{i}.raw").rename(root / "raw" / f"{kind}_c{i}.raw")
                text = header.read_text().replace(f"ElementDataFile = c{i}.raw", f"ElementDataFile = ../raw/{kind}_c{i}.raw")
                header.write_text(text)
            entries.append({"image": f"images/c{i}.mhd", "label": f"labels/c{i}.mhd"})
            labels.append(label.T)  # SimpleITK arrays are (y, x); medsynth reads (x, y)
        manifest = {"name": "mhd", "labels": {"0": "background", "1": "box"}, "modality": {"0": "MR"},
                    "training": entries, "test": []}
        (root / "dataset.json").write_text(json.dumps(manifest))
        return root / "dataset.json", labels

    train, train_labels = dataset(tmp_path / "train", 0)
    test, test_labels = dataset(tmp_path / "test", 1)
    data = load_inputs(train, test, [], progress=False)
    assert [c.label.tolist() for c in data.train] == [a.tolist() for a in train_labels]
    assert data.test is not None and [c.label.tolist() for c in data.test] == [a.tolist() for a in test_labels]
