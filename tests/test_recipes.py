"""Shipped recipes: names and descriptions come from the files in configs/, names resolve to files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.errors import ConfigError
from medsynth.recipes import list_recipes, recipe_path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# read from the source folder, independently of medsynth.recipes
FILES = {p.relative_to(CONFIGS).as_posix()[: -len(".yaml")]: p for p in CONFIGS.rglob("*.yaml")}
TRAIN = sorted(n for n, p in FILES.items() if "model" in yaml.safe_load(p.read_text()))


def test_every_file_in_configs_is_listed_with_its_first_comment_line() -> None:
    recipes = {r.name: r for r in list_recipes()}
    assert set(recipes) == set(FILES)
    assert {"gan2d", "ldm3d", "tiny/gan2d", "tiny/ldm2d", "augment"} <= set(recipes)
    for name, path in FILES.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{path}: needs a one-line description comment first"
        assert recipes[name].description == first[2:].strip()
        assert recipes[name].path.read_bytes() == path.read_bytes()
    assert sorted(n for n, r in recipes.items() if r.kind == "train") == TRAIN
    assert recipes["augment"].kind == "augment"


def test_a_name_resolves_to_the_shipped_file_and_an_existing_path_is_used_as_is(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert recipe_path("tiny/ldm2d").read_bytes() == (CONFIGS / "tiny" / "ldm2d.yaml").read_bytes()
    assert recipe_path("gan3d").read_bytes() == (CONFIGS / "gan3d.yaml").read_bytes()
    own = tmp_path / "gan2d"  # a file in the working directory wins over the shipped name
    own.write_text("name: mine\n")
    monkeypatch.chdir(tmp_path)
    assert recipe_path("gan2d") == Path("gan2d")
    assert recipe_path(own) == own


def test_unknown_names_folders_and_the_augment_config_are_refused_with_the_shipped_names() -> None:
    with pytest.raises(ConfigError) as err:
        recipe_path("gan4d")
    message = str(err.value)
    assert message.startswith("gan4d: no such file")
    for name in TRAIN:
        assert name in message
    assert "augment," not in message
    with pytest.raises(ConfigError, match="augment config"):
        recipe_path("augment")
    assert recipe_path("augment", kind="augment").name == "augment.yaml"
    with pytest.raises(ConfigError, match="is a folder"):
        recipe_path(CONFIGS / "tiny")


def test_recipes_command_prints_one_line_per_recipe() -> None:
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name, path in FILES.items():
        hits = [line for line in lines if line.split()[:1] == [name]]
        assert len(hits) == 1, name
        assert path.read_text().splitlines()[0][2:].strip() in hits[0]
    # training recipes first, then the augment config under its own heading
    first_word = [line.split()[0] if line.split() else "" for line in lines]
    assert max(first_word.index(name) for name in TRAIN) < first_word.index("Augment") < first_word.index("augment")


def test_listing_recipes_does_not_import_torch() -> None:
    code = ("import sys\nfrom medsynth.recipes import list_recipes\nlist_recipes()\n"
            "print([m for m in ('torch', 'monai', 'pydantic') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_train_accepts_a_shipped_recipe_name(tmp_path: Path) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "p", dim=2, cases=2, size=32, seed=0)
    result = CliRunner().invoke(app, ["train", "tiny/gan2d", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--max-steps", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["name"] == yaml.safe_load((CONFIGS / "tiny" / "gan2d.yaml").read_text())["name"] == "gan2d-tiny"


def test_train_with_an_unknown_recipe_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "gan5d", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: gan5d: no such file, and not the name of a shipped training recipe (")
    assert all(name in line for name in TRAIN) and "medsynth recipes" in line
    assert not (tmp_path / "run").exists()


def test_augment_takes_the_shipped_config_by_name_or_by_its_checkout_path_from_any_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.augment import load_augment_config
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "p", dim=2, cases=2, size=32, seed=0)
    monkeypatch.chdir(tmp_path)  # no configs/ folder here, as after a wheel install
    assert not Path("configs").exists()
    assert recipe_path("configs/augment.yaml", kind="augment").read_bytes() == (CONFIGS / "augment.yaml").read_bytes()
    assert recipe_path("configs/small/gan3d.yaml").read_bytes() == (CONFIGS / "small" / "gan3d.yaml").read_bytes()
    base = ["augment", str(data), "--method", "synthseg", "--num", "2", "--dry-run", "--no-progress"]
    for given in ("augment", "configs/augment.yaml", str(CONFIGS / "augment.yaml")):
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out"), "--config", given])
        assert result.exit_code == 0, (given, result.output)
    # the shipped file documents the defaults; a file of one's own is read (its bad key is reported)
    assert load_augment_config(recipe_path("augment", kind="augment")) == load_augment_config(None)
    (tmp_path / "own.yaml").write_text("edits:\n  grow_probability: 0.5\n")
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out"), "--config", "own.yaml"])
    assert result.exit_code == 1 and "own.yaml" in result.output and "grow_probability" in result.output
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out"), "--config", "tiny/gan2d"])
    assert result.exit_code == 1 and "is the shipped training recipe, not a augment config" in result.output


def test_every_recipe_header_names_itself_by_name_not_by_a_checkout_path() -> None:
    for recipe in list_recipes():
        header = []
        for line in recipe.path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line)
        text = "\n".join(header)
        assert "configs/" not in text, f"{recipe.name}: its header names a path of the source tree"
        if recipe.kind == "train":
            assert f"medsynth train {recipe.name} --data" in text, recipe.name
            named = re.findall(r"medsynth train (\S+)", text)
            assert set(named) == {recipe.name}, (recipe.name, named)
        else:
            assert f"--config {recipe.name}" in text, recipe.name
