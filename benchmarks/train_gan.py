"""GAN training speed: samples/s and peak memory of one full GAN step (G + EMA + D), JSON lines.

    python benchmarks/train_gan.py                          # tiny recipes on the CPU, full ones on a GPU
    python benchmarks/train_gan.py --recipe configs/gan3d.yaml --batch 2 --steps 20

Each measurement builds the recipe's networks through the GAN family (as the engine does), feeds a
synthetic batch of the recipe's size (blocky label maps, smooth images; no disk), runs ``--warmup``
steps, then times ``--steps`` steps. On CUDA it reports fp32 and bf16 autocast (the engine's
``training.amp``) and ``torch.cuda.max_memory_allocated``; on the CPU fp32 only (bf16 on CPU is slow)
and the process's peak RSS. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsynth.config import load_config  # noqa: E402
from medsynth.data.loader import DataInfo, Normalization, one_hot  # noqa: E402
from medsynth.training.engine import Runtime  # noqa: E402
from medsynth.training.gan import GanFamily  # noqa: E402


def synthetic_batch(info: DataInfo, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    size = info.size
    coarse = torch.randint(0, info.num_labels, (batch, *[max(1, s // 4) for s in size]), generator=g)
    index = torch.nn.functional.interpolate(coarse[:, None].float(), size=size, mode="nearest")[:, 0].long()
    image = (index.float() / max(1, info.num_labels - 1))[:, None] * 0.8 + 0.1
    image = image + 0.05 * torch.randn(image.shape, generator=g)
    return {"image": image.clamp(0, 1).to(device), "label_index": index.to(device),
            "label": one_hot(index, info.num_labels).to(device),
            "class_index": torch.zeros(batch, dtype=torch.int64, device=device)}


def measure(recipe: Path, batch: int | None, steps: int, warmup: int, amp: bool, device: torch.device) -> dict:
    cfg = load_config(recipe, [f"training.amp={str(amp).lower()}"])
    b = batch or cfg.training.batch_size
    info = DataInfo(dim=cfg.data.dim, slice_axis=2, volume_ndim=cfg.data.dim, size=list(cfg.data.size),
                    labels=list(range(7)), label_names={}, channels=["image"], classes=[], spacing=None,
                    normalization=Normalization("ct_window", [0.0], [1.0]))
    rt = Runtime(cfg, ROOT, device)
    torch.manual_seed(0)
    fam = GanFamily(cfg, info, rt)
    data = synthetic_batch(info, b, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        fam.train_step(data, i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        fam.train_step(data, warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "bench": "train_gan", "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "precision": "bf16" if rt.amp_enabled else "fp32",
        "batch": b, "size": list(cfg.data.size), "step_ms": round(step_s * 1000, 2),
        "samples_per_s": round(b / step_s, 2),
        "peak_mem_mib": round(peak, 1), "peak_mem_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "params_g_m": round(sum(p.numel() for p in fam.G.parameters()) / 1e6, 3),
        "params_d_m": round(sum(p.numel() for p in fam.D.parameters()) / 1e6, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", type=Path, help="recipe(s) to time (repeatable)")
    ap.add_argument("--batch", type=int, default=None, help="override the recipe's batch size")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    recipes = args.recipe or [ROOT / "configs/tiny/gan2d.yaml", ROOT / "configs/tiny/gan3d.yaml"] + (
        [ROOT / "configs/gan2d.yaml", ROOT / "configs/gan3d.yaml"] if cuda else [])
    for recipe in recipes:
        for amp in ([False, True] if cuda else [False]):
            print(json.dumps(measure(Path(recipe).resolve(), args.batch, args.steps, args.warmup, amp, device)),
                  flush=True)


if __name__ == "__main__":
    main()
