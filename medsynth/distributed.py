"""The torchrun environment: the one place that reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``.

``torchrun --nproc_per_node P ...`` starts P processes and sets these variables in each; without
torchrun they are absent and a process is rank 0 of 1. Imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from medsynth.errors import JobError

__all__ = ["TorchrunEnv", "torchrun_env"]


@dataclass(frozen=True)
class TorchrunEnv:
    """rank: this process's global rank; local_rank: its index on this machine (its GPU);
    world_size: processes in the job (1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        """True under a torchrun job of more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes shared files and reports)."""
        return self.rank == 0


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv:
    """The torchrun variables of ``environ`` (default: this process's environment).

    JobError when a variable is set but not a valid integer, or the rank is out of range."""
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for key, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = env.get(key)
        if raw is None or raw.strip() == "":
            values[key] = default
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise JobError(f"environment variable {key}={raw!r} is not an integer (torchrun sets it)") from None
    rank, local, world = values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise JobError(f"torchrun environment RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world} is inconsistent")
    return TorchrunEnv(rank=rank, local_rank=local, world_size=world)
