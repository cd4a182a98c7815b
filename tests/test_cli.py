"""The command line as a whole: every command is listed, --help needs no torch, errors are one line."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from medsynth.cli import app

COMMANDS = ("validate", "phantoms", "evaluate", "train", "sample", "augment", "demo", "recipes", "downstream", "export", "anatomy")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    for name in COMMANDS:
        sub = CliRunner().invoke(app, [name, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output, name


def test_help_and_import_do_not_load_torch() -> None:
    """`medsynth --help` must answer at once: neither the package nor the CLI imports torch or MONAI."""
    code = (
        "import sys, runpy\n"
        "sys.argv = ['medsynth', '--help']\n"
        "try:\n"
        "    runpy.run_module('medsynth', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'monai', 'nibabel', 'SimpleITK', 'skimage') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "validate" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_python_dash_m_runs_the_same_app() -> None:
    proc = subprocess.run([sys.executable, "-m", "medsynth", "phantoms", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--dim" in proc.stdout


def test_stage_option_is_refused_for_a_family_without_stages(tmp_path) -> None:
    from pathlib import Path

    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "p", dim=2, cases=2, size=32, seed=0)
    recipe = Path(__file__).resolve().parents[1] / "configs/tiny/gan2d.yaml"
    result = CliRunner().invoke(app, ["train", str(recipe), "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--stage", "diffusion"])
    assert result.exit_code == 1 and "only staged families (ldm) have stages" in result.output
    assert not (tmp_path / "run").exists()
