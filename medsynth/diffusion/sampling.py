"""The sampling loop of latent diffusion: noise -> latents, for any sampler of a noise process.

:func:`sample_latents` walks the timestep grid of the chosen sampler
(:meth:`medsynth.diffusion.process.NoiseProcess.timesteps`), calling the denoiser once per step
(twice in one batch with classifier-free guidance) and updating with
:meth:`~medsynth.diffusion.process.NoiseProcess.step`. On CUDA the denoiser call can be captured
once in a CUDA graph and replayed (:class:`CudaGraphed`). Noise comes from explicit CPU generators.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from medsynth.diffusion.process import NoiseProcess, Sampler, cpu_randn

__all__ = ["Condition", "CudaGraphed", "Denoiser", "guided_prediction", "sample_latents"]


@dataclass
class Condition:
    """What a sample is conditioned on.

    mask: one-hot label map ``(N, L, *image_spatial)``, float, at the image grid
        (``image_spatial = latent_spatial * downsample_factor``).
    class_labels: ``(N,)`` long class indices, or None.
    label_means: ``(N, C, L)`` per-sample fill means of a per-case run, or None (the pooled ones).
    """

    mask: torch.Tensor
    class_labels: torch.Tensor | None = None
    label_means: torch.Tensor | None = None


Denoiser = Callable[..., torch.Tensor]


def guided_prediction(net: Denoiser, z: torch.Tensor, t: torch.Tensor, cond: Condition, guidance: float,
                      null: Condition | None) -> torch.Tensor:
    """``net(z, t, mask, class)``, with classifier-free guidance when ``guidance != 1``:
    ``pred = uncond + guidance * (cond - uncond)`` (both halves in one batched forward)."""
    if guidance == 1.0 or null is None:
        if cond.label_means is None:
            return net(z, t, cond.mask, cond.class_labels)
        return net(z, t, cond.mask, cond.class_labels, label_means=cond.label_means)
    labels = None
    if cond.class_labels is not None and null.class_labels is not None:
        labels = torch.cat([cond.class_labels, null.class_labels])
    if cond.label_means is None:
        out = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond.mask, null.mask]), labels)
    else:  # the null mask is all zero: its fill is zero whatever the means
        out = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond.mask, null.mask]), labels,
                  label_means=torch.cat([cond.label_means, cond.label_means]))
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

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = predict
    if cuda_graph and device.type == "cuda":
        forward = CudaGraphed(predict, z, torch.full((shape[0],), ts[0], device=device, dtype=t_dtype))
    # 2. walk the grid from noise to clean latents
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        pred = forward(z, torch.full((shape[0],), t, device=device, dtype=t_dtype))
        z = process.step(sampler, pred, z, t, t_next, generator)
    return z
