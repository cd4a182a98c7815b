"""Synthesizer: a trained run -> images with the mask's geometry, seeded, in the dataset's units."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import medsynth
from medsynth.config import load_config
from medsynth.data.nifti import Volume, read_volume
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.synthesis.synthesizer import Synthesizer
from medsynth.training.engine import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medsynth.data.phantoms import make_phantom_dataset

    base = tmp_path_factory.mktemp("synth")
    manifest = make_phantom_dataset(base / "p2", dim=2, cases=3, size=32, seed=1)
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml",
                      [f"data.manifest={manifest}", "training.max_steps=6", "training.preview_every=0"])
    train(cfg, base / "run", progress=False)
    return base / "run", manifest.parent


def test_gan_synth_shape_seed_and_units(run2d) -> None:
    run, data = run2d
    synth = medsynth.Synthesizer.from_run(run)
    assert synth.labels == [0, 1, 2, 3, 4, 5, 6] and synth.dim == 2
    mask = read_volume(data / "labelsTr/phantom_000.nii.gz", kind="label").array
    a, b, c = synth.generate(mask, seed=3), synth.generate(mask, seed=3), synth.generate(mask, seed=4)
    assert a.shape == mask.shape and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and a.std() > 0
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # dataset units: the run maps [0, 1] back through its fitted percentiles
    norm = json.loads((run / "model_card.json").read_text())["data"]["normalization"]
    lo, hi = norm["lo"][0], norm["hi"][0]
    assert lo - 1e-3 <= a.min() and a.max() <= hi + 1e-3 and (a.max() - a.min()) > 0.05 * (hi - lo)


def test_gan_synth_odd_shapes_volumes_and_slices(run2d) -> None:
    run, data = run2d
    synth = Synthesizer.from_run(run, device="cpu")
    label = read_volume(data / "labelsTr/phantom_001.nii.gz", kind="label")
    odd = label.array[2:29, 1:24]  # not a multiple of the generator's factor: padded and cropped
    assert synth.generate(odd, seed=0).shape == (27, 23)
    vol = synth.generate_volume(label, seed=0)
    assert isinstance(vol, Volume) and vol.shape == label.shape
    np.testing.assert_array_equal(vol.affine, label.affine)
    # a 2D run given a 3D mask works slice by slice along the run's axis (2), with a warning
    stack = np.stack([label.array, label.array[::-1], label.array], axis=2)
    with pytest.warns(UserWarning, match="slices along axis 2"):
        out = synth.generate(stack, seed=5)
    assert out.shape == stack.shape
    assert np.all(np.isfinite(out)) and not np.array_equal(out[..., 0], out[..., 2])  # own noise per slice
    with pytest.warns(UserWarning, match="no effect on a GAN"):
        synth.generate(odd, seed=0, steps=10, sampler="ddim")


def test_gan_synth_refuses_bad_masks_and_runs(run2d, tmp_path: Path) -> None:
    run, _ = run2d
    synth = Synthesizer.from_run(run)
    with pytest.raises(DataError, match=r"label values \[7, 9\] that the run was not trained on"):
        synth.generate(np.array([[0, 7], [9, 1]]), seed=0)
    with pytest.raises(DataError, match="non-integer"):
        synth.generate(np.array([[0.5, 1.0], [1.0, 1.0]]), seed=0)
    with pytest.raises(ConfigError, match="'T2': the run is not class-conditioned"):  # the API, not only the CLI
        synth.generate(np.array([[0, 1], [1, 1]]), seed=0, class_value="T2")
    with pytest.raises(CheckpointError, match="no such run folder"):
        Synthesizer.from_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_card.json"):
        Synthesizer.from_run(tmp_path / "empty")
    # a card of a family this installation does not have, and a card whose weights are missing
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    card = json.loads((foreign / "model_card.json").read_text())
    card["family"] = card["config"]["model"]["family"] = "vae"
    (foreign / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"foreign/model_card.json: field 'family' is 'vae', not a model family"):
        Synthesizer.from_run(foreign)
    (run_copy := tmp_path / "noweights").mkdir()
    shutil.copy(run / "model_card.json", run_copy / "model_card.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Synthesizer.from_run(run_copy)
    # unreadable weights, and weights that do not fit the card's generator: one CheckpointError naming the file
    (run_copy / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"noweights/model.safetensors: cannot read the weights"):
        Synthesizer.from_run(run_copy)
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "model.safetensors"))
    name = next(k for k, v in state.items() if v.ndim == 4)
    state[name] = state[name][:, :1].contiguous()
    save_file(state, str(run_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: generator weights do not fit the run's recipe"):
        Synthesizer.from_run(run_copy)


def test_two_channel_run_samples_one_file_per_channel(tmp_path: Path) -> None:
    """A run on a 2-channel dataset (T1 + an inverted copy) writes OUT_0000 / OUT_0001 with the mask's grid."""
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.data.manifest import read_manifest, write_manifest
    from medsynth.data.nifti import write_volume
    from medsynth.data.phantoms import make_phantom_dataset

    single = read_manifest(make_phantom_dataset(tmp_path / "p", dim=2, cases=2, size=32, seed=2))
    cases = []
    for case in single.cases:
        t1 = read_volume(case.images[0])
        inv = write_volume(tmp_path / "p" / "imagesTr" / f"{case.case_id}_inv.nii.gz", 1000.0 - t1.array,
                           t1.affine, kind="image")
        case.images = [case.images[0], inv]
        cases.append(case)
    two = single.with_cases(cases)
    two.channels = ["T1", "inverted"]
    manifest = write_manifest(two, tmp_path / "p" / "two.json", fmt="msd")
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml",
                      [f"data.manifest={manifest}", "training.max_steps=2", "training.preview_every=0"])
    train(cfg, tmp_path / "run", progress=False)
    mask = tmp_path / "p" / "labelsTr" / "phantom_000.nii.gz"
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "run"), "--mask", str(mask),
                                      "--out", str(tmp_path / "gen.nii.gz")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "gen.nii.gz").exists()
    lab = read_volume(mask, kind="label")
    for c in (0, 1):
        img = read_volume(tmp_path / f"gen_{c:04d}.nii.gz")
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert np.all(np.isfinite(img.array)) and img.array.std() > 0


