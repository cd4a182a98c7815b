"""Will a recipe fit? The lower bound :func:`medsynth.config.memory_estimate` of the memory training
takes, against the memory of the device it trains on, checked before anything is allocated; and the
memory model (:func:`estimate_memory`): parameters counted and one training step run on the meta device
(``torch.device("meta")``: shapes only, nothing allocated), the tensors autograd saves for the
backward pass summed per optimiser step. ``medsynth train --dry-run`` prints it and ``docs/recipes.md`` tabulates it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.config import Config, memory_estimate
from medsynth.data.limits import available_memory, format_bytes
from medsynth.data.loader import CaseStatistics, DataInfo, Normalization, one_hot
from medsynth.errors import ConfigError

__all__ = ["MemoryEstimate", "assumed_info", "check_estimates", "check_memory", "device_memory", "estimate_memory",
           "StepMeasurement", "measure_step_memory", "plan_memory", "step_batch"]


def device_memory(device: str) -> tuple[str, int]:
    """``(what, bytes)``: the memory training on ``device`` (``auto``, ``cpu``, ``cuda``) can use: one
    GPU's total memory under CUDA (each torchrun process has one), else
    :func:`medsynth.data.limits.available_memory`."""
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            return f"GPU {torch.cuda.get_device_name(index)}", int(torch.cuda.get_device_properties(index).total_memory)
    return "memory of this machine", available_memory()


def check_memory(cfg: Config, available: int, what: str = "device") -> int:
    """ConfigError when the lower bound :func:`~medsynth.config.memory_estimate` of training ``cfg``
    exceeds ``available`` bytes (``what``: the device, named in the message). Returns the bound in bytes."""
    needed, parameters = memory_estimate(cfg)
    if needed > available:
        raise ConfigError(
            f"{cfg.name}: training this recipe needs at least {format_bytes(needed)} (about {parameters:,} "
            f"parameters with their gradients and optimiser state, and batch {cfg.training.batch_size} of "
            f"{'x'.join(map(str, cfg.data.size))} crops), more than the {format_bytes(available)} of the {what}; "
            "lower training.batch_size, data.size or the model's channels"
        )
    return needed


# ---------------------------------------------------------------------------- the memory model

#: what :func:`estimate_memory` assumes of a dataset it does not read: image channels and labels
ASSUMED_CHANNELS = 1
ASSUMED_LABELS = 16
#: the memory a recipe for a GPU (``training.device`` auto or cuda) is checked against by default
DEFAULT_DEVICE_MEMORY = 80 * 1024**3
#: bytes per trained parameter: float32 weight, gradient and Adam's two moments; an EMA copy adds 4
BYTES_PER_PARAMETER = 16
BYTES_PER_EMA_PARAMETER = 4
#: gradients in flight during the backward pass, beyond the saved tensors: the gradient into and the gradient
#: out of the layer being differentiated, each counted as the step's largest saved tensor
TRANSIENT_FACTOR = 2
#: a training step's memory that does not scale with the recipe (autograd's graph, kernels' scratch, the
#: allocator's slack): measured on the CPU, peak RSS growth of the tiny recipes beyond the rest of the model
STEP_OVERHEAD_BYTES = 4 * 1024**2
#: stages whose networks need an earlier stage's weights (their step cannot run without a trained run), or a
#: downloaded bundle's (maisi_controlnet: its networks are the bundle's)
_NEEDS_EARLIER_STAGE = {("ldm", "diffusion"), ("maisi_controlnet", None)}


@dataclass(frozen=True)
class MemoryEstimate:
    """One training stage's memory, estimated on the meta device (nothing allocated).

    parameters: trained parameters (every network the stage optimises); parameter_bytes: their weights,
    gradients and Adam moments (16 bytes each) and EMA copies (4); activation_bytes: the largest
    optimiser step's tensors saved for the backward pass (``saved_tensors_hooks``; float32, no
    activation checkpointing; attention as the recipe's device computes it: fused, without the
    tokens x tokens matrix, for a GPU recipe whose ``model.use_flash_attention`` is auto or true);
    transient_bytes: gradients in flight in the backward pass (:data:`TRANSIENT_FACTOR` x the largest
    saved tensor) and the step's fixed :data:`STEP_OVERHEAD_BYTES`; batch_bytes: the batch (image,
    index map, one-hot labels)."""

    recipe: str
    stage: str | None
    parameters: int
    parameter_bytes: int
    activation_bytes: int
    transient_bytes: int
    batch_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes + self.transient_bytes + self.batch_bytes

    def line(self) -> str:
        """``gan3d: 12,345 parameters, estimated peak 9.1 GiB (parameters and optimiser ..., ...)``."""
        name = self.recipe + (f" ({self.stage})" if self.stage else "")
        return (f"{name}: {self.parameters:,} parameters, estimated peak {format_bytes(self.peak_bytes)} "
                f"(parameters and optimiser {format_bytes(self.parameter_bytes)}, activations "
                f"{format_bytes(self.activation_bytes)}, gradients in flight {format_bytes(self.transient_bytes)}, "
                f"batch {format_bytes(self.batch_bytes)})")


def assumed_info(cfg: Config, num_labels: int = ASSUMED_LABELS, channels: int = ASSUMED_CHANNELS) -> DataInfo:
    """A DataInfo for ``cfg`` without reading data: ``num_labels`` labels, ``channels`` image channels,
    flat label means (the networks' shapes depend on the counts only)."""
    means = [[(i + 0.5) / num_labels for i in range(num_labels)] for _ in range(channels)]
    table = np.asarray([means, means], np.float64)  # two cases, for families that draw per-case means
    return DataInfo(
        dim=cfg.data.dim, slice_axis=cfg.data.slice_axis, volume_ndim=3, size=list(cfg.data.size),
        labels=list(range(num_labels)), label_names={i: f"label_{i}" for i in range(num_labels)},
        channels=[f"channel_{c}" for c in range(channels)], classes=list(cfg.data.classes or []),
        spacing=None, normalization=Normalization("ct_window", [0.0] * channels, [1.0] * channels),
        num_cases=2, class_key=cfg.data.class_key, label_means=means,
        label_stds=[[0.1] * num_labels for _ in range(channels)], fill_sigma=0.5,
        case_stats=CaseStatistics(table, table * 0 + 0.1, table * 0 + 0.1, 1))


@contextlib.contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    """``F.scaled_dot_product_attention`` on meta tensors as the fused (memory-efficient) kernel a GPU runs,
    while open: on the meta device torch takes the math path, which saves the tokens x tokens matrix."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, **kw: Any) -> torch.Tensor:
        if query.device.type != "meta" or kw:
            return real(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                                      is_causal, scale=scale)
        return out[0]

    torch.nn.functional.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real


@contextlib.contextmanager
def _autocast_on_meta() -> Iterator[None]:
    """``torch.autocast("meta", ...)`` as a no-op while open (torch has no autocast for the meta
    device; the networks turn autocast off around float32 parts by their input's device)."""
    real = torch.autocast

    def autocast(device_type: str, *args: Any, **kwargs: Any) -> Any:
        return contextlib.nullcontext() if device_type == "meta" else real(device_type, *args, **kwargs)

    torch.autocast = autocast  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def _stage_estimate(cfg: Config, info: DataInfo, stage: str | None) -> MemoryEstimate:
    """Build the stage's family on the meta device and run one training step there, summing the
    tensors autograd saves between optimiser steps."""
    from medsynth.training.engine import Runtime, family_class

    if cfg.training.device != "cpu" and getattr(cfg.model, "use_flash_attention", None) == "auto":
        cfg = cfg.model_copy(deep=True)  # auto resolves to fused attention on the GPU the recipe is for
        cfg.model.use_flash_attention = True  # type: ignore[attr-defined]
    meta = torch.device("meta")
    rt = Runtime(config=cfg, run_dir=Path("memory-estimate"), device=meta, stage=stage)
    with torch.random.fork_rng(devices=[]), torch.device(meta):
        family = family_class(cfg.model.family)(cfg, info, rt)
    nets = list(family.modules.values())
    trained = {id(p): p for name, opt in family.optimizers.items() for g in opt.param_groups for p in g["params"]}
    parameters = sum(p.numel() for p in trained.values())
    ema = sum(p.numel() for e in family.emas.values() for p in e.module.parameters())
    # 1. what autograd saves for the backward pass, per optimiser step (a step's graph is freed at its
    # backward); parameters are counted above, a tensor saved twice once
    weights = {id(p) for net in nets for p in net.parameters()}
    segments, current, seen, largest = [0], [0], set(), [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and id(t) not in seen:
            seen.add(id(t))
            current[0] += t.numel() * t.element_size()
            largest[0] = max(largest[0], t.numel() * t.element_size())
        return t

    step = family.clip_and_step

    def clip_and_step(name: str, loss: torch.Tensor) -> None:
        step(name, loss)
        segments.append(current[0])
        current[0] = 0
        seen.clear()

    family.clip_and_step = clip_and_step  # type: ignore[method-assign]
    family.emas.clear()  # an EMA update reads its step count as a Python number (none on meta)
    n = cfg.training.batch_size
    try:
        with _autocast_on_meta(), _fused_attention_on_meta(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            family.train_step(step_batch(cfg, info, meta), 10**9)  # a late step: every warm-up has passed
    finally:
        family.clip_and_step = step  # type: ignore[method-assign]
    voxels = int(np.prod(cfg.data.size))
    batch_bytes = n * voxels * (4 * info.num_channels + 8 + 4 * info.num_labels)
    return MemoryEstimate(cfg.name, stage, parameters, parameters * BYTES_PER_PARAMETER + ema * BYTES_PER_EMA_PARAMETER,
                          max(segments + [current[0]]), TRANSIENT_FACTOR * largest[0] + STEP_OVERHEAD_BYTES, batch_bytes)


def step_batch(cfg: Config, info: DataInfo, device: torch.device) -> dict[str, torch.Tensor]:
    """A training batch of ``cfg`` on ``device`` (``image``, ``label_index``, one-hot ``label``, ...),
    zeros: what the memory model steps on, and :func:`measure_step_memory`."""
    n, size = cfg.training.batch_size, list(cfg.data.size)
    index = torch.zeros((n, *size), dtype=torch.int64, device=device)
    return {"image": torch.zeros((n, info.num_channels, *size), device=device), "label_index": index,
            "label": one_hot(index, info.num_labels),
            **{k: torch.zeros(n, dtype=torch.int64, device=device) for k in ("class_index", "index", "case_index")}}


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` size (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


@dataclass(frozen=True)
class StepMeasurement:
    """What :func:`measure_step_memory` measured: peak_bytes, the peak memory growth of building the
    stage and training ``steps`` steps; step_seconds, the mean wall time of the steps after the first."""

    peak_bytes: int
    step_seconds: float


def measure_step_memory(cfg: Config, stage: str | None = None, *, device: str = "cpu", steps: int = 3) -> StepMeasurement:
    """The memory :func:`estimate_memory` models, measured: build ``stage``'s family for ``cfg`` on ``device``
    (with :func:`assumed_info`), run ``steps`` (>= 2) training steps on :func:`step_batch`, and return the
    peak growth over the memory in use before the family was built, and the time per step. CUDA: the
    allocator's peak. CPU (Linux): peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
    after a warm-up step at batch 1 so that kernels and thread pools are loaded first; run it in a fresh
    process with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS. The ldm diffusion
    stage needs a trained autoencoder: not measured here."""
    from medsynth.training.engine import Runtime, family_class

    dev = torch.device(device)
    info = assumed_info(cfg)

    def build(c: Config) -> tuple[Any, dict[str, torch.Tensor]]:
        """The family and a batch as a training step takes them (``Runtime.prepare``: memory format)."""
        rt = Runtime(config=c, run_dir=Path("memory-measure"), device=dev, stage=stage)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            family = family_class(c.model.family)(c, info, rt)
        return family, rt.prepare(step_batch(c, info, dev), info.num_labels)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        warm = cfg.model_copy(deep=True)
        warm.training.batch_size = 1
        family, batch = build(warm)
        family.train_step(batch, 10**9)
        del family, batch
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _proc_status("VmRSS")
    family, batch = build(cfg)
    family.train_step(batch, 10**9)
    sync()
    start = time.perf_counter()
    for k in range(1, max(2, steps)):
        family.train_step(batch, 10**9 + k)
    sync()
    seconds = (time.perf_counter() - start) / (max(2, steps) - 1)
    peak = torch.cuda.max_memory_allocated() - before if dev.type == "cuda" else _proc_status("VmHWM") - before
    return StepMeasurement(int(peak), seconds)


def estimate_memory(cfg: Config, info: DataInfo | None = None) -> list[MemoryEstimate]:
    """The memory model: one :class:`MemoryEstimate` per training stage of ``cfg`` (one for a family
    without stages), from a training step on the meta device. ``info``: the dataset's (None:
    :func:`assumed_info`). A stage that needs an earlier stage's trained weights (the ldm diffusion
    stage) is left out."""
    from medsynth.registry import get_family

    info = info if info is not None else assumed_info(cfg)
    stages: list[str | None] = [*get_family(cfg.model.family).stages] or [None]
    return [_stage_estimate(cfg, info, s) for s in stages if (cfg.model.family, s) not in _NEEDS_EARLIER_STAGE]


def check_estimates(estimates: list[MemoryEstimate], available: int, what: str = "device") -> None:
    """ConfigError naming every stage whose estimated peak exceeds ``available`` bytes."""
    over = [e for e in estimates if e.peak_bytes > available]
    if over:
        raise ConfigError("; ".join(e.line() for e in over) + f": more than the {format_bytes(available)} of the "
                          f"{what}; lower training.batch_size, data.size or the model's channels")


def plan_memory(cfg: Config, device_memory: int | None = None) -> tuple[list[MemoryEstimate], int, str]:
    """What ``medsynth train --dry-run`` reports: the estimates of ``cfg`` (its manifest's label and
    channel counts when ``data.manifest`` is set, else :func:`assumed_info`'s), and the memory they are
    checked against: ``device_memory`` bytes when given, else this machine's for a ``training.device: cpu``
    recipe and :data:`DEFAULT_DEVICE_MEMORY` (one 80 GiB GPU) for the others. ConfigError when a stage
    does not fit. Returns ``(estimates, available bytes, what the memory is)``."""
    from medsynth.data.manifest import read_manifest

    info = None
    if cfg.data.manifest is not None:
        manifest = read_manifest(cfg.data.manifest)
        labels = set(manifest.labels or {}) | {0}
        info = assumed_info(cfg, num_labels=max(len(labels), 2), channels=max(1, len(manifest.channels)))
    if device_memory is not None:
        available, what = device_memory, "--device-memory"
    elif cfg.training.device == "cpu":
        available, what = available_memory(), "memory of this machine"
    else:
        available, what = DEFAULT_DEVICE_MEMORY, "default --device-memory (one 80 GiB GPU)"
    estimates = estimate_memory(cfg, info)
    check_estimates(estimates, available, what)
    return estimates, available, what
