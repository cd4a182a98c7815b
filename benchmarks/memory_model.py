"""The memory model (``medsynth train --dry-run``) beside measured peak memory and step time, JSON lines.

    OMP_NUM_THREADS=1 python benchmarks/memory_model.py                          # CPU: tiny and small recipes
    python benchmarks/memory_model.py --device cuda --recipes gan2d,gan3d,ldm2d,ldm3d   # one GPU
    python benchmarks/memory_model.py --device cuda --recipes gan3d --set training.channels_last=true

Each recipe stage runs in a fresh process (:func:`medsynth.training.memory.measure_step_memory`: the
family built with the memory model's assumed data, 16 labels and 1 channel, then 3 training steps on a
batch of zeros): on the CPU the peak RSS growth (``MALLOC_MMAP_THRESHOLD_=65536``, so freed tensors leave
the RSS), on CUDA the allocator's peak growth (bf16 autocast when the recipe sets ``training.amp``: the
model counts float32). ``ratio`` is the estimate over the measurement. The ldm diffusion stage needs a
trained autoencoder: neither estimated nor measured. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_RECIPES = "tiny/gan2d,tiny/gan3d,tiny/ldm2d,tiny/ldm3d,small/gan2d,small/gan3d,small/ldm2d,small/ldm3d"


def one(recipe: str, stage: str | None, device: str, threads: int, overrides: list[str]) -> dict:
    """Estimate and measure one stage in this process (``overrides``: ``key=value`` recipe settings)."""
    import torch

    from medsynth.config import load_config
    from medsynth.recipes import recipe_path
    from medsynth.training.memory import estimate_memory, measure_step_memory

    torch.set_num_threads(threads)
    cfg = load_config(recipe_path(recipe), overrides)
    (estimate,) = [e for e in estimate_memory(cfg) if e.stage == stage]
    measured = measure_step_memory(cfg, stage, device=device, steps=3)
    return {"what": "memory_model", "recipe": recipe, "stage": stage, "set": overrides, "device": device,
            "name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "threads": threads,
            "batch": cfg.training.batch_size, "size": list(cfg.data.size), "amp": cfg.training.amp and device == "cuda",
            "estimate_gib": estimate.peak_bytes / 2**30, "measured_gib": measured.peak_bytes / 2**30,
            "ratio": estimate.peak_bytes / max(1, measured.peak_bytes), "step_s": measured.step_seconds,
            "samples_per_s": cfg.training.batch_size / measured.step_seconds,
            "estimate_parts_gib": {"parameters": estimate.parameter_bytes / 2**30,
                                   "activations": estimate.activation_bytes / 2**30,
                                   "in_flight": estimate.transient_bytes / 2**30, "batch": estimate.batch_bytes / 2**30}}


def stages(recipe: str, overrides: list[str]) -> list[str | None]:
    from medsynth.config import load_config
    from medsynth.recipes import recipe_path
    from medsynth.training.memory import estimate_memory

    return [e.stage for e in estimate_memory(load_config(recipe_path(recipe), overrides))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default=CPU_RECIPES)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per stage")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting for every measurement, e.g. training.channels_last=true (repeatable)")
    ap.add_argument("--one", nargs=2, metavar=("RECIPE", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        recipe, stage = args.one
        print(json.dumps(one(recipe, None if stage == "-" else stage, args.device, args.threads, args.set)), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    for recipe in args.recipes.split(","):
        for stage in stages(recipe, args.set):
            cmd = [sys.executable, __file__, "--one", recipe, stage or "-", "--device", args.device,
                   "--threads", str(args.threads), *[f"--set={kv}" for kv in args.set]]
            try:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
                lines = out.stdout.strip().splitlines()
                if out.returncode == 0 and lines:
                    print(lines[-1], flush=True)
                else:
                    print(json.dumps({"what": "memory_model", "recipe": recipe, "stage": stage,
                                      "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]}), flush=True)
            except subprocess.TimeoutExpired:
                print(json.dumps({"what": "memory_model", "recipe": recipe, "stage": stage, "error": "timeout"}),
                      flush=True)


if __name__ == "__main__":
    main()
