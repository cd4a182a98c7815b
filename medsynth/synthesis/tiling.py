"""Tiled inference of a fully convolutional generator whose only global operations are instance norms.

A volume larger than a bound (``TileSettings.max_voxels``) is generated tile by tile. Two things would
otherwise make tiles disagree, and both are removed rather than blended away:

1. **Instance-norm statistics.** Each instance norm divides by the mean and variance of its whole input;
   a tile would see only its own. With ``norm_stats="volume"`` (the default) the statistics are the
   whole volume's, streamed: pass ``k`` runs every tile up to the ``k``-th distinct norm input, adds its
   per-channel sum and sum of squares over the tile's *own* region (each voxel counted once, in float64)
   and stops there; the norms already resolved apply the volume's statistics. ``K`` norm inputs take
   ``K`` partial passes and one full pass (about ``K / 2 + 1`` whole forwards of work). ``"tile"``
   normalises each tile by itself (one pass; tiles then differ, see the tests' measurement).
2. **Convolution borders.** With the statistics fixed the generator is a stack of local operators, so an
   output voxel depends only on inputs within its receptive radius (:func:`receptive_radius`, an upper
   bound). Each tile carries a ``halo`` of that many voxels of context whose outputs get weight 0; the
   next ``blend`` voxels ramp up with a raised cosine, and overlapping tiles are averaged by their
   weights. Every weighted voxel is then exact, so the blend only hides float rounding (and, with a
   smaller halo than the radius, the border error).

Tiles start at multiples of the generator's factor, so the coarse noise maps and the area-averaged
conditioning maps of a tile are exact crops of the whole volume's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from typing import Literal

import torch
import torch.nn as nn

from medsynth.errors import ConfigError

__all__ = ["TileSettings", "plan_tiles", "receptive_radius", "tiled_forward"]

#: voxels one forward pass may cover before a volume is tiled (160^3)
DEFAULT_MAX_VOXELS = 160**3

Box = tuple[slice, ...]
NormStats = Literal["volume", "tile"]


@dataclass(frozen=True)
class TileSettings:
    """max_voxels: a volume (or a batch item) with more voxels is tiled, each tile at most this many;
    halo: context voxels per tile side whose outputs are dropped (None: the generator's receptive radius);
    blend: voxels of the raised-cosine ramp between tiles; norm_stats: ``volume`` or ``tile`` (module
    docstring)."""

    max_voxels: int = DEFAULT_MAX_VOXELS
    halo: int | None = None
    blend: int = 8
    norm_stats: NormStats = "volume"

    def __post_init__(self) -> None:
        if self.max_voxels < 1:
            raise ConfigError(f"tile max_voxels: expected a positive number of voxels, got {self.max_voxels}")
        if self.halo is not None and self.halo < 0:
            raise ConfigError(f"tile halo: expected >= 0 voxels, got {self.halo}")
        if self.blend < 0:
            raise ConfigError(f"tile blend: expected >= 0 voxels, got {self.blend}")
        if self.norm_stats not in ("volume", "tile"):
            raise ConfigError(f"tile norm_stats: expected volume or tile, got {self.norm_stats!r}")


def receptive_radius(levels: int, fill_sigma: float = 0.0) -> int:
    """An upper bound (output voxels) of how far a SPADE-ResNet output voxel looks, with fixed norm
    statistics. Walking inwards from ``conv_out`` (1 voxel), block ``k`` at scale ``s = 2 ** (levels - 1 - k)``
    output voxels per voxel (finest first) adds its two 3x3 convolutions and s of nearest-upsampling
    slack (3s) to the path; a path may leave it through the SPADE modulation of its first norm (the two
    convolutions, then the modulation's shared and gamma/beta convolutions on a map averaged over
    cells of s: 5s). ``conv_in`` and its conditioning cell add 2 s_0 at the coarsest level, and the
    fill's Gaussian (``int(4 sigma + 0.5)``) every conditioning path."""
    scales = [2 ** (levels - 1 - k) for k in range(levels)]
    reach, far = 1, 0
    for s in reversed(scales):
        far = max(far, reach + 5 * s)
        reach += 3 * s
    far = max(far, reach + 2 * scales[0])
    return far + (int(4.0 * fill_sigma + 0.5) if fill_sigma > 0 else 0)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _axis_tiles(n: int, tile: int, step: int) -> list[int]:
    """Starts of tiles of ``tile`` voxels every ``step`` covering [0, n) (the last one ends at n)."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, step))
    return [*starts, n - tile]


@dataclass(frozen=True)
class TilePlan:
    """boxes: each tile's slice per spatial axis (output voxels); owned: each tile's own region
    (the tiles' owned regions partition the volume: where its statistics are counted), relative to
    the tile; weights: per axis and tile, the 1D blending weights (the tile's weight is their product)."""

    boxes: list[Box]
    owned: list[Box]
    weights: list[list[torch.Tensor]]


def plan_tiles(spatial: tuple[int, ...], multiple: int, settings: TileSettings, radius: int) -> TilePlan:
    """The tiles of a ``spatial`` volume (each side a multiple of ``multiple``) under ``settings``."""
    halo = _round_up(radius if settings.halo is None else settings.halo, multiple)
    blend = _round_up(settings.blend, multiple)
    side = int(settings.max_voxels ** (1.0 / len(spatial)) + 1e-9) // multiple * multiple
    step = side - 2 * halo - blend
    if step < multiple:
        raise ConfigError(
            f"tile max_voxels={settings.max_voxels}: tiles of {side} voxels per side leave no room beside a "
            f"halo of {halo} and a blend of {blend} voxels on each side (the generator's receptive radius is "
            f"{radius}); raise max_voxels to at least {(2 * halo + blend + multiple) ** len(spatial)}")
    per_axis: list[list[tuple[slice, slice, torch.Tensor]]] = []
    for n in spatial:
        tile = min(side, n)
        starts = _axis_tiles(n, tile, step)
        # own region: split each overlap at its middle (a multiple of the factor)
        cuts = [0] + [(starts[i + 1] + starts[i] + tile) // 2 // multiple * multiple
                      for i in range(len(starts) - 1)] + [n]
        entries = []
        for i, a in enumerate(starts):
            w = torch.ones(tile, dtype=torch.float64)
            for edge, inner in ((a > 0, slice(0, halo)), (a + tile < n, slice(tile - halo, tile))):
                if edge:
                    w[inner] = 0.0
            if blend:
                ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(blend, dtype=torch.float64) + 0.5) / blend)
                if a > 0:
                    w[halo : halo + blend] = ramp
                if a + tile < n:
                    w[tile - halo - blend : tile - halo] = ramp.flip(0)
            entries.append((slice(a, a + tile), slice(cuts[i] - a, cuts[i + 1] - a), w))
        per_axis.append(entries)
    boxes, owned, weights = [], [], []
    for combo in product(*per_axis):
        boxes.append(tuple(c[0] for c in combo))
        owned.append(tuple(c[1] for c in combo))
        weights.append([c[2] for c in combo])
    return TilePlan(boxes, owned, weights)


class _Stop(Exception):
    """Ends a statistics pass at the first norm whose statistics are not known yet."""


class _VolumeNorms:
    """Forward hooks on every instance norm of a network: apply known volume statistics, or collect
    them over the tiles' own regions (module docstring)."""

    def __init__(self, net: nn.Module) -> None:
        self.norms = [m for m in net.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
        self.known: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, 1/std): (N, C) float64
        self.sums: dict[nn.Module, list[torch.Tensor]] = {}  # [sum, sum of squares, count]
        self.collecting: torch.Tensor | None = None
        self.owned: Box = ()
        self.tile_shape: tuple[int, ...] = ()

    def hook(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        known = self.known.get(module)
        if known is not None:
            mean, inv = (t.to(x.dtype).view(*t.shape, *([1] * (x.ndim - 2))) for t in known)
            return (x - mean) * inv
        if self.collecting is not None and x is not self.collecting:
            raise _Stop
        self.collecting = x
        factors = [t // s for t, s in zip(self.tile_shape, x.shape[2:])]
        own = x[(slice(None), slice(None)) + tuple(slice(o.start // f, o.stop // f)
                                                   for o, f in zip(self.owned, factors))].double()
        dims = tuple(range(2, x.ndim))
        acc = [own.sum(dims), (own * own).sum(dims), torch.tensor(float(own[0, 0].numel()), dtype=torch.float64)]
        old = self.sums.get(module)
        self.sums[module] = acc if old is None else [a + b for a, b in zip(old, acc)]
        return output

    def resolve(self) -> None:
        """Turn the sums of this pass into statistics."""
        for module, (s, ss, n) in self.sums.items():
            eps = float(getattr(module, "eps", 1e-5))
            mean = s / n
            var = (ss / n - mean * mean).clamp_min(0.0)
            self.known[module] = (mean, (var + eps).rsqrt())
        self.sums = {}

    @property
    def done(self) -> bool:
        return len(self.known) == len(self.norms)


def _weight(weights: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tile's blending weight ``(*tile)``: the product of its 1D weights."""
    out = weights[0]
    for w in weights[1:]:
        out = out[..., None] * w
    return out.to(device=device, dtype=torch.float32)


@contextlib.contextmanager
def _hooked(net: nn.Module, norms: _VolumeNorms) -> Iterator[None]:
    handles = [m.register_forward_hook(norms.hook) for m in norms.norms]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def tiled_forward(net: nn.Module, run: Callable[[Box], torch.Tensor], spatial: tuple[int, ...], multiple: int,
                  settings: TileSettings, radius: int,
                  progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """The output ``(N, C, *spatial)`` of ``run`` over the whole volume, computed tile by tile.

    run(box): the network's output ``(N, C, *tile)`` for the tile ``box`` (slices in output voxels, starts
    multiples of ``multiple``; it crops its own inputs); net: the network ``run`` calls (its instance norms
    are hooked); radius: its receptive radius (:func:`receptive_radius`); progress: the share done."""
    plan = plan_tiles(spatial, multiple, settings, radius)
    norms = _VolumeNorms(net)
    passes = len(norms.norms) + 1 if settings.norm_stats == "volume" else 1
    calls, done = passes * len(plan.boxes), 0
    with _hooked(net, norms) if settings.norm_stats == "volume" else contextlib.nullcontext():
        # 1. the volume's norm statistics, one norm input per pass
        while settings.norm_stats == "volume" and not norms.done:
            for box, owned in zip(plan.boxes, plan.owned):
                norms.collecting, norms.owned = None, owned
                norms.tile_shape = tuple(b.stop - b.start for b in box)
                with contextlib.suppress(_Stop):
                    run(box)
                done += 1
                if progress is not None:
                    progress(min(1.0, done / calls))
            if not norms.sums:  # no norm was reached: nothing left to learn
                break
            norms.resolve()
        # 2. every tile with the statistics fixed, blended by its weights
        out: torch.Tensor | None = None
        total: torch.Tensor | None = None
        for box, weights in zip(plan.boxes, plan.weights):
            y = run(box).float()
            if out is None or total is None:
                out = torch.zeros((*y.shape[:2], *spatial), dtype=torch.float32, device=y.device)
                total = torch.zeros(spatial, dtype=torch.float32, device=y.device)
            w = _weight(weights, y.device)
            out[(slice(None), slice(None)) + box] += y * w
            total[box] += w
            done += 1
            if progress is not None:
                progress(min(1.0, done / calls))
    if out is None or total is None:  # pragma: no cover - a plan has at least one tile
        raise ConfigError("tiled inference: no tiles")
    if progress is not None:
        progress(1.0)
    return out / total
