"""The recipe reference, ``docs/recipes.md``, generated from the recipe models of :mod:`medsynth.config`.

Every field of every section (and of every registered family's ``model`` section) is listed with its
type, default and description; the descriptions live on the pydantic fields (``Field(description=...)``)
and nowhere else. Regenerate the page after changing a field or a shipped recipe::

    python -m medsynth.recipe_docs > docs/recipes.md

:func:`missing_descriptions` names every field without a description (the tests require none).
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

__all__ = ["FieldDoc", "field_docs", "main", "missing_descriptions", "recipe_reference"]


@dataclass(frozen=True)
class FieldDoc:
    """One row of the reference: ``key`` the dotted path (``data.size``), ``kind`` the accepted
    values, ``default`` as YAML (empty for a section), ``description`` the field's own text."""

    key: str
    kind: str
    default: str
    description: str
    section: bool = False


# ---------------------------------------------------------------------------- rendering types


def _yaml(value: Any) -> str:
    """A default as it is written in a recipe (YAML flow style)."""
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value, default=str)


def _constraints(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        inner = item.metadata if isinstance(item, FieldInfo) else [item]
        for m in inner:
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                bound = getattr(m, attr, None)
                if bound is not None:
                    parts.append(f"{sign} {bound}")
            least = getattr(m, "min_length", None)
            if least:
                parts.append(f"at least {least} value{'s' if least != 1 else ''}")
    return ", ".join(parts)


def _type_text(tp: Any) -> str:
    """``list of int > 0``, ``2 or 3``, ``number or null``, ... for an annotation."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(_yaml(a) for a in args)
    if origin is Annotated:
        base, cons = _type_text(args[0]), _constraints(list(args[1:]))
        return f"{base} {cons}".strip()
    if origin in (Union, types.UnionType):
        parts = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "section"
    names = {bool: "true/false", int: "integer", float: "number", str: "text", Path: "path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _family_sections() -> list[tuple[str, type[BaseModel]]]:
    """(family name, its ``model`` config class) for every registered family."""
    from medsynth.registry import family_names, get_family, load_object

    out = []
    for name in family_names():
        cls = load_object(get_family(name).config)
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            out.append((name, cls))
    return out


def field_docs(model: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every field of ``model`` and, depth first, of its sub-sections, as :class:`FieldDoc` rows
    (``prefix`` is prepended to the keys: ``"data."``)."""
    from medsynth.config import ModelSection

    rows = []
    for name, info in model.model_fields.items():
        key = prefix + name
        tp = info.annotation
        sub = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
        cons = _constraints(list(info.metadata))
        optional = get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)
        if cons and optional:  # "number > 0 or null", not "number or null > 0"
            kind = " or ".join(_type_text(a) for a in get_args(tp) if a is not type(None)) + f" {cons} or null"
        else:
            kind = f"{_type_text(tp)} {cons}".strip()
        default = "" if sub is not None or info.is_required() else _yaml(info.get_default(call_default_factory=True))
        rows.append(FieldDoc(key, kind, default, (info.description or "").strip(), section=sub is not None))
        if sub is not None and sub is not ModelSection:  # a family's section is documented per family
            rows.extend(field_docs(sub, key + "."))
    return rows


def missing_descriptions() -> list[str]:
    """Dotted keys of every recipe field (all sections, every registered family) without a description."""
    from medsynth.config import Config

    rows = field_docs(Config) + [r for _, cls in _family_sections() for r in field_docs(cls, "model.")]
    return [r.key for r in rows if not r.description]


# ---------------------------------------------------------------------------- the page


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[FieldDoc]) -> list[str]:
    out = ["| key | accepts | default | unit and effect |", "|---|---|---|---|"]
    for r in rows:
        default = f"`{r.default}`" if r.default else ("(section)" if r.section else "")
        out.append(f"| `{r.key}` | {_cell(r.kind)} | {_cell(default)} | {_cell(r.description)} |")
    return out


def _recipe_table() -> list[str]:
    """The shipped training recipes: name, family, dim, training crop, steps, batch, first comment line."""
    from medsynth.config import load_config
    from medsynth.recipes import list_recipes

    out = ["| recipe | family | dim | data.size | steps | batch | what it is |", "|---|---|---|---|---|---|---|"]
    for recipe in list_recipes():
        if recipe.kind != "train":
            continue
        cfg = load_config(recipe.path)
        steps = str(cfg.training.max_steps)
        stage_steps = [getattr(getattr(cfg.model, s, None), "max_steps", None) for s in ("autoencoder", "diffusion")]
        if any(v is not None for v in stage_steps):
            steps = " + ".join(str(min(v if v is not None else cfg.training.max_steps, cfg.training.max_steps))
                               for v in stage_steps)
        size = "x".join(str(s) for s in cfg.data.size)
        out.append(f"| `{recipe.name}` | {cfg.model.family} | {cfg.data.dim}D | {size} | {steps} | "
                   f"{cfg.training.batch_size} | {_cell(recipe.description)} |")
    return out