def test_empty_slices_follow_the_training_policy(tmp_path: Path) -> None:
    """A 2D run trained on the foreground slices of 3D volumes never saw an empty slice: generating a
    3D mask paints its empty slices with the background's mean training intensity (the training
    images' own mean, recomputed here) and generates the others as it would anyway."""
    from medsynth.data.phantoms import make_phantom_dataset

    manifest = make_phantom_dataset(tmp_path / "p3", dim=3, cases=2, size=16, seed=2)
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml",
                      [f"data.manifest={manifest}", "data.size=[16,16]", "model.discriminator.num_d=1",
                       "training.max_steps=2", "training.preview_every=0"])
    train(cfg, tmp_path / "run", progress=False)
    synth = Synthesizer.from_run(tmp_path / "run", device="cpu")
    label = read_volume(manifest.parent / "labelsTr/phantom_000.nii.gz", kind="label").array
    k = int(np.argmax((label != 0).sum(axis=(0, 1))))
    stack = np.zeros((*label.shape[:2], 3), label.dtype)
    stack[..., 1] = label[..., k]
    with pytest.warns(UserWarning, match="slices along axis 2"):
        out = synth.generate(stack, seed=7)
    # the background mean of the training images in the dataset's units
    images = [read_volume(p, kind="image").array for p in sorted((manifest.parent / "imagesTr").glob("*.nii.gz"))]
    labels = [read_volume(p, kind="label").array for p in sorted((manifest.parent / "labelsTr").glob("*.nii.gz"))]
    norm = json.loads((tmp_path / "run" / "model_card.json").read_text())["data"]["normalization"]
    lo, hi = norm["lo"][0], norm["hi"][0]
    background = np.concatenate([np.clip((im - lo) / (hi - lo), 0, 1)[lab == 0] for im, lab in zip(images, labels)])
    expected = lo + background.mean() * (hi - lo)
    np.testing.assert_allclose(out[..., 0], expected, rtol=1e-4)
    np.testing.assert_allclose(out[..., 2], expected, rtol=1e-4)
    assert out[..., 1].std() > 0
    # the generated slice is the one a full stack of that slice gives at the same position
    with pytest.warns(UserWarning):
        full = synth.generate(np.repeat(label[..., k : k + 1], 3, axis=2), seed=7)
    np.testing.assert_allclose(out[..., 1], full[..., 1], rtol=1e-5)  # (batched with 1 or 3 slices)
