"""The user's label values mapped onto a bundle's vocabulary (``configs/label_dict.json``).

A mapping is a small YAML file (read with :func:`medsynth.safe_yaml.read_yaml_file`)::

    labels:            # the dataset's label value -> the bundle's label name (or value)
      1: liver
      2: hepatic tumor
      3: spare         # a class the vocabulary lacks: its first unused value (0..255, not 200)
    body: outline      # label 200 (body) from the mask's outline; none: leave it out

Background 0 maps to 0. A mask value the mapping does not list is refused by name: nothing is guessed.
``medsynth bundle-labels`` writes a first mapping from the dataset's label names by name similarity,
with the score beside each line, for the user to check.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

from medsynth.bundles.reader import Bundle
from medsynth.errors import CheckpointError, ConfigError, DataError
from medsynth.safe_yaml import read_yaml_file

__all__ = ["BODY_LABEL", "LabelMapping", "Suggestion", "add_body", "apply_mapping", "mapping_text",
           "read_mapping", "spare_values", "suggest_mapping"]

#: the bundle's body label: inside the body, no organ
BODY_LABEL = 200
SPARE = "spare"


@dataclass
class LabelMapping:
    """user label value -> bundle label value (0 -> 0 always); body: how label 200 is made."""

    values: dict[int, int]
    body: Literal["outline", "none"] = "outline"
    names: dict[int, str] = field(default_factory=dict)  # user value -> the bundle name it maps to
    source: str = "label mapping"

    @property
    def new_classes(self) -> dict[int, int]:
        """user value -> bundle value of the classes placed in spare slots."""
        return {k: v for k, v in self.values.items() if self.names.get(k) == SPARE}

    def to_facts(self) -> dict[str, object]:
        """The mapping as JSON-able facts (a fine-tuned run's card keeps them: sampling needs no file)."""
        return {"values": {str(k): int(v) for k, v in self.values.items()},
                "names": {str(k): str(v) for k, v in self.names.items()}, "body": self.body, "source": self.source}

    @classmethod
    def from_facts(cls, facts: object, where: str) -> LabelMapping:
        """:meth:`to_facts` read back; CheckpointError naming ``where`` when they are not such facts."""
        try:
            if not isinstance(facts, dict):
                raise TypeError
            values = {int(k): int(v) for k, v in facts["values"].items()}
            names = {int(k): str(v) for k, v in facts.get("names", {}).items()}
            body = facts.get("body", "outline")
            if body not in ("outline", "none") or not all(0 <= v < 256 for v in values.values()):
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CheckpointError(f"{where}: field 'model.label_mapping' is not a label mapping medsynth wrote") from None
        return cls(values=values, body=body, names=names, source=str(facts.get("source", where)))


def spare_values(bundle: Bundle) -> list[int]:
    """Label values 1..255 the bundle's vocabulary leaves unused (the body label 200 excluded)."""
    used = set(bundle.label_dict.values()) | {0, BODY_LABEL}
    return [v for v in range(1, 256) if v not in used]


def read_mapping(path: str | Path, bundle: Bundle) -> LabelMapping:
    """Read and check a mapping file against ``bundle``; ConfigError naming the file and the key."""
    path = Path(path)
    raw = read_yaml_file(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("labels"), dict) or not raw["labels"]:
        raise ConfigError(f"{path}: expected a 'labels' mapping of dataset label value -> bundle label name")
    extra = sorted(set(raw) - {"labels", "body", "bundle"})
    if extra:
        raise ConfigError(f"{path}: unknown key {extra[0]!r} (known: labels, body, bundle)")
    body = raw.get("body", "outline")
    if body not in ("outline", "none"):
        raise ConfigError(f"{path}: key 'body' is {body!r}; expected outline or none")
    by_value = bundle.label_names
    spares = iter(spare_values(bundle))
    values: dict[int, int] = {0: 0}
    names: dict[int, str] = {0: "background"}
    for key, target in raw["labels"].items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ConfigError(f"{path}: key labels.{key!r} is not a label value (a whole number >= 0)")
        where = f"{path}: key labels.{key}"
        if key == 0:
            if target not in (0, "background", None):
                raise ConfigError(f"{where}: background 0 maps to the bundle's background 0, not {target!r}")
            continue
        if target == SPARE:
            value = next(spares, None)
            if value is None:
                raise ConfigError(f"{where}: the bundle's vocabulary has no unused value left for a new class")
            names[key] = SPARE
        elif isinstance(target, str) and target in bundle.label_dict:
            value, names[key] = bundle.label_dict[target], target
        elif isinstance(target, int) and not isinstance(target, bool) and target in by_value:
            value, names[key] = target, by_value[target]
        else:
            close = difflib.get_close_matches(str(target), list(bundle.label_dict), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} is {target!r}, not a label of {bundle.root / 'configs' / 'label_dict.json'}"
                              f"{hint}; write a name from it, or 'spare' for a new class")
        if value == BODY_LABEL and body == "outline":
            raise ConfigError(f"{where} maps to the body label {BODY_LABEL}; set body: none when the dataset labels "
                              "the body itself")
        values[key] = value
    return LabelMapping(values=values, body=body, names=names, source=str(path))


