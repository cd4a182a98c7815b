"""Recipes: pydantic validation (every bad field reported), overrides, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.config import Config, GanModelConfig, LdmModelConfig, load_config
from medsynth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["configs/gan2d.yaml", "configs/gan3d.yaml", "configs/tiny/gan2d.yaml", "configs/tiny/gan3d.yaml"]


@pytest.mark.parametrize("name", RECIPES)
def test_config_shipped_recipes_parse(name: str) -> None:
    from medsynth.models.gan import check_sizes

    cfg = load_config(ROOT / name)
    assert isinstance(cfg.model, GanModelConfig)
    assert len(cfg.data.size) == cfg.data.dim
    check_sizes(cfg.model, cfg.data.size)  # sizes fit the generator factor and discriminator depth
    if "tiny" not in name:
        # full recipes are GPU-sized: at least 96 voxels a side and wide networks
        assert min(cfg.data.size) >= 96 and max(cfg.model.generator.channels) >= 256


def test_config_reports_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "data: {dim: 2, size: [32, 32], ct_window: [5, 1], bogus: 1}\n"
        "model: {generator: {channels: [8, -1]}, what: 2}\n"
        "training: {batch_size: -1, lr: abc}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optimizer.betas=[0.5, 2]"])
    msg = str(err.value)
    assert str(path) in msg and "7 invalid settings" in msg
    for field in ("data.ct_window", "data.bogus: unknown field", "model.generator.channels.1", "model.what",
                  "optimizer.betas", "training.batch_size", "training.lr"):
        assert field in msg, field
    assert "(got -1)" in msg and "(got 'abc')" in msg


def test_config_overrides_are_yaml_scalars(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs/tiny/gan2d.yaml",
                      ["training.max_steps=7", "training.lr=1e-3", "data.size=[16, 16]", "training.ema=null",
                       "model.loss.adversarial=lsgan"])
    assert cfg.training.max_steps == 7 and isinstance(cfg.training.max_steps, int)
    assert cfg.training.lr == pytest.approx(1e-3)
    assert cfg.data.size == [16, 16]
    assert cfg.training.ema is None
    assert cfg.model.loss.adversarial == "lsgan"
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["training.max_steps"])
    with pytest.raises(ConfigError, match="training.nope: unknown field"):
        load_config(None, ["training.nope=1"])
    with pytest.raises(ConfigError, match="training.seed is not a section"):
        load_config(ROOT / "configs/tiny/gan2d.yaml", ["training.seed.x=1"])


def test_config_intensity_normalisation_and_size_rules() -> None:
    cfg = load_config(None, ["data.dim=2", "data.size=[32, 32]"])
    assert cfg.data.mri_percentiles == (0.5, 99.5) and cfg.data.ct_window is None
    ct = load_config(None, ["data.ct_window=[-1000, 1000]"])
    assert ct.data.mri_percentiles is None and ct.data.normalization_mode == "ct_window"
    with pytest.raises(ConfigError, match="either ct_window or mri_percentiles"):
        load_config(None, ["data.ct_window=[0, 1]", "data.mri_percentiles=[1, 99]"])
    with pytest.raises(ConfigError, match="size needs 2 values"):
        load_config(None, ["data.dim=2", "data.size=[32, 32, 32]"])
    with pytest.raises(ConfigError, match="0 <= lo < hi <= 100"):
        load_config(None, ["data.mri_percentiles=[50, 10]"])


def test_config_model_family_union(tmp_path: Path) -> None:
    assert isinstance(load_config(None).model, GanModelConfig)  # default family
    assert isinstance(load_config(None, ["model.family=ldm"]).model, LdmModelConfig)
    with pytest.raises(ConfigError, match=r"model.family: unknown model family 'vae' \(known: gan, ldm, maisi_controlnet\)"):
        load_config(None, ["model.family=vae"])
    # the family's own config class validates the section: bad fields keep their paths
    with pytest.raises(ConfigError, match=r"(?s)2 invalid settings.*model.autoencoder.lr: .*model.generator: unknown field"):
        load_config(None, ["model.family=ldm", "model.autoencoder.lr=-1", "model.generator.channels=[8]"])
    cfg = load_config(None, ["model.family=ldm"])
    assert cfg.to_dict()["model"]["diffusion"]["sampler"] == "rflow"  # dumped as the family's class
    with pytest.raises(ConfigError, match="LdmModelConfig is needed"):
        load_config(None).model_as(LdmModelConfig)
    with pytest.raises(ConfigError, match="weights_path"):
        load_config(None, ["model.loss.perceptual.weight=1"])


def test_config_manifest_paths_and_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "r.yaml").write_text("data: {manifest: data/dataset.json, dim: 2, size: [32, 32]}\n")
    cfg = load_config(sub / "r.yaml")
    assert cfg.data.manifest == (sub / "data/dataset.json").resolve()  # relative to the recipe
    monkeypatch.chdir(tmp_path)
    cli = load_config(sub / "r.yaml", ["data.manifest=other.json"])
    assert cli.data.manifest == (tmp_path / "other.json").resolve()  # relative to the working dir
    again = Config.model_validate(cfg.to_dict())  # the resolved config (RUN/config.yaml) re-validates
    assert again == cfg
    assert load_config(None, []).to_yaml().startswith("name: run")


def test_config_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_one_bad_setting_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["training.steps=2"])
    assert str(info.value) == "config: invalid setting training.steps: unknown field"
