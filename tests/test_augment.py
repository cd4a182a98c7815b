"""The augment job (medsynth.augment, ``medsynth augment``) on tiny phantom datasets.

Outputs are re-read from disk and compared with the source cases and with independent runs
(uninterrupted vs killed + resumed, one worker vs two, one rank vs two)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth import augment as A
from medsynth import journal as J
from medsynth.augment import AugmentOptions, run_augment
from medsynth.cli import app
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import read_volume
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.synthesis import pairs as P

PHANTOM_LABELS = {0, 1, 2, 3, 4, 5, 6}
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ helpers


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), journals excluded."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.name.startswith(J.JOURNAL_PREFIX):
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def opts(data: Path, out: Path, **kw) -> AugmentOptions:
    base = dict(input=data, out=out, method="synthseg", num=3, seed=0)
    base.update(kw)
    return AugmentOptions(**base)


def provenance(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / A.PROVENANCE_FILE).read_text().splitlines()]


def check_pairs(out: Path, prov: list[dict], sources: dict[str, Path]) -> None:
    """Each synthetic pair: source geometry, finite float image, integer labels in the label set."""
    for p in prov:
        src = read_volume(sources[p["source"]], kind="label")
        lab = read_volume(out / p["label"], kind="label")
        assert lab.array.dtype == np.uint8
        assert lab.shape == src.shape
        np.testing.assert_allclose(lab.affine, src.affine, atol=1e-5)
        assert set(np.unique(lab.array).tolist()) <= PHANTOM_LABELS
        for rel in p["images"]:
            img = read_volume(out / rel)
            assert img.shape == src.shape and img.array.dtype == np.float32
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
            assert np.all(np.isfinite(img.array))


@pytest.fixture(scope="module")
def msd3d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("msd3d") / "data", dim=3, cases=4, size=16, seed=3)


def label_paths(manifest_path: Path) -> dict[str, Path]:
    return {c.case_id: c.label for c in read_manifest(manifest_path).cases}


# ------------------------------------------------------------------------------------ formats


def test_synthseg_msd_writes_aligned_pairs_and_manifest(msd3d, tmp_path):
    from medsynth.data.validate import validate_dataset

    before = tree(msd3d.parent)
    s = run_augment(opts(msd3d, tmp_path / "out", num=3))
    assert tree(msd3d.parent) == before  # inputs byte-for-byte untouched
    assert (s.generated, s.reused, s.real_cases, s.synthetic_cases) == (3, 0, 4, 3)
    data = json.loads(s.manifest.read_text())
    assert s.manifest == tmp_path / "out" / "dataset.json"
    assert data["numTraining"] == 7 and len(data["training"]) == 7
    m = read_manifest(s.manifest)
    real = read_manifest(msd3d)
    assert [c.case_id for c in m.cases] == [c.case_id for c in real.cases] + ["syn_00000", "syn_00001", "syn_00002"]
    for got, want in zip(m.cases, real.cases):  # real cases placed inside the output, bytes unchanged
        assert [p.parent for p in got.images] == [tmp_path / "out" / "imagesTr"] and got.label.parent.name == "labelsTr"
        assert [p.name for p in got.images] == [p.name for p in want.images] and got.label.name == want.label.name
        assert got.images[0].read_bytes() == want.images[0].read_bytes()
        assert got.label.read_bytes() == want.label.read_bytes()
    prov = provenance(tmp_path / "out")
    assert [p["case_id"] for p in prov] == ["syn_00000", "syn_00001", "syn_00002"]
    assert all(p["method"] == "synthseg" and p["seed"] == 0 and p["model_sha256"] is None for p in prov)
    check_pairs(tmp_path / "out", prov, label_paths(msd3d))
    assert validate_dataset(s.manifest).ok


def test_nnunet_in_gives_nnunet_out_with_classic(tmp_path):
    from medsynth.data.phantoms import make_phantom_dataset
    from medsynth.data.validate import validate_dataset

    data = make_phantom_dataset(tmp_path / "raw", dim=3, cases=3, size=16, format="nnunet")
    before = tree(data)
    out = tmp_path / "aug"
    s = run_augment(opts(data, out, method="classic", num=2))
    assert tree(data) == before
    names = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert names == [f"phantom_00{i}_0000.nii.gz" for i in range(3)] + ["syn_00000_0000.nii.gz", "syn_00001_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"phantom_00{i}.nii.gz" for i in range(3)] + [
        "syn_00000.nii.gz", "syn_00001.nii.gz"]
    for i in range(3):  # real cases in place: hard links (or byte-identical copies)
        a, b = out / f"imagesTr/phantom_00{i}_0000.nii.gz", data / f"imagesTr/phantom_00{i}_0000.nii.gz"
        assert a.read_bytes() == b.read_bytes()
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 5 and ds["file_ending"] == ".nii.gz" and ds["labels"]["lesion"] == 6
    assert len(read_manifest(out).cases) == 5
    check_pairs(out, provenance(out), label_paths(data))
    assert validate_dataset(out).ok
    assert s.format == "nnunet"


def test_csv_in_gives_csv_out_2d_synthetic_only(tmp_path):
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "d2", dim=2, cases=3, size=16, format="csv")
    before = tree(data.parent)
    out = tmp_path / "aug2"
    s = run_augment(opts(data, out, num=2, synthetic_only=True))
    assert tree(data.parent) == before
    assert s.manifest == out / "dataset.csv"
    m = read_manifest(s.manifest)
    assert m.format == "csv" and [c.case_id for c in m.cases] == ["syn_00000", "syn_00001"]
    check_pairs(out, provenance(out), label_paths(data))
    assert read_volume(out / "labelsTr/syn_00000.nii.gz").array.ndim == 2


# ------------------------------------------------------------------------------------ nothing lost


def test_out_inside_or_containing_input_is_refused(msd3d, tmp_path):
    folder = msd3d.parent
    before = tree(folder)
    for out in (folder, folder / "aug", folder / "imagesTr" / "x"):
        with pytest.raises(JobError, match="inside the input folder"):
            run_augment(opts(msd3d, out))
    with pytest.raises(JobError, match="contains the input"):
        run_augment(opts(msd3d, folder.parent))
    assert tree(folder) == before and not (folder / "aug").exists()
    result = CliRunner().invoke(app, ["augment", str(msd3d), "--method", "synthseg", "--num", "2", "--out",
                                      str(folder / "aug")])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output
    assert tree(folder) == before and not (folder / "aug").exists()


def test_existing_out_needs_resume_with_same_settings_or_overwrite(msd3d, tmp_path):
    out = tmp_path / "out"
    run_augment(opts(msd3d, out, num=2))
    with pytest.raises(JobError, match="--resume"):
        run_augment(opts(msd3d, out, num=2))
    with pytest.raises(JobError, match="started with --num 2; a job can grow"):
        run_augment(opts(msd3d, out, num=1, resume=True))
    with pytest.raises(JobError, match="real was 'auto', now 'reference'"):
        run_augment(opts(msd3d, out, num=2, resume=True, real="reference"))
    with pytest.raises(JobError, match="seed was 0, now 1"):
        run_augment(opts(msd3d, out, num=2, seed=1, resume=True))
    cfg = A.AugmentConfig(deform={"rotate_deg": 3.0})
    with pytest.raises(JobError, match="config.deform.rotate_deg was 10.0, now 3.0"):
        run_augment(opts(msd3d, out, num=2, resume=True, config=cfg))
    with pytest.raises(JobError, match="method was 'synthseg', now 'classic'"):
        run_augment(opts(msd3d, out, num=2, method="classic", resume=True))
    done = run_augment(opts(msd3d, out, num=2, resume=True))
    assert (done.generated, done.reused) == (0, 2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="not written by medsynth augment"):
        run_augment(opts(msd3d, foreign, overwrite=True))
    assert (foreign / "notes.txt").read_text() == "mine"
    again = run_augment(opts(msd3d, out, num=1, seed=5, overwrite=True))
    assert again.generated == 1 and json.loads((out / J.JOB_FILE).read_text())["seed"] == 5
    assert sorted(p.name for p in (out / "imagesTr").iterdir() if p.name.startswith("syn_")) == ["syn_00000.nii.gz"]


def _journal_cases(out: Path) -> int:
    path = out / ".journal.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"key": "syn:' in line)


def test_kill_then_resume_is_byte_identical(msd3d, tmp_path):
    n = 40
    ref = run_augment(opts(msd3d, tmp_path / "ref", num=n))
    out = tmp_path / "out"
    # two worker processes: results must reach the journal as each case finishes
    cmd = [sys.executable, "-m", "medsynth", "augment", str(msd3d), "--method", "synthseg", "--num", str(n),
           "--out", str(out), "--seed", "0", "--no-progress", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 90
    while _journal_cases(out) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, like kill -9 of the whole job
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "dataset.json").exists(), "the job finished before the kill; make it longer"
    written = _journal_cases(out)
    assert 2 <= written < n
    # corrupt a finished file: resume must check content, not existence. With two workers the
    # journal need not start at syn_00000, so take the first case it records.
    first = next(json.loads(line) for line in (out / ".journal.jsonl").read_text().splitlines()
                 if '"key": "syn:' in line)
    victim = out / next(f for f in first["files"] if f.startswith("imagesTr/"))
    raw = bytearray(victim.read_bytes())
    raw[-10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    s = run_augment(opts(msd3d, out, num=n, resume=True))
    assert s.reused == written - 1 and s.generated == n - written + 1
    assert tree(out) == tree(tmp_path / "ref")
    assert (out / "dataset.json").read_bytes() == ref.manifest.read_bytes()
    assert not list(out.rglob(".*.tmp-*"))


def test_two_workers_identical_to_one(msd3d, tmp_path):
    one = run_augment(opts(msd3d, tmp_path / "w1", num=4, seed=7))
    two = run_augment(opts(msd3d, tmp_path / "w2", num=4, seed=7, workers=2))
    assert two.generated == 4
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")
    assert one.manifest.read_bytes() == two.manifest.read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_shard_cases_and_rank0_writes_the_manifest(msd3d, tmp_path):
    run_augment(opts(msd3d, tmp_path / "single", num=5, seed=2))
    out = tmp_path / "ranks"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, "-m", "medsynth", "augment", str(msd3d), "--method", "synthseg", "--num", "5",
               "--out", str(out), "--seed", "2", "--no-progress"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "rank 1: made 2 case(s)" in outputs[1][0]
    assert (out / ".journal.rank00001.jsonl").exists()
    assert tree(out) == tree(tmp_path / "single")


# ------------------------------------------------------------------------------------ QC


def test_qc_sample_reasons():
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 2
    img = np.ones((1, 4, 4, 4), np.float32)
    kw = dict(shape=(4, 4, 4), affine=np.eye(4), source_affine=np.eye(4), labels=[0, 1, 2], ranges=[(0.0, 2.0)])
    assert P.qc_sample(img, label, **kw) is None
    assert "not in the dataset" in P.qc_sample(img, label + 1, **kw)
    assert "not integer" in P.qc_sample(img, label.astype(np.float32), **kw)
    assert "shape" in P.qc_sample(img, label[:3], **kw)
    bad = img.copy()
    bad[0, 0, 0, 0] = np.nan
    assert "NaN" in P.qc_sample(bad, label, **kw)
    assert "plausible range" in P.qc_sample(img * 5, label, **kw)
    assert "affine" in P.qc_sample(img, label, **{**kw, "affine": np.diag([2.0, 1, 1, 1])})


def test_failed_qc_is_redrawn_and_counted(msd3d, tmp_path, monkeypatch):
    plain = run_augment(opts(msd3d, tmp_path / "plain", num=2))
    real_qc = P.qc_sample
    calls = {"n": 0}

    def first_try_fails(*args, **kwargs):
        calls["n"] += 1
        return "forced failure" if calls["n"] % 2 == 1 else real_qc(*args, **kwargs)

    monkeypatch.setattr(P, "qc_sample", first_try_fails)
    s = run_augment(opts(msd3d, tmp_path / "redrawn", num=2))
    assert s.redraws == 2
    prov = provenance(tmp_path / "redrawn")
    assert [p["redraws"] for p in prov] == [1, 1] and [p["attempt"] for p in prov] == [1, 1]
    assert prov[0]["qc_failures"] == ["try 0: forced failure"]
    # the kept sample is the second draw, not the first
    assert tree(tmp_path / "redrawn")["imagesTr/syn_00000.nii.gz"] != tree(tmp_path / "plain")["imagesTr/syn_00000.nii.gz"]
    assert plain.redraws == 0
    monkeypatch.setattr(P, "qc_sample", lambda *a, **k: "always bad")
    with pytest.raises(JobError, match="failed quality control 5 times"):
        run_augment(opts(msd3d, tmp_path / "hopeless", num=1))
    assert not (tmp_path / "hopeless" / "dataset.json").exists()


# ------------------------------------------------------------------------------------ plan, edits, config


def test_dry_run_writes_nothing_and_sources_follow_the_seed(msd3d, tmp_path):
    out = tmp_path / "dry"
    s = run_augment(opts(msd3d, out, num=8, dry_run=True))
    assert not out.exists() and s.manifest is None
    srcs = [p.source for p in s.plan]
    assert sorted(srcs[:4]) == sorted(srcs[4:]) == [f"phantom_00{i}" for i in range(4)]  # balanced
    assert srcs == [p.source for p in run_augment(opts(msd3d, out, num=8, dry_run=True)).plan]
    assert srcs != [p.source for p in run_augment(opts(msd3d, out, num=8, seed=1, dry_run=True)).plan]
    result = CliRunner().invoke(app, ["augment", str(msd3d), "--method", "synthseg", "--num", "2", "--out", str(out),
                                      "--dry-run", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "syn_00001" in result.output and "labelsTr/syn_00001.nii.gz" in result.output and not out.exists()


def test_lesion_paste_and_edits_are_recorded(msd3d, tmp_path):
    cfg = A.AugmentConfig(edits={"paste_prob": 1.0, "lesion_label": 6, "lesion_hosts": [3, 4], "grow_prob": 0.3,
                                 "structures": [5]})
    s = run_augment(opts(msd3d, tmp_path / "e", num=4, config=cfg))
    prov = provenance(tmp_path / "e")
    present = {cid: set(np.unique(read_volume(p, kind="label").array).tolist()) for cid, p in label_paths(msd3d).items()}
    for p in prov:
        assert p["donor"] is not None and 6 in present[p["donor"]]
        for e in p["mask_edits"]:
            assert e["op"] in {"paste", "grow"}
            if e["op"] == "paste":
                assert e["donor"] == p["donor"] and e["voxels"] > 0
    assert any(e["op"] == "paste" for p in prov for e in p["mask_edits"])
    check_pairs(tmp_path / "e", prov, label_paths(msd3d))
    assert s.generated == 4
    bad = A.AugmentConfig(edits={"removable": [9], "remove_prob": 1.0})
    with pytest.raises(ConfigError, match="edits.removable"):
        run_augment(opts(msd3d, tmp_path / "bad", config=bad))
    assert not (tmp_path / "bad").exists()


def test_config_file_is_the_defaults_and_errors_name_the_field(tmp_path):
    assert A.load_augment_config(REPO / "configs" / "augment.yaml") == A.AugmentConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("deform:\n  rotate_degs: 3\nqc:\n  max_tries: 0\n")
    with pytest.raises(ConfigError) as err:
        A.load_augment_config(bad)
    assert "deform.rotate_degs" in str(err.value) and "qc.max_tries" in str(err.value)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        A.load_augment_config(tmp_path / "missing.yaml")


def test_set_overrides_the_recipe_like_a_file_and_bad_ones_write_nothing(msd3d, tmp_path):
    """``--set`` lands on the recipe as the same keys in a file would (identical output bytes), keys the
    file sets and keys it does not; a bad value or key is one error naming it, and no output folder."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("edits:\n  grow_prob: 0.2\ndeform:\n  rotate_deg: 3.0\n")
    merged = tmp_path / "merged.yaml"
    merged.write_text("edits:\n  grow_prob: 1.0\n  structures: [1]\n  max_radius: 1\ndeform:\n  rotate_deg: 3.0\n")
    assert A.load_augment_config(recipe, ["edits.grow_prob=1.0", "edits.structures=[1]", "edits.max_radius=1"]) \
        == A.load_augment_config(merged)
    base = ["augment", str(msd3d), "--method", "synthseg", "--num", "2", "--no-progress"]
    by_set = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a"), "--config", str(recipe),
                                      "--set", "edits.grow_prob=1.0", "--set", "edits.structures=[1]",
                                      "--set", "edits.max_radius=1"])
    by_file = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b"), "--config", str(merged)])
    assert by_set.exit_code == 0 and by_file.exit_code == 0, (by_set.output, by_file.output)
    made = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("syn_*.nii.gz"))
    assert len(made) == 4  # 2 images + 2 labels
    for rel in made:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    for bad, message in (("edits.grow_prob=2", "edits.grow_prob: Input should be less than or equal to 1"),
                         ("edits.grow_probs=0.5", "edits.grow_probs"), ("edits", "expected key=value")):
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--set", bad])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / "bad").exists()


