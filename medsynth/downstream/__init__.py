"""``medsynth downstream``: does synthetic data make a segmenter better than classic augmentation?

The job (:mod:`~medsynth.downstream.run`), its inputs (:mod:`~medsynth.downstream.data`), the segmenter
(:mod:`~medsynth.downstream.segmenter`), the metrics and the bootstrap (:mod:`~medsynth.downstream.metrics`)
and the output folder (:mod:`~medsynth.downstream.report`).

The package itself is callable: ``medsynth.downstream(train, test, synthetic, out=..., seeds=...)`` is
:func:`~medsynth.downstream.run.downstream` and returns a :class:`DownstreamSummary`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from medsynth.downstream.data import DownstreamWarning
from medsynth.downstream.run import (
    Comparison,
    DownstreamOptions,
    DownstreamSummary,
    SeedStat,
    VariantResult,
    downstream,
    run_downstream,
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


class _CallablePackage(types.ModuleType):
    """``medsynth.downstream`` is both this package and the function of the public API."""

    def __call__(self, *args: Any, **kwargs: Any) -> DownstreamSummary:
        return downstream(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
