"""Training: one engine (:mod:`.engine`) for every model family (:mod:`.gan`, :mod:`.ldm`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_training(config: Any, run_dir: str | Path, *, resume: bool = False, stage: str | None = None,
                 progress: bool = True) -> Any:
    """Train ``config`` into ``run_dir`` whatever its family: a staged family (``ldm``: autoencoder,
    then diffusion) runs its stages in order, or only ``stage``. Returns the engine's ``TrainResult``."""
    if stage is not None and config.model.family != "ldm":
        from medsynth.errors import ConfigError

        raise ConfigError(f"--stage {stage}: only staged families (ldm) have stages; "
                          f"this recipe trains a {config.model.family}")
    if config.model.family == "ldm":
        from medsynth.training.engine import distributed_session
        from medsynth.training.ldm import train_ldm

        # One process group for all stages: under torchrun, a group destroyed after the autoencoder
        # stage and created again for the diffusion stage hangs in DDP's first collective.
        with distributed_session(config):
            return train_ldm(config, run_dir, resume=resume, stage=stage, progress=progress)
    from medsynth.training.engine import train

    return train(config, run_dir, resume=resume, stage=stage, progress=progress)
