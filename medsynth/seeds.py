"""Seeds: one derivation and one named tag per random stream.

Two ways to derive independent randomness from a job seed, both from numpy's ``SeedSequence``:

- :func:`derive_seed` ``(seed, Stream.X, ...)`` -> a 63-bit int for a ``torch.Generator``
  (training steps, fixed evaluation noise, the synthesizer's per-item latents);
- :func:`seed_sequence` ``(seed, Tag.X, ...)`` -> a ``SeedSequence`` whose spawn key names the
  purpose (the augment job's per-case draws, the online dataset's per-epoch draws).

Every purpose has its own tag below; a tag number is never used for two purposes within one
derivation, and the numbers are part of the output (changing one changes what a seed makes).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["SEED_MAX", "CaseTag", "DownstreamTag", "MixTag", "PairStream", "Stream", "derive_seed", "seed_sequence"]

#: the largest job seed: seeds feed numpy's SeedSequence and torch.Generator.manual_seed (a signed
#: 64-bit integer), so every seed option and setting accepts 0 .. 2**63 - 1
SEED_MAX = 2**63 - 1


class Stream(IntEnum):
    """Tags of :func:`derive_seed` (the second value, after the job seed)."""

    #: engine: ``Runtime.generator(step, stream)`` -> (seed, TRAIN_STEP, step, rank, stream)
    TRAIN_STEP = 7
    #: GAN family: the fixed noise of its evaluation and previews
    GAN_EVAL = 11
    #: synthesizer: the latent of item k of one ``generate`` call -> (seed, SYNTH_ITEM, k)
    SYNTH_ITEM = 13
    #: LDM family: the fixed noise of its evaluation and previews -> (seed, LDM_EVAL, sub-stream)
    LDM_EVAL = 17
    #: downstream: a segmenter's initial weights -> (seed, SEGMENTER_INIT, fold)
    SEGMENTER_INIT = 19
    #: synthesizer: the label means drawn for one ``generate`` call of a per-case-fill run -> (seed, APPEARANCE)
    APPEARANCE = 23
    #: LDM family: the flips of pool crop p of the cached-latent pool -> (seed, LATENT_POOL, p)
    LATENT_POOL = 29


class CaseTag(IntEnum):
    """First spawn-key element of the augment job's per-case streams."""

    SOURCE = 0  #: (SOURCE, epoch): the order the source cases are drawn in
    DONOR = 1  #: (DONOR, k): the donor case of synthetic case k
    ATTEMPT = 2  #: (ATTEMPT, k, attempt, PairStream): one try at making case k
    FIELD = 3  #: (FIELD, k): the bank field (target, scale) that warps synthetic case k's source (--anatomy bank:)


class PairStream(IntEnum):
    """Last spawn-key element of one attempt at a synthetic pair."""

    DEFORM = 0  #: the mask deformation
    EDIT = 1  #: the label edits
    IMAGE = 2  #: the training-free image synthesis
    MODEL = 99  #: the seed handed to a trained run's ``generate``


class MixTag(IntEnum):
    """First spawn-key element of :class:`medsynth.synthesis.online.SyntheticMixDataset` and
    :class:`medsynth.synthesis.online_batch.SyntheticBatch` streams."""

    LAYOUT = 0  #: (LAYOUT, epoch): which items are real and which synthetic
    REAL = 1  #: the order of the real items
    SOURCE = 2  #: the order of the source masks
    ITEM = 3  #: (ITEM, epoch, i): the synthetic pair of item i
    TRANSFORM = 4  #: (TRANSFORM, epoch, i): the seed of the user's transform for item i
    BATCH = 5  #: SyntheticBatch: (BATCH, step) which samples of a step's batch; (BATCH, step, i) sample i's pair


class DownstreamTag(IntEnum):
    """First spawn-key element of ``medsynth downstream`` streams."""

    BATCH = 5  #: (BATCH, fold, step): the draws of one segmenter training step
    FOLDS = 6  #: (FOLDS,) with seed 0: the K-fold assignment of the real cases
    BOOTSTRAP = 7  #: (BOOTSTRAP, k) with seed 0: the bootstrap of comparison k


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy SeedSequence; order matters).

    Call it as ``derive_seed(seed, Stream.X, ...)`` so each purpose draws from its own stream."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    """``SeedSequence(seed, spawn_key=key)``: the stream of one purpose (``key[0]`` a tag above)."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=tuple(int(k) for k in key))
