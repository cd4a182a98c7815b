"""The model-family registry: the one list of trainable generator families.

A *family* (``gan``, ``ldm``, the next one) is three pieces of code named by lazy ``"module:attr"``
strings, so reading the registry imports no torch:

- ``config``: the pydantic model of the recipe's ``model:`` section (its ``family`` field is a
  ``Literal`` of the family's name); :class:`medsynth.config.Config` validates ``model:`` with it.
- ``trainer``: the :class:`medsynth.training.engine.FamilyBase` subclass the engine trains.
- ``backend``: ``loader(card, device)`` returning the synthesizer backend of a trained run from its
  :class:`medsynth.runcard.RunCard` (see :mod:`medsynth.synthesis.synthesizer`).
- ``stages``: the stages a staged family trains in order (``ldm``: autoencoder, diffusion); ``runner``
  optionally names the function that runs them (``runner(config, run_dir, *, resume, stage,
  progress, allow_changed_data)``); without one, each stage is one call of the engine.

Everything that lists families asks here: the recipe's ``model.family`` choices, the CLI, the
method lists of ``medsynth augment`` and the online API (:func:`method_names`). A new family is its
own modules plus one :func:`register_family` call (in this file for a built-in family; anywhere
before use for a plug-in or a test).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from medsynth.errors import ConfigError

#: label-map -> image methods that need no trained run
TRAINING_FREE_METHODS: tuple[str, ...] = ("synthseg", "classic")


@dataclass(frozen=True)
class Family:
    """One model family. Every code reference is a lazy ``"module:attr"`` string.

    name: the value of ``model.family`` in a recipe and of ``family`` in a run card.
    summary: one line for listings (``medsynth train --help``).
    config: the pydantic model of the recipe's ``model`` section.
    trainer: the engine's FamilyBase subclass.
    backend: the synthesizer backend loader ``loader(card, device)``.
    stages: stage names in training order (empty: one stage).
    runner: the function that trains the stages in order (None: the engine's own loop per stage).
    """

    name: str
    summary: str
    config: str
    trainer: str
    backend: str
    stages: tuple[str, ...] = ()
    runner: str | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Add ``family`` (registering a name again replaces the earlier entry)."""
    if not family.name.isidentifier() or family.name in TRAINING_FREE_METHODS:
        raise ConfigError(f"family name {family.name!r}: must be an identifier and not one of "
                          f"{', '.join(TRAINING_FREE_METHODS)}")
    for field_name in ("config", "trainer", "backend"):
        target = getattr(family, field_name)
        if ":" not in target:
            raise ConfigError(f"family {family.name!r}: {field_name} {target!r} is not 'module:attr'")
    _FAMILIES[family.name] = family


def unregister_family(name: str) -> None:
    """Remove ``name`` (for tests that register a temporary family); unknown names are ignored."""
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order."""
    return tuple(_FAMILIES)


def get_family(name: str) -> Family:
    """The family registered as ``name``; ConfigError naming the known families otherwise."""
    family = _FAMILIES.get(str(name))
    if family is None:
        raise ConfigError(f"model family {name!r} is unknown (known: {', '.join(family_names())})")
    return family


def load_object(target: str) -> object:
    """Import ``"module:attr"`` (``attr`` may be dotted) and return the attribute.

    ConfigError when the module or attribute does not exist; an import error inside an existing
    module propagates unchanged (it is a bug, not a user mistake)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{target!r}: expected 'module:attr'")
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ConfigError(f"{target!r}: module {module_name} is not installed") from None
        raise
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{target!r}: {module_name} has no attribute {attr!r}") from None
    return obj


def method_names() -> tuple[str, ...]:
    """Every label-map -> image method: the training-free ones, then the registered families."""
    return TRAINING_FREE_METHODS + family_names()


def is_model_method(name: str) -> bool:
    """True when ``name`` is a registered family (a method that needs a trained run)."""
    return name in _FAMILIES


register_family(Family(
    name="gan",
    summary="mask-conditioned SPADE GAN with a multi-scale patch discriminator (one stage)",
    config="medsynth.config:GanModelConfig",
    trainer="medsynth.training.gan:GanFamily",
    backend="medsynth.synthesis.gan:load_gan_backend",
))
register_family(Family(
    name="ldm",
    summary="latent diffusion: AutoencoderKL, then a mask-conditioned diffusion UNet on its latents",
    config="medsynth.config:LdmModelConfig",
    trainer="medsynth.training.ldm:LdmFamily",
    backend="medsynth.synthesis.ldm:load_ldm_backend",
    stages=("autoencoder", "diffusion"),
    runner="medsynth.training.ldm:train_ldm",
))
register_family(Family(
    name="maisi_controlnet",
    summary="the ControlNet of a downloaded MAISI CT bundle fine-tuned on your pairs (UNet and autoencoder frozen)",
    config="medsynth.bundles.finetune_config:MaisiControlNetConfig",
    trainer="medsynth.training.maisi:MaisiControlNetFamily",
    backend="medsynth.synthesis.maisi:load_maisi_backend",
))

__all__ = [
    "TRAINING_FREE_METHODS",
    "Family",
    "family_names",
    "get_family",
    "is_model_method",
    "load_object",
    "method_names",
    "register_family",
    "unregister_family",
]
