"""Diffusion math, a leaf shared by training and sampling: noise processes and their sampler
updates (:mod:`.process`), the sampling loop (:mod:`.sampling`), and the size and attention rules
of the networks (:mod:`.settings`). Imports only torch, MONAI and :mod:`medsynth.errors`."""

from medsynth.diffusion.process import SAMPLERS, NoiseProcess, Process, Sampler, cpu_randn, make_process
from medsynth.diffusion.sampling import Condition, CudaGraphed, Denoiser, guided_prediction, sample_latents
from medsynth.diffusion.settings import size_multiple, use_flash

__all__ = [
    "SAMPLERS",
    "Condition",
    "CudaGraphed",
    "Denoiser",
    "NoiseProcess",
    "Process",
    "Sampler",
    "cpu_randn",
    "guided_prediction",
    "make_process",
    "sample_latents",
    "size_multiple",
    "use_flash",
]
