"""Shared test settings: one torch thread per process (CI has 2 cores), no GPU assumptions."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):  # noqa: ARG001
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
