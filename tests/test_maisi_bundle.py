"""MAISI CT bundles without the real weights: tiny random networks of MONAI's MAISI classes saved in the
published file names and key layouts (ddpm and rflow), loaded strictly, sampled for 2 steps on the CPU.

Outputs are re-read from disk with nibabel and compared with the mask file (shape, affine, label bytes),
geometry against an analytic function of world coordinates, bits and body labels against hand values.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medsynth.bundles import geometry, is_bundle
from medsynth.bundles.geometry import FitLimits, fit_grid
from medsynth.bundles.labels import BODY_LABEL, add_body, read_mapping, spare_values
from medsynth.bundles.networks import load_networks
from medsynth.bundles.random_bundle import WEIGHT_FILES, write_random_bundle
from medsynth.bundles.reader import read_bundle
from medsynth.bundles.sampler import BundleSampler, binarize_labels
from medsynth.cli import app
from medsynth.data.nifti import Volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.errors import CheckpointError, ConfigError, DataError

runner = CliRunner()
#: small limits in the published pattern (square in-plane, sizes multiples of 16) for 2-core CPU tests
SMALL = FitLimits(xy_sizes=(32, 48, 64), z_sizes=(16, 32, 48), xy_spacing=(0.5, 3.0), z_spacing=(0.5, 5.0))
MAPPING = "labels:\n  1: liver\n  2: hepatic tumor\nbody: outline\n"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {layout: write_random_bundle(root / layout, layout) for layout in ("ddpm", "rflow")}  # type: ignore[arg-type]


@pytest.fixture()
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "MAISI_LIMITS", SMALL)


def blob_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """A liver-like ellipsoid (1) with a tumour (2) inside: whole values, uint8."""
    idx = np.indices(shape).astype(np.float64)
    c = [(s - 1) / 2 for s in shape]
    r = sum(((idx[a] - c[a]) / (0.35 * shape[a])) ** 2 for a in range(3))
    out = (r < 1).astype(np.uint8)
    out[r < 0.15] = 2
    return out


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))
    return path


def one_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def oblique(spacing: tuple[float, float, float], degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    rot = rot @ np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = (-40.0, 12.5, 7.0)
    return aff


GEOMETRIES = {
    "anisotropic": ((24, 20, 9), np.diag([0.7, 0.7, 3.1, 1.0])),
    "oblique": ((22, 26, 14), oblique((1.1, 1.3, 2.0), 25.0)),
    "not_divisible_by_16": ((37, 29, 19), np.diag([-1.0, 1.0, 1.5, 1.0])),
}


# ------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("layout", ["ddpm", "rflow"])
def test_both_layouts_load_strictly_into_monai_classes(bundles: dict[str, Path], layout: str) -> None:
    bundle = read_bundle(bundles[layout])
    assert bundle.layout == layout and is_bundle(bundles[layout])
    assert [p.name for p in bundle.weights.values()] == list(WEIGHT_FILES[layout])
    nets = load_networks(bundle)
    saved = torch.load(bundle.weights["trained_diffusion_path"], weights_only=True)["unet_state_dict"]
    for key, value in nets.unet.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert type(nets.controlnet).__name__ == "ControlNetMaisi" and nets.scale_factor == 1.0


def test_binarized_labels_are_the_bits_of_each_value() -> None:
    bits = binarize_labels(torch.tensor([200, 26, 1, 0]).view(1, 1, 4))[0]
    by_hand = {200: [0, 0, 0, 1, 0, 0, 1, 1], 26: [0, 1, 0, 1, 1, 0, 0, 0], 1: [1, 0, 0, 0, 0, 0, 0, 0], 0: [0] * 8}
    for i, value in enumerate((200, 26, 1, 0)):
        assert bits[:, i].tolist() == by_hand[value]


def test_body_label_fills_the_outline() -> None:
    shell = np.zeros((15, 15, 5), np.uint8)
    shell[2:13, 2:13, :] = 1
    shell[4:11, 4:11, :] = 0  # a hollow square tube: its inside is body, its outside air
    out = add_body(shell)
    assert (out[4:11, 4:11, :] == BODY_LABEL).all()
    assert (out[:2] == 0).all() and (out[2:13, 2:13][shell[2:13, 2:13] == 1] == 1).all()


# ------------------------------------------------------------------------------------ sampling and geometry


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_output_keeps_the_mask_grid_for_odd_geometries(bundles: dict[str, Path], tmp_path: Path, name: str,
                                                       small_limits: None) -> None:
    shape, affine = GEOMETRIES[name]
    mask = save(tmp_path / "mask.nii.gz", blob_mask(shape), affine)
    before = hashlib.sha256(mask.read_bytes()).hexdigest()
    (tmp_path / "map.yaml").write_text(MAPPING)
    out = tmp_path / "image.nii.gz"
    result = runner.invoke(app, ["sample", str(bundles["rflow"]), "--mask", str(mask), "--out", str(out),
                                 "--labels", str(tmp_path / "map.yaml"), "--steps", "2", "--seed", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written, source = nib.load(str(out)), nib.load(str(mask))
    assert written.shape == source.shape == shape
    assert np.array_equal(written.affine, source.affine)
    assert hashlib.sha256(mask.read_bytes()).hexdigest() == before  # the mask file is untouched
    image = np.asarray(written.dataobj)
    assert np.isfinite(image).all() and image.min() >= -1000 and image.max() <= 1000


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_work_grid_resamples_world_coordinates_exactly(name: str) -> None:
    """A linear function of world position put on the work grid comes back on the mask grid unchanged
    (linear interpolation of a linear function), away from the clamped border."""
    shape, affine = GEOMETRIES[name]
    grid = fit_grid(shape, affine, SMALL)
    assert all(s % 16 == 0 for s in grid.shape) and grid.shape[0] == grid.shape[1]
    work_affine = grid.affine(affine)
    coeff = np.array([0.3, -0.7, 1.9])
    work_idx = np.indices(grid.shape).reshape(3, -1)
    work_world = work_affine[:3, :3] @ work_idx + work_affine[:3, 3:]
    on_work = (coeff @ work_world).reshape(grid.shape)
    back = grid.to_mask(on_work)
    mask_idx = np.indices(shape).reshape(3, -1)
    expected = (coeff @ (affine[:3, :3] @ mask_idx + affine[:3, 3:])).reshape(shape)
    assert back.shape == shape
    assert np.allclose(back, expected, atol=1e-3), float(np.abs(back - expected).max())
    labels = blob_mask(shape)
    work_labels = grid.to_work(labels)  # nearest: every work label value is a mask value at its world position
    assert set(np.unique(work_labels)) <= set(np.unique(labels))


@pytest.mark.parametrize("layout", ["ddpm", "rflow"])
def test_sampling_is_seeded_and_in_hu(bundles: dict[str, Path], tmp_path: Path, layout: str) -> None:
    (tmp_path / "map.yaml").write_text(MAPPING)
    sampler = BundleSampler.from_bundle(bundles[layout], tmp_path / "map.yaml", device="cpu", limits=SMALL)
    shape, affine = GEOMETRIES["anisotropic"]
    array = blob_mask(shape)
    array[9:15, 7:13, :] = 0  # a channel through the organ: background inside the outline is body
    mask = Volume(array, affine)
    a, b = (sampler.generate(mask, 5, steps=2).array for _ in range(2))
    c = sampler.generate(mask, 6, steps=2).array
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= -1000 and a.max() <= 1000
    labels, grid = sampler.work_labels(mask)
    assert BODY_LABEL in labels and set(np.unique(labels)) <= {0, 1, 26, BODY_LABEL}
    hu = sampler.generate_work(labels, grid.spacing, 5, steps=2)
    assert (hu[labels == 0] == -1000).all()  # MAISI's background: air


# ------------------------------------------------------------------------------------ labels


def test_unmapped_label_is_refused_by_name_and_nothing_is_written(bundles: dict[str, Path], tmp_path: Path) -> None:
    shape, affine = GEOMETRIES["anisotropic"]
    mask = blob_mask(shape)
    mask[0, 0, 0] = 7
    path = save(tmp_path / "mask.nii.gz", mask, affine)
    (tmp_path / "map.yaml").write_text(MAPPING)
    out = tmp_path / "image.nii.gz"
    line = one_error(runner.invoke(app, ["sample", str(bundles["rflow"]), "--mask", str(path), "--out", str(out),
                                         "--labels", str(tmp_path / "map.yaml"), "--steps", "2"]))
    assert "label value(s) 7" in line and "map.yaml" in line
    assert sorted(tmp_path.iterdir()) == sorted([path, tmp_path / "map.yaml"])


def test_bundle_labels_writes_a_mapping_by_name_similarity(bundles: dict[str, Path], tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=3, cases=1, seed=0, size=16)
    manifest = json.loads(data.read_text())
    manifest["labels"] = {"0": "background", "1": "Liver", "2": "right_kidney", "3": "white matter"}
    data.write_text(json.dumps(manifest))
    out = tmp_path / "map.yaml"
    result = runner.invoke(app, ["bundle-labels", str(bundles["rflow"]), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    mapping = read_mapping(out, read_bundle(bundles["rflow"]))
    assert mapping.values[1] == 1 and mapping.values[2] == 5  # liver; right kidney
    assert mapping.names[3] == "spare" and mapping.values[3] == spare_values(read_bundle(bundles["rflow"]))[0]
    assert one_error(runner.invoke(app, ["bundle-labels", str(bundles["rflow"]), "--data", str(data),
                                         "--out", str(out)])).endswith("pass --overwrite to replace it")


def test_mapping_errors_name_the_file_and_key(bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = read_bundle(bundles["rflow"])
    for text, expected in (("labels:\n  1: liverr\n", "key labels.1 is 'liverr'"),
                           ("labels:\n  1: liver\nbodyy: outline\n", "unknown key 'bodyy'"),
                           ("labels:\n  1: body\n", "maps to the body label 200")):
        (tmp_path / "m.yaml").write_text(text)
        with pytest.raises(ConfigError, match=expected):
            read_mapping(tmp_path / "m.yaml", bundle)


# ------------------------------------------------------------------------------------ bundle errors


def damaged(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_every_bundle_error_names_the_file_and_the_key(bundles: dict[str, Path], tmp_path: Path) -> None:
    files = WEIGHT_FILES["rflow"]
    # a missing weights file: named, with the config key and how to get the bundle
    b = damaged(bundles["rflow"], tmp_path / "missing")
    (b / "models" / files[2]).unlink()
    with pytest.raises(DataError, match=f"{files[2]}: missing \\(config key 'trained_controlnet_path'.*monai.bundle download"):
        read_bundle(b)
    # the state dict under another key
    b = damaged(bundles["rflow"], tmp_path / "wrongkey")
    ckpt = torch.load(b / "models" / files[1], weights_only=True)
    torch.save({"state_dict": ckpt["unet_state_dict"], "scale_factor": ckpt["scale_factor"]}, b / "models" / files[1])
    with pytest.raises(CheckpointError, match=f"{files[1]}: key 'unet_state_dict' is missing"):
        load_networks(read_bundle(b))
    # a shape mismatch: the config's network is wider than the weights
    b = damaged(bundles["rflow"], tmp_path / "shape")
    config = json.loads((b / "configs" / "inference.json").read_text())
    config["controlnet_def"]["conditioning_embedding_num_channels"] = [8, 8, 16]
    (b / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{files[2]} \\['controlnet_state_dict'\\]: key '.*' has shape"):
        load_networks(read_bundle(b))
    # a missing key and an unknown version
    b = damaged(bundles["rflow"], tmp_path / "version")
    (b / "configs" / "metadata.json").write_text(json.dumps({"version": "2.0.0"}))
    with pytest.raises(CheckpointError, match="metadata.json: key 'version' is '2.0.0'"):
        read_bundle(b)
    b = damaged(bundles["rflow"], tmp_path / "nokey")
    config = json.loads((b / "configs" / "inference.json").read_text())
    del config["controlnet_def"]
    (b / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="inference.json: key 'controlnet_def' is missing"):
        read_bundle(b)
    # the ddpm scheduler under an rflow version
    b = damaged(bundles["ddpm"], tmp_path / "mixed")
    (b / "configs" / "metadata.json").write_text(json.dumps({"version": "1.0.0"}))
    with pytest.raises(CheckpointError, match="builds DDPMScheduler, but version 1.0.0"):
        read_bundle(b)


def test_augment_refuses_a_bundle_without_its_mapping_and_writes_nothing(bundles: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    data = make_phantom_dataset(tmp_path / "data", dim=3, cases=2, seed=0, size=16)
    out = tmp_path / "aug"
    line = one_error(runner.invoke(app, ["augment", str(data), "--method", "ldm", "--num", "1", "--out", str(out),
                                         "--model", str(bundles["rflow"]), "--no-progress"]))
    assert "a MAISI bundle needs --labels MAPPING" in line and "medsynth bundle-labels" in line
    assert not out.exists()
