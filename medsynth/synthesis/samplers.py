"""Noise processes and samplers for latent diffusion: DDPM, DDIM and rectified flow.

A trained denoiser belongs to one *noise process* (the recipe's ``diffusion.scheduler``):

- ``ddpm``: variance preserving, ``z_t = a_t z_0 + s_t eps`` with ``a_t = sqrt(alphas_cumprod[t])`` and
  ``s_t = sqrt(1 - alphas_cumprod[t])`` from MONAI's ``DDPMScheduler``, integer ``t`` in ``[0, T)``;
  the UNet predicts ``eps`` (or ``v``);
- ``rflow``: rectified flow (MONAI's ``RFlowScheduler``), ``z_t = (1 - t/T) z_0 + (t/T) eps``,
  real ``t`` in ``[0, T]``; the UNet predicts the velocity ``v = z_0 - eps``.

Any prediction converts to ``(z0_hat, eps_hat)``, so one loop (:func:`sample_latents`) runs any
*sampler* on the grid of timesteps that the MONAI scheduler of that name sets:

- ``ddpm``: ancestral sampling, ``z_next ~ q(z_next | z_t, z0_hat)`` (the Gaussian posterior, for
  any gap between timesteps, so a short chain is valid);
- ``ddim``: deterministic, ``z_next = a_next z0_hat + s_next eps_hat`` (eta = 0);
- ``rflow``: Euler steps of the flow ODE, ``z_next = z_t + (t - t_next)/T * v`` (rectified-flow
  models only; on them it equals DDIM on the same grid).

The updates are written here rather than calling the schedulers' ``step``: in MONAI 1.6.1
``DDPMScheduler.step`` assumes consecutive timesteps (``t - 1``), ``DDIMScheduler.step`` assumes a
gap of ``T // steps`` while its ``set_timesteps`` uses ``linspace`` (so the gaps differ), and
``RFlowScheduler.step`` truncates the next timestep to an integer. With consecutive timesteps the
updates here equal MONAI's (tests check this).

All random draws (initial noise, DDPM noise, training noise and timesteps) come from an explicit
``torch.Generator`` on the CPU and are moved to the device, so a seed gives the same sample on any
device (up to floating point differences of the device's arithmetic).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from medsynth.errors import ConfigError

Process = Literal["ddpm", "rflow"]
Sampler = Literal["ddpm", "ddim", "rflow"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "rflow")


@dataclass
class Condition:
    """What a sample is conditioned on.

    mask: one-hot label map ``(N, L, *image_spatial)``, float, at the image grid
        (``image_spatial = latent_spatial * downsample_factor``).
    class_labels: ``(N,)`` long class indices, or None.
    """

    mask: torch.Tensor
    class_labels: torch.Tensor | None = None


def cpu_randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
              like: torch.Tensor | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the CPU, then moved to ``device`` (or ``like``'s device).

    generator: one generator for the whole tensor, or one per item along the first axis (so an
    item's noise depends only on its own seed, whatever else is in the batch).
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    else:
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    target = device if device is not None else (like.device if like is not None else "cpu")
    return noise.to(target)


class NoiseProcess:
    """The forward process a denoiser is trained on, built on a MONAI scheduler.

    Args:
        kind: ``ddpm`` or ``rflow``.
        num_train_timesteps: ``T``.
        prediction_type: for ``ddpm``, ``epsilon`` or ``v_prediction`` (``rflow`` always predicts
            the velocity ``z_0 - eps``).
        base_numel: for ``rflow``, the number of latent voxels of the training crops; larger
            latents at sampling time shift the timesteps toward noise (MONAI's timestep transform,
            as in MAISI). None turns the transform off.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        kind: Process,
        *,
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        base_numel: int | None = None,
        spatial_dims: int = 3,
    ) -> None:
        from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

        self.kind = kind
        self.T = int(num_train_timesteps)
        self.prediction_type = prediction_type if kind == "ddpm" else "v_prediction"
        self.base_numel = base_numel
        self.spatial_dims = spatial_dims
        if kind == "ddpm":
            # MONAI's LDM tutorials: scaled linear betas 0.0015..0.0195; no x0 clipping for latents.
            self.scheduler = DDPMScheduler(
                num_train_timesteps=self.T,
                schedule="scaled_linear_beta",
                beta_start=0.0015,
                beta_end=0.0195,
                clip_sample=False,
                prediction_type=self.prediction_type,
            )
        elif kind == "rflow":
            self.scheduler = RFlowScheduler(
                num_train_timesteps=self.T,
                use_discrete_timesteps=False,
                sample_method="uniform",
                use_timestep_transform=base_numel is not None,
                base_img_size_numel=base_numel or 1,
                spatial_dim=spatial_dims,
            )
        else:
            raise ConfigError(f"diffusion.scheduler must be 'ddpm' or 'rflow', got {kind!r}")

    # ------------------------------------------------------------------ training
    def training_timesteps(self, n: int, latent_shape: tuple[int, ...], generator: torch.Generator,
                           device: torch.device | str) -> torch.Tensor:
        """``(n,)`` random training timesteps drawn from ``generator`` (long for ddpm, float for rflow)."""
        if self.kind == "ddpm":
            return torch.randint(0, self.T, (n,), generator=generator).to(device)
        t = torch.rand((n,), generator=generator) * self.T
        return self._transform(t, latent_shape).to(device)

    def _transform(self, t: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        if self.kind != "rflow" or self.base_numel is None:
            return t
        from monai.networks.schedulers.rectified_flow import timestep_transform

        numel = float(torch.tensor(latent_shape[-self.spatial_dims:]).prod())
        return timestep_transform(t, input_img_size_numel=numel, base_img_size_numel=self.base_numel,
                                  num_train_timesteps=self.T, spatial_dim=self.spatial_dims)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``z_t`` for clean latents ``z0 (N, C, *latent)``, noise of the same shape, ``t (N,)``."""
        return self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to predict (MSE): ``eps``, ``v`` (VP velocity) or ``z0 - eps``."""
        if self.kind == "rflow":
            return z0 - noise
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(z0, noise, t)

    # ------------------------------------------------------------------ sampling
    def alpha_sigma(self, t: float | None) -> tuple[float, float]:
        """Signal and noise scale ``(a_t, s_t)`` at timestep ``t``; ``t=None`` is the clean end (1, 0)."""
        if t is None:
            return 1.0, 0.0
        if self.kind == "rflow":
            s = float(t) / self.T
            return 1.0 - s, s
        acp = float(self.scheduler.alphas_cumprod[int(t)])
        return acp**0.5, (1.0 - acp) ** 0.5

    def split(self, pred: torch.Tensor, z_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Model prediction at ``z_t`` -> ``(z0_hat, eps_hat)``."""
        a, s = self.alpha_sigma(t)
        if self.kind == "rflow":  # pred = z0 - eps
            return z_t + s * pred, z_t - a * pred
        if self.prediction_type == "epsilon":
            return (z_t - s * pred) / a, pred
        return a * z_t - s * pred, s * z_t + a * pred  # v-prediction

    def timesteps(self, sampler: Sampler, steps: int, latent_shape: tuple[int, ...]) -> list[float]:
        """The descending timesteps a sampler visits (set by the MONAI scheduler of its name)."""
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if not 1 <= steps <= self.T:
            raise ConfigError(f"steps must be between 1 and {self.T}, got {steps}")
        if self.kind == "ddpm":
            if sampler == "rflow":
                raise ConfigError(
                    "sampler 'rflow' needs a model trained with rectified flow "
                    "(model.diffusion.scheduler: rflow); this run was trained with ddpm: use ddpm or ddim"
                )
            sched = DDPMScheduler(num_train_timesteps=self.T) if sampler == "ddpm" else DDIMScheduler(
                num_train_timesteps=self.T)
            sched.set_timesteps(steps)
            return [float(t) for t in sched.timesteps]
        numel = int(torch.tensor(latent_shape[-self.spatial_dims:]).prod())
        self.scheduler.set_timesteps(steps, input_img_size_numel=numel)
        return [float(t) for t in self.scheduler.timesteps]

    def step(self, sampler: Sampler, pred: torch.Tensor, z_t: torch.Tensor, t: float, t_next: float | None,
             generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """One update from ``t`` to ``t_next`` (None: the clean end). ``pred`` is the model output."""
        if sampler == "rflow":
            nxt = 0.0 if t_next is None else t_next
            return z_t + (t - nxt) / self.T * pred
        z0, eps = self.split(pred, z_t, t)
        a_n, s_n = self.alpha_sigma(t_next)
        if sampler == "ddim" or t_next is None:
            return a_n * z0 + s_n * eps
        # ddpm: Gaussian posterior q(z_next | z_t, z0) for an arbitrary gap (Kingma et al. 2021, eq. 33)
        a_t, s_t = self.alpha_sigma(t)
        a_ts = a_t / a_n
        var_ts = s_t**2 - a_ts**2 * s_n**2
        mean = (a_ts * s_n**2 / s_t**2) * z_t + (a_n * var_ts / s_t**2) * z0
        std = (var_ts * s_n**2 / s_t**2) ** 0.5
        return mean + std * cpu_randn(tuple(z_t.shape), generator, like=z_t).to(z_t.dtype)


Denoiser = Callable[..., torch.Tensor]


def guided_prediction(net: Denoiser, z: torch.Tensor, t: torch.Tensor, cond: Condition, guidance: float,
                      null: Condition | None) -> torch.Tensor:
    """``net(z, t, mask, class)``, with classifier-free guidance when ``guidance != 1``:
    ``pred = uncond + guidance * (cond - uncond)`` (both halves in one batched forward)."""
    if guidance == 1.0 or null is None:
        return net(z, t, cond.mask, cond.class_labels)
    labels = None
    if cond.class_labels is not None and null.class_labels is not None:
        labels = torch.cat([cond.class_labels, null.class_labels])
    out = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond.mask, null.mask]), labels)
    c, u = out.chunk(2)
    return u + guidance * (c - u)


class CudaGraphed:
    """``fn(z, t) -> prediction`` captured once in a CUDA graph and replayed (fixed shapes).

    The 30 UNet forwards of a short chain on a small latent are bound by kernel launches; replaying
    a captured graph removes that overhead. Everything ``fn`` closes over (networks, conditions)
    must stay alive and unchanged while this object is used. Inputs are copied into static buffers;
    the returned tensor is overwritten by the next call.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                 t: torch.Tensor, warmup: int = 2) -> None:
        self.z, self.t = z.clone(), t.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(self.z, self.t)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.z, self.t)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.z.copy_(z)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


