"""`medsynth anatomy` (the anatomy bank) and `augment --anatomy`: unlabelled images become masks.

A 2D phantom dataset is split into labelled cases and "unlabelled" ones whose true labels the product
never sees; the tests compare what the bank propagates with those true labels, re-read every file from
disk, and check each bad input ends in one `error:` line with nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.nifti import read_volume, write_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.registration.bank import dice_per_label

LABELLED = 4
POOL = 3


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def split_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A labelled MSD dataset of LABELLED cases with POOL unlabelled ``test`` entries, the pool's true labels
    kept aside."""
    root = tmp_path_factory.mktemp("anatomy") / "data"
    manifest = make_phantom_dataset(root, dim=2, cases=LABELLED + POOL, size=48, seed=11)
    data = json.loads(manifest.read_text())
    truth = root.parent / "truth"
    truth.mkdir()
    pool = data["training"][LABELLED:]
    for entry in pool:
        shutil.move(str(root / entry["label"]), truth / Path(entry["label"]).name)
    data["training"] = data["training"][:LABELLED]
    data["test"] = [e["image"] for e in pool]
    data["numTraining"], data["numTest"] = LABELLED, POOL
    manifest.write_text(json.dumps(data))
    return {"manifest": manifest, "truth": truth, "root": root}


@pytest.fixture(scope="module")
def bank(split_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bank") / "bank"
    code, output = _run("anatomy", split_data["manifest"], "--out", out, "--no-progress")
    assert code == 0, output
    return out


def _pool_ids(split_data: dict[str, Path]) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in split_data["truth"].iterdir())


def test_bank_masks_match_the_true_labels_better_than_identity(bank: Path, split_data: dict[str, Path]) -> None:
    facts = json.loads((bank / "bank.json").read_text())
    assert facts["complete"] and sorted(facts["targets"]) == _pool_ids(split_data)
    for cid in _pool_ids(split_data):
        mask = read_volume(bank / "masks" / f"{cid}.nii.gz", kind="label")
        image = read_volume(split_data["root"] / "imagesTr" / f"{cid}.nii.gz", kind="image")
        truth = read_volume(split_data["truth"] / f"{cid}.nii.gz", kind="label")
        agreement = read_volume(bank / "agreement" / f"{cid}.nii.gz", kind="image").array
        # the mask lies on the unlabelled image's grid, with its affine
        assert mask.array.shape == image.array.shape
        np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
        assert set(np.unique(mask.array).tolist()) <= {0, 1, 2, 3, 4, 5, 6}
        assert agreement.min() >= 0.0 and agreement.max() <= 1.0 + 1e-6
        dice = dice_per_label(mask.array, truth.array, [1, 2, 3])
        assert np.nanmean(list(dice.values())) > 0.6, dice
    loo = facts["loo"]
    # propagation is measured on the labelled cases, beside identity and affine-only
    assert set(loo) >= {"identity", "affine", "deformable"}
    assert loo["deformable"]["mean"] >= loo["identity"]["mean"] - 0.02, loo
    assert (bank / "report.md").is_file() and (bank / "propagated.png").stat().st_size > 1000
    assert "Leave-one-out" in (bank / "report.md").read_text()


def test_resume_reuses_every_target_and_a_plain_rerun_is_refused(bank: Path, split_data: dict[str, Path]) -> None:
    before = {p: p.read_bytes() for p in (bank / "masks").iterdir()}
    code, output = _run("anatomy", split_data["manifest"], "--out", bank, "--resume", "--no-progress", "--json")
    assert code == 0, output
    summary = json.loads(output[output.index("{"):])
    assert summary["fitted"] == 0 and summary["reused"] == POOL
    assert {p: p.read_bytes() for p in (bank / "masks").iterdir()} == before
    code, output = _run("anatomy", split_data["manifest"], "--out", bank, "--no-progress")
    assert code != 0 and output.startswith("error:") and "--resume" in output


