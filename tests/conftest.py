"""Shared test settings and fixtures: one torch thread per process (CI has 2 cores), no GPU
assumptions; the quick demo runs once per test session (:func:`quick_demo`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001
    import torch

    torch.set_num_threads(1)


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


@dataclass(frozen=True)
class InstalledWheel:
    """A wheel of this source tree installed (not editable) into a fresh venv."""

    wheel: Path
    bindir: Path
    site: Path


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """Built once per session; the fresh venv sees this environment's dependencies through a ``.pth``
    line (folders named there are appended to ``sys.path`` without processing their own ``.pth``
    files, so an editable medsynth of this environment cannot leak in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    bindir, site = _fresh_venv(tmp, wheel)
    return InstalledWheel(wheel=wheel, bindir=bindir, site=site)


@pytest.fixture(scope="session")
def quick_demo(installed_wheel: InstalledWheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the session's one ``medsynth demo --quick`` run: the installed wheel's command,
    started in an empty folder. Tests that use it must not change it."""
    empty = tmp_path_factory.mktemp("demo_cwd")
    proc = _run([str(installed_wheel.bindir / "medsynth"), "demo", "--quick", "--out", "demo"], cwd=empty,
                timeout=300)
    out = empty / "demo"
    assert "report.md" in proc.stdout + proc.stderr  # the report's path is printed at the end
    assert [p.name for p in empty.iterdir()] == ["demo"]
    return out