def test_option_errors(msd3d, tmp_path):
    with pytest.raises(ConfigError, match="--num"):
        run_augment(opts(msd3d, tmp_path / "o", num=0))
    with pytest.raises(ConfigError, match="exclude"):
        run_augment(opts(msd3d, tmp_path / "o", resume=True, overwrite=True))
    with pytest.raises(ConfigError, match="needs --model"):
        run_augment(opts(msd3d, tmp_path / "o", method="gan"))
    with pytest.raises(ConfigError, match="only used by"):
        run_augment(opts(msd3d, tmp_path / "o", model=tmp_path))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ gan / ldm


@pytest.fixture(scope="module")
def gan_run(msd3d, tmp_path_factory) -> Path:
    """A tiny 2D GAN trained for two steps on the 3D phantoms' slices."""
    from medsynth.config import load_config
    from medsynth.training import run_training

    cfg = load_config(REPO / "configs" / "tiny" / "gan2d.yaml",
                      [f"data.manifest={msd3d}", "training.max_steps=2", "training.batch_size=2", "training.amp=false"])
    run = tmp_path_factory.mktemp("gan") / "run"
    run_training(cfg, run, progress=False)
    return run


def run_variant(run: Path, dest: Path, edit) -> Path:
    """A copy of ``run``'s card and weights with ``edit(card)`` applied to the card."""
    dest.mkdir()
    shutil.copy(run / "model.safetensors", dest / "model.safetensors")
    card = json.loads((run / "model_card.json").read_text())
    edit(card)
    (dest / "model_card.json").write_text(json.dumps(card))
    return dest


