"""The recipe reference (docs/recipes.md, generated from the recipe models) and the up-front warning
of ``medsynth train`` when a 2D recipe meets 3D volumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from medsynth.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "recipes.md"
WARNING = "the recipe is 2D (data.dim: 2) and the volumes are 3D"


def _fields(model: type[BaseModel], prefix: str) -> dict[str, str | None]:
    """Dotted key -> description of every field, walking nested sections (an independent walk)."""
    out: dict[str, str | None] = {}
    for name, info in model.model_fields.items():
        out[prefix + name] = info.description
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel) and name != "model":
            out.update(_fields(tp, f"{prefix}{name}."))
    return out


def _all_fields() -> dict[str, str | None]:
    from medsynth.config import Config
    from medsynth.registry import family_names, get_family, load_object

    found = _fields(Config, "")
    for name in family_names():
        cls = load_object(get_family(name).config)
        assert isinstance(cls, type) and issubclass(cls, BaseModel)
        found.update(_fields(cls, "model."))
    return found


def test_every_recipe_field_has_a_description() -> None:
    from medsynth.recipe_docs import missing_descriptions

    fields = _all_fields()
    assert len(fields) > 80 and "model.autoencoder.decode_tile" in fields and "training.threads" in fields
    assert [k for k, d in fields.items() if not (d and d.strip())] == []
    assert missing_descriptions() == []


def test_a_field_without_description_is_found() -> None:
    from medsynth.recipe_docs import field_docs

    class Inner(BaseModel):
        depth: int = 3

    class Toy(BaseModel):
        size: int = Field(default=2, description="voxels")
        inner: Inner = Field(default_factory=Inner, description="a section")

    rows = field_docs(Toy, "toy.")
    assert [r.key for r in rows if not r.description] == ["toy.inner.depth"]
    assert [(r.key, r.default) for r in rows] == [("toy.size", "2"), ("toy.inner", ""), ("toy.inner.depth", "3")]


def test_committed_reference_is_the_generated_text() -> None:
    from medsynth.recipe_docs import recipe_reference

    assert DOC.read_text(encoding="utf-8") == recipe_reference(), (
        "docs/recipes.md is out of date: run `python -m medsynth.recipe_docs > docs/recipes.md`")


def test_reference_lists_every_field_with_its_default() -> None:
    text = DOC.read_text(encoding="utf-8")
    for key in _all_fields():
        if key not in ("data", "model", "optimizer", "training"):
            assert f"| `{key}` |" in text, key
    for key, accepts, default in (("data.size", "list of integer > 0", "[32, 32, 32]"),
                                  ("training.threads", "integer >= 0", "0"),
                                  ("optimizer.betas", "[number, number]", "[0.5, 0.999]"),
                                  ("optimizer.grad_clip", "number > 0", "null")):
        row = re.search(rf"^\| `{re.escape(key)}` \| ([^|]*) \| `([^`]*)` \|", text, re.M)
        assert row and row.group(1).startswith(accepts) and row.group(2) == default, (key, row and row.groups())
    assert "`data.size` is a random crop" in text and "`--max-steps` applies per stage" in text


def test_recipe_table_lists_every_shipped_training_recipe() -> None:
    text = DOC.read_text(encoding="utf-8")
    shipped = 0
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        if "model" not in recipe:
            continue
        shipped += 1
        name = path.relative_to(ROOT / "configs").with_suffix("").as_posix()
        size = "x".join(str(s) for s in recipe["data"]["size"])
        assert re.search(rf"\| `{re.escape(name)}` \| {recipe['model']['family']} \| {recipe['data']['dim']}D \| "
                         rf"{size} \|", text), name
    assert shipped >= 8


@pytest.fixture(scope="module")
def data3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("p3") / "data", dim=3, cases=2, size=16, seed=0)


def test_2d_recipe_on_3d_volumes_warns_once_before_training(data3d: Path, tmp_path: Path) -> None:
    """Both LDM stages train; the warning comes once, before the summary, which names each stage
    with the last record of that stage in metrics.jsonl."""
    run = tmp_path / "ldm"
    res = CliRunner().invoke(app, ["train", "tiny/ldm2d", "--data", str(data3d), "--out", str(run),
                                   "--max-steps", "2", "--set", "training.log_every=2", "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert res.output.count(WARNING) == 1
    assert "along axis 2" in res.output and res.output.index(WARNING) < res.output.index("trained 2 steps")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in ("autoencoder", "diffusion"):
        last = [r for r in records if r["kind"] == "train" and r.get("stage") == stage][-1]
        shown = " ".join(f"{k}={v:.4g}" for k, v in last.items() if k not in ("kind", "step", "stage",
                                                                               "samples_per_s"))
        assert f"{stage} 2 steps: {shown}" in res.output, res.output


def test_2d_recipe_on_2d_images_does_not_warn(tmp_path: Path) -> None:
    from medsynth.data.phantoms import make_phantom_dataset

    data2d = make_phantom_dataset(tmp_path / "p2", dim=2, cases=2, size=32, seed=0)
    res = CliRunner().invoke(app, ["train", "tiny/gan2d", "--data", str(data2d), "--out", str(tmp_path / "run"),
                                   "--max-steps", "1", "--set", "training.preview_every=0", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert WARNING not in res.output and "trained 1 steps" in res.output
