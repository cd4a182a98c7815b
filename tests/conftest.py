"""Shared test settings and fixtures: one torch thread per process (CI has 2 cores), no GPU
assumptions; the quick demo runs once per test session (:func:`quick_demo`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of one ``medsynth demo --quick`` run (made once per session, through the CLI);
    tests that use it must not change it."""
    from typer.testing import CliRunner

    from medsynth.cli import app

    out = tmp_path_factory.mktemp("demo") / "out"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert str(out / "report.md") in result.output  # the report's path is printed at the end
    return out