def test_gan_method_with_a_tiny_trained_run(msd3d, gan_run, tmp_path):
    from medsynth.synthesis.synthesizer import Synthesizer

    with pytest.warns(UserWarning, match="2D run given a 3D mask"):  # a 2D run on 3D masks: slice by slice
        s = run_augment(opts(msd3d, tmp_path / "g", method="gan", model=gan_run, num=2))
    prov = provenance(tmp_path / "g")
    sha = hashlib.sha256((gan_run / "model.safetensors").read_bytes()).hexdigest()
    assert all(p["model_sha256"] == sha and p["method"] == "gan" for p in prov) and s.generated == 2
    check_pairs(tmp_path / "g", prov, label_paths(msd3d))
    # each image is the run's image for exactly the written mask and the recorded seed
    synth = Synthesizer.from_run(gan_run, device="cpu")
    for p in prov:
        label = read_volume(tmp_path / "g" / p["label"], kind="label")
        with pytest.warns(UserWarning, match="2D run given a 3D mask"):
            expected = synth.generate_volume(label, p["generator_seed"]).array
        np.testing.assert_array_equal(read_volume(tmp_path / "g" / p["images"][0]).array, expected)
    with pytest.warns(UserWarning, match="2D run given a 3D mask"):
        again = run_augment(opts(msd3d, tmp_path / "g2", method="gan", model=gan_run, num=2))
    assert tree(tmp_path / "g") == tree(tmp_path / "g2") and again.manifest.read_bytes() == s.manifest.read_bytes()


