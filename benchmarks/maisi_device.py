"""Peak GPU memory and seconds of MAISI CT generation (rflow layout) through medsynth's bundle sampler,
with the published architecture and random weights (memory and time do not depend on the weights).

Writes one JSON file (``--out``): per output size, the seconds of the diffusion loop (ControlNet + UNet,
``--steps`` rflow steps, fp16 autocast), of the autoencoder decode, and the peak allocated memory, beside
the figures MAISI publishes (Project-MONAI/tutorials generation/maisi/README.md, A100 80 GB, ddpm
version). ``--tiny`` runs the same code with the tiny test networks at small sizes (a CPU smoke run).
Run through ``benchmarks/maisi_device.sh``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medsynth.bundles.geometry import FitLimits
from medsynth.bundles.labels import BODY_LABEL, LabelMapping
from medsynth.bundles.networks import load_networks
from medsynth.bundles.random_bundle import write_random_bundle
from medsynth.bundles.reader import read_bundle
from medsynth.bundles.sampler import BundleSampler

from _common import peak, sync

#: MAISI README (A100 80G): output size -> (peak memory, diffusion seconds, VAE seconds) as published
PUBLISHED = {"256x256x128": {"peak_memory": "14G", "dm_time_s": 57, "vae_time_s": 1,
                             "note": "autoencoder_tp_num_splits 2, no sliding window"},
             "512x512x256": {"peak_memory": None, "dm_time_s": None, "vae_time_s": None,
                             "note": "not in the table; nearest rows 512x512x128 (14-37G, DM 138 s) and "
                                     "512x512x512 (22-44G, DM 569 s)"}}


def phantom_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """A body ellipsoid (200) holding a liver (1) and a tumour (26): bundle values on the work grid."""
    idx = np.indices(shape, dtype=np.float32)
    c = [(s - 1) / 2 for s in shape]
    r = sum(((idx[a] - c[a]) / (0.45 * shape[a])) ** 2 for a in range(3))
    out = np.where(r < 1, BODY_LABEL, 0).astype(np.uint8)
    liver = ((idx[0] - 0.4 * shape[0]) / (0.15 * shape[0])) ** 2 + ((idx[1] - c[1]) / (0.2 * shape[1])) ** 2 \
        + ((idx[2] - c[2]) / (0.3 * shape[2])) ** 2
    out[liver < 1] = 1
    out[liver < 0.1] = 26
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = [(32, 32, 16), (64, 64, 32)] if args.tiny else [(256, 256, 128), (512, 512, 256)]
    record: dict[str, object] = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                                 "torch": torch.__version__, "steps": args.steps, "layout": "rflow",
                                 "weights": "random (published architecture)" if not args.tiny else "tiny", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_random_bundle(Path(tmp) / "bundle", "rflow", "tiny" if args.tiny else "published")
        bundle = read_bundle(root)
        nets = load_networks(bundle, dev)
        record["load_s"] = round(time.perf_counter() - t0, 1)
        record["parameters"] = {k: sum(p.numel() for p in getattr(nets, k).parameters())
                                for k in ("autoencoder", "unet", "controlnet")}
        mapping = LabelMapping(values={0: 0, 1: 1})
        sampler = BundleSampler(bundle, nets, mapping, FitLimits())
        for shape in sizes:
            name = "x".join(map(str, shape))
            labels = phantom_labels(shape)
            run: dict[str, object] = {"size": name, "published": PUBLISHED.get(name)}
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                sync(dev)
                t = time.perf_counter()
                hu = sampler.generate_work(labels, (1.5, 1.5, 1.5), seed=0, steps=args.steps)
                sync(dev)
                run.update(total_s=round(time.perf_counter() - t, 2), peak_gib=round(peak(dev), 2),
                           hu_min=float(hu.min()), hu_max=float(hu.max()))
                # the decode alone: its own peak and seconds
                latents = torch.randn(1, bundle.latent_channels, *(s // 4 for s in shape), device=dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(dev)
                t = time.perf_counter()
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                    nets.autoencoder.decode_stage_2_outputs(latents)
                sync(dev)
                run.update(decode_s=round(time.perf_counter() - t, 2), decode_peak_gib=round(peak(dev), 2))
                run["diffusion_s"] = round(float(run["total_s"]) - float(run["decode_s"]), 2)  # type: ignore[arg-type]
            except torch.cuda.OutOfMemoryError as exc:
                run["error"] = f"out of memory: {str(exc)[:200]}"
            record["runs"].append(run)  # type: ignore[attr-defined]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))  # after every size: a timeout keeps what was measured
            print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
