"""Pretrained MAISI / NV-Generate CT bundles: read safely, labels remapped, sampled on the mask's own grid.

- :mod:`~medsynth.bundles.reader`: the bundle folder read as data (allow-listed ``_target_``, no ``$`` code);
- :mod:`~medsynth.bundles.networks`: MONAI 1.6's MAISI networks filled from the weights (``weights_only=True``);
- :mod:`~medsynth.bundles.labels`: the user's labels -> the bundle's vocabulary (a YAML mapping), body label 200;
- :mod:`~medsynth.bundles.geometry`: size and spacing fitted to the bundle's limits, and back;
- :mod:`~medsynth.bundles.sampler`: mask -> CT image in HU;
- :mod:`~medsynth.bundles.random_bundle`: bundles of random weights in the published layouts (tests, benchmarks).

Imports flow downward only (data, errors, safe_yaml, safe_weights); nothing here imports training or jobs.
"""

from __future__ import annotations

__all__ = ["is_bundle"]


def is_bundle(path: object) -> bool:
    """Whether ``path`` is a folder laid out like a MONAI bundle (``configs/inference.json``), not a run."""
    from pathlib import Path

    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / "configs" / "inference.json").is_file() and not (p / "model_card.json").exists()
