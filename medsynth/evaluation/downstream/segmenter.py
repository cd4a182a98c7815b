"""The segmenter of ``medsynth downstream``: a MONAI UNet or DynUNet, its batches, its training loop.

- **Size** (:func:`plan_segmenter`): the patch is the largest case extent per axis, capped at 256
  (2D) or 96 (3D) voxels, then rounded up to a multiple of the network's total stride. The network
  has one level per halving of the smallest patch side down to at least 4 voxels (3 to 5 levels);
  level ``i`` has ``base * 2**i`` channels (base 16 by default), capped at 256 (2D) / 320 (3D).
  ``unet``: ``monai.networks.nets.UNet`` with one residual unit per level; ``dynunet``:
  ``monai.networks.nets.DynUNet`` (nnU-Net's two 3x3 convolutions per level, no deep supervision).
- **Batches** (:class:`TrainingPool`): each of the ``B`` samples of a step is a synthetic case with
  probability ``1 - real_fraction`` (only when synthetic cases are given), else a real one; the case is
  then uniform within its group. A patch-sized window is taken (a third of the time centred on a
  random foreground voxel, else uniform; a whole axis when the case is no larger than the patch).
  With ``classic``, the window plus a margin of 1/8 patch per side goes through the ``classic`` chain
  of ``medsynth augment`` (:func:`medsynth.data.transforms.classic_pair`: one random affine + elastic
  deformation of image and label together, then MONAI's random bias field, gamma, scaling and noise)
  and the centre is kept. Every channel is then z-scored with its case's own mean and standard
  deviation (over the whole case, before augmentation) and the window is padded to the patch
  (image 0, label background). Every draw of step ``t`` comes from ``(seed, fold, t)``, and the same
  number of draws is made whatever the variant, so two variants with the same seed see the same
  real cases at the same steps.
- **Training**: ``DiceCELoss`` (softmax, one-hot targets), AdamW (lr 2e-3, weight decay 1e-4) with a
  polynomial decay (power 0.9) to 0 over the step budget; weights initialised from ``(seed, fold)``.
- **Inference**: ``sliding_window_inference`` with the patch as window, overlap 0.25, Gaussian
  weighting; the argmax of the softmax.

Shapes: images ``(C, *spatial)``, batches ``(B, C, *patch)`` float32 and ``(B, 1, *patch)`` int64
class indices (position of the label value in the sorted label set).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medsynth.errors import ConfigError
from medsynth.evaluation.downstream.data import LoadedCase
from medsynth.seeds import DownstreamTag, Stream, derive_seed, seed_sequence

if TYPE_CHECKING:
    import torch

Network = Literal["unet", "dynunet"]
NETWORKS: tuple[str, ...] = ("unet", "dynunet")
PATCH_CAP = {2: 256, 3: 96}
CHANNEL_CAP = {2: 256, 3: 320}
FOREGROUND_FRACTION = 1.0 / 3.0
LEARNING_RATE = 2e-3


# ------------------------------------------------------------------------------------ the network


@dataclass(frozen=True)
class SegmenterSpec:
    """The segmenter's architecture. patch: training window and inference window (voxels)."""

    network: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    patch: tuple[int, ...]
    channels: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.channels)

    def build(self) -> torch.nn.Module:
        """A fresh network (weights from torch's current random state)."""
        from monai.networks.nets import DynUNet, UNet

        d, n = self.spatial_dims, self.levels
        if self.network == "unet":
            return UNet(d, self.in_channels, self.num_classes, channels=self.channels, strides=(2,) * (n - 1),
                        num_res_units=1, norm="INSTANCE")
        return DynUNet(d, self.in_channels, self.num_classes, kernel_size=[3] * n, strides=[1] + [2] * (n - 1),
                       upsample_kernel_size=[2] * (n - 1), filters=list(self.channels), deep_supervision=False)

    def describe(self) -> str:
        what = "MONAI UNet (1 residual unit per level)" if self.network == "unet" else "MONAI DynUNet"
        patch = "x".join(str(p) for p in self.patch)
        return f"{what}, {self.spatial_dims}D, {self.levels} levels, channels {list(self.channels)}, patch {patch}"