def _memory_table() -> list[str]:
    """Each shipped training recipe's parameters and estimated peak training memory per stage, from the
    memory model of ``medsynth train --dry-run`` (:func:`medsynth.training.memory.estimate_memory`)."""
    from medsynth.config import load_config
    from medsynth.data.limits import format_bytes
    from medsynth.recipes import list_recipes
    from medsynth.training.memory import DEFAULT_DEVICE_MEMORY, estimate_memory

    out = ["| recipe | stage | parameters | parameters + optimiser | activations | estimated peak | "
           f"fits {format_bytes(DEFAULT_DEVICE_MEMORY)} |", "|---|---|---|---|---|---|---|"]
    for recipe in list_recipes():
        if recipe.kind != "train":
            continue
        for e in estimate_memory(load_config(recipe.path)):
            out.append(f"| `{recipe.name}` | {e.stage or '-'} | {e.parameters:,} | {format_bytes(e.parameter_bytes)} | "
                       f"{format_bytes(e.activation_bytes)} | {format_bytes(e.peak_bytes)} | "
                       f"{'yes' if e.peak_bytes <= DEFAULT_DEVICE_MEMORY else 'no'} |")
    return out


def _choice_table() -> list[str]:
    """Which recipe for which data and machine, naming the shipped recipes of each row."""
    from medsynth.config import load_config
    from medsynth.recipes import list_recipes

    found: dict[tuple[str, int], list[str]] = {}
    for recipe in list_recipes():
        if recipe.kind == "train":
            tier = recipe.name.split("/")[0] if "/" in recipe.name else "full"
            found.setdefault((tier, load_config(recipe.path).data.dim), []).append(f"`{recipe.name}`")

    def names(tier: str, dim: int) -> str:
        return ", ".join(found.get((tier, dim), [])) or "none shipped yet"

    return [
        "| your data | your machine | recipes | what to expect |",
        "|---|---|---|---|",
        f"| any, to try medsynth out | any CPU | {names('tiny', 2)} (2D); {names('tiny', 3)} (3D) | seconds; "
        "the pipeline runs end to end, the images are not meant to look real |",
        f"| 2D images, or 3D volumes learned as 2D slices, 128-256 px | a laptop or desktop CPU | "
        f"{names('small', 2)} | a first real model in minutes (see each recipe's line below) |",
        f"| 3D volumes, 64-96 voxels per side | a laptop or desktop CPU | {names('small', 3)} | a first real 3D "
        "model in tens of minutes |",
        f"| 2D, any size | one GPU | {names('full', 2)} | hours; `gan` samples fast, `ldm` gives the most "
        "realistic and varied images |",
        f"| 3D | one large GPU (40-140 GB) | {names('full', 3)} | hours to days; torchrun for several GPUs |",
    ]


_GUIDE = """\
## Things that are easy to get wrong

- **`data.size` is a random crop, not a resize.** Each training step sees a random patch (3D) or a
  random crop of a slice (2D) of that many voxels; volumes smaller than it are padded with background.
  Generation is fully convolutional and works on the whole mask at its own size, so `data.size` sets
  the memory and time per step and how much context the model sees, not the output size. Each side
  must be a multiple of the model's downsampling factor (the error message names it).
- **2D recipes on 3D volumes** train on slices along `data.slice_axis` and generate a 3D mask slice by
  slice, without continuity between slices. `medsynth train` warns about it before training starts;
  use a 3D recipe (`data.dim: 3`) for 3D generation.
- **`data.foreground_slices`** (2D recipes on 3D volumes) draws training slices only among those that
  hold a foreground label, so the model does not spend its steps on empty slices beyond the anatomy.
- **`--max-steps` applies per stage for `ldm`.** `medsynth train ldm2d --max-steps 100` trains the
  autoencoder for at most 100 steps and then the diffusion UNet for at most 100 steps
  (`training.max_steps` caps `model.autoencoder.max_steps` and `model.diffusion.max_steps`).
- **Resuming** (`--resume`) accepts changes to {mutable} only; anything else is a new run.
- **Threads.** A training process uses `training.threads` CPU threads (0 = auto: `OMP_NUM_THREADS`
  when set, else the cores the process may run on, at most 32) and says so at the start ("using N CPU
  threads"). On a machine shared with other jobs, set your share.
- **Units.** Sizes are voxels, spacings millimetres, steps optimisation steps; intensities are the
  dataset's own (HU for CT) on the way in and out, [0, 1] inside the model.

Every run writes `RUN/report.md` with `RUN/curves.png` (all logged losses, evaluations marked) at each
checkpoint and at the end; `medsynth report RUN` rebuilds them, also during training.
"""


