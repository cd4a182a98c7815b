"""Latent diffusion training speed: samples/s and peak memory of our training steps, JSON lines.

    python benchmarks/train_ldm.py                 # GPU sizes on CUDA, small ones on the CPU
    python benchmarks/train_ldm.py --compile       # also torch.compile the UNet (CUDA; slow first step)

Run it in the same call as the peer baseline (``monai_baseline.py``, a plain loop): the networks and
batches are that script's (MONAI's 2d_ldm / 3d_ldm tutorial networks, which ``configs/ldm2d.yaml`` and
``configs/ldm3d.yaml`` use), so ``samples_per_s`` divides directly:

- ``unet2d``: the diffusion UNet of configs/ldm2d.yaml, batch 64 of 3x64x64 latents (CPU: 4 of 3x16x16);
- ``unet3d``: the diffusion UNet of configs/ldm3d.yaml, batch 8 of 3x32^3 latents (CPU: 1 of 3x8^3);
- ``autoencoder3d``: the AutoencoderKL of configs/ldm3d.yaml, batch 2 of 128^3 (CPU: 1 of 32^3).

One UNet step is our stage-2 step on given latents: ``denoising_loss`` (rectified flow, concat
conditioning on a one-hot mask of 7 labels at image resolution) + backward + Adam + EMA update. One
autoencoder step is our stage-1 forward (explicit reparameterisation noise) + L1 (the baseline's
loss) + backward + Adam. Modes: ``plain`` = fp32, unfused Adam, no flash attention (a plain loop over
our code); ``ours`` = what training does on CUDA: bf16 autocast, flash attention (SDPA), fused Adam;
``ours+checkpoint`` (autoencoder) adds activation checkpointing; ``ours+compile`` adds torch.compile.
On the CPU only ``plain`` runs (bf16 there is 10-70x slower). Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsynth.config import load_config  # noqa: E402
from medsynth.diffusion import NoiseProcess  # noqa: E402
from medsynth.models.autoencoder import build_autoencoder  # noqa: E402
from medsynth.models.diffusion import MaskConditionedUNet  # noqa: E402
from medsynth.training.ldm import _Reconstructor, denoising_loss  # noqa: E402

from _common import emit, peak, sync  # noqa: E402

NUM_LABELS = 7


def timed(step, dev: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return (time.perf_counter() - t0) / steps


def optimizer(params, dev: torch.device, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4, fused=fused and dev.type == "cuda")


def onehot_mask(n: int, spatial: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, NUM_LABELS, (n, 1, *[max(1, s // 8) for s in spatial]), generator=g).float()
    idx = torch.nn.functional.interpolate(coarse, size=spatial, mode="nearest")[:, 0].long()
    return torch.nn.functional.one_hot(idx, NUM_LABELS).movedim(-1, 1).float().to(dev)


def unet_step(recipe: Path, batch: int, latent: int, mode: str, dev: torch.device, warmup: int, steps: int) -> dict:
    cfg = load_config(recipe).model
    dims = load_config(recipe).data.dim
    factor = 2 ** (len(cfg.autoencoder.channels) - 1)
    fast = mode != "plain"
    torch.manual_seed(0)
    net = MaskConditionedUNet(cfg.diffusion, spatial_dims=dims, latent_channels=3, num_labels=NUM_LABELS,
                              downsample_factor=factor, use_flash_attention=fast).to(dev)
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999),
                                              use_buffers=True)
    fwd = torch.compile(net) if mode.endswith("compile") else net
    opt = optimizer(net.parameters(), dev, fused=fast)
    process = NoiseProcess("rflow", spatial_dims=dims)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn((batch, 3, *[latent] * dims), generator=g).to(dev)
    mask = onehot_mask(batch, tuple([latent * factor] * dims), dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if fast and dev.type == "cuda" else None

    def step() -> None:
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = process.training_timesteps(batch, tuple(z0.shape), g, dev)
        opt.zero_grad(set_to_none=True)
        loss = denoising_loss(fwd, process, z0, noise, t, mask, None, amp or contextlib.nullcontext())
        loss.backward()
        opt.step()
        ema.update_parameters(net)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, dev, warmup, steps)
    return {"batch": batch, "latent": latent, "mode": mode, "sec": sec, "samples_per_s": batch / sec,
            "peak_gib": peak(dev)}


def autoencoder_step(recipe: Path, batch: int, size: int, mode: str, dev: torch.device, warmup: int,
                     steps: int) -> dict:
    cfg = load_config(recipe).model.autoencoder
    fast = mode != "plain"
    if mode == "ours+checkpoint":
        cfg = cfg.model_copy(update={"use_checkpoint": True})
    torch.manual_seed(0)
    ae = build_autoencoder(cfg, spatial_dims=3, in_channels=1, use_flash_attention=fast).to(dev)
    rec = _Reconstructor(ae)
    opt = optimizer(ae.parameters(), dev, fused=fast)
    g = torch.Generator().manual_seed(0)
    img = torch.rand((batch, 1, size, size, size), generator=g).to(dev)
    f = 2 ** (len(cfg.channels) - 1)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if fast and dev.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        eps = torch.randn((batch, cfg.latent_channels, *[size // f] * 3), generator=g).to(dev)
        opt.zero_grad(set_to_none=True)
        with amp:
            out, mu, sigma = rec(img, eps)
        loss = torch.nn.functional.l1_loss(out.float(), img)
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, dev, min(warmup, 2), max(2, steps // 4))
    return {"batch": batch, "size": size, "mode": mode, "sec": sec, "samples_per_s": batch / sec,
            "peak_gib": peak(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (CUDA)")
    ap.add_argument("--only", default="unet2d,unet3d,autoencoder3d")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # the baseline's fp32 is true fp32
    emit(what="env", device=str(dev), name=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
         threads=torch.get_num_threads())
    modes = ["plain", "ours"] + (["ours+compile"] if args.compile and gpu else []) if gpu else ["plain"]
    only = set(args.only.split(","))
    for what, recipe, batch, latent in (("unet2d", "configs/ldm2d.yaml", 64 if gpu else 4, 64 if gpu else 16),
                                        ("unet3d", "configs/ldm3d.yaml", 8 if gpu else 1, 32 if gpu else 8)):
        if what not in only:
            continue
        for mode in modes:
            try:
                emit(what=f"ldm_{what}_train_step", **unet_step(ROOT / recipe, batch, latent, mode, dev,
                                                                args.warmup, args.steps))
            except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
                emit(what=f"ldm_{what}_train_step", mode=mode, error=repr(exc)[:300])
    if "autoencoder3d" in only:
        for mode in (["plain", "ours", "ours+checkpoint"] if gpu else ["plain"]):
            try:
                emit(what="ldm_autoencoder3d_train_step",
                     **autoencoder_step(ROOT / "configs/ldm3d.yaml", 2 if gpu else 1, 128 if gpu else 32, mode,
                                        dev, args.warmup, args.steps))
            except Exception as exc:  # noqa: BLE001
                emit(what="ldm_autoencoder3d_train_step", mode=mode, error=repr(exc)[:300])


if __name__ == "__main__":
    main()