def test_pseudo_writes_the_unlabelled_images_with_their_propagated_masks(bank: Path, split_data: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "pseudo"
    code, output = _run("augment", split_data["manifest"], "--method", "pseudo", "--anatomy", f"unlabelled:{bank}",
                        "--num", POOL, "--out", out, "--synthetic-only", "--no-progress")
    assert code == 0, output
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert sorted(p["source"] for p in prov) == _pool_ids(split_data)
    for p in prov:
        assert p["pseudo_labelled"] is True and 0.0 < p["anatomy"]["agreement"] <= 1.0
        src = read_volume(split_data["root"] / "imagesTr" / f"{p['source']}.nii.gz", kind="image")
        img = read_volume(out / p["images"][0], kind="image")
        lab = read_volume(out / p["label"], kind="label")
        np.testing.assert_array_equal(np.asarray(img.array, np.float32), np.asarray(src.array, np.float32))
        np.testing.assert_array_equal(lab.array, read_volume(bank / "masks" / f"{p['source']}.nii.gz", kind="label").array)


def test_bank_fields_warp_labelled_masks_onto_unlabelled_grids(bank: Path, split_data: dict[str, Path],
                                                               tmp_path: Path) -> None:
    out = tmp_path / "banked"
    code, output = _run("augment", split_data["manifest"], "--method", "synthseg", "--anatomy", f"bank:{bank}",
                        "--num", 4, "--out", out, "--synthetic-only", "--no-progress",
                        "--set", "anatomy.alpha_min=1.0", "--set", "deform.affine_prob=0", "--set", "deform.elastic_prob=0")
    assert code == 0, output
    prov = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    for p in prov:
        a = p["anatomy"]
        assert a["source"] == "bank" and a["atlas"] == p["source"] and a["alpha"] == 1.0
        target = read_volume(split_data["root"] / "imagesTr" / f"{a['target']}.nii.gz", kind="image")
        lab = read_volume(out / p["label"], kind="label")
        np.testing.assert_allclose(lab.affine, target.affine, atol=1e-5)
        truth = read_volume(split_data["truth"] / f"{a['target']}.nii.gz", kind="label").array
        # alpha 1 without a deformation on top: the mask shows the unlabelled image's anatomy
        assert np.nanmean(list(dice_per_label(lab.array, truth, [1, 2, 3]).values())) > 0.5


def test_a_bank_from_another_dataset_is_refused(bank: Path, tmp_path: Path) -> None:
    other = make_phantom_dataset(tmp_path / "other", dim=2, cases=3, size=48, seed=5)
    out = tmp_path / "out"
    code, output = _run("augment", other, "--method", "synthseg", "--anatomy", f"unlabelled:{bank}",
                        "--num", 2, "--out", out, "--no-progress")
    assert code != 0 and output.startswith("error:") and "another dataset" in output, output
    assert not out.exists() or not any(p for p in out.rglob("*.nii.gz"))


def test_pseudo_needs_unlabelled_anatomy(split_data: dict[str, Path], tmp_path: Path) -> None:
    code, output = _run("augment", split_data["manifest"], "--method", "pseudo", "--num", 2, "--out", tmp_path / "o")
    assert code != 0 and output.startswith("error:") and "unlabelled:BANK" in output
    code, output = _run("augment", split_data["manifest"], "--method", "synthseg", "--anatomy", "elsewhere",
                        "--num", 2, "--out", tmp_path / "o")
    assert code != 0 and output.startswith("error:") and "--anatomy" in output


def _bad_pool(tmp_path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    folder = tmp_path / "pool"
    folder.mkdir()
    nib.save(nib.Nifti1Image(array, affine), str(folder / "bad.nii.gz"))
    return folder


@pytest.mark.parametrize("what", ["3d", "nan", "channels"])
def test_bad_unlabelled_images_are_one_error_and_nothing_written(split_data: dict[str, Path], tmp_path: Path,
                                                                 what: str) -> None:
    if what == "3d":
        arr = np.zeros((48, 48, 8), np.float32)
    elif what == "nan":
        arr = np.zeros((48, 48), np.float32)
        arr[3, 3] = np.nan
    else:
        arr = np.zeros((48, 48, 1, 2), np.float32)
    folder = _bad_pool(tmp_path, arr, np.eye(4))
    out = tmp_path / "bank"
    code, output = _run("anatomy", split_data["manifest"], "--unlabelled", folder, "--out", out, "--no-progress")
    assert code != 0 and output.startswith("error:") and "bad.nii.gz" in output, output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_an_empty_pool_is_one_error(tmp_path: Path) -> None:
    manifest = make_phantom_dataset(tmp_path / "labelled", dim=2, cases=3, size=48, seed=2)
    code, output = _run("anatomy", manifest, "--out", tmp_path / "bank", "--no-progress")
    assert code != 0 and output.startswith("error:") and "no unlabelled images" in output
    assert not (tmp_path / "bank").exists() or not any((tmp_path / "bank").iterdir())


def test_a_failed_registration_is_skipped_with_a_warning(split_data: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.registration import RegistrationError
    from medsynth.registration import bank as B

    real = B.register
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RegistrationError("diverged (metric NaN)")
        return real(*args, **kwargs)

    monkeypatch.setattr(B, "register", flaky)
    with pytest.warns(UserWarning, match="skipped"):
        summary = B.fit_bank(B.BankOptions(dataset=split_data["manifest"], out=tmp_path / "bank", loo=False))
    assert summary.skipped_pairs == 1 and summary.targets == POOL
    facts = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert sum(len(t["skipped"]) for t in facts["targets"].values()) == 1


def test_unlabelled_folder_of_images_joins_the_pool(split_data: dict[str, Path], tmp_path: Path) -> None:
    from medsynth.data.manifest import read_manifest
    from medsynth.data.unlabelled import unlabelled_cases

    folder = tmp_path / "more"
    folder.mkdir()
    img = read_volume(split_data["root"] / "imagesTr" / "phantom_000.nii.gz", kind="image")
    write_volume(folder / "extra_a.nii.gz", np.asarray(img.array, np.float32), img.affine, kind="image")
    cases = unlabelled_cases(read_manifest(split_data["manifest"]), folder)
    assert [c.case_id for c in cases][-1] == "extra_a" and len(cases) == POOL + 1
    with pytest.raises(Exception, match="also a labelled case's image"):
        unlabelled_cases(read_manifest(split_data["manifest"]), split_data["root"] / "imagesTr")


def test_validate_counts_unlabelled_images_and_refuses_another_dimensionality(split_data: dict[str, Path],
                                                                               tmp_path: Path) -> None:
    code, output = _run("validate", split_data["manifest"], "--json", "--no-progress")
    assert code == 0, output
    fp = json.loads(output)["fingerprint"]
    assert fp["labelled_cases"] == LABELLED and fp["unlabelled_cases"] == POOL
    folder = _bad_pool(tmp_path, np.zeros((48, 48, 8), np.float32), np.eye(4))
    code, output = _run("validate", split_data["manifest"], "--unlabelled", folder, "--json", "--no-progress")
    report = json.loads(output)
    assert code != 0 and any("bad.nii.gz" in p["file"] and "3D" in p["message"] and p["severity"] == "error"
                             for p in report["problems"]), report["problems"]


def test_a_slice_stored_as_x_y_1_gets_a_mask_of_the_same_shape_and_header(split_data: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    src = nib.load(str(split_data["root"] / "imagesTr" / "phantom_004.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)[..., None]
    img = nib.Nifti1Image(data, src.affine)
    img.header.set_sform(src.affine, code=4)
    img.header.set_qform(src.affine, code=2)
    folder = tmp_path / "slices"
    folder.mkdir()
    nib.save(img, str(folder / "slab.nii.gz"))
    manifest = json.loads(split_data["manifest"].read_text())
    manifest["test"], manifest["numTest"] = [], 0
    only_labelled = tmp_path / "dataset.json"
    for entry in manifest["training"]:
        for key in ("image", "label"):
            entry[key] = str(split_data["root"] / entry[key])
    only_labelled.write_text(json.dumps(manifest))
    code, output = _run("anatomy", only_labelled, "--unlabelled", folder, "--out", tmp_path / "bank", "--no-loo",
                        "--no-progress")
    assert code == 0, output
    mask = nib.load(str(tmp_path / "bank" / "masks" / "slab.nii.gz"))
    assert mask.shape == data.shape
    assert int(mask.header["sform_code"]) == 4 and int(mask.header["qform_code"]) == 2


def test_workers_write_the_same_bank(bank: Path, split_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bank2"
    code, output = _run("anatomy", split_data["manifest"], "--out", out, "--workers", 2, "--no-loo", "--no-progress")
    assert code == 0, output
    for sub in ("masks", "agreement", "fields"):
        names = sorted(p.name for p in (bank / sub).iterdir())
        assert names and names == sorted(p.name for p in (out / sub).iterdir())
        for name in names:
            a = nib.load(str(bank / sub / name)) if name.endswith(".nii.gz") else None
            if a is None:
                np.testing.assert_array_equal(np.load(bank / sub / name), np.load(out / sub / name))
            else:
                np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(nib.load(str(out / sub / name)).dataobj))
