"""Packaging glue that pyproject.toml cannot express: the top-level ``configs/`` folder (the recipes'
source) ships inside the package as ``medsynth/configs`` (``configs/tiny`` as ``medsynth/configs/tiny``,
and so on for any new subfolder). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

RECIPE_DIRS = [Path("configs"), *sorted(p for p in Path("configs").rglob("*") if p.is_dir() and p.name != "__pycache__")]
RECIPE_PACKAGES = [".".join(("medsynth", *d.parts)) for d in RECIPE_DIRS]

setup(
    packages=[*find_packages(include=["medsynth", "medsynth.*"]), *RECIPE_PACKAGES],
    package_dir={"medsynth.configs": "configs"},
    package_data={"medsynth": ["py.typed"], **{name: ["*.yaml"] for name in RECIPE_PACKAGES}},
)
