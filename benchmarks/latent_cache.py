"""LDM stage-2 step throughput with cached latents against today's uncached step, one run, JSON lines.

    OMP_NUM_THREADS=1 python benchmarks/latent_cache.py            # small/ldm2d and small/ldm3d, CPU
    python benchmarks/latent_cache.py --recipes small/ldm2d --steps 20

For each recipe: head phantoms at the recipe's crop size, an autoencoder of the recipe's shape (random
weights: the step's cost does not depend on them) written as the run's autoencoder checkpoint, then the
engine's stage-2 step (``LdmFamily.train_step`` on a loader batch with one-hot labels made on the
device) timed three ways, interleaved in rounds so machine load falls on all alike:

- ``uncached``: ``latent_cache.store: off``, today's code path (fresh crops, every batch encoded);
- ``cached``: ``store: memory`` after every pool crop was encoded once (the steady state from the
  second pass over the pool on);
- ``*_sdpa``: the same with ``model.use_flash_attention: true`` (PyTorch's fused scaled-dot-product
  attention; ``auto`` uses it on CUDA only).

A cached variant also reports ``first_pass_s`` (every crop still a miss: encode + store). ``speedup``
is the median over rounds of the round's uncached seconds per step over the variant's (the variants
of one round run back to back, so a shared machine's load changes them alike); ``run_speedup`` the
whole stage's (medians), counting one
first pass over a pool of ``crops_per_case`` crops per case in the recipe's stage-2 steps. Torch threads
are set to ``--threads`` (default 1). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsynth.config import load_config  # noqa: E402
from medsynth.data.loader import build_training_data, make_loader, with_one_hot  # noqa: E402
from medsynth.data.phantoms import make_phantom_dataset  # noqa: E402
from medsynth.models.autoencoder import build_autoencoder  # noqa: E402
from medsynth.recipes import recipe_path  # noqa: E402
from medsynth.training import checkpoint as ck  # noqa: E402
from medsynth.training.engine import Runtime, checkpoint_dir, validated_manifest  # noqa: E402
from medsynth.training.ldm import LdmFamily, stage_config, stage_steps  # noqa: E402

from _common import emit  # noqa: E402

CASES = 4


def setup(recipe: str, work: Path):
    """(config, run folder) for ``recipe`` on phantoms of its crop size with an autoencoder checkpoint."""
    probe = load_config(recipe_path(recipe))
    dim, size = probe.data.dim, max(probe.data.size)
    data = make_phantom_dataset(work / "data", dim=dim, cases=CASES, seed=0, size=size)
    cfg = stage_config(load_config(recipe_path(recipe), [f"data.manifest={json.dumps(str(data))}"]), "diffusion")
    m = cfg.model
    torch.manual_seed(0)
    ae = build_autoencoder(m.autoencoder, spatial_dims=dim, in_channels=1, zero_output=m.fill == "residual")
    run = work / "run"
    folder = checkpoint_dir(run, "autoencoder")
    folder.mkdir(parents=True)
    ck.save_checkpoint(folder, 1, ck.make_payload(
        step=1, family="ldm", stage="autoencoder", family_state={"modules": {"autoencoder": ae.state_dict()}},
        config_json=json.dumps(cfg.to_dict()), losses={}, data_order={}), keep_last=1)
    return cfg, run


def family_and_batches(cfg, run: Path, store: str, flash: bool):
    cfg = cfg.model_copy(deep=True)
    cfg.model.diffusion.latent_cache.store = store
    cfg.model.use_flash_attention = flash or "auto"
    data = build_training_data(validated_manifest(cfg.data.manifest), cfg.data, seed=cfg.training.seed)
    rt = Runtime(config=cfg, run_dir=run, device=torch.device("cpu"), stage="diffusion")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family = LdmFamily(cfg, data.info, rt)
    data.pool_per_case = family.crop_pool()
    loader = make_loader(data, start_step=0, max_steps=10**9, batch_size=cfg.training.batch_size)
    return family, data, iter(loader)


def run_steps(family, batches, start: int, steps: int, num_labels: int) -> float:
    """Seconds per step of ``steps`` engine steps (loading, one-hot, train_step), losses synced at the end."""
    t0 = time.perf_counter()
    sums = []
    for k in range(steps):
        out = family.train_step(with_one_hot(next(batches), num_labels), start + k)
        sums.append(out["mse"])
    float(torch.stack(sums).sum())
    return (time.perf_counter() - t0) / steps


#: name -> (latent_cache.store, model.use_flash_attention on the CPU)
VARIANTS = {"uncached": ("off", False), "cached": ("memory", False), "uncached_sdpa": ("off", True),
            "cached_sdpa": ("memory", True)}


def measure(recipe: str, steps: int, rounds: int, variants: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, run = setup(recipe, Path(tmp))
        runs, first, step_of = {}, {}, {}
        batch = cfg.training.batch_size
        for name in variants:
            family, data, it = family_and_batches(cfg, run, *VARIANTS[name])
            labels, pool = data.info.num_labels, data.pool_size
            run_steps(family, it, 0, 1, labels)  # warm-up (allocator, the first step's scale factor)
            step = 1
            if family.cache is not None:  # the first pass over the pool: every crop a miss
                n = max(1, pool // batch - 1)
                first[name] = run_steps(family, it, step, n, labels)
                step += n
                while family.cache.filled < pool:  # the rest (a batch may straddle two passes)
                    run_steps(family, it, step, 1, labels)
                    step += 1
            runs[name], step_of[name] = (family, it, labels), step
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):  # interleaved: machine load falls on every variant alike
            for name in variants:
                family, it, labels = runs[name]
                times[name].append(run_steps(family, it, step_of[name], steps, labels))
                step_of[name] += steps
        sec = {name: statistics.median(t) for name, t in times.items()}
        base = sec["uncached"]
        total = stage_steps(cfg, "diffusion")
        misses = min(total, max(1, pool // batch))
        out = {"recipe": recipe, "batch": batch, "size": list(cfg.data.size), "pool": pool,
               "stage_steps": total, "threads": torch.get_num_threads(), "load1": os.getloadavg()[0]}
        for name in variants:
            ratios = [b / t for b, t in zip(times["uncached"], times[name])]  # neighbours in time: under the same load
            out[name] = {"s_per_step": sec[name], "samples_per_s": batch / sec[name],
                         "speedup": statistics.median(ratios), "rounds": times[name]}
            if name in first:  # the whole stage: one first pass over the pool, then cached steps
                whole = misses * first[name] + (total - misses) * sec[name]
                out[name].update(first_pass_s=first[name], run_speedup=total * base / whole,
                                 hits=runs[name][0].cache.hits, misses=runs[name][0].cache.misses)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="small/ldm2d,small/ldm3d")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS) + " (uncached first)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    emit(what="env", torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(),
         load1=os.getloadavg()[0])
    for recipe in args.recipes.split(","):
        emit(what="ldm_stage2_latent_cache", **measure(recipe, args.steps, args.rounds, args.variants.split(",")))


if __name__ == "__main__":
    main()
