"""Stage 2's cached latents: the frozen autoencoder's posterior of each pool crop, kept after its first
encoding (``model.diffusion.latent_cache``).

The diffusion stage then trains on a fixed pool of crops (``crops_per_case`` per case, the engine's
``crop_pool``: :meth:`medsynth.data.loader.TrainingData.pool_item`), and crop ``p`` is encoded once,
the first time it is drawn. A row holds its posterior mean and standard deviation ``(2, Cz, *latent)``
float32, so every step still draws its own ``z = mu + sigma * eps``: a cached step computes the same
loss as an uncached one on the same batch.

Where the rows live: host memory (a ``(items, 2, Cz, *latent)`` tensor), or a ``.npy`` memory map per
process in ``RUN/latents/rank<r>/`` beside a ``.filled.npy`` flag per row (a row is flagged after its
bytes are flushed, so a killed run never reads a half-written row). A store is named by its
fingerprint (:func:`cache_fingerprint`: the autoencoder's weights, the training data, the pool's
settings); opening one removes that folder's stores of any other fingerprint, so a resumed run with
a changed autoencoder or dataset never reuses stale latents.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medsynth.config import LatentCacheConfig
from medsynth.errors import ConfigError

__all__ = ["CACHE_DIR", "LatentCache", "cache_fingerprint", "plan_store"]

#: the cache's folder inside the run folder
CACHE_DIR = "latents"
#: part of every fingerprint: a change of the row layout invalidates every store on disk
_FORMAT = 1


def cache_fingerprint(**parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (keys sorted): the identity of one cache's rows."""
    text = json.dumps({"format": _FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class StorePlan:
    """Where a cache of ``items`` rows of ``row_shape`` float32 goes, and its size in bytes."""

    store: Literal["memory", "disk"]
    items: int
    row_shape: tuple[int, ...]
    nbytes: int


def plan_store(cfg: LatentCacheConfig, items: int, row_shape: tuple[int, ...]) -> StorePlan:
    """``cfg.store`` resolved against ``cfg.memory_gib``: ``auto`` is memory when the rows fit it, else
    disk. ConfigError for ``memory`` when they do not fit, naming both sizes."""
    nbytes = items * math.prod(row_shape) * 4
    bound = cfg.memory_gib * 2**30
    if cfg.store == "memory" and nbytes > bound:
        raise ConfigError(f"model.diffusion.latent_cache.store: memory: the cache of {items} crops needs "
                          f"{nbytes / 2**30:.2f} GiB, above latent_cache.memory_gib {cfg.memory_gib:g} (raise it, "
                          "lower crops_per_case, or use store: disk or auto)")
    if cfg.store in ("memory", "disk"):
        store: Literal["memory", "disk"] = cfg.store
    else:
        store = "memory" if nbytes <= bound else "disk"
    return StorePlan(store, items, tuple(row_shape), nbytes)


class LatentCache:
    """Rows ``(2, Cz, *latent)`` float32 keyed by pool crop ``0 <= key < items``.

    ``folder`` None: in memory; else a memory map in ``folder`` named by ``fingerprint`` (stores of
    other fingerprints there are removed). ``hits`` / ``misses`` count the keys looked up."""

    def __init__(self, plan: StorePlan, *, fingerprint: str, folder: Path | None = None) -> None:
        self.plan = plan
        self.fingerprint = fingerprint
        self.hits = 0
        self.misses = 0
        self.folder = folder
        shape = (plan.items, *plan.row_shape)
        if plan.store == "memory" or folder is None:
            self._rows: torch.Tensor | np.memmap = torch.empty(shape, dtype=torch.float32)
            self._filled: torch.Tensor | np.memmap = torch.zeros(plan.items, dtype=torch.bool)
            return
        folder.mkdir(parents=True, exist_ok=True)
        name = fingerprint[:32]
        for old in folder.iterdir():
            if not old.name.startswith(name):
                old.unlink()  # another autoencoder's, dataset's or pool's rows
        rows, flags = folder / f"{name}.npy", folder / f"{name}.filled.npy"
        reuse = rows.is_file() and flags.is_file()
        if reuse:
            r = np.load(rows, mmap_mode="r+", allow_pickle=False)
            f = np.load(flags, mmap_mode="r+", allow_pickle=False)
            reuse = r.shape == shape and r.dtype == np.float32 and f.shape == (plan.items,)
        if not reuse:
            r = np.lib.format.open_memmap(rows, mode="w+", dtype=np.float32, shape=shape)
            f = np.lib.format.open_memmap(flags, mode="w+", dtype=np.uint8, shape=(plan.items,))
        self._rows, self._filled = r, f

    @property
    def filled(self) -> int:
        """Rows encoded so far."""
        return int(np.count_nonzero(np.asarray(self._filled)))

    def missing(self, keys: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: which of ``keys`` (``(N,)`` int64, CPU) have no row yet (counted as misses)."""
        idx = keys.numpy()
        have = np.asarray(self._filled[idx]).astype(bool)
        self.misses += int((~have).sum())
        self.hits += int(have.sum())
        return torch.from_numpy(~have)

    def put(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Store ``rows`` ``(N, 2, Cz, *latent)`` (float32, CPU) under ``keys`` ``(N,)``."""
        idx = keys.numpy()
        if isinstance(self._rows, torch.Tensor):
            self._rows[keys] = rows
            self._filled[keys] = True
            return
        self._rows[idx] = rows.numpy()
        self._rows.flush()  # the bytes first, then the flags: a killed run never reads a half-written row
        assert isinstance(self._filled, np.memmap)
        self._filled[idx] = 1
        self._filled.flush()

    def get(self, keys: torch.Tensor) -> torch.Tensor:
        """The rows of ``keys`` ``(N,)`` (each filled): ``(N, 2, Cz, *latent)`` float32 on the CPU."""
        if isinstance(self._rows, torch.Tensor):
            return self._rows[keys]
        return torch.from_numpy(np.ascontiguousarray(self._rows[keys.numpy()]))
