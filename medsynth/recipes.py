"""The recipes that ship with medsynth: find one by name or path, list them.

The YAML files live in the source tree's top-level ``configs/`` folder; a built wheel carries the same
files as ``medsynth/configs/`` (see ``pyproject.toml``). A recipe's name is its path under that folder
without ``.yaml``: ``gan2d``, ``ldm3d``, ``tiny/gan2d``. Its description is its first comment line.
A recipe with a ``model`` section trains a model (``medsynth train NAME``); the others configure a job
(``augment``: ``medsynth augment --config augment``). Every command that takes a recipe takes a file
or a name (:func:`recipe_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medsynth.errors import ConfigError
from medsynth.safe_yaml import load_yaml

__all__ = ["Recipe", "RecipeKind", "list_recipes", "recipe_path", "recipes_dir"]

RecipeKind = Literal["train", "augment"]

_PACKAGE = Path(__file__).resolve().parent
_WHAT: dict[RecipeKind, str] = {"train": "training recipe", "augment": "augment config (medsynth augment --config)"}


@dataclass(frozen=True)
class Recipe:
    """One shipped recipe file."""

    name: str  # path under the recipes folder without ".yaml", e.g. "tiny/gan2d"
    path: Path
    kind: RecipeKind
    description: str  # the first comment line, without "# "


def recipes_dir() -> Path:
    """The folder of shipped recipes: ``medsynth/configs`` in an installed wheel, ``configs/`` of the
    source tree in an editable install. Raises ConfigError when neither exists (a broken install)."""
    installed = _PACKAGE / "configs"
    if installed.is_dir():
        return installed
    source = _PACKAGE.parent / "configs"
    if source.is_dir() and (_PACKAGE.parent / "pyproject.toml").is_file():
        return source
    raise ConfigError(f"{installed}: the shipped recipes are missing; reinstall medsynth (pip install medsynth)")


def _describe(path: Path) -> tuple[RecipeKind, str]:
    """(kind, first comment line) of a recipe file."""
    text = path.read_text(encoding="utf-8")
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    description = first.lstrip("#").strip() if first.startswith("#") else ""
    loaded = load_yaml(text, str(path))
    kind: RecipeKind = "train" if isinstance(loaded, dict) and "model" in loaded else "augment"
    return kind, description


def list_recipes() -> list[Recipe]:
    """Every shipped recipe, training recipes first (full size, then ``tiny/``), then job configs."""
    root = recipes_dir()
    found = []
    for path in root.rglob("*.yaml"):
        kind, description = _describe(path)
        found.append(Recipe(path.relative_to(root).with_suffix("").as_posix(), path, kind, description))
    return sorted(found, key=lambda r: (r.kind != "train", r.name.count("/"), r.name))


def _recipe_name(text: str) -> str:
    """A recipe name from what a user typed: ``small/gan3d``, or the source tree's path of a shipped
    recipe, ``configs/small/gan3d.yaml`` (so a command written in a checkout works from a wheel too)."""
    name = text.replace("\\", "/")
    if name.startswith("./"):
        name = name[2:]
    if name.startswith("configs/") and name.endswith(".yaml"):
        name = name[len("configs/"):-len(".yaml")]
    return name


def recipe_path(name_or_path: str | Path, kind: RecipeKind = "train") -> Path:
    """A recipe file: ``name_or_path`` itself when that file exists, else the shipped recipe of that name
    (``gan2d``, ``tiny/ldm2d``; ``configs/tiny/ldm2d.yaml``, its path in the source tree, names it too).
    Raises ConfigError naming the shipped recipes of ``kind`` when it is neither, or when the name is a
    shipped recipe of the other kind."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    if given.exists():
        raise ConfigError(f"{given}: is a folder, not a recipe file")
    recipes = list_recipes()
    name = _recipe_name(str(name_or_path))
    for recipe in recipes:
        if recipe.name == name:
            if recipe.kind != kind:
                raise ConfigError(f"recipe {name!r}: is the shipped {_WHAT[recipe.kind]}, not a {_WHAT[kind]}")
            return recipe.path
    names = ", ".join(r.name for r in recipes if r.kind == kind)
    raise ConfigError(f"{name_or_path}: no such file, and not the name of a shipped {_WHAT[kind]} ({names}; "
                      "see `medsynth recipes`)")
