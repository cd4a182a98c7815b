"""Noise processes for latent diffusion (DDPM, rectified flow) and the update rules of their samplers.

A trained denoiser belongs to one *noise process* (the recipe's ``diffusion.scheduler``):

- ``ddpm``: variance preserving, ``z_t = a_t z_0 + s_t eps`` with ``a_t = sqrt(alphas_cumprod[t])`` and
  ``s_t = sqrt(1 - alphas_cumprod[t])`` from MONAI's ``DDPMScheduler``, integer ``t`` in ``[0, T)``;
  the UNet predicts ``eps`` (or ``v``);
- ``rflow``: rectified flow (MONAI's ``RFlowScheduler``), ``z_t = (1 - t/T) z_0 + (t/T) eps``,
  real ``t`` in ``[0, T]``; the UNet predicts the velocity ``v = z_0 - eps``.

Any prediction converts to ``(z0_hat, eps_hat)``, so one loop (:func:`medsynth.diffusion.sampling.sample_latents`) runs any
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

from typing import TYPE_CHECKING, Literal, Protocol, cast

import torch

from medsynth.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

__all__ = ["SAMPLERS", "NoiseProcess", "Process", "ProcessSettings", "Sampler", "cpu_randn", "make_process"]

Process = Literal["ddpm", "rflow"]
Sampler = Literal["ddpm", "ddim", "rflow"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "rflow")


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
        self.scheduler: DDPMScheduler | RFlowScheduler
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
        rflow = cast("RFlowScheduler", self.scheduler)
        rflow.set_timesteps(steps, input_img_size_numel=numel)
        return [float(t) for t in rflow.timesteps]

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


class ProcessSettings(Protocol):
    """The fields of a recipe's ``model.diffusion`` section that define the noise process."""

    @property
    def scheduler(self) -> Process: ...

    @property
    def num_train_timesteps(self) -> int: ...

    @property
    def prediction_type(self) -> str: ...


def make_process(settings: ProcessSettings, spatial_dims: int, base_numel: int | None) -> NoiseProcess:
    """The noise process of a ``model.diffusion`` section (rflow's timestep shift keyed to the
    training latents' voxel count ``base_numel``)."""
    return NoiseProcess(settings.scheduler, num_train_timesteps=settings.num_train_timesteps,
                        prediction_type=settings.prediction_type, base_numel=base_numel, spatial_dims=spatial_dims)
