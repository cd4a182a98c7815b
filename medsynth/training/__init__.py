"""Training: one engine (:mod:`.engine`) for every model family registered in :mod:`medsynth.registry`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import Config
    from medsynth.training.engine import TrainResult


def run_training(config: Config, run_dir: str | Path, *, resume: bool = False, stage: str | None = None,
                 progress: bool = True, allow_changed_data: bool = False, force: bool = False) -> TrainResult:
    """Train ``config`` into ``run_dir`` whatever its family: a staged family (``ldm``: autoencoder,
    then diffusion) runs its stages in order, or only ``stage``. Returns the engine's ``TrainResult``
    (of the last stage trained). A recipe whose estimated memory cannot fit the device is refused
    first (:func:`medsynth.training.memory.check_memory`). With ``progress``, says once on stderr how many CPU threads torch
    uses (:func:`medsynth.training.engine.cpu_threads`); ``RUN/report.md`` is the run's report.
    ``allow_changed_data``: resume although a training file changed since the run started (else refused).
    ``force``: a staged family's later stage starts although the earlier one missed its quality gate
    (the ldm autoencoder's ``target_psnr``: :func:`medsynth.training.ldm.check_autoencoder_gate`)."""
    import sys

    from medsynth.distributed import torchrun_env
    from medsynth.errors import ConfigError
    from medsynth.registry import family_names, get_family, load_object
    from medsynth.training.engine import check_run_dir, cpu_threads, distributed_session, train
    from medsynth.training.memory import check_memory, device_memory

    family = get_family(config.model.family)
    what, available = device_memory(config.training.device)
    check_memory(config, available, what)  # a recipe that cannot fit fails before anything is allocated
    if stage is not None and stage not in family.stages:
        if not family.stages:
            staged = ", ".join(n for n in family_names() if get_family(n).stages)
            raise ConfigError(f"--stage {stage}: only staged families ({staged}) have stages; "
                              f"this recipe trains a {family.name}")
        raise ConfigError(f"--stage {stage}: the {family.name} family has stages {', '.join(family.stages)}")
    if progress and torchrun_env().is_main:
        setting, n = config.training.threads, cpu_threads(config.training.threads)
        sys.stderr.write(f"using {n} CPU thread{'s' if n != 1 else ''} (training.threads: {setting or '0 = auto'})\n")
    if not family.stages:
        return train(config, run_dir, resume=resume, stage=stage, progress=progress,
                     allow_changed_data=allow_changed_data)
    check_run_dir(Path(run_dir), stage, resume, family.name)
    # One process group for all stages: under torchrun, a group destroyed after one stage and
    # created again for the next hangs in DDP's first collective.
    with distributed_session(config):
        if family.runner is not None:
            runner = load_object(family.runner)
            if not callable(runner):
                raise ConfigError(f"model.family {family.name!r}: its runner {family.runner} is not a function")
            result: TrainResult = runner(config, run_dir, resume=resume, stage=stage, progress=progress,
                                         allow_changed_data=allow_changed_data, force=force)
            return result
        from medsynth.training.checkpoint import checkpoint_paths
        from medsynth.training.engine import checkpoint_dir

        for s in family.stages if stage is None else (stage,):
            # a resumed run starts the stages it had not reached yet
            started = bool(checkpoint_paths(checkpoint_dir(Path(run_dir), s)))
            result = train(config, run_dir, resume=resume and started, stage=s, progress=progress,
                           allow_changed_data=allow_changed_data)
        return result


__all__ = ["run_training"]