def plan_segmenter(network: str, spatial_dims: int, in_channels: int, num_classes: int,
                   shapes: Sequence[tuple[int, ...]], *, base_channels: int | None = None,
                   patch_size: int | None = None) -> SegmenterSpec:
    """Size the segmenter from the training cases' ``shapes`` (see the module docstring).

    patch_size: cap on each patch side instead of 256 (2D) / 96 (3D). base_channels: default 16."""
    if network not in NETWORKS:
        raise ConfigError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
    cap = PATCH_CAP[spatial_dims] if patch_size is None else int(patch_size)
    extent = [max(s[a] for s in shapes) for a in range(spatial_dims)]
    patch = [min(e, cap) for e in extent]
    levels = int(np.clip(math.floor(math.log2(max(min(patch), 4) / 4)) + 1, 3, 5))
    stride = 2 ** (levels - 1)
    patch = [int(math.ceil(p / stride) * stride) for p in patch]
    base = 16 if base_channels is None else int(base_channels)
    channels = tuple(min(base * 2**i, CHANNEL_CAP[spatial_dims]) for i in range(levels))
    return SegmenterSpec(network, spatial_dims, in_channels, num_classes, tuple(patch), channels)


# ------------------------------------------------------------------------------------ batches


def label_lut(labels: Sequence[int]) -> np.ndarray:
    """``lut[value]`` = class index of a label value (its position in sorted ``labels``); -1 elsewhere."""
    values = sorted(int(v) for v in labels)
    lut = np.full(max(values) + 1, -1, dtype=np.int64)
    lut[values] = np.arange(len(values))
    return lut