@torch.no_grad()
def sample_latents(
    net: Denoiser,
    cond: Condition,
    shape: tuple[int, ...],
    *,
    process: NoiseProcess,
    sampler: Sampler = "rflow",
    steps: int = 30,
    guidance: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    null: Condition | None = None,
    autocast_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Sample latents ``(N, C, *latent)`` = ``shape`` for ``cond`` (on ``cond.mask``'s device).

    net: ``net(z, t, mask, class_labels) -> prediction`` (eval mode).
    null: the dropped condition for classifier-free guidance (needed when ``guidance != 1``).
    generator: a CPU generator, or one per item; it alone decides the noise.
    autocast_dtype: e.g. ``torch.bfloat16`` on CUDA; None runs in float32.
    cuda_graph: on CUDA, capture the (guided) UNet forward once and replay it at every step.
    """
    device = cond.mask.device
    # 1. the timestep grid of the chosen sampler and the starting noise
    ts = process.timesteps(sampler, steps, shape)
    z = cpu_randn(shape, generator, device=device)
    use_amp = autocast_dtype is not None and device.type == "cuda"
    t_dtype = torch.long if process.kind == "ddpm" else torch.float32

    def predict(z_in: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        # cache_enabled=False: autocast's weight-cast cache must not outlive a graph capture
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use_amp,
                            cache_enabled=False):
            return guided_prediction(net, z_in, t_in, cond, guidance, null).float()

    if cuda_graph and device.type == "cuda":
        predict = CudaGraphed(predict, z, torch.full((shape[0],), ts[0], device=device, dtype=t_dtype))
    # 2. walk the grid from noise to clean latents
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        pred = predict(z, torch.full((shape[0],), t, device=device, dtype=t_dtype))
        z = process.step(sampler, pred, z, t, t_next, generator)
    return z
