"""The built wheel stands alone: it carries the recipes, installs (not editable) into a fresh venv and
runs ``medsynth demo --quick`` from an empty folder.

Offline and fast: the wheel is built without build isolation from a copy of the source, and the fresh
venv reuses this environment's installed dependencies through a ``.pth`` line. Folders named in a
``.pth`` are appended to ``sys.path`` without processing their own ``.pth`` files, so this
environment's editable medsynth (if any) cannot leak in; the test asserts that.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_alone_and_runs_the_demo_from_an_empty_folder(installed_wheel, quick_demo: Path) -> None:
    wheel, bindir, site = installed_wheel.wheel, installed_wheel.bindir, installed_wheel.site

    # 1. the wheel lists every recipe of configs/ under medsynth/configs/, and every module of medsynth/
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert {"gan2d.yaml", "tiny/gan2d.yaml", "tiny/ldm2d.yaml", "augment.yaml"} <= set(recipes)
    missing = [r for r in recipes if f"medsynth/configs/{r}" not in names]
    assert not missing, f"recipes not in the wheel: {missing}"
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "medsynth").rglob("*.py")]
    assert not [m for m in modules if m not in names], "modules not in the wheel"
    assert "medsynth/py.typed" in names

    # 2. installed, not editable: medsynth and its recipes come from the fresh venv
    code = "import medsynth, medsynth.recipes as r; print(medsynth.__file__); print(r.recipe_path('tiny/gan2d'))"
    proc = subprocess.run([str(bindir / "python"), "-c", code], cwd=site, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where = proc.stdout.split()
    assert Path(where[0]) == site / "medsynth" / "__init__.py"
    assert Path(where[1]) == site / "medsynth" / "configs" / "tiny" / "gan2d.yaml"
    listing = subprocess.run([str(bindir / "medsynth"), "recipes"], cwd=site, capture_output=True, text=True,
                             timeout=120).stdout
    assert "tiny/ldm2d" in listing and str(site / "medsynth" / "configs") in listing

    # 3. the session's quick demo ran from that venv in an empty working directory (see conftest)
    assert (quick_demo / "report.md").is_file()
