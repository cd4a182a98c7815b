"""`medsynth demo`: every stage runs (quick sizes), the report's pictures exist, reruns are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app


@pytest.fixture
def demo_dir(quick_demo: Path) -> Path:
    """The session's quick demo run (tests/conftest.py): the demo runs once per test suite."""
    return quick_demo


def test_report_links_pictures_that_exist(demo_dir: Path) -> None:
    report = (demo_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"figures/phantoms.png", "figures/training_losses.png", "figures/gan_ldm_from_real_masks.png",
            "figures/augmented_cases.png"} <= set(links)
    for link in links:
        png = demo_dir / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_augmented_outputs_validate_and_list_real_plus_synthetic(demo_dir: Path) -> None:
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import read_volume
    from medsynth.data.validate import validate_dataset

    for name, real, made in (("synthseg3d", "phantoms3d", 3), ("gan2d", "phantoms2d", 6), ("ldm2d", "phantoms2d", 6)):
        manifest = demo_dir / "augmented" / name / "dataset.json"
        assert validate_dataset(manifest).ok, name
        cases = read_manifest(manifest).cases
        real_ids = [c.case_id for c in read_manifest(demo_dir / "data" / real / "dataset.json").cases]
        assert [c.case_id for c in cases[: len(real_ids)]] == real_ids
        syn = [c for c in cases if c.case_id.startswith("syn_")]
        assert len(syn) == made  # as many synthetic as real cases in --quick
        for case in syn:
            image, label = read_volume(case.images[0]), read_volume(case.label, kind="label")
            assert image.shape == label.shape and np.allclose(image.affine, label.affine)


def test_summary_numbers_agree_with_the_evaluation_files(demo_dir: Path) -> None:
    summary = json.loads((demo_dir / "summary.json").read_text())
    for name in ("gan2d", "ldm2d"):
        paired = json.loads((demo_dir / "evaluation" / f"paired_{name}" / "summary.json").read_text())
        assert summary["paired"][name]["ssim"] == pytest.approx(paired["ssim"])
        assert -1.0 <= paired["ssim"] <= 1.0 and paired["n_cases"] == 6
    assert {"phantoms", "validate", "train", "augment", "evaluate", "report"} <= set(summary["stage_seconds"])


def test_rerun_into_the_same_folder_is_refused(demo_dir: Path) -> None:
    before = sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*"))
    result = CliRunner().invoke(app, ["demo", "--out", str(demo_dir), "--quick"])
    assert result.exit_code == 1
    assert "exists and is not empty" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(demo_dir) for p in demo_dir.rglob("*")) == before


def test_overwrite_never_deletes_a_folder_the_demo_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "my_data"
    precious.mkdir()
    (precious / "scan.nii.gz").write_bytes(b"not ours")
    result = CliRunner().invoke(app, ["demo", "--out", str(precious), "--overwrite", "--quick"])
    assert result.exit_code == 1 and "was not made by `medsynth demo`" in result.output
    assert (precious / "scan.nii.gz").read_bytes() == b"not ours"
