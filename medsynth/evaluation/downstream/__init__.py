"""``medsynth downstream``: does synthetic data make a segmenter better than classic augmentation?

The job (:mod:`~medsynth.evaluation.downstream.run`), its inputs (:mod:`~medsynth.evaluation.downstream.data`), the segmenter
(:mod:`~medsynth.evaluation.downstream.segmenter`), the metrics and the bootstrap (:mod:`~medsynth.evaluation.downstream.metrics`)
and the output folder (:mod:`~medsynth.evaluation.downstream.report`).

The public API is :func:`medsynth.downstream` (``medsynth.downstream(train, test, synthetic, out=...,
seeds=...)``), that is :func:`~medsynth.evaluation.downstream.run.downstream`, which returns a
:class:`DownstreamSummary`.
"""

from __future__ import annotations

from medsynth.evaluation.downstream.data import DownstreamWarning
from medsynth.evaluation.downstream.run import downstream, run_downstream
from medsynth.evaluation.downstream.summary import (
    Comparison,
    DownstreamOptions,
    DownstreamSummary,
    SeedStat,
    VariantResult,
)

__all__ = [
    "Comparison",
    "DownstreamOptions",
    "DownstreamSummary",
    "DownstreamWarning",
    "SeedStat",
    "VariantResult",
    "downstream",
    "run_downstream",
]
