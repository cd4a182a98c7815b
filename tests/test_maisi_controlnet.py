"""Fine-tuning a MAISI bundle's ControlNet (``model.family: maisi_controlnet``) on tiny random bundles, CPU.

Frozen networks are compared with the bundle's files tensor by tensor and byte by byte, the trained
ControlNet with the weights file re-read from disk, a resumed run with an uninterrupted one, axes with
nibabel's own reorientation, and the sampled image re-read from disk against the mask file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medsynth.bundles.finetune_config import MaisiControlNetConfig
from medsynth.bundles.geometry import FitLimits
from medsynth.bundles.labels import read_mapping
from medsynth.bundles.networks import load_networks
from medsynth.bundles.random_bundle import write_random_bundle
from medsynth.bundles.reader import read_bundle
from medsynth.bundles.sampler import BundleSampler
from medsynth.cli import app
from medsynth.config import validate_config
from medsynth.data.nifti import read_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.errors import CheckpointError, ConfigError
from medsynth.training import run_training
from medsynth.training.maisi import CaseGeometry

runner = CliRunner()
#: the phantom's labels 1..6 onto the tiny bundle's names; 3 and 6 are new classes in spare slots
MAPPING = ("labels:\n  1: liver\n  2: spleen\n  3: spare\n  4: pancreas\n  5: right kidney\n  6: spare\n"
           "body: outline\n")
SMALL = {"xy_sizes": [32, 48], "z_sizes": [16, 32], "xy_spacing": [0.5, 3.0], "z_spacing": [0.5, 5.0]}


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("maisi_ft")
    manifest = make_phantom_dataset(root / "data", dim=3, cases=2, size=32)
    (root / "map.yaml").write_text(MAPPING)
    out = {"manifest": Path(manifest), "mapping": root / "map.yaml", "root": root}
    for layout in ("rflow", "ddpm"):
        out[layout] = write_random_bundle(root / layout, layout)  # type: ignore[arg-type]
    return out


def recipe(world: dict[str, Path], layout: str, steps: int, **model: object) -> dict[str, object]:
    return {"name": f"ft-{layout}",
            "data": {"manifest": str(world["manifest"]), "dim": 3, "size": [32, 32, 32], "ct_window": [-1000, 1000]},
            "model": {"family": "maisi_controlnet", "bundle": str(world[layout]), "labels": str(world["mapping"]),
                      "sample_steps": 2, "limits": SMALL, **model},
            "training": {"max_steps": steps, "batch_size": 1, "lr": 1e-3, "ema": None, "checkpoint_every": 2,
                         "log_every": 1, "preview_every": 0, "device": "cpu", "seed": 3}}


def train(world: dict[str, Path], layout: str, steps: int, run: Path, resume: bool = False, **model: object):  # type: ignore[no-untyped-def]
    with pytest.warns(UserWarning):  # random weights never beat the label-mean fill (the yardstick says so)
        return run_training(validate_config(recipe(world, layout, steps, **model)), run, resume=resume,
                            progress=False)


@pytest.fixture(scope="module")
def rflow_run(world: dict[str, Path]) -> tuple[Path, dict[str, str]]:
    before = digest_tree(world["rflow"])
    run = world["root"] / "run_rflow"
    train(world, "rflow", 3, run)  # checkpoints at steps 2 and 3
    return run, before


def test_training_changes_only_the_controlnet(world: dict[str, Path], rflow_run: tuple[Path, dict[str, str]]) -> None:
    run, before = rflow_run
    bundle_dir = world["rflow"]
    assert digest_tree(bundle_dir) == before  # the user's bundle folder: not a byte changed, nothing added
    files = {p.name: p for p in (bundle_dir / "models").iterdir()}
    saved_cn = torch.load(next(p for n, p in files.items() if "controlnet" in n), weights_only=True)
    tuned = load_file(str(run / "model.safetensors"))
    assert set(tuned) == set(saved_cn["controlnet_state_dict"])
    changed = [k for k, v in tuned.items() if not torch.equal(v, saved_cn["controlnet_state_dict"][k])]
    assert len(changed) > len(tuned) // 4
    ckpt = torch.load(run / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert set(ckpt["family_state"]["modules"]) == {"controlnet"}  # the frozen networks are not trained state
    assert torch.equal(ckpt["family_state"]["modules"]["controlnet"][changed[0]], tuned[changed[0]])
    card = json.loads((run / "model_card.json").read_text())
    assert card["family"] == "maisi_controlnet" and card["steps"] == 3
    assert card["model"]["bundle"] == str(bundle_dir.resolve())
    for key, name in (("trained_autoencoder_path", "autoencoder_epoch273.pt"),
                      ("trained_diffusion_path", "diff_unet_ckpt_epoch19350.pt")):
        assert card["model"]["bundle_sha256"][key] == hashlib.sha256(files[name].read_bytes()).hexdigest()
    # new classes 3 and 6 sit in values the bundle's vocabulary leaves unused
    used = set(json.loads((bundle_dir / "configs" / "label_dict.json").read_text()).values())
    values = card["model"]["label_mapping"]["values"]
    assert values["1"] == 1 and values["2"] == 3 and {values["3"], values["6"]}.isdisjoint(used | {0, 200})
    assert (run / "report.md").is_file() and "maisi_controlnet" in (run / "report.md").read_text()


def test_frozen_networks_keep_the_bundles_tensors(world: dict[str, Path], tmp_path: Path) -> None:
    result = train(world, "ddpm", 2, tmp_path / "run")  # the ddpm layout's objective (noise) and conditions
    fam = result.family
    ae_file = torch.load(world["ddpm"] / "models" / "autoencoder_epoch273.pt", weights_only=True)
    unet_file = torch.load(next((world["ddpm"] / "models").glob("input_unet3d*.pt")), weights_only=True)
    for net, saved in ((fam.autoencoder, ae_file), (fam.unet, unet_file["unet_state_dict"])):
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
        assert not any(p.requires_grad for p in net.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["l1"]) for r in records if r["kind"] == "train")


def test_resume_continues_to_the_uninterrupted_weights(world: dict[str, Path], rflow_run: tuple[Path, dict[str, str]],
                                                      tmp_path: Path) -> None:
    import shutil

    run, _ = rflow_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    (resumed / "checkpoints" / "step_00000003.pt").unlink()  # as if stopped after the step-2 checkpoint
    (resumed / "model.safetensors").unlink()
    train(world, "rflow", 3, resumed, resume=True)
    a, b = load_file(str(resumed / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    starts = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "start"]
    assert starts == [0, 2]


def test_sample_uses_the_tuned_controlnet_on_the_masks_grid(world: dict[str, Path],
                                                            rflow_run: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    run, _ = rflow_run
    # an oblique, anisotropic mask of a size not divisible by 16, with the phantom's labels (spare classes too)
    lab = read_volume(world["manifest"].parent / "labelsTr" / "phantom_000.nii.gz", kind="label").array[:29, 3:30, 5:24]
    t = np.deg2rad(20.0)
    aff = np.eye(4)
    aff[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([1.1, 0.9, 2.0])
    aff[:3, 3] = (-12.0, 30.5, 4.0)
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lab), aff), str(mask_path))
    out = tmp_path / "image.nii.gz"
    result = runner.invoke(app, ["sample", str(run), "--mask", str(mask_path), "--out", str(out), "--seed", "4",
                                 "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    written, mask = nib.load(str(out)), nib.load(str(mask_path))
    assert written.shape == mask.shape and np.allclose(written.affine, mask.affine, atol=1e-5)
    assert np.array_equal(np.asarray(mask.dataobj), lab)  # the mask file itself is untouched
    image = written.get_fdata()
    assert np.isfinite(image).all() and image.min() >= -1000.0 - 1e-3 and image.max() <= 1000.0 + 1e-3
    # the same through the bundle with the run's ControlNet loaded by hand; different from the bundle's own
    bundle = read_bundle(world["rflow"])
    mapping = read_mapping(world["mapping"], bundle)
    limits = FitLimits(xy_sizes=(32, 48), z_sizes=(16, 32))
    nets = load_networks(bundle)
    own = BundleSampler(bundle, nets, mapping, limits).generate(read_volume(mask_path, kind="label"), 4, steps=2)
    nets.controlnet.load_state_dict(load_file(str(run / "model.safetensors")))
    tuned = BundleSampler(bundle, nets, mapping, limits).generate(read_volume(mask_path, kind="label"), 4, steps=2)
    assert np.allclose(image, tuned.array, atol=0.05)
    assert not np.allclose(own.array, tuned.array, atol=0.05)


def test_a_changed_bundle_is_refused_for_sampling_and_resume(world: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from medsynth.synthesis.synthesizer import Synthesizer

    bundle = tmp_path / "bundle"
    shutil.copytree(world["rflow"], bundle)
    (tmp_path / "map.yaml").write_text(MAPPING)
    mine = dict(world, rflow=bundle, mapping=tmp_path / "map.yaml")
    run = tmp_path / "run"
    train(mine, "rflow", 2, run)
    Synthesizer.from_run(run, device="cpu")
    unet = bundle / "models" / "diff_unet_ckpt_epoch19350.pt"
    state = torch.load(unet, weights_only=True)
    state["unet_state_dict"]["out.2.conv.bias"] = state["unet_state_dict"]["out.2.conv.bias"] + 1.0
    torch.save(state, unet)
    with pytest.raises(CheckpointError, match="diff_unet_ckpt_epoch19350.pt: changed since the run"):
        Synthesizer.from_run(run, device="cpu")
    with pytest.raises(CheckpointError, match="changed since the run started"):
        run_training(validate_config(recipe(mine, "rflow", 3)), run, resume=True, progress=False)
    shutil.copy(world["rflow"] / "models" / "diff_unet_ckpt_epoch19350.pt", unet)  # the bundle as it was ...
    (tmp_path / "map.yaml").write_text(MAPPING.replace("2: spleen", "2: spare"))  # ... the mapping changed
    with pytest.raises(CheckpointError, match="maps the labels otherwise than when the run started"):
        run_training(validate_config(recipe(mine, "rflow", 3)), run, resume=True, progress=False)
    shutil.rmtree(bundle)
    with pytest.raises(CheckpointError, match="the run's bundle .* is missing"):
        Synthesizer.from_run(run, device="cpu")


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"bundle": None}}, "model.bundle: required"),
    ({"data": {"ct_window": [-200, 300]}}, "data.ct_window: maisi_controlnet needs"),
    ({"mapping": "labels:\n  1: liver\n"}, "dataset label value(s) [2, 3, 4, 5, 6] are not mapped"),
    ({"data": {"size": [24, 24, 24]}}, "multiple of 16"),
    ({"model": {"weighted_labels": [9]}}, "model.weighted_labels: [9]"),
])
def test_recipe_mistakes_are_named_before_training(world: dict[str, Path], tmp_path: Path,
                                                   change: dict[str, object], message: str) -> None:
    raw = recipe(world, "rflow", 2)
    for section in ("data", "model"):
        raw[section].update(change.get(section, {}))  # type: ignore[attr-defined]
    if "mapping" in change:
        (tmp_path / "map.yaml").write_text(str(change["mapping"]))
        raw["model"]["labels"] = str(tmp_path / "map.yaml")  # type: ignore[index]
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_training(validate_config(raw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.parametrize("axes", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_case_axes_turn_into_ras_as_nibabel_reorients(axes: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    arr = rng.random((4, 5, 6))
    aff = np.zeros((4, 4))
    aff[3, 3] = 1
    signs = (-1.0, 1.0, -1.0)
    for voxel_axis, world_axis in enumerate(axes):
        aff[world_axis, voxel_axis] = signs[voxel_axis] * (voxel_axis + 1.0)
    order, flip = [0, 0, 0], [False, False, False]
    for a, (b, sign) in enumerate(nib.orientations.io_orientation(aff)):
        order[int(b)], flip[int(b)] = a, bool(sign < 0)
    g = CaseGeometry((order[0], order[1], order[2]), (flip[0], flip[1], flip[2]), (1.0, 1.0, 1.0))
    expected = nib.as_closest_canonical(nib.Nifti1Image(arr, aff)).get_fdata()
    assert np.array_equal(g.to_ras(torch.from_numpy(arr)[None], 1)[0].numpy(), expected)


def test_the_family_section_validates_its_limits() -> None:
    with pytest.raises(ValueError, match="xy_spacing needs 0 < lo <= hi"):
        MaisiControlNetConfig.model_validate({"limits": {"xy_spacing": [3.0, 0.5]}})


# ------------------------------------------------------------------------------------ augment with a bundle


def test_augment_with_a_bundle_keeps_each_masks_grid_and_labels(world: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.bundles import geometry

    monkeypatch.setattr(geometry, "MAISI_LIMITS", FitLimits(xy_sizes=(32, 48), z_sizes=(16, 32, 48)))
    before = digest_tree(world["rflow"])
    out = tmp_path / "aug"
    args = ["augment", str(world["manifest"]), "--method", "ldm", "--model", str(world["rflow"]), "--labels",
            str(world["mapping"]), "--num", "2", "--out", str(out), "--no-progress", "--set", "qc.label_agreement=false",
            "--set", "qc.range_margin=3"]  # random weights: the range check only
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "dataset.json").read_text())
    synthetic = [c for c in manifest["training"] if c.get("synthetic")]
    assert len(synthetic) == 2
    for case in synthetic:
        image, label = nib.load(str(out / case["image"])), nib.load(str(out / case["label"]))
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        values = np.asarray(label.dataobj)
        assert set(np.unique(values).tolist()) <= set(range(7))
        hu = image.get_fdata()
        assert hu.min() >= -1000.0 - 1e-3 and hu.max() <= 1000.0 + 1e-3
        assert np.median(hu[values == 0]) == -1000.0  # air outside the body, as MAISI sets it
    provenance = (out / ".medsynth_job.json").read_text()
    assert str(world["mapping"].resolve()) in provenance
    assert digest_tree(world["rflow"]) == before
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0 and "2 verified" in again.output, again.output


def test_augment_with_a_bundle_needs_its_mapping(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "aug"
    result = runner.invoke(app, ["augment", str(world["manifest"]), "--method", "ldm", "--model", str(world["rflow"]),
                                 "--num", "1", "--out", str(out), "--no-progress"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "needs --labels MAPPING" in errors[0] and not out.exists()
    (tmp_path / "half.yaml").write_text("labels:\n  1: liver\n")
    result = runner.invoke(app, ["augment", str(world["manifest"]), "--method", "ldm", "--model", str(world["rflow"]),
                                 "--labels", str(tmp_path / "half.yaml"), "--num", "1", "--out", str(out),
                                 "--no-progress"])
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "[2, 3, 4, 5, 6] are not mapped" in errors[0]
    assert not (out / "imagesTr").exists() or not any((out / "imagesTr").glob("syn_*"))
