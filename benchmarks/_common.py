"""Helpers shared by the benchmark scripts: JSON-line output, device sync, peak memory."""

from __future__ import annotations

import json
import resource
from typing import Any

import torch


def emit(**record: Any) -> None:
    """Print one JSON line."""
    print(json.dumps(record), flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak(dev: torch.device) -> float:
    """Peak memory in GiB: CUDA allocator peak, or the process's peak RSS on the CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
