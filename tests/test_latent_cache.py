"""Stage 2's cached latents: a cached step trains on the same latents (and loss) as an uncached one on
the same batch, a second process reuses the rows on disk, a changed autoencoder invalidates them, the
memory bound is kept, and a cached run trains and resumes through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import LatentCacheConfig, load_config
from medsynth.data.loader import POOL_BASE, build_training_data, with_one_hot
from medsynth.errors import ConfigError
from medsynth.training import checkpoint as ck
from medsynth.training.engine import Runtime, checkpoint_dir, validated_manifest
from medsynth.training.latent_cache import CACHE_DIR, plan_store
from medsynth.training.ldm import LdmFamily, train_ldm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def data2d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("lc") / "ds", dim=2, cases=4, seed=0, size=32)


def _config(data: Path, *more: str):
    return load_config(CONFIGS / "tiny/ldm2d.yaml", [f"data.manifest={json.dumps(str(data))}", "training.max_steps=2",
                                                     "training.batch_size=2", "training.log_every=1", *more])


@pytest.fixture(scope="module")
def ae_run(data2d, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("lcrun") / "run"
    train_ldm(_config(data2d), run, stage="autoencoder", progress=False)
    return run


def _family(cfg, run: Path, store: str) -> tuple[LdmFamily, dict]:
    cfg = cfg.model_copy(deep=True)
    cfg.model.diffusion.latent_cache = LatentCacheConfig(store=store, crops_per_case=2)
    data = build_training_data(validated_manifest(cfg.data.manifest), cfg.data, seed=cfg.training.seed)
    rt = Runtime(config=cfg, run_dir=run, device=torch.device("cpu"), stage="diffusion")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family = LdmFamily(cfg, data.info, rt)
    data.pool_per_case = 2  # the engine asks family.crop_pool(); every family here gets the pool's crops
    batch = data.collate([data.sample(g) for g in range(3)], one_hot_labels=False)
    return family, with_one_hot(batch, data.info.num_labels)


def test_cached_and_uncached_steps_give_the_same_latents_and_loss(data2d, ae_run):
    cfg = _config(data2d)
    plain, batch = _family(cfg, ae_run, "off")
    assert plain.crop_pool() is None
    assert batch["index"].min() >= POOL_BASE  # pool crops: the same index each time a crop is drawn
    first, _ = _family(cfg, ae_run, "disk")  # encodes and stores the batch's crops
    assert first.crop_pool() == 2
    ref = plain.training_latents(batch, 5)
    assert torch.allclose(first.training_latents(batch, 5), ref, atol=1e-6)
    assert (first.cache.hits, first.cache.misses) == (0, 3)
    second, _ = _family(cfg, ae_run, "disk")  # another process: reads the rows from RUN/latents
    assert second.cache.filled == 3
    assert torch.allclose(second.training_latents(batch, 5), ref, atol=1e-6)
    assert (second.cache.hits, second.cache.misses) == (3, 0)
    memory, _ = _family(cfg, ae_run, "memory")
    memory.training_latents(batch, 0)  # fill
    losses = [f.train_step(batch, 0)["mse"].item() for f in (plain, second, memory)]
    assert memory.cache.hits == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)


def test_a_changed_autoencoder_invalidates_the_cache(data2d, ae_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ae_run, run)
    cfg = _config(data2d)
    family, batch = _family(cfg, run, "disk")
    family.training_latents(batch, 0)
    stored = sorted(p.name for p in (run / CACHE_DIR / "rank0").iterdir())
    assert len(stored) == 2 and _family(cfg, run, "disk")[0].cache.filled == 3
    # the autoencoder trained on: a newer checkpoint with other weights
    folder = checkpoint_dir(run, "autoencoder")
    _, state = ck.load_latest_checkpoint(folder)
    weights = state["family_state"]["modules"]["autoencoder"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 0.01
    state["step"] = int(state["step"]) + 1
    ck.save_checkpoint(folder, state["step"], state, keep_last=5)
    changed, _ = _family(cfg, run, "disk")
    assert changed.cache.filled == 0
    assert not set(stored) & {p.name for p in (run / CACHE_DIR / "rank0").iterdir()}  # stale rows removed
    changed.training_latents(batch, 0)
    assert changed.cache.misses == 3


def test_the_memory_bound_decides_the_store():
    row = (2, 4, 16, 16, 16)  # 128 KiB a crop
    assert plan_store(LatentCacheConfig(store="auto", memory_gib=1.0), 100, row).store == "memory"
    plan = plan_store(LatentCacheConfig(store="auto", memory_gib=0.01), 100, row)
    assert (plan.store, plan.nbytes) == ("disk", 100 * 2 * 4 * 16**3 * 4)
    with pytest.raises(ConfigError, match="memory_gib"):
        plan_store(LatentCacheConfig(store="memory", memory_gib=0.01), 100, row)


def test_a_cached_run_trains_and_resumes_exactly(data2d, ae_run, tmp_path):
    import shutil

    more = ("model.diffusion.latent_cache.store=memory", "model.diffusion.latent_cache.crops_per_case=1",
            "training.checkpoint_every=2")
    runs = {}
    for name, stops in (("straight", (5,)), ("resumed", (2, 5))):
        run = tmp_path / name
        shutil.copytree(ae_run, run)
        for i, steps in enumerate(stops):
            train_ldm(_config(data2d, *more, f"training.max_steps={steps}", "model.autoencoder.max_steps=2"), run,
                      stage="diffusion", resume=i > 0, progress=False)
        runs[name] = torch.load(run / "checkpoints/diffusion/step_00000005.pt", weights_only=True)
    a, b = (runs[k]["family_state"]["modules"]["unet"] for k in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "straight" / "model_card.json").read_text())
    assert card["model"]["latent_cache"] == {"store": "memory", "crops": 4, "encoded": 4}
    assert np.isfinite(runs["straight"]["losses"]["mse"])