def case_stats(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``image`` ``(C, *spatial)``, each ``(C,)`` float32."""
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    return flat.mean(axis=1).astype(np.float32), np.maximum(flat.std(axis=1), 1e-8).astype(np.float32)


def normalise(image: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per-channel z-score of ``image`` ``(C, *spatial)`` with ``stats`` = (mean, std), float32."""
    mean, std = stats
    shape = (-1,) + (1,) * (image.ndim - 1)
    return ((image - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32)


def _pad_to(array: np.ndarray, patch: Sequence[int], value: float) -> np.ndarray:
    """Pad the last ``len(patch)`` axes of ``array`` to ``patch`` (centred)."""
    lead = array.ndim - len(patch)
    pads = [(0, 0)] * lead
    for n, p in zip(array.shape[lead:], patch):
        extra = max(p - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(array, pads, constant_values=value) if any(p != (0, 0) for p in pads) else array


class TrainingPool:
    """Training batches for one variant, seed and fold (see the module docstring for the rule).

    real, synthetic: the cases to draw from (``synthetic`` may be empty). ranges: per channel
    (low, high) intensity range of the real training set for the ``classic`` chain.
    """

    def __init__(self, real: list[LoadedCase], synthetic: list[LoadedCase], *, patch: tuple[int, ...],
                 labels: Sequence[int], ranges: list[tuple[float, float]], classic: bool, real_fraction: float,
                 seed: int, fold: int) -> None:
        from medsynth.data.transforms import ClassicConfig, DeformConfig

        if not real:
            raise ConfigError("a training fold has no real cases (use fewer --folds)")
        self.real, self.synthetic = real, synthetic
        self.patch, self.ranges, self.classic = patch, ranges, classic
        self.real_fraction = real_fraction if synthetic else 1.0
        self.seed, self.fold = seed, fold
        self.lut = label_lut(labels)
        self.deform, self.intensity = DeformConfig.model_validate({}), ClassicConfig.model_validate({})  # augment's defaults
        self._stats = {id(c): case_stats(c.image) for c in [*real, *synthetic]}
        self._fg = {id(c): np.flatnonzero(c.label.reshape(-1) != 0) for c in [*real, *synthetic]}

    def _sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from medsynth.data.transforms import classic_pair

        d = len(self.patch)
        # 1. the same draws for every variant: group, case in each group, window, classic stream
        u_group = rng.random()
        i_real = int(rng.integers(len(self.real)))
        i_syn = int(rng.integers(max(len(self.synthetic), 1)))
        use_fg, u_fg, u_start = rng.random() < FOREGROUND_FRACTION, rng.random(), rng.random(d)
        classic_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        case = self.synthetic[i_syn] if u_group >= self.real_fraction else self.real[i_real]
        # 2. the window (plus the classic margin) inside the case
        shape, fg = case.shape, self._fg[id(case)]
        centre = np.unravel_index(int(fg[int(u_fg * fg.size)]), shape) if use_fg and fg.size else None
        outer, inner = [], []
        for a, (n, p) in enumerate(zip(shape, self.patch)):
            if n <= p:
                outer.append(slice(0, n))
                inner.append(slice(0, n))
                continue
            start = int(np.clip(centre[a] - p // 2, 0, n - p)) if centre is not None else int(u_start[a] * (n - p + 1))
            margin = p // 8 if self.classic else 0
            lo, hi = max(start - margin, 0), min(start + p + margin, n)
            outer.append(slice(lo, hi))
            inner.append(slice(start - lo, start - lo + p))
        image, label = case.image[tuple([slice(None), *outer])], case.label[tuple(outer)]
        # 3. classic augmentation, then the centre
        if self.classic:
            image, label, _ = classic_pair(image, label, case.spacing, deform=self.deform, intensity=self.intensity,
                                           ranges=self.ranges, rng=classic_rng)
        image, label = image[tuple([slice(None), *inner])], label[tuple(inner)]
        # 4. z-score with the case's statistics, class indices, pad to the patch
        image = _pad_to(normalise(image, self._stats[id(case)]), self.patch, 0.0)
        index = _pad_to(self.lut[label], self.patch, 0)
        return image, index

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s batch: images ``(B, C, *patch)`` float32, class indices ``(B, 1, *patch)`` int64."""

        rng = np.random.default_rng(seed_sequence(self.seed, DownstreamTag.BATCH, self.fold, step))
        samples = [self._sample(rng) for _ in range(batch_size)]
        return np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])[:, None]


# ------------------------------------------------------------------------------------ train / predict


class _StepBatches:
    """Batch ``t`` of a training run as item ``t`` (a map-style dataset for torch's DataLoader)."""

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[t] for t in range(self.steps))

    def __init__(self, pool: TrainingPool, steps: int, batch_size: int) -> None:
        self.pool, self.steps, self.batch_size = pool, steps, batch_size

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        return self.pool.batch(step, self.batch_size)


def train_segmenter(spec: SegmenterSpec, pool: TrainingPool, *, steps: int, batch_size: int, seed: int, fold: int,
                    device: str, workers: int = 0, on_step: Callable[[float], None] | None = None) -> torch.nn.Module:
    """Train a fresh network for ``steps`` steps on ``pool``'s batches; ``on_step(loss)`` after each.

    workers: processes making the batches ahead of the training (0: in this process). The batches
    do not depend on it: batch ``t`` comes from ``(seed, fold, t)`` only."""
    import torch
    from monai.losses import DiceCELoss


    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, Stream.SEGMENTER_INIT, fold))
        net = spec.build()
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps, power=0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batches = _StepBatches(pool, steps, batch_size)
    loader: Iterable[tuple[np.ndarray, np.ndarray]] = batches if workers == 0 else torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers,  # type: ignore[arg-type]
        pin_memory=device.startswith("cuda"))
    for images, targets in loader:
        x = torch.as_tensor(images).to(device, non_blocking=True)
        y = torch.as_tensor(targets).to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(float(loss.detach()))
    return net.eval()


def predict(net: torch.nn.Module, spec: SegmenterSpec, image: np.ndarray, *, device: str,
            batch_size: int) -> np.ndarray:
    """Class indices ``(*spatial)`` int64 for a z-scored image ``(C, *spatial)`` (sliding window)."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    with torch.no_grad():
        logits = sliding_window_inference(x, roi_size=spec.patch, sw_batch_size=batch_size, predictor=net,
                                          overlap=0.25, mode="gaussian")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the network returned {type(logits).__name__}, expected a tensor of logits")
    return logits.argmax(dim=1)[0].cpu().numpy().astype(np.int64)