def recipe_reference() -> str:
    """The text of ``docs/recipes.md``."""
    from medsynth.config import Config, DataConfig, OptimizerConfig, TrainingConfig
    from medsynth.training.engine import RESUME_MUTABLE
    from medsynth.training.memory import ASSUMED_CHANNELS, ASSUMED_LABELS

    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by `python -m medsynth.recipe_docs > docs/recipes.md` from the field descriptions in",
        "medsynth/config.py and the shipped recipes; edit those, not this page. -->",
        "",
        "A recipe is a YAML file with four sections: `data` (what to train on), `model` (the family and its",
        "networks), `optimizer` and `training` (the loop). `medsynth recipes` lists the shipped ones; pass a",
        "name (`tiny/gan2d`) or a file to `medsynth train`, and change any field with `--set key=value`",
        "(a dotted key, a YAML value). An unknown or badly typed field is refused with every problem listed.",
        "",
        "```bash",
        "medsynth recipes",
        "```",
        "",
        "```python",
        "from medsynth.config import load_config",
        "from medsynth.recipes import recipe_path",
        "",
        'cfg = load_config(recipe_path("tiny/gan2d"), ["data.size=[64, 64]", "training.threads=2"])',
        "assert cfg.data.size == [64, 64] and cfg.training.threads == 2",
        "```",
        "",
        "## Which recipe for my data and machine",
        "",
        *_choice_table(),
        "",
        "The shipped training recipes (steps: per stage for `ldm`):",
        "",
        *_recipe_table(),
        "",
        "Estimated training memory per stage (`medsynth train RECIPE --dry-run` prints the same): the memory",
        "model counts the trained parameters (16 bytes each: weight, gradient, two Adam moments; 4 more for an EMA",
        "copy) and runs one training step on the meta device (shapes only, nothing allocated), summing the tensors",
        "autograd saves for the backward pass between optimiser steps (float32; attention fused, without its",
        "tokens x tokens matrix, where a GPU recipe uses PyTorch's scaled-dot-product attention), plus the",
        "gradients in flight during the backward pass (2x the largest saved tensor) and 4 MiB a step that does",
        "not scale. On the CPU it is within 12 % of the measured peak RSS growth of the tiny and small recipes",
        "(`benchmarks/memory_model.py`; tested for the tiny ones).",
        f"It assumes {ASSUMED_LABELS} labels and {ASSUMED_CHANNELS} image channel (`--dry-run` reads both from the "
        "manifest when one is given); bf16 autocast on a GPU roughly halves the activations. The `ldm` diffusion",
        "stage needs the trained autoencoder and is not estimated, nor is `maisi_controlnet` (its networks come from",
        "a downloaded bundle; docs/maisi.md gives MAISI's published figures).",
        "",
        *_memory_table(),
        "",
        _GUIDE.format(mutable=", ".join(f"`{k}`" for k in sorted(RESUME_MUTABLE))).rstrip(),
        "",
        "## Every field",
        "",
        "Sections in recipe order; a key's unit and effect are its description.",
        "",
        *_table([r for r in field_docs(Config) if not r.section and "." not in r.key]),
        "",
    ]

    def section(title: str, cls: type[BaseModel], prefix: str) -> list[str]:
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        return [f"### {title}", "", summary, "", *_table(field_docs(cls, prefix)), ""]

    lines += section("data", DataConfig, "data.")
    for name, cls in _family_sections():
        lines += section(f"model (family `{name}`)", cls, "model.")
    lines += section("optimizer", OptimizerConfig, "optimizer.")
    lines += section("training", TrainingConfig, "training.")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    """Print the reference (``python -m medsynth.recipe_docs > docs/recipes.md``)."""
    sys.stdout.write(recipe_reference())


if __name__ == "__main__":
    main()
