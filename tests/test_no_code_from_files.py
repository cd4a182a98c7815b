"""Nothing a file says ever runs: planted payloads in every loadable format, and a scan of the source.

Each payload, loaded the unsafe way, creates a marker file (checked first, so the payload is live);
medsynth then gets the same file through its CLI, must print one ``error:`` line, exit non-zero and
leave no marker. The last tests read medsynth's own source (ast) for loaders that can run code.
"""

from __future__ import annotations

import ast
import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.errors import CheckpointError
from medsynth.evaluation import distribution as D
from medsynth.evaluation.fid_networks import FID_NETWORK_KEY, FID_NETWORKS

PACKAGE = Path(__file__).resolve().parents[1] / "medsynth"
runner = CliRunner()
#: torch's own loaders, kept before the autouse fixture replaces them (to show a payload is live)
TORCH_EXPORT_LOAD = torch.export.load


class OpensMarker:
    """Unpickling this calls ``open(marker, "w")``: the file appears when the pickle runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def one_error_line(result) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, result.output
    assert "Traceback" not in result.output


@pytest.fixture(autouse=True)
def no_code_loaders(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaders that run code fail the test if medsynth ever calls them."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a code-running loader was called with {args!r}")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch.export, "load", forbidden)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    ref = make_phantom_dataset(root / "ref", dim=2, cases=2, seed=0, size=24)
    cand = make_phantom_dataset(root / "cand", dim=2, cases=2, seed=1, size=24)
    return ref, cand


def evaluate_with(datasets: tuple[Path, Path], weights: Path, *extra: str):  # type: ignore[no-untyped-def]
    ref, cand = datasets
    return runner.invoke(app, ["evaluate", str(ref), str(cand), "--data-range", "auto", "--unpaired",
                               "--no-progress", "--fid-weights", str(weights), *extra])


# ------------------------------------------------------------------------------------ payloads


def crafted_pt2(path: Path, marker: Path) -> Path:
    """A torch.export program whose weight ``weight`` is marked ``use_pickle`` and holds a pickle that
    opens ``marker`` (torch.export.load unpickles such weights with weights_only=False)."""
    plain = path.with_name("plain.pt2")
    torch.export.save(torch.export.export(torch.nn.Conv2d(1, 2, 3), (torch.zeros(1, 1, 8, 8),)), str(plain))
    buf = io.BytesIO()
    torch.save(OpensMarker(marker), buf)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("weights/model_weights_config.json"):
                config = json.loads(data)
                config["config"]["weight"]["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = buf.getvalue()
            dst.writestr(info.filename, data)
    plain.unlink()
    return path


def test_pt2_payload_is_refused_unread(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pt2_ran"
    evil = crafted_pt2(tmp_path / "features.pt2", marker)
    with pytest.raises(Exception):  # noqa: B017 (torch then rejects the program; the payload already ran)
        TORCH_EXPORT_LOAD(str(evil))
    assert marker.exists()  # the payload is live: torch's own loader runs it
    marker.unlink()
    for name in ("features.pt2", "features.ep", "features"):  # the ending decides, not the contents
        target = evil.rename(tmp_path / name)
        result = evaluate_with(datasets, target, "--fid-network", "medicalnet_resnet10")
        one_error_line(result)
        assert "never loaded" in result.output and name in result.output
        evil = target
    renamed = evil.rename(tmp_path / "features.pt")  # a .pt goes to torch.load(weights_only=True): refused
    one_error_line(evaluate_with(datasets, renamed, "--fid-network", "medicalnet_resnet10"))
    assert not marker.exists()


def test_pickled_pt_payload_is_refused(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pt_ran"
    evil = tmp_path / "weights.pt"
    torch.save({"conv1.weight": OpensMarker(marker)}, evil)
    torch.load(evil, weights_only=False)  # live
    assert marker.exists()
    marker.unlink()
    for extra in (["--fid-network", "medicalnet_resnet10"], []):
        result = evaluate_with(datasets, evil, *extra)
        one_error_line(result)
        assert "weights.pt" in result.output
    assert "weights_only=True" in evaluate_with(datasets, evil, "--fid-network", "medicalnet_resnet10").output
    with pytest.raises(CheckpointError, match="weights.pt: cannot be loaded as plain weights"):
        D.fid([np.zeros((8, 8))] * 2, [np.zeros((8, 8))] * 2, feature_weights=evil, model=torch.nn.Conv2d(1, 1, 1))
    assert not marker.exists()


class Echo(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_torchscript_is_refused_unread(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch >= 2.10 deprecates TorchScript
        scripted = torch.jit.script(Echo())
    for name in ("features.ts", "features.pt", "features.pth"):
        path = tmp_path / name
        scripted.save(str(path))
        result = evaluate_with(datasets, path, "--fid-network", "medicalnet_resnet10")
        one_error_line(result)  # the autouse fixture fails the test if torch.jit.load is reached
        assert name in result.output


def test_npy_object_array_is_not_read(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "npy_ran"
    evil = tmp_path / "image.npy"
    np.save(evil, np.array([OpensMarker(marker)], dtype=object), allow_pickle=True)
    np.load(evil, allow_pickle=True)  # live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="allow_pickle=False"):
        np.load(evil, allow_pickle=False)
    one_error_line(runner.invoke(app, ["evaluate", str(evil), str(evil), "--data-range", "1"]))
    one_error_line(evaluate_with(datasets, evil, "--fid-network", "medicalnet_resnet10"))
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"training": [{"image": "image.npy", "label": "image.npy"}]}))
    result = runner.invoke(app, ["validate", str(manifest), "--no-progress"])
    assert result.exit_code == 1 and "image.npy" in result.output and "unsupported file type" in result.output
    assert not marker.exists()


# ------------------------------------------------------------------------------------ YAML


def yaml_payload(marker: Path) -> str:
    return f"!!python/object/apply:builtins.open [{json.dumps(str(marker))}, w]"


def test_yaml_tags_in_recipes_and_set_do_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "yaml_ran"
    yaml.unsafe_load(yaml_payload(marker))  # live
    assert marker.exists()
    marker.unlink()
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"training:\n  seed: {yaml_payload(marker)}\n")
    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=2, seed=0, size=24)
    runs = [
        ["train", str(recipe), "--out", str(tmp_path / "run1")],
        ["train", "tiny/gan2d", "--out", str(tmp_path / "run2"), "--set", f"training.seed={yaml_payload(marker)}"],
        ["augment", str(data), "--method", "classic", "--num", "1", "--out", str(tmp_path / "aug1"),
         "--config", str(recipe)],
        ["augment", str(data), "--method", "classic", "--num", "1", "--out", str(tmp_path / "aug2"),
         "--set", f"anatomy.alpha_min={yaml_payload(marker)}"],
    ]
    for args in runs:
        result = runner.invoke(app, args)
        one_error_line(result)
        assert "python/object/apply" in result.output, result.output
    assert not marker.exists()
    assert not (tmp_path / "run1").exists() and not (tmp_path / "aug1").exists()


# ------------------------------------------------------------------------------------ the positive path


def test_named_architecture_from_safetensors_matches_the_net_built_in_code(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = FID_NETWORKS["medicalnet_resnet10"].build(2).eval()
    rng = np.random.default_rng(0)
    ref = [rng.random((24, 24)) for _ in range(5)]
    cand = [rng.random((24, 24)) * 2.0 + 0.5 for _ in range(5)]
    named = tmp_path / "resnet10.safetensors"
    save_file(net.state_dict(), str(named), metadata={FID_NETWORK_KEY: "medicalnet_resnet10"})
    bare = tmp_path / "bare.safetensors"
    save_file(net.state_dict(), str(bare))
    expected = D.fid(ref, cand, feature_weights=named, model=FID_NETWORKS["medicalnet_resnet10"].build(2))
    # by hand: the 512 features of the module built here, then the Frechet distance
    with torch.no_grad():
        feats = np.stack([net(torch.from_numpy(im.astype(np.float32))[None, None])[0].double().numpy()
                          for im in [*ref, *cand]])
    assert feats.shape == (10, 512)
    assert expected == pytest.approx(D.frechet_distance(feats[:5], feats[5:]), rel=1e-6)
    assert expected > 0
    assert D.fid(ref, cand, feature_weights=named) == pytest.approx(expected, rel=1e-9)
    assert D.fid(ref, cand, feature_weights=bare, network="medicalnet_resnet10") == pytest.approx(expected, rel=1e-9)
    pt = tmp_path / "resnet10.pt"
    torch.save(net.state_dict(), pt)
    assert D.fid(ref, cand, feature_weights=pt, network="medicalnet_resnet10") == pytest.approx(expected, rel=1e-9)


def test_weights_that_do_not_fit_name_the_file_and_the_key(datasets: tuple[Path, Path], tmp_path: Path) -> None:
    state = FID_NETWORKS["medicalnet_resnet10"].build(2).state_dict()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "conv1.weight"}, {FID_NETWORK_KEY: "medicalnet_resnet10"},
                    [], "key 'conv1.weight' is missing"),
        "extra": ({**state, "head.weight": torch.zeros(2)}, {FID_NETWORK_KEY: "medicalnet_resnet10"}, [],
                  "key 'head.weight' is unexpected"),
        "shape": ({**state, "conv1.weight": torch.zeros(64, 1, 3, 3)}, {FID_NETWORK_KEY: "medicalnet_resnet10"}, [],
                  "key 'conv1.weight' has shape (64, 1, 3, 3)"),
        "unnamed": (state, {}, [], "names no FID network"),
        "unknown": (state, {FID_NETWORK_KEY: "inception_v3"}, [], "FID network 'inception_v3'"),
        "unknown_option": (state, {}, ["--fid-network", "vgg"], "FID network 'vgg' (from --fid-network) is unknown"),
        "disagree": (state, {FID_NETWORK_KEY: "medicalnet_resnet10"}, ["--fid-network", "medicalnet_resnet18"],
                     "names 'medicalnet_resnet10', but --fid-network is 'medicalnet_resnet18'"),
        "3d_for_2d": (FID_NETWORKS["medicalnet_resnet10"].build(3).state_dict(),
                      {FID_NETWORK_KEY: "medicalnet_resnet10"}, [], "key 'conv1.weight' has shape (64, 1, 7, 7, 7)"),
    }
    for name, (tensors, meta, extra, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(dict(tensors), str(path), metadata=meta or None)
        result = evaluate_with(datasets, path, *extra)
        one_error_line(result)
        assert words in result.output and path.name in result.output, (name, result.output)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    one_error_line(evaluate_with(datasets, garbage, "--fid-network", "medicalnet_resnet10"))


# ------------------------------------------------------------------------------------ the source


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "(...)")  # e.g. net.to(d).eval -> (...).to.eval
    return ".".join(reversed(parts))


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


CODE_MODULES = {"pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "_pickle"}


def unsafe_loads(source: str) -> list[str]:
    """``line: what`` for every loader in ``source`` that can run code from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: import {n}" for n in names if n.split(".")[0] in CODE_MODULES]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
                found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                          if (node.module, a.name) in {("torch.jit", "load"), ("torch.export", "load"), ("torch", "jit")}]
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name.endswith(("jit.load", "export.load")) or name.split(".")[-1] in {
                    "unsafe_load", "full_load", "unsafe_load_all", "full_load_all", "UnsafeLoader", "FullLoader"}:
                found.append(f"{where}: {name}")
            if name in {"yaml.load", "yaml.load_all", "yaml.Loader"}:
                found.append(f"{where}: {name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in {"eval", "exec"}:
                found.append(f"{where}: {name}()")
            if name == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: torch.load without weights_only=True")
            if name in {"np.load", "numpy.load"} and not _keyword_is(node, "allow_pickle", False):
                found.append(f"{where}: np.load without allow_pickle=False")
    return found


def test_the_scan_finds_every_unsafe_loader() -> None:
    bad = """
import pickle
from torch.jit import load
x = torch.jit.load(p)
y = torch.export.load(p)
z = yaml.load(t)
w = yaml.unsafe_load(t)
v = torch.load(p)
u = torch.load(p, weights_only=False)
s = np.load(p)
r = np.load(p, allow_pickle=True)
eval(t)
"""
    assert len(unsafe_loads(bad)) == 11, unsafe_loads(bad)
    good = "a = torch.load(p, map_location='cpu', weights_only=True)\nb = np.load(p, allow_pickle=False)\n" \
           "c = yaml.safe_load(t)\nnet.eval()\nnet.to(d).eval()\n"
    assert unsafe_loads(good) == []


def test_medsynth_has_no_loader_that_runs_code() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += [f"{path.relative_to(PACKAGE.parent)}:{hit}" for hit in unsafe_loads(path.read_text(encoding="utf-8"))]
    assert found == []


# ------------------------------------------------------------------------------------ MAISI bundles


def _bundle_case(tmp_path: Path) -> tuple[Path, list[str]]:
    """A tiny rflow bundle, a mask and a mapping: the arguments of ``medsynth sample BUNDLE``."""
    import nibabel as nib

    from medsynth.bundles.random_bundle import write_random_bundle

    bundle = write_random_bundle(tmp_path / "bundle", "rflow")
    mask = np.zeros((16, 16, 8), np.uint8)
    mask[4:12, 4:12, 2:6] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    (tmp_path / "map.yaml").write_text("labels:\n  1: liver\n")
    return bundle, ["sample", str(bundle), "--mask", str(tmp_path / "mask.nii.gz"), "--out",
                    str(tmp_path / "out.nii.gz"), "--labels", str(tmp_path / "map.yaml"), "--steps", "1"]


def test_malicious_bundle_is_refused_and_nothing_in_it_runs(tmp_path: Path) -> None:
    """A bundle whose config carries ``$`` code and a foreign ``_target_``, whose ``scripts`` package and
    weights pickle would each create a marker: every one is refused, and no marker appears."""
    import sys

    from medsynth.bundles.random_bundle import WEIGHT_FILES

    bundle, args = _bundle_case(tmp_path)
    markers = {k: tmp_path / f"ran_{k}" for k in ("imports", "expression", "target", "scripts", "pickle")}
    (bundle / "scripts").mkdir()
    (bundle / "scripts" / "__init__.py").write_text(f"open({str(markers['scripts'])!r}, 'w').close()\n")
    (bundle / "scripts" / "rectified_flow.py").write_text(f"open({str(markers['scripts'])!r}, 'w').close()\n")
    config_path = bundle / "configs" / "inference.json"
    clean = json.loads(config_path.read_text())
    clean["imports"] = [f"$open({str(markers['imports'])!r}, 'w')", "$import scripts"]

    # 1. a '$' expression where a value is needed, and a _target_ off the allow-list
    evil = json.loads(json.dumps(clean))
    evil["diffusion_unet_def"]["num_res_blocks"] = f"$open({str(markers['expression'])!r}, 'w') and 1"
    config_path.write_text(json.dumps(evil))
    result = runner.invoke(app, args)
    one_error_line(result)
    assert "diffusion_unet_def.num_res_blocks" in result.output and "evaluates no '$' expression" in result.output
    evil = json.loads(json.dumps(clean))
    evil["noise_scheduler"]["_target_"] = "os.system"
    config_path.write_text(json.dumps(evil))
    result = runner.invoke(app, args)
    one_error_line(result)
    assert "noise_scheduler._target_ is 'os.system'" in result.output

    # 2. a weights file whose pickle opens a marker: live when loaded the unsafe way, refused by name here
    config_path.write_text(json.dumps(clean))
    weights = bundle / "models" / WEIGHT_FILES["rflow"][1]
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "hook": OpensMarker(markers["pickle"])}, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(weights, weights_only=False)  # the payload is live
    assert markers["pickle"].exists()
    markers["pickle"].unlink()
    result = runner.invoke(app, args)
    one_error_line(result)
    assert WEIGHT_FILES["rflow"][1] in result.output and "open" in result.output

    # 3. nothing ran, nothing was imported from the bundle, nothing was written
    assert [k for k, m in markers.items() if m.exists()] == []
    assert "scripts" not in sys.modules and "scripts.rectified_flow" not in sys.modules
    assert not (tmp_path / "out.nii.gz").exists()
