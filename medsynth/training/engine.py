"""The training engine: one plain PyTorch loop for every model family.

How a model family plugs in (the contract; read this before writing a family)
-----------------------------------------------------------------------------
A *family* (``gan`` in :mod:`medsynth.training.gan`, ``ldm`` in :mod:`medsynth.training.ldm`) is a
class registered in :mod:`medsynth.registry` (``Family.trainer``, a lazy ``"module:Class"`` string, so
importing the engine imports no family) under the value of ``config.model.family``. Subclass
:class:`FamilyBase`; the engine calls only these members::

    family = Family(config: Config, info: DataInfo, rt: Runtime)
        Build networks (on the CPU, then ``.to(rt.device)``), optimisers (``self.make_optimizer``),
        EMA copies (``self.make_ema``), and register them in ``self.modules``, ``self.optimizers``,
        ``self.schedulers``, ``self.emas``. The engine runs the constructor inside
        ``torch.random.fork_rng`` seeded with ``training.seed``, so default initialisers are
        reproducible without touching the caller's global RNG. Wrap a network for training with
        ``rt.wrap(module)`` (DDP under torchrun, the module itself otherwise); keep the unwrapped
        module in ``self.modules``. Raise ConfigError for settings that do not fit the data
        (e.g. a size not divisible by the network's downsampling factor).
    family.max_steps() -> int
        Steps to train (default ``config.training.max_steps``; a stage may use its own count).
    family.train_step(batch: dict[str, Tensor], step: int) -> Mapping[str, Tensor | float]
        One optimisation step on ``batch`` (see DataInfo / medsynth.data.loader.TrainingData for the
        keys: ``image`` (N, C, *spatial) float32 in [0, 1]; ``label`` (N, L, *spatial) one-hot
        float32 over ``info.labels``; ``label_index`` (N, *spatial) int64; ``class_index`` (N,) int64).
        Every random draw comes from ``rt.generator(step, stream)`` (a CPU torch.Generator seeded
        from (seed, step, rank, stream)), so a resumed run draws the same numbers. Use
        ``rt.autocast()`` around forwards. Update EMA copies here. Return the losses for logging as
        detached scalar tensors (left on the device: the engine sums them there and synchronises once
        per ``training.log_every``) or floats.
    family.state_dict() / family.load_state_dict(state)
        Everything the family owns, as tensors and plain Python types only (the default collects
        modules, optimisers, schedulers, EMA copies, the GradScaler and ``extra_state()``); the engine
        adds the step, every RNG state, the data order and the config itself.
    family.evaluate(batch) -> dict[str, float]      (optional; default {})
        Deterministic scores on the fixed preview batch, logged as ``{"kind": "eval", ...}`` records
        at step 0, every ``preview_every`` steps and at the end (rank 0 only, no grad).
    family.preview(batch) -> dict[str, Tensor]
        Named image rows for the preview grid, each (N, C, *spatial) in [0, 1] (e.g. ``real``,
        ``generated``); the engine adds the mask row (with a label legend) and writes
        ``RUN/previews/step_XXXXXXXX.png``.
    family.crop_pool() -> int | None                         (optional; default None)
        None: every sample is a fresh crop. An int k: training samples come from a fixed pool of k
        crops per case (:meth:`medsynth.data.loader.TrainingData.pool_item`); a sample's ``index`` is
        then the same each time its crop is drawn (the LDM's cached latents use it as the key).
    family.preview_multiple() -> int | None                 (optional; default None)
        None: the preview batch is the fixed batch of training crops. An int m: the family's
        ``preview`` generates at the batch's own size, and the preview batch holds whole slices of a
        few training cases (3D: a slab through the whole volume, as deep as ``data.size``), each side
        a multiple of m (:func:`full_size_batch`).
    family.export(run_dir: Path) -> dict[str, object]
        Write the family's inference weights (``RUN/`` + :data:`medsynth.runcard.WEIGHTS_FILE`; EMA
        weights when there are any) and return JSON-able facts for the run card
        (:class:`medsynth.runcard.RunCard` ``.model``). Rank 0 only.

Runs, stages and the folder layout
----------------------------------
``train(config, run_dir, resume=False, stage=None)`` writes::

    RUN/config.yaml                      the resolved recipe
    RUN/metrics.jsonl                    {"kind": "start", "step", "max_steps", "device", "threads",
                                         "previews" ("whole" or "crops": see preview_multiple), ...}
                                         once per call, {"kind": "train", "step", "samples_per_s",
                                         losses...} (each loss the mean over the steps since the last
                                         record) and {"kind": "eval", "step", ...} records (a "stage"
                                         key if staged)
    RUN/report.md, RUN/curves.png        the run report (medsynth.training.report), rewritten at every
                                         checkpoint and at the end
    RUN/tensorboard/                     the same records as TensorBoard scalars, when the
                                         ``tensorboard`` package is installed
    RUN/previews/[STAGE_]step_XXXXXXXX.png
    RUN/checkpoints/[STAGE/]step_XXXXXXXX.pt   (see medsynth.training.checkpoint)
    RUN/model.safetensors, RUN/model_card.json (family.export, then medsynth.runcard.write_run_card)

``stage`` (``--stage`` on the CLI) is passed to the family as ``rt.stage``; a staged family (LDM:
``autoencoder`` then ``diffusion``) trains each stage as its own run of the loop with its own
checkpoint folder in the same RUN. An existing RUN is refused without ``resume`` (for a stage:
when that stage already has checkpoints). ``resume`` continues from the newest valid checkpoint and
refuses a config that differs in anything but the step count, intervals and workers. A RUN that
holds another family's run (its ``config.yaml`` or run card names another ``model.family``) is
refused, with or without ``resume``.

The losses a run reports (the progress line, :class:`TrainResult` ``.losses``, the run card, the
checkpoint, ``medsynth train``'s summary) are the last ``train`` record of ``metrics.jsonl``.

Threads: the process uses :func:`cpu_threads` torch threads while it trains (``training.threads``;
0: ``OMP_NUM_THREADS`` when set, else the CPU cores the process may run on, at most 32).

Determinism: the data order is a function of (seed, step) (medsynth.data.loader), noise comes from
``rt.generator(step, ...)``, and on the CPU ``torch.use_deterministic_algorithms`` is on, so N steps
+ resume to M equals M straight, bit for bit. Under torchrun each rank takes its own slice of every
global batch (a DistributedSampler without padding), gradients are averaged by DDP, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import numpy as np

from medsynth.data.atomic import atomic_write_text
from medsynth.data.ledger import LEDGER, LOCK_FILE, check_out_path, check_outside_inputs, claim_folder, made_by
from medsynth.data.loader import with_one_hot
from medsynth.distributed import TorchrunEnv, torchrun_env
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.journal import changed_input, dataset_inputs, output_lock
from medsynth.seeds import Stream, derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medsynth.config import Config
    from medsynth.data.loader import DataInfo, TrainingData
    from medsynth.data.manifest import Manifest

#: a batch of the data loader: ``image``, ``label`` (one-hot), ``label_index``, ``class_index`` tensors
Batch = dict[str, "torch.Tensor"]
#: the parameter lists AveragedModel hands to its ``multi_avg_fn``
TensorSeq: TypeAlias = "tuple[torch.Tensor, ...] | list[torch.Tensor]"
#: the stream of ``rt.generator(step, stream)`` that training flips (``model.flips``) draw from; a family's
#: own streams (noise, timesteps, ...) use other numbers
FLIP_STREAM = 9


def flip_batch(batch: Batch, generator: torch.Generator) -> Batch:
    """Flip each sample's ``image``, ``label`` and ``label_index`` together along each spatial axis
    with probability 1/2 (draws from ``generator``: one per sample and axis). The ``model.flips``
    augmentation of every family."""
    import torch

    image = batch["image"]
    n, sd = image.shape[0], image.ndim - 2
    draws = torch.rand((n, sd), generator=generator) < 0.5
    out = dict(batch)
    for key, first in (("image", 2), ("label", 2), ("label_index", 1)):
        t = batch[key]
        out[key] = torch.stack([
            t[i].flip([first - 1 + a for a in range(sd) if draws[i, a]]) if draws[i].any() else t[i]
            for i in range(n)])
    return out


# Settings that may change between a run and its resume.
RESUME_MUTABLE = {
    "training.max_steps",
    "training.workers",
    "training.log_every",
    "training.preview_every",
    "training.checkpoint_every",
    "training.keep_last",
    "training.device",
    "training.threads",
    "training.channels_last",
    "training.compile",
}
#: the most torch threads ``training.threads: 0`` picks
MAX_AUTO_THREADS = 32
#: the largest side of a preview slice (2D) and of a preview slab's in-plane sides (3D), voxels
PREVIEW_MAX_SIDE = {2: 512, 3: 256}


def cpu_threads(setting: int, environ: Mapping[str, str] | None = None) -> int:
    """The torch threads a training process uses: ``setting`` (``training.threads``) when above 0;
    else ``OMP_NUM_THREADS`` when set to a positive number (torchrun sets 1 per process); else the CPU
    cores this process may run on (``os.sched_getaffinity``), at most :data:`MAX_AUTO_THREADS`."""
    if setting > 0:
        return int(setting)
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_THREADS))


def family_class(name: str) -> type[FamilyBase]:
    """The trainer class the registry names for family ``name`` (ConfigError if unknown)."""
    from medsynth.registry import get_family, load_object

    target = get_family(name).trainer
    cls = load_object(target)
    if not (isinstance(cls, type) and issubclass(cls, FamilyBase)):
        raise ConfigError(f"model.family {name!r}: its trainer {target} is not a FamilyBase subclass")
    return cls


# ---------------------------------------------------------------------------- runtime


@dataclass(frozen=True)
class Runtime(TorchrunEnv):
    """Where and how this process trains: torchrun's ranks (:class:`medsynth.distributed.TorchrunEnv`,
    with ``distributed`` and ``is_main``; 0/1/0 without it), and

    config: the recipe; run_dir: RUN; device: the torch device; stage: the ``--stage`` option (None
    when the family has no stages).
    """

    config: Config = field(kw_only=True)
    run_dir: Path = field(kw_only=True)
    device: torch.device = field(kw_only=True)
    stage: str | None = None

    @property
    def seed(self) -> int:
        return self.config.training.seed

    @property
    def amp_enabled(self) -> bool:
        """bf16 autocast: only on CUDA (bf16 on this kind of CPU is 10-70x slower)."""
        return self.config.training.amp and self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)

    def memory_format(self) -> torch.memory_format | None:
        """``training.channels_last``: channels_last (2D) or channels_last_3d (3D); else None."""
        import torch

        if not self.config.training.channels_last:
            return None
        return torch.channels_last if self.config.data.dim == 2 else torch.channels_last_3d

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module a step trains: ``module`` in the channels-last memory format with
        ``training.channels_last`` (its parameters converted in place), DDP-wrapped under torchrun (its
        gradients are averaged across ranks), then compiled with ``training.compile``."""
        import torch

        fmt = self.memory_format()
        if fmt is not None:
            module = module.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes it; its stubs do not
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids)
        if self.config.training.compile:
            module = cast("torch.nn.Module", torch.compile(module))
        return module

    def prepare(self, batch: Batch, num_labels: int) -> Batch:
        """A loader batch as a step takes it: on the device, one-hot ``label`` built there, images and
        labels in the channels-last format with ``training.channels_last``."""
        out = with_one_hot(_to_device(batch, self.device), num_labels)
        fmt = self.memory_format()
        if fmt is None:
            return out
        sd = 4 if self.config.data.dim == 2 else 5
        return {k: (v.contiguous(memory_format=fmt) if k in ("image", "label") and v.ndim == sd else v)
                for k, v in out.items()}

    def generator(self, step: int, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded from (seed, step, rank, stream): draw, then ``.to(rt.device)``."""
        import torch

        return torch.Generator().manual_seed(derive_seed(self.seed, Stream.TRAIN_STEP, step, self.rank, stream))

    def ranks_with(self, flag: bool) -> list[int]:
        """The ranks whose ``flag`` is true, the same list on every rank (one all-reduce under torchrun;
        every rank must call it at the same step). A decision one rank cannot take alone: a divergence."""
        import torch

        if not self.distributed:
            return [self.rank] if flag else []
        import torch.distributed as dist

        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(flag)
        dist.all_reduce(flags)
        return [int(r) for r in torch.nonzero(flags).flatten().tolist()]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


# ---------------------------------------------------------------------------- family base


def ema_warmup_fn(decay: float) -> Callable[[TensorSeq, TensorSeq, torch.Tensor | int], None]:
    """AveragedModel's ``multi_avg_fn``: ``ema <- d * ema + (1 - d) * current`` with
    ``d = min(decay, (1 + n) / (10 + n))``, n the updates averaged so far."""
    import torch

    @torch.no_grad()
    def update(ema: TensorSeq, current: TensorSeq, num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            torch._foreach_lerp_(list(ema), list(current), 1.0 - d)
        else:
            for e, c in zip(ema, current):
                e.copy_(e * d + c * (1.0 - d))

    return update


class FamilyBase:
    """Shared machinery for model families (see the module docstring for the contract)."""

    name = "base"

    def __init__(self, config: Config, info: DataInfo, rt: Runtime) -> None:
        import torch

        self.config = config
        self.info = info
        self.rt = rt
        self.modules: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}
        self.emas: dict[str, torch.optim.swa_utils.AveragedModel] = {}
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=False)

    # -- helpers for subclasses
    def make_optimizer(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """Adam or AdamW with the recipe's ``optimizer`` settings and learning rate ``lr``
        (fused kernels on CUDA)."""
        import torch

        opt = self.config.optimizer
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        fused = True if self.rt.device.type == "cuda" else None
        return cls(params, lr=lr, betas=(opt.betas[0], opt.betas[1]), weight_decay=opt.weight_decay, fused=fused)

    def make_ema(self, module: torch.nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
        """An EMA copy (AveragedModel) if ``training.ema`` is set, with a warm-up: the n-th update
        uses decay ``min(ema, (1 + n) / (10 + n))``, so early weights fade within a short run."""
        from torch.optim.swa_utils import AveragedModel

        decay = self.config.training.ema
        if decay is None:
            return None
        return AveragedModel(module, multi_avg_fn=ema_warmup_fn(decay), use_buffers=True)

    def clip_and_step(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss``, clip (``optimizer.grad_clip``) and step optimiser ``name``."""
        import torch

        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optimizer.grad_clip
        if clip is not None:
            params = [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched = self.schedulers.get(name)
        if sched is not None:
            sched.step()

    def inference_module(self, name: str) -> torch.nn.Module:
        """The EMA copy's module when there is one, else the raw module."""
        ema = self.emas.get(name)
        return ema.module if ema is not None else self.modules[name]

    def crop_pool(self) -> int | None:
        """None (the default): fresh crops every step. k: a fixed pool of k crops per case."""
        return None

    def preview_multiple(self) -> int | None:
        """None (the default): previews show the fixed batch of training crops. A family whose
        ``preview`` generates at any size returns the multiple its networks need (e.g. the
        generator's downsampling factor); previews then show whole slices (see
        :func:`full_size_batch`)."""
        return None

    # -- the contract
    def max_steps(self) -> int:
        return self.config.training.max_steps

    def train_step(self, batch: Batch, step: int) -> Mapping[str, torch.Tensor | float]:
        raise NotImplementedError

    def evaluate(self, batch: Batch) -> dict[str, float]:
        return {}

    def preview(self, batch: Batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def export(self, run_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "emas": {k: e.state_dict() for k, e in self.emas.items()},
            "scaler": self.scaler.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for group, owned in (("modules", self.modules), ("optimizers", self.optimizers),
                             ("schedulers", self.schedulers), ("emas", self.emas)):
            saved = state.get(group, {})
            if set(saved) != set(owned):
                raise CheckpointError(
                    f"checkpoint holds {group} {sorted(saved)}, this model has {sorted(owned)}"
                )
            for key, obj in owned.items():
                try:
                    obj.load_state_dict(saved[key])
                except (RuntimeError, ValueError, KeyError) as exc:
                    first = str(exc).strip().splitlines()[0]
                    raise CheckpointError(f"checkpoint {group}.{key} does not fit this model: {first}") from None
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.load_extra_state(state.get("extra", {}))


# ---------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    """What :func:`train` did. ``losses``: the last ``train`` record of ``metrics.jsonl`` (each loss
    the mean over the last ``training.log_every`` steps); ``family``: the trained family object
    (weights in memory)."""

    run_dir: Path
    step: int
    losses: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    family: FamilyBase | None = None


# ---------------------------------------------------------------------------- setup helpers


def _init_distributed(cfg: Config) -> tuple[torch.device, int, int, int, bool]:
    """(device, rank, world_size, local_rank, we_initialised) from torchrun's environment."""
    import torch
    import torch.distributed as dist

    from medsynth.devices import resolve_device
    from medsynth.distributed import torchrun_env

    env = torchrun_env()
    world, rank, local_rank = env.world_size, env.rank, env.local_rank
    use_cuda = resolve_device(cfg.training.device, "training.device") == "cuda"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    ours = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        ours = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return device, rank, world, local_rank, ours


@contextlib.contextmanager
def distributed_session(cfg: Config) -> Iterator[None]:
    """Hold a torchrun process group for several :func:`train` calls (a staged family's stages);
    :func:`train` then uses it instead of creating and destroying its own. No-op without torchrun."""
    _, _, _, _, ours = _init_distributed(cfg)
    try:
        yield
    finally:
        if ours:
            import torch.distributed as dist

            dist.destroy_process_group()


def validated_manifest(path: Path | None) -> Manifest:
    """Validate the whole dataset (every file decoded and checked) and return its manifest."""
    if path is None:
        raise ConfigError("data.manifest: no dataset given (set it in the recipe or pass --data)")
    from medsynth.data.validate import load_valid_dataset

    return load_valid_dataset(path)


def checkpoint_dir(run_dir: Path, stage: str | None) -> Path:
    return run_dir / "checkpoints" if stage is None else run_dir / "checkpoints" / stage


def recorded_family(run_dir: Path) -> str | None:
    """The model family a run folder already holds (its ``config.yaml``, else its run card), or None."""
    from medsynth.config import read_yaml_mapping
    from medsynth.runcard import CARD_FILE

    recipe = run_dir / "config.yaml"
    if recipe.is_file():
        with contextlib.suppress(ConfigError):
            model = read_yaml_mapping(recipe).get("model")
            if isinstance(model, dict) and isinstance(model.get("family"), str):
                return str(model["family"])
    card = run_dir / CARD_FILE
    if card.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
            family = json.loads(card.read_text(encoding="utf-8")).get("family")
            if isinstance(family, str):
                return family
    return None


def check_run_family(run_dir: Path, family: str) -> None:
    """JobError when ``run_dir`` holds a run of another family than ``family`` (training into it,
    resumed or by stage, would replace that run's weights and card)."""
    held = recorded_family(Path(run_dir)) if Path(run_dir).is_dir() else None
    if held is not None and held != family:
        raise JobError(f"{run_dir}: holds a {held!r} run and this recipe trains a {family!r} model; "
                       "a run folder holds one family (choose another --out)")


def check_run_dir(run_dir: Path, stage: str | None, resume: bool, family: str) -> None:
    """Refuse a run folder that training ``family`` (``stage``; None: the whole run) must not touch:
    another family's run, a missing run to resume, an existing run (or stage) without ``resume``."""
    ckpts = checkpoint_dir(run_dir, stage)
    check_run_family(run_dir, family)
    if resume:
        if not run_dir.exists():
            raise CheckpointError(f"{run_dir}: no such run to resume")
        return
    if stage is None:
        if run_dir.exists() and (not run_dir.is_dir() or any(c.name != LOCK_FILE for c in run_dir.iterdir())):
            raise JobError(f"{run_dir}: run folder exists; pass --resume to continue it, or choose another --out")
    elif ckpts.exists() and any(ckpts.iterdir()):
        raise JobError(f"{run_dir}: stage {stage!r} has checkpoints; pass --resume to continue it")
    if run_dir.exists() and not run_dir.is_dir():
        raise JobError(f"{run_dir}: exists and is not a folder")


INPUTS_FILE = "inputs.json"


def _empty(run_dir: Path) -> bool:
    return not run_dir.exists() or all(c.name == LOCK_FILE for c in run_dir.iterdir())


def _mark_train(run_dir: Path) -> None:
    """Claim a run folder made before runs recorded their owner (a resume, or a later stage)."""
    from medsynth import __version__

    with open(run_dir / LEDGER, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"command": "train", "medsynth": __version__}) + "\n")


def _stage_key(stage: str | None) -> str:
    return stage or "run"


def check_inputs(run_dir: Path, stage: str | None, inputs: dict[str, Any], resume: bool,
                 allow_changed_data: bool) -> dict[str, Any]:
    """The inputs to record for this stage (``RUN/inputs.json``: ``{stage: {"case ID": {path: sha256},
    "manifest": {...}}}``). A resume compares them with the recorded ones first: JobError naming the
    first changed case, unless ``allow_changed_data`` (then a warning, and the new record)."""
    recorded = read_inputs(run_dir).get(_stage_key(stage))
    if resume and recorded is not None:
        changed = changed_input(recorded, inputs)
        if changed is not None and not allow_changed_data:
            raise JobError(f"cannot resume {run_dir}: {changed} since the run started (recorded in {INPUTS_FILE}); "
                           "restore it, start a new run, or pass --allow-changed-data to go on with the new data")
        if changed is not None:
            warnings.warn(f"{run_dir}: resuming on changed data ({changed}); --allow-changed-data", stacklevel=2)
    return inputs


def read_inputs(run_dir: Path) -> dict[str, Any]:
    """``RUN/inputs.json`` ({} when missing or unreadable: a run made before runs recorded their inputs)."""
    try:
        data = json.loads((run_dir / INPUTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_inputs(run_dir: Path, stage: str | None, inputs: dict[str, Any]) -> None:
    data = read_inputs(run_dir)
    data[_stage_key(stage)] = inputs
    atomic_write_text(run_dir / INPUTS_FILE, json.dumps(data, indent=1, sort_keys=True) + "\n")


def _config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    from medsynth.config import changed_settings

    return [f"{key}: {a!r} -> {b!r}" for key, a, b in changed_settings(old, new, ignore=RESUME_MUTABLE)]


def _truncate_metrics(path: Path, step: int, stage: str | None = None) -> None:
    """Drop this stage's records after ``step`` (a run killed after its last checkpoint logged them).

    Records of other stages (the autoencoder's, when the diffusion stage starts) are kept."""
    from medsynth.data.atomic import atomic_write_text

    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("stage") != stage or int(rec.get("step", 0)) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(x + "\n" for x in kept))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


@contextlib.contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def add_losses(sums: dict[str, torch.Tensor], losses: Mapping[str, torch.Tensor | float],
               device: torch.device) -> None:
    """Add one step's ``losses`` to ``sums`` (float64 scalars on ``device``) without a device sync."""
    import torch

    for k, v in losses.items():
        t = v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
        t = t.to(device, non_blocking=True)
        sums[k] = sums[k] + t if k in sums else t


def mean_losses(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """``sums`` divided by ``count`` as floats: one device sync for all of them."""
    import torch

    if not sums:
        return {}
    values = torch.stack(list(sums.values())).cpu().tolist()
    return {k: v / count for k, v in zip(sums, values)}


def write_preview(path: Path, batch: Batch, rows: dict[str, torch.Tensor], info: DataInfo) -> Path:
    """A PNG grid (:func:`medsynth.plots.label_preview`): the label maps with a legend, then one row
    per entry of ``rows``, one column per sample. 3D samples show their middle slice along the last
    axis; channel 0 only."""
    from medsynth.plots import label_preview, middle_slice

    def as_2d(t: torch.Tensor) -> np.ndarray:
        return middle_slice(t.detach().float().cpu().numpy())

    idx = batch["label_index"]
    masks = [as_2d(idx[i]) for i in range(idx.shape[0])]
    images = {name: [as_2d(t[i, 0]) for i in range(t.shape[0])] for name, t in rows.items()}
    legend = [f"{v} {info.label_names.get(v, '')}".strip() for v in info.labels]
    return label_preview(masks, images, legend, path)


def _window(extent: np.ndarray, length: int, side: int) -> slice:
    """``side`` voxels of an axis of ``length``, centred on the foreground ``extent`` (a bool per
    voxel; the axis centre when it has none), kept inside the axis."""
    hits = np.nonzero(extent)[0]
    centre = (int(hits[0]) + int(hits[-1]) + 1) // 2 if hits.size else length // 2
    side = min(side, length)
    start = min(max(0, centre - side // 2), length - side)
    return slice(start, start + side)


def full_size_batch(data: TrainingData, n: int, multiple: int) -> Batch:
    """The preview batch: whole slices of ``n`` training cases (the first of a fixed seeded order),
    not training crops. 2D from 3D volumes: the middle foreground slice along ``slice_axis``; 2D
    images: the image; 3D: a slab through the whole volume, ``data.size[2]`` deep along the last axis
    around the foreground's middle. Sides longer than :data:`PREVIEW_MAX_SIDE` are cropped around the
    foreground. Every sample is padded with background to one shape, each side a multiple of
    ``multiple``. Keys as :meth:`TrainingData.fixed_batch`. Draws from no global RNG."""
    import torch

    from medsynth.data.loader import pad_to

    info = data.info
    picks = np.random.default_rng([data.seed, 3]).permutation(len(data.cases))[: max(1, min(n, len(data.cases)))]
    cap = PREVIEW_MAX_SIDE[info.dim]
    parts = []
    for c in picks:
        case = data.cases[int(c)]
        image, index = case.image, case.index
        if info.dim == 2 and info.volume_ndim == 3:
            axis = info.slice_axis
            pool = case.fg_slices if len(case.fg_slices) else np.arange(index.shape[axis])
            k = int(pool[len(pool) // 2])
            image, index = np.take(image, k, axis=axis + 1), np.take(index, k, axis=axis)
        fg = index != 0
        sides = [cap] * index.ndim
        if info.dim == 3:
            sides[-1] = int(info.size[-1])
        window = tuple(_window(fg.any(axis=tuple(a for a in range(fg.ndim) if a != ax)), index.shape[ax], side)
                       for ax, side in enumerate(sides))
        parts.append((case, image[(slice(None),) + window], index[window]))
    shape = [max(p[2].shape[ax] for p in parts) for ax in range(info.dim)]
    shape = [-(-s // multiple) * multiple for s in shape]
    samples = []
    for j, (case, image, index) in enumerate(parts):
        samples.append({
            "image": torch.from_numpy(np.ascontiguousarray(pad_to(image, shape, 0.0), dtype=np.float32)),
            "label_index": torch.from_numpy(np.ascontiguousarray(pad_to(index, shape, 0)).astype(np.int64)),
            "class_index": torch.tensor(case.class_index, dtype=torch.int64),
            "index": torch.tensor(2**62 + j, dtype=torch.int64),
            "case_index": torch.tensor(int(picks[j]), dtype=torch.int64),
        })
    return data.collate(samples)


class _Scalars:
    """TensorBoard scalars beside metrics.jsonl (``RUN/tensorboard``) when the ``tensorboard`` package
    is installed; otherwise nothing happens. Rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = _tensorboard_writer(run_dir / "tensorboard") if enabled else None

    def add(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(folder: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``folder``, or None without ``tensorboard``."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(folder))


# ---------------------------------------------------------------------------- the loop


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stage: str | None = None,
    progress: bool = True,
    allow_changed_data: bool = False,
) -> TrainResult:
    """Train ``config.model.family`` on ``config.data.manifest`` into ``run_dir``.

    Validates the run folder and the whole dataset before building any network. Rank 0 holds the run
    folder's lock (:func:`medsynth.journal.output_lock`: one job a run folder) for the whole stage.
    A resume compares the sha256 of every training file with those recorded when the stage started
    (``RUN/inputs.json``) and refuses a changed case by name unless ``allow_changed_data``. Under
    torchrun (``WORLD_SIZE > 1``) every process calls this; rank 0 writes. Raises ConfigError,
    DataError, CheckpointError or JobError for user mistakes.
    """
    # 0. cheap checks before torch is even imported: the run folder, then the whole dataset
    run_dir = Path(run_dir)
    check_out_path(run_dir)
    check_run_dir(run_dir, stage, resume, config.model.family)
    main = torchrun_env().is_main
    with contextlib.ExitStack() as held:
        if main:
            held.enter_context(output_lock(run_dir))  # a second job on this folder is refused, naming this one
            check_run_dir(run_dir, stage, resume, config.model.family)  # again, now that no other job can change it
        manifest = validated_manifest(config.data.manifest)
        if main:
            check_outside_inputs(run_dir, [Path(manifest.source or ".")])
        inputs = check_inputs(run_dir, stage, dataset_inputs(manifest), resume, allow_changed_data) if main else None
        return _train_held(config, run_dir, manifest, inputs, resume=resume, stage=stage, progress=progress)


def _train_held(config: Config, run_dir: Path, manifest: Manifest, inputs: dict[str, Any] | None, *, resume: bool,
                stage: str | None, progress: bool) -> TrainResult:
    device, rank, world, local_rank, ours = _init_distributed(config)
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(config.training.threads))
    try:
        rt = Runtime(config=config, run_dir=run_dir, device=device, rank=rank,
                     world_size=world, local_rank=local_rank, stage=stage)
        deterministic = device.type == "cpu" or config.training.deterministic
        with _deterministic(deterministic):
            return _train(rt, manifest, inputs, resume=resume, progress=progress)
    finally:
        torch.set_num_threads(threads_before)
        if ours:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(rt: Runtime, manifest: Manifest, inputs: dict[str, Any] | None, *, resume: bool, progress: bool) -> TrainResult:
    import torch

    from medsynth.data.loader import build_training_data, make_loader
    from medsynth.progress import progress_bar
    from medsynth.registry import get_family
    from medsynth.training import checkpoint as ck
    from medsynth.training.report import format_losses, write_report

    cfg, run_dir, stage = rt.config, rt.run_dir, rt.stage
    family_cls = family_class(cfg.model.family)

    # 1. the training arrays (normalisation fitted on the training set)
    data = build_training_data(manifest, cfg.data, seed=cfg.training.seed, progress=progress and rt.is_main)
    stages = get_family(cfg.model.family).stages
    if data.info.dim == 2 and data.info.volume_ndim == 3 and rt.is_main and stage in (None, *stages[:1]):
        warnings.warn(f"{manifest.source}: the recipe is 2D (data.dim: 2) and the volumes are 3D: training "
                      f"on 2D slices along axis {data.info.slice_axis} (data.slice_axis), and sampling will "
                      "generate a 3D mask slice by slice, without continuity between slices; for 3D "
                      "generation use a 3D recipe (data.dim: 3, see `medsynth recipes`)", stacklevel=2)

    # 2. the family: networks, optimisers, EMA (seeded, without touching the global RNG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed)
        family = family_cls(cfg, data.info, rt)
    max_steps = family.max_steps()
    data.pool_per_case = family.crop_pool()

    # 3. resume: newest valid checkpoint -> family state, RNG states, step
    ckpt_dir = checkpoint_dir(run_dir, stage)
    start_step = 0
    state: dict[str, Any] = {}
    if resume:
        path, state = ck.load_latest_checkpoint(ckpt_dir)
        diffs = _config_differences(json.loads(state["config_json"]), cfg.to_dict())
        if diffs:
            raise JobError(f"{run_dir}: the config differs from the run's ({'; '.join(diffs)}); "
                           "resume with the same recipe or start a new run")
        family.load_state_dict(state["family_state"])
        ck.set_rng_state(state["rng"])
        start_step = int(state["step"])
        rt.barrier()  # every rank has read its checkpoint before rank 0 renames skipped ones
        if rt.is_main:
            for moved in ck.set_aside_newer(ckpt_dir, start_step):
                warnings.warn(f"renamed the skipped checkpoint to {moved}", stacklevel=2)
        order = state.get("data_order", {})
        if order.get("global_batch") not in (None, data.global_batch(cfg.training.batch_size, rt.world_size)):
            warnings.warn(f"{run_dir}: resuming with a different global batch than the run used "
                          f"({order.get('global_batch')}); the data order will not match an uninterrupted run",
                          stacklevel=2)
    ckpt_dir.mkdir(parents=True, exist_ok=True) if rt.is_main else None

    # 4. the run's files
    metrics_path = run_dir / "metrics.jsonl"
    prefix = f"{stage}_" if stage else ""
    if rt.is_main:
        if not made_by(run_dir, "train"):  # the folder is a training run's: `medsynth report` may write there
            claim_folder(run_dir, "train", overwrite=False) if _empty(run_dir) else _mark_train(run_dir)
        if inputs is not None:
            record_inputs(run_dir, stage, inputs)
        (run_dir / "previews").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        _truncate_metrics(metrics_path, start_step, stage)
        ck.remove_stale_temp_files(ckpt_dir)
    rt.barrier()
    tag = {"stage": stage} if stage else {}
    multiple = family.preview_multiple()
    if rt.is_main:
        _append_jsonl(metrics_path, {
            "kind": "start", "step": start_step, **tag, "max_steps": max_steps, "device": str(rt.device),
            "threads": torch.get_num_threads(), "world_size": rt.world_size,
            "batch_size": cfg.training.batch_size, "previews": "crops" if multiple is None else "whole"})
    eval_batch = data.fixed_batch(min(4, cfg.training.batch_size))
    preview_batch = None
    if rt.is_main and cfg.training.preview_every:
        preview_batch = (eval_batch if multiple is None
                         else full_size_batch(data, min(4, cfg.training.batch_size), multiple))
    scalars = _Scalars(run_dir, enabled=rt.is_main)

    def evaluate_and_preview(step: int) -> None:
        if not rt.is_main:
            return
        with torch.no_grad():
            scores = family.evaluate(_to_device(eval_batch, rt.device))
            pb = None if preview_batch is None else _to_device(preview_batch, rt.device)
            rows = family.preview(pb) if pb is not None else {}
        if scores:
            _append_jsonl(metrics_path, {"kind": "eval", "step": step, **tag, **scores})
            scalars.add(f"{stage}/eval" if stage else "eval", scores, step)
        if rows and pb is not None:
            write_preview(run_dir / "previews" / f"{prefix}step_{step:08d}.png", pb, rows, data.info)

    def report() -> None:
        if rt.is_main:
            write_report(run_dir)

    def save(step: int, losses: dict[str, float]) -> Path | None:
        if not rt.is_main:
            return None
        payload = ck.make_payload(
            step=step, family=cfg.model.family, stage=stage, family_state=family.state_dict(),
            config_json=json.dumps(cfg.to_dict()), losses=losses,
            data_order={"seed": cfg.training.seed, "next_step": step,
                        "global_batch": data.global_batch(cfg.training.batch_size, rt.world_size)},
        )
        return ck.save_checkpoint(ckpt_dir, step, payload, keep_last=cfg.training.keep_last)

    # 5. the loop
    loader = make_loader(data, start_step=start_step, max_steps=max_steps,
                         batch_size=cfg.training.batch_size, rank=rt.rank, world_size=rt.world_size,
                         workers=cfg.training.workers, pin_memory=rt.device.type == "cuda")
    if start_step == 0:
        with progress_bar(f"{stage or cfg.model.family}: first evaluation and preview", 1,
                          enabled=progress and rt.is_main) as first:
            evaluate_and_preview(0)
            first.advance()
    bar = progress_bar(stage or cfg.model.family, max_steps, start=start_step, enabled=progress and rt.is_main)
    logged: dict[str, float] = {}  # the last train record of metrics.jsonl: what the run reports
    sums: dict[str, torch.Tensor] = {}  # losses summed on the device since the last log
    count, busy, last_ckpt = 0, 0.0, None
    step = start_step
    num_labels = data.info.num_labels
    with bar:
        mark = time.perf_counter()
        for batch in loader:
            # 5a. one optimisation step (timed with its data loading; one-hot labels made on the device)
            out = family.train_step(rt.prepare(batch, num_labels), step)
            step += 1
            add_losses(sums, out, rt.device)
            count += 1
            log_now = step % cfg.training.log_every == 0 or step == max_steps
            # the only device sync of the losses: at a log or a checkpoint (never save a diverged model)
            means = mean_losses(sums, count) if log_now or step % cfg.training.checkpoint_every == 0 else None
            busy += time.perf_counter() - mark
            # decided on all ranks together: a rank that stopped alone would leave the others waiting
            diverged = [] if means is None else rt.ranks_with(any(not math.isfinite(v) for v in means.values()))
            if diverged:
                where = f" on rank(s) {diverged}" if rt.distributed else ""
                raise JobError(f"{run_dir}: training diverged by step {step}{where} (mean losses of the last {count} "
                               f"steps {means}); lower the learning rate or check the data")
            # 5b. logs, progress, previews, checkpoints, report (not timed)
            if log_now and means is not None:
                logged = means
                rate = count / max(busy, 1e-9)
                if rt.is_main:
                    _append_jsonl(metrics_path, {
                        "kind": "train", "step": step, **tag,
                        "samples_per_s": round(rate * cfg.training.batch_size * rt.world_size, 3), **logged})
                    scalars.add(stage or "train", logged, step)
                bar.note(f"{rate:.2f} it/s {format_losses(logged)}")
                sums, count, busy = {}, 0, 0.0
            bar.update(step)
            if cfg.training.preview_every and step % cfg.training.preview_every == 0 and step != max_steps:
                evaluate_and_preview(step)
            if step % cfg.training.checkpoint_every == 0 or step == max_steps:
                last_ckpt = save(step, logged)
                if step != max_steps:  # the end writes the final report
                    report()
            mark = time.perf_counter()

    # 6. the end: final evaluation, preview, checkpoint, export, model card, yardstick and report
    from medsynth.training.yardstick import record_yardstick  # mask -> image vs the label-mean fill

    with progress_bar(f"{stage or cfg.model.family}: finishing", 4, enabled=progress and rt.is_main) as end:
        end.note("final evaluation and preview")
        if step > start_step or start_step == 0:
            evaluate_and_preview(step)
        scalars.close()
        end.advance()
        if rt.is_main:
            end.note("checkpoint, weights and run card")
            if last_ckpt is None and step > start_step:
                last_ckpt = save(step, logged)
            if not logged and resume:
                logged = {k: float(v) for k, v in (state.get("losses") or {}).items()}
            extras = family.export(run_dir)
            _write_run_card(run_dir, cfg, data.info, stage, step, logged, extras)
            end.advance()
            end.note("yardstick: mask -> image against the label-mean fill")
            record_yardstick(run_dir, cfg, stage, device=rt.device.type, bar=end)
            end.advance()
            end.note("run report")
            report()
            end.advance()
    rt.barrier()
    return TrainResult(run_dir=run_dir, step=step, losses=logged, checkpoint=last_ckpt, family=family)


def _write_run_card(run_dir: Path, cfg: Config, info: DataInfo, stage: str | None, step: int,
                    losses: dict[str, float], extras: dict[str, Any]) -> None:
    """RUN/model_card.json through :func:`medsynth.runcard.write_run_card`. A staged family's later
    stage keeps the earlier stages' records and model facts."""
    from medsynth.runcard import RunCard, StageRecord, read_run_card, write_run_card

    model: dict[str, Any] = {}
    stages: dict[str, StageRecord] = {}
    if stage is not None and (run_dir / "model_card.json").is_file():
        with contextlib.suppress(CheckpointError):  # an unreadable earlier card is replaced
            earlier = read_run_card(run_dir)
            model, stages = dict(earlier.model), dict(earlier.stages)
    model.update(extras)
    if stage is not None:
        stages[stage] = StageRecord(steps=step, final_losses=dict(losses))
    card = RunCard(run_dir=run_dir, family=cfg.model.family, config=cfg.to_dict(), data=info, steps=step,
                   final_losses=dict(losses), model=model, stages=stages)
    write_run_card(run_dir, card)


__all__ = [
    "Batch",
    "FamilyBase",
    "Runtime",
    "TrainResult",
    "check_run_dir",
    "check_run_family",
    "checkpoint_dir",
    "cpu_threads",
    "family_class",
    "full_size_batch",
    "train",
    "validated_manifest",
    "write_preview",
]