def apply_mapping(mask: np.ndarray, mapping: LabelMapping, where: str,
                  dataset_names: dict[int, str] | None = None) -> np.ndarray:
    """``mask`` (any shape, whole label values) as bundle label values (uint8); DataError naming every
    value the mapping does not list (and its dataset name, when known)."""
    values = np.unique(mask)
    unmapped = [int(v) for v in values if int(v) not in mapping.values]
    if unmapped:
        shown = ", ".join(f"{v}" + (f" ({dataset_names[v]})" if dataset_names and v in dataset_names else "")
                          for v in unmapped[:8])
        raise DataError(f"{where}: label value(s) {shown} are not in {mapping.source}; map each to a bundle label "
                        "name (or 'spare') before generating")
    lut = np.zeros(int(values.max()) + 1, np.uint8)
    for user, bundle_value in mapping.values.items():
        if user < len(lut):
            lut[user] = bundle_value
    return lut[np.asarray(mask, np.int64)]


def add_body(mapped: np.ndarray, z_axis: int = 2) -> np.ndarray:
    """``mapped`` with the body label 200 on background voxels inside the labels' outline: the foreground
    closed and its holes filled, slice by slice across ``z_axis`` (each axial slice's own outline)."""
    foreground = mapped > 0
    if not foreground.any():
        return mapped
    closed = ndimage.binary_closing(foreground, structure=np.ones((3, 3, 3), bool), iterations=2) | foreground
    moved = np.moveaxis(closed, z_axis, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    body = np.moveaxis(filled, 0, z_axis) & ~foreground
    out = mapped.copy()
    out[body] = BODY_LABEL
    return out


# ------------------------------------------------------------------------------------ suggestions


@dataclass(frozen=True)
class Suggestion:
    """The best bundle name for one dataset label, its score (0..1) and the runner-up."""

    value: int
    name: str
    target: str
    score: float
    runner_up: str | None


def _words(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def _similarity(a: str, b: str) -> float:
    wa, wb = _words(a), _words(b)
    ratio = difflib.SequenceMatcher(None, wa, wb).ratio()
    ta, tb = set(wa.split()), set(wb.split())
    jaccard = len(ta & tb) / len(ta | tb) if ta | tb else 0.0
    return max(ratio, jaccard)


def suggest_mapping(dataset_labels: dict[int, str], bundle: Bundle, threshold: float = 0.6) -> list[Suggestion]:
    """For each dataset label but background: the most similar bundle label name ('spare' when no
    name scores ``threshold`` or more)."""
    names = [n for n in bundle.label_dict if bundle.label_dict[n] not in (0, BODY_LABEL)]
    out = []
    for value, name in sorted(dataset_labels.items()):
        if value == 0:
            continue
        ranked = sorted(names, key=lambda n: (-_similarity(name, n), n))
        best = ranked[0] if ranked else None
        score = _similarity(name, best) if best else 0.0
        target = best if best is not None and score >= threshold else SPARE
        out.append(Suggestion(value, name, target, round(score, 2), ranked[1] if len(ranked) > 1 else None))
    return out


def mapping_text(suggestions: list[Suggestion], bundle: Bundle, dataset: str) -> str:
    """The YAML of a first mapping, one commented line per label, for the user to check."""
    lines = [f"# label mapping for the bundle {bundle.root} (written by medsynth bundle-labels from {dataset})",
             "# CHECK EVERY LINE: the names were matched by spelling only. A value maps to a name of the bundle's",
             "# configs/label_dict.json, or to 'spare' (a new class in an unused value, for a fine-tuned ControlNet).",
             f"bundle: {str(bundle.root)!r}", "labels:"]
    for s in suggestions:
        note = f"dataset name {s.name!r}, similarity {s.score:.2f}"
        if s.runner_up:
            note += f", next: {s.runner_up!r}"
        lines.append(f"  {s.value}: {s.target!r}  # {note}")
    lines += ["# body: outline makes label 200 (body) from the outline of the labels; none leaves it out", "body: outline",
              ""]
    return "\n".join(lines)
