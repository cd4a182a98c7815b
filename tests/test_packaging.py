"""The built wheel stands alone: it carries the recipes, installs (not editable) into a fresh venv and
runs ``medsynth demo --quick`` from an empty folder.

Offline and fast: the wheel is built without build isolation from a copy of the source, and the fresh
venv reuses this environment's installed dependencies through a ``.pth`` line. Folders named in a
``.pth`` are appended to ``sys.path`` without processing their own ``.pth`` files, so this
environment's editable medsynth (if any) cannot leak in; the test asserts that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("medsynth", "configs", "pyproject.toml", "setup.py", "README.md")


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _build_wheel(tmp: Path) -> Path:
    from importlib.metadata import version

    have = version("setuptools")
    assert int(have.split(".")[0]) >= 77, f"setuptools {have} cannot build the wheel offline: pip install -e '.[dev]'"
    src = tmp / "src"
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("medsynth-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """(bin folder, site-packages) of a new venv with the wheel installed and this env's packages visible."""
    venv = tmp / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    # install while the venv sees nothing else, so pip finds no medsynth already there
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp).stdout.strip())
    outer = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_outer_env.pth").write_text("".join(f"{p}\n" for p in outer))
    return venv / "bin", site


def test_wheel_installs_alone_and_runs_the_demo_from_an_empty_folder(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)

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
    bindir, site = _fresh_venv(tmp_path, wheel)
    code = "import medsynth, medsynth.recipes as r; print(medsynth.__file__); print(r.recipe_path('tiny/gan2d'))"
    where = _run([str(bindir / "python"), "-c", code], cwd=tmp_path).stdout.split()
    assert Path(where[0]) == site / "medsynth" / "__init__.py"
    assert Path(where[1]) == site / "medsynth" / "configs" / "tiny" / "gan2d.yaml"
    listing = _run([str(bindir / "medsynth"), "recipes"], cwd=tmp_path).stdout
    assert "tiny/ldm2d" in listing and str(site / "medsynth" / "configs") in listing

    # 3. the demo from an empty working directory
    empty = tmp_path / "empty"
    empty.mkdir()
    _run([str(bindir / "medsynth"), "demo", "--quick", "--out", "demo"], cwd=empty, timeout=300)
    assert (empty / "demo" / "report.md").is_file()
    assert [p.name for p in empty.iterdir()] == ["demo"]
