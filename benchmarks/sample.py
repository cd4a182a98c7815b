"""Latent diffusion sampling speed: latency per volume and peak memory, JSON lines.

    python benchmarks/sample.py               # GPU sizes on CUDA, small ones on the CPU

Run it in the same call as the peer baseline (``monai_baseline.py``, MONAI's tutorial networks in a plain
loop). Its ``unet3d_sample`` rows time MONAI's 3d_ldm UNet on a 3x32^3 latent, batch 1, eager bf16:
DDPM 1000 steps, DDIM 50, RFlow 30.
Here the same UNet (configs/ldm3d.yaml, concat conditioning on a 7-label one-hot mask of 128^3)
runs through our :func:`~medsynth.diffusion.sample_latents`:

- ``ldm_unet3d_sample``: latents only, per sampler and steps, batch 1 and 8, modes ``eager_fp32``,
  ``eager_bf16`` and ``graph_bf16`` (the guided UNet forward captured once in a CUDA graph and
  replayed each step, as ``LatentDiffusionPipeline`` does on CUDA); ``sec_per_volume`` = sec / batch;
- ``ldm_decode3d``: decoding one 3x32^3 latent to 128^3 with the recipe's autoencoder, whole vs in
  16^3 latent tiles (sliding window), with peak memory;
- ``ldm_pipeline3d``: mask -> image through ``LatentDiffusionPipeline`` (RFlow 30, graph on CUDA, the
  recipe's decode_tile).

CPU sizes: 3x8^3 latents (32^3 masks), DDPM 20 steps. Networks are randomly initialised (speed does
not depend on the weights). Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsynth.config import load_config  # noqa: E402
from medsynth.diffusion import Condition, NoiseProcess, sample_latents  # noqa: E402
from medsynth.models.autoencoder import build_autoencoder, decode  # noqa: E402
from medsynth.models.diffusion import MaskConditionedUNet  # noqa: E402
from medsynth.synthesis.ldm import LatentDiffusionPipeline, SamplingDefaults  # noqa: E402

from _common import emit, peak, sync  # noqa: E402

NUM_LABELS = 7


def timeit(fn, dev: torch.device, warm: int = 1, n: int = 3) -> float:
    for _ in range(warm):
        fn()
    sync(dev)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def onehot_mask(n: int, size: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, NUM_LABELS, (n, 1, *[max(1, size // 8)] * 3), generator=g).float()
    idx = torch.nn.functional.interpolate(coarse, size=(size,) * 3, mode="nearest")[:, 0].long()
    return torch.nn.functional.one_hot(idx, NUM_LABELS).movedim(-1, 1).float().to(dev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip-ddpm", action="store_true", help="skip the 1000-step DDPM rows")
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    gpu = dev.type == "cuda"
    emit(what="env", device=str(dev), name=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
         threads=torch.get_num_threads())
    cfg = load_config(ROOT / "configs/ldm3d.yaml").model
    latent = 32 if gpu else 8
    factor = 2 ** (len(cfg.autoencoder.channels) - 1)
    torch.manual_seed(0)
    unet = MaskConditionedUNet(cfg.diffusion, spatial_dims=3, latent_channels=3, num_labels=NUM_LABELS,
                               downsample_factor=factor, use_flash_attention=gpu).to(dev).eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv; any weights time the same
        for p in unet.parameters():
            p.normal_(0, 0.02)
    process = NoiseProcess("rflow", spatial_dims=3, base_numel=latent**3)

    # 1. latents only: samplers x batch x modes
    modes = ["eager_fp32", "eager_bf16", "graph_bf16"] if gpu else ["eager_fp32"]
    plan = [("rflow", 30), ("ddim", 50)] + ([] if args.skip_ddpm else [("ddpm", 1000 if gpu else 20)])
    for batch in (1, 8) if gpu else (1,):
        mask = onehot_mask(batch, latent * factor, dev)
        cond = Condition(mask=mask)
        for sampler, steps in plan:
            for mode in modes:
                if sampler == "ddpm" and mode == "eager_fp32" and gpu:
                    continue  # the baseline has no fp32 DDPM row; saves ~20 s
                amp = torch.bfloat16 if mode.endswith("bf16") else None

                def run(cond: Condition = cond, batch: int = batch, sampler: str = sampler, steps: int = steps,
                        amp: torch.dtype | None = amp, mode: str = mode) -> torch.Tensor:
                    return sample_latents(unet, cond, (batch, 3, *(latent,) * 3), process=process, sampler=sampler,
                                          steps=steps, generator=torch.Generator().manual_seed(0),
                                          autocast_dtype=amp, cuda_graph=mode.startswith("graph"))

                try:
                    if gpu:
                        torch.cuda.reset_peak_memory_stats()
                    sec = timeit(run, dev, warm=1, n=3 if steps < 1000 else 1)
                    emit(what="ldm_unet3d_sample", sampler=sampler, steps=steps, batch=batch, latent=latent, mode=mode,
                         sec=sec, sec_per_volume=sec / batch, volumes_per_s=batch / sec, peak_gib=peak(dev))
                except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
                    emit(what="ldm_unet3d_sample", sampler=sampler, batch=batch, mode=mode, error=repr(exc)[:300])

    # 2. decoding one latent: whole vs tiled
    ae = build_autoencoder(cfg.autoencoder, spatial_dims=3, in_channels=1, use_flash_attention=gpu).to(dev).eval()
    z = torch.randn((1, 3, *(latent,) * 3), generator=torch.Generator().manual_seed(0)).to(dev)
    for tile in (None, latent // 2):
        def dec(tile: int | None = tile) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=gpu):
                return decode(ae, z, tile=tile, overlap=0.25)

        try:
            if gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sec = timeit(dec, dev, warm=1, n=3)
            emit(what="ldm_decode3d", latent=latent, out=latent * factor, tile=tile, sec=sec, peak_gib=peak(dev))
        except Exception as exc:  # noqa: BLE001
            emit(what="ldm_decode3d", tile=tile, error=repr(exc)[:300])

    # 3. the whole pipeline: mask -> image
    pipe = LatentDiffusionPipeline(ae, unet, process, scale_factor=1.0, factor=factor,
                                   multiple=factor * 2 ** (len(cfg.diffusion.channels) - 1), latent_channels=3,
                                   defaults=SamplingDefaults("rflow", 30, 1.0), decode_tile=cfg.autoencoder.decode_tile)
    mask = onehot_mask(1, latent * factor, dev)
    try:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sec = timeit(lambda: pipe(mask, seed=0), dev, warm=1, n=3)
        emit(what="ldm_pipeline3d", size=latent * factor, sampler="rflow", steps=30, cuda_graph=gpu,
             decode_tile=cfg.autoencoder.decode_tile,
             sec=sec, peak_gib=peak(dev))
    except Exception as exc:  # noqa: BLE001
        emit(what="ldm_pipeline3d", error=repr(exc)[:300])


if __name__ == "__main__":
    main()