def test_a_run_that_does_not_fit_is_refused_before_any_work(msd3d, gan_run, tmp_path):
    def labels(card):
        card["data"]["labels"] = [0, 1, 2]

    def family(card):
        card["family"] = card["config"]["model"]["family"] = "ldm"

    with pytest.raises(ConfigError, match="trained with labels"):
        run_augment(opts(msd3d, tmp_path / "g2", method="gan", model=run_variant(gan_run, tmp_path / "r2", labels)))
    with pytest.raises(ConfigError, match="is a ldm model"):
        run_augment(opts(msd3d, tmp_path / "g3", method="gan", model=run_variant(gan_run, tmp_path / "r3", family)))
    (tmp_path / "r4").mkdir()
    with pytest.raises(CheckpointError, match="no model_card.json"):
        run_augment(opts(msd3d, tmp_path / "g4", method="ldm", model=tmp_path / "r4"))
    (run_variant(gan_run, tmp_path / "r5", lambda card: None) / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        run_augment(opts(msd3d, tmp_path / "g5", method="gan", model=tmp_path / "r5"))
    foreign = run_variant(gan_run, tmp_path / "r6", lambda card: card.pop("version"))
    with pytest.raises(CheckpointError, match="'version'"):
        run_augment(opts(msd3d, tmp_path / "g6", method="gan", model=foreign))
    assert not any((tmp_path / f"g{i}").exists() for i in (2, 3, 4, 5, 6))


def test_augment_warns_when_the_runs_card_says_it_never_beat_the_label_mean_fill(gan_run, tmp_path):
    """The run card's yardstick (written at the end of training) is read back by augment: a run that
    did not beat the label-mean fill is named with its numbers; one that did, or has none, is not."""
    from medsynth.augment.model import fill_warning
    from medsynth.runcard import read_run_card

    def weak(card):
        card["yardstick"] = {"model_ssim": 0.80, "fill_ssim": 0.85, "model_psnr": 20.0, "fill_psnr": 22.0,
                             "beats_fill": False, "held_out": True}

    def strong(card):
        card["yardstick"] = {"model_ssim": 0.90, "fill_ssim": 0.85, "model_psnr": 25.0, "fill_psnr": 22.0,
                             "beats_fill": True, "held_out": True}

    text = fill_warning(read_run_card(run_variant(gan_run, tmp_path / "weak", weak)))
    assert text is not None and "never beat the label-mean fill on its held-out masks" in text
    assert "SSIM 0.8 vs 0.85" in text and "PSNR 20.0 vs 22.0 dB" in text
    assert fill_warning(read_run_card(run_variant(gan_run, tmp_path / "strong", strong))) is None
