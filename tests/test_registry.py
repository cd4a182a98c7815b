"""The family registry: the one list of families; everything that lists families asks it."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from medsynth.errors import ConfigError
from medsynth.registry import (
    TRAINING_FREE_METHODS,
    Family,
    family_names,
    get_family,
    is_model_method,
    load_object,
    method_names,
    register_family,
    unregister_family,
)


def test_builtin_families_and_method_lists() -> None:
    assert family_names()[:2] == ("gan", "ldm")
    assert method_names()[:4] == ("synthseg", "classic", "gan", "ldm")
    assert method_names() == TRAINING_FREE_METHODS + family_names()
    assert is_model_method("ldm") and not is_model_method("synthseg") and not is_model_method("vae")
    assert get_family("ldm").stages == ("autoencoder", "diffusion") and get_family("gan").stages == ()
    with pytest.raises(ConfigError, match=r"model family 'vae' is unknown \(known: gan, ldm"):
        get_family("vae")


@pytest.mark.parametrize("name", ["gan", "ldm"])
def test_each_registered_piece_is_what_it_claims(name: str) -> None:
    """The lazy strings resolve: a ModelSection whose family literal is the name, a FamilyBase
    subclass, a backend loader taking (card, device), and a runner for a staged family."""
    import inspect

    from medsynth.config import ModelSection
    from medsynth.training.engine import FamilyBase, family_class

    fam = get_family(name)
    config = load_object(fam.config)
    assert isinstance(config, type) and issubclass(config, ModelSection)
    assert typing.get_args(config.model_fields["family"].annotation) == (name,)
    assert config().family == name
    assert family_class(name) is load_object(fam.trainer) and issubclass(family_class(name), FamilyBase)
    assert list(inspect.signature(load_object(fam.backend)).parameters) == ["card", "device"]
    assert (fam.runner is not None) == bool(fam.stages)


def test_register_replace_and_unregister() -> None:
    fake = Family(name="fake", summary="s", config="m:C", trainer="m:T", backend="m:b")
    register_family(fake)
    try:
        assert family_names()[-1] == "fake" and "fake" in method_names()
        register_family(Family(name="fake", summary="other", config="m:C", trainer="m:T", backend="m:b"))
        assert get_family("fake").summary == "other" and family_names().count("fake") == 1
        from medsynth.config import load_config

        # the recipe's model.family choices follow the registry
        with pytest.raises(ConfigError, match=r"'m:C': module m is not installed"):
            load_config(None, ["model.family=fake"])
    finally:
        unregister_family("fake")
    assert "fake" not in family_names()
    with pytest.raises(ConfigError, match="not one of synthseg, classic"):
        register_family(Family(name="synthseg", summary="s", config="m:C", trainer="m:T", backend="m:b"))
    with pytest.raises(ConfigError, match="trainer 'nocolon' is not 'module:attr'"):
        register_family(Family(name="x", summary="s", config="m:C", trainer="nocolon", backend="m:b"))


def test_load_object() -> None:
    from medsynth.config import GanModelConfig

    assert load_object("medsynth.config:GanModelConfig") is GanModelConfig
    assert load_object("medsynth.config:GanModelConfig.model_validate") == GanModelConfig.model_validate
    with pytest.raises(ConfigError, match="module medsynth.nowhere is not installed"):
        load_object("medsynth.nowhere:X")
    with pytest.raises(ConfigError, match="has no attribute 'Nope'"):
        load_object("medsynth.config:Nope")
    with pytest.raises(ConfigError, match="expected 'module:attr'"):
        load_object("medsynth.config")


def test_reading_the_registry_and_run_cards_imports_no_torch() -> None:
    code = ("import sys, medsynth.registry, medsynth.runcard, medsynth.seeds, medsynth.distributed, medsynth.config;"
            "medsynth.config.load_config(None, ['model.family=ldm']);"
            "print(sorted(m for m in ('torch', 'monai', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
