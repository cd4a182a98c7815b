"""Synthetic pairs for a whole training batch, made in the training process on the training device.

:class:`RandSyntheticPaird` and :class:`~medsynth.synthesis.online.SyntheticMixDataset` make one pair
at a time, in loader workers, on the CPU. :class:`SyntheticBatch` is the other way for a trained run
(``gan``, ``ldm``): called in the training loop on a batch, it deforms and edits the chosen samples'
masks on the CPU (the pair core's :func:`~medsynth.synthesis.pairs.draw_label`), then generates every
image of one attempt in one batched ``Synthesizer.generate`` call on the run's device (the training
GPU), and checks each with the pair core's QC. A sample whose draws all fail QC keeps its real pair
and is counted: the loop never stops for it.

The masks are generated on their own grid (no resampling to the run's training spacing, unlike
``generate_volume``): give batches at the run's voxel size, or use ``RandSyntheticPaird``.

Seeds: step ``s`` picks its samples from ``seed_sequence(seed, MixTag.BATCH, s)`` and sample ``i``'s
pair comes from ``seed_sequence(seed, MixTag.BATCH, s, i)`` (attempt streams as in the pair core).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth.data.labels import as_label_array
from medsynth.data.transforms import DeformConfig, EditConfig
from medsynth.errors import ConfigError, DataError
from medsynth.runcard import read_run_card
from medsynth.seeds import MixTag, seed_sequence
from medsynth.synthesis.online import OnlinePairs
from medsynth.synthesis.pairs import (
    PairSource,
    QCConfig,
    agreement_reference,
    attempt_streams,
    draw_label,
    load_synthesizer,
    model_seed,
    pair_problem,
)
from medsynth.synthesis.procedural import IntensityStats, fit_intensity_stats

__all__ = ["SyntheticBatch", "SyntheticBatchResult"]


@dataclass(frozen=True)
class SyntheticBatchResult:
    """image ``(B, C, *spatial)`` and label ``(B, 1, *spatial)`` (the input's kind, dtype and device);
    replaced ``(B,)`` bool (CPU): which samples are synthetic; qc_fallbacks: chosen samples that kept
    their real pair because every draw failed QC."""

    image: torch.Tensor
    label: torch.Tensor
    replaced: torch.Tensor
    qc_fallbacks: int


class SyntheticBatch:
    """Replace each sample of a batch with probability ``prob`` by a synthetic pair of the trained run
    ``model``, generated batched on ``device`` (``auto``: CUDA when there is one).

    deform, edits, qc, labels, spacing, intensity_stats, generate_kwargs: as in
    :class:`~medsynth.synthesis.online.RandSyntheticPaird` (``spacing``: mm per voxel of the batch's grid,
    default 1 mm). ``qc_fallbacks``: the running count over every call."""

    def __init__(self, model: str | Path, prob: float = 0.5, *, device: str = "auto", seed: int = 0,
                 deform: DeformConfig | Mapping[str, object] | None = None,
                 edits: EditConfig | Mapping[str, object] | None = None,
                 qc: QCConfig | Mapping[str, object] | None = None, labels: Sequence[int] | None = None,
                 spacing: Sequence[float] | None = None, intensity_stats: Sequence[IntensityStats] | None = None,
                 generate_kwargs: Mapping[str, object] | None = None) -> None:
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= float(prob) <= 1.0:
            raise ConfigError(f"prob must be a number in [0, 1], got {prob!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        family = read_run_card(Path(model).expanduser().resolve()).family
        self.pairs = OnlinePairs.build(
            method=family, deform=deform, edits=edits, synthseg=None, classic=None, labels=labels, spacing=spacing,
            intensity_stats=intensity_stats, match_range=None, model=model, device=device,
            generate_kwargs=generate_kwargs, qc=qc)
        self.synthesizer = load_synthesizer(Path(model).expanduser().resolve(), device)
        self.prob, self.seed = float(prob), int(seed)
        self.qc_fallbacks = 0

    def __call__(self, image: torch.Tensor, label: torch.Tensor, step: int) -> SyntheticBatchResult:
        """image ``(B, C, *spatial)``, label ``(B, 1, *spatial)`` label values, of training step ``step``."""
        if image.ndim not in (4, 5) or label.shape != (image.shape[0], 1, *image.shape[2:]):
            raise DataError(f"SyntheticBatch: image {tuple(image.shape)} and label {tuple(label.shape)}: expected "
                            "(B, C, *spatial) and (B, 1, *spatial)")
        b, nd = image.shape[0], image.ndim - 2
        # 1. which samples: one draw per sample from the step's stream
        chosen = np.random.default_rng(seed_sequence(self.seed, MixTag.BATCH, step)).random(b) < self.prob
        replaced = torch.zeros(b, dtype=torch.bool)
        if not chosen.any():
            return SyntheticBatchResult(image, label, replaced, 0)
        spacing = self.pairs.spacing[:nd] if self.pairs.spacing is not None else (1.0,) * nd
        affine = np.diag([*spacing, *([1.0] * (4 - nd))])
        images = image.detach().float().cpu().numpy()
        labels = label.detach().cpu().numpy()[:, 0]
        sources = {i: PairSource(images[i], as_label_array(labels[i], f"SyntheticBatch sample {i}"), affine)
                   for i in np.flatnonzero(chosen).tolist()}
        settings = self.pairs.settings
        agreement = agreement_reference(self.synthesizer) if settings.qc.label_agreement else None
        options = dict(self.pairs.generate_kwargs)
        made: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        pending = sorted(sources)
        # 2. attempts: every pending mask drawn on the CPU, their images generated in one batched call
        for attempt in range(settings.qc.max_tries):
            if not pending:
                break
            streams = {i: attempt_streams(seed_sequence(self.seed, MixTag.BATCH, step, i), attempt) for i in pending}
            values = {i: list(self.pairs.labels) if self.pairs.labels is not None
                      else [int(v) for v in np.unique(sources[i].label)] for i in pending}
            masks = {i: draw_label(sources[i], settings, values[i], streams[i])[0] for i in pending}
            out = self.synthesizer.generate([masks[i] for i in pending], [model_seed(streams[i]) for i in pending],
                                            **options)  # type: ignore[arg-type]
            still = []
            for k, i in enumerate(pending):
                # 3. QC of each sample, against its own intensity range unless one is given
                img = np.asarray(out[k], dtype=np.float32)
                img = img[None] if img.ndim == nd else img
                src = sources[i]
                stats = (list(self.pairs.intensity_stats) if self.pairs.intensity_stats is not None
                         else [fit_intensity_stats([(src.images[c], src.label)]) for c in range(src.images.shape[0])])
                ranges = [s.plausible(settings.qc.range_margin) for s in stats]
                problem = pair_problem(img, masks[i], src, settings, labels=values[i], ranges=ranges,
                                       agreement=agreement)
                if problem is None:
                    made[i] = (img, masks[i])
                else:
                    still.append(i)
            pending = still
        # 4. the batch: synthetic where QC passed, real elsewhere (a failure never stops the loop)
        if pending:
            self.qc_fallbacks += len(pending)
            warnings.warn("SyntheticBatch: a synthetic pair failed quality control; the real pair was used instead "
                          "(counted in qc_fallbacks; training goes on)", stacklevel=2)
        new_image, new_label = image.clone(), label.clone()
        for i, (img, lab) in made.items():
            new_image[i] = torch.from_numpy(img).to(device=image.device, dtype=image.dtype)
            new_label[i, 0] = torch.from_numpy(lab).to(device=label.device, dtype=label.dtype)
            replaced[i] = True
        return SyntheticBatchResult(new_image, new_label, replaced, len(pending))
