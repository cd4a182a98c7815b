"""The command line as a whole: every command is listed, --help needs no torch, errors are one line."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from medsynth.cli import app

COMMANDS = ("validate", "phantoms", "evaluate", "train", "sample", "augment", "demo", "recipes", "downstream", "export",
            "anatomy")


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


def test_every_command_prints_warnings_as_one_plain_line(tmp_path, monkeypatch) -> None:
    """The demo (and every command: each goes through the one wrapper) shows a warning as ``warning: ...``,
    not Python's ``file.py:842: UserWarning`` with the source line after it."""
    import warnings

    import medsynth.demo
    from medsynth.cli import user_errors

    def fake_demo(out, **kwargs):
        warnings.warn("demo stage warned (test_cli)", stacklevel=1)
        return medsynth.demo.DemoResult(out=tmp_path, report=tmp_path / "report.md", seconds=0.0)

    monkeypatch.setattr(medsynth.demo, "run_demo", fake_demo)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["warning: demo stage warned (test_cli)"], result.stderr
    for command in app.registered_commands:  # the wrapper that installs the formatter
        assert command.callback is not None and command.callback.__code__ is user_errors(lambda: None).__code__, (
            command.callback)


def test_train_help_shows_a_training_key_as_its_set_example() -> None:
    def text(command: str) -> str:  # the help without rich's box, one space between words
        out = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        return " ".join(out.replace("│", " ").split())

    train, augment = text("train"), text("augment")
    assert "e.g. training.lr=1e-4" in train and "edits." not in train
    from medsynth.config import load_config
    from medsynth.recipes import recipe_path

    assert load_config(recipe_path("tiny/gan2d"), ["training.lr=1e-4"]).training.lr == 1e-4  # a real key
    assert "e.g. edits.grow_prob=0.5" in augment
