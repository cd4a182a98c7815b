"""The Medical Segmentation Decathlon ``dataset.json`` (under any file name).

``"training": [{"image": ..., "label": ...}]``, optional ``"validation"`` and ``"test"`` lists,
``"labels": {"0": "background", ...}``, ``"modality": {"0": "T1"}``; paths relative to the JSON
file's folder. An entry's ``image`` may be a list (one file per channel); ``case_id`` and any other
field of an entry are kept.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from medsynth.data.formats.base import (
    Case,
    FormatNote,
    Manifest,
    ManifestFormat,
    channel_files,
    label_file,
    load_json,
    parse_channels,
    relative,
    resolve,
)
from medsynth.data.nifti import strip_suffix
from medsynth.errors import DataError

_SPLITS = (("training", "train"), ("validation", "val"), ("test", "test"))
_TOP_LEVEL = {"training", "validation", "test", "labels", "modality", "name", "numTraining", "numTest"}


class MsdFormat(ManifestFormat):
    name = "msd"
    manifest_name = "dataset.json"

    def sniff(self, path: Path) -> bool:
        path = Path(path)
        return (path.is_dir() and (path / "dataset.json").is_file()) or (path.is_file() and path.suffix.lower() == ".json")

    def read(self, path: Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "dataset.json"
        data = load_json(path)
        root = path.parent.resolve()
        labels = _parse_labels(data.get("labels"), path)
        channels = parse_channels(data.get("modality"), path)
        cases: list[Case] = []
        for split_key, split in _SPLITS:
            entries = data.get(split_key, [])
            if entries is None:
                continue
            if not isinstance(entries, list):
                raise DataError(f"{path}: \"{split_key}\" must be a list")
            for i, entry in enumerate(entries):
                cases.append(_entry(entry, i, split_key, split, root, path))
        if "training" not in data:
            raise DataError(f"{path}: no \"training\" list (not an MSD dataset.json)")
        dupes = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
        if dupes:
            raise DataError(f"{path}: duplicate case ids {dupes}")
        return Manifest(
            format=self.name,
            cases=cases,
            labels=labels,
            channels=channels,
            name=str(data.get("name", path.parent.name)),
            file_ending=".nii.gz",
            source=path.resolve(),
            root=root,
            meta={k: v for k, v in data.items() if k not in _TOP_LEVEL},
        )

    def check(self, manifest: Manifest) -> list[FormatNote]:
        """``numTraining`` as declared against the entries of the training list."""
        if manifest.source is None:
            return []
        src = Path(manifest.source)
        try:
            data = json.loads(src.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            return []
        declared = data.get("numTraining") if isinstance(data, dict) else None
        found = len(data.get("training") or []) if isinstance(data, dict) else 0
        if declared is not None and (not isinstance(declared, int) or isinstance(declared, bool)):
            return [FormatNote("warning", src, f"numTraining must be a whole number, got {declared!r} "
                               f"({type(declared).__name__})")]
        if isinstance(declared, int) and declared != found:
            return [FormatNote("warning", src, f"numTraining is {declared} but the training list has {found} entries")]
        return []

    def text(self, manifest: Manifest, root: Path) -> str:
        def entry(c: Case) -> dict[str, Any]:
            imgs = [relative(p, root) for p in c.images]
            e: dict[str, Any] = {"image": imgs[0] if len(imgs) == 1 else imgs}
            if c.label is not None:
                e["label"] = relative(c.label, root)
            if c.case_id != strip_suffix(Path(c.images[0])):
                e["case_id"] = c.case_id
            if c.split not in {"train", "val", "test"}:  # free-text split: keep it
                e["split"] = c.split
            e.update(c.extra)
            return e

        m = manifest
        train = [entry(c) for c in m.cases if c.split not in {"test", "val"}]
        val = [entry(c) for c in m.cases if c.split == "val"]
        test = [entry(c) for c in m.cases if c.split == "test"]
        data: dict[str, Any] = {
            "name": m.name,
            "modality": {str(i): n for i, n in enumerate(m.channels)},
        }
        if m.labels is not None:  # an absent list stays absent (not an empty one)
            data["labels"] = {str(k): v for k, v in m.labels.items()}
        data["numTraining"] = len(train)
        data["numTest"] = len(test)
        data.update({k: v for k, v in m.meta.items() if k not in data and not k.startswith("declared_")})
        data["training"] = train
        if val:
            data["validation"] = val
        data["test"] = test
        return json.dumps(data, indent=2) + "\n"

    def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
        return channel_files(root, case_id, channels, ending, split)

    def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
        return label_file(root, case_id, ending, split)


def _parse_labels(raw: object, path: Path) -> dict[int, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: \"labels\" must be an object like {{\"0\": \"background\"}}")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise DataError(f"{path}: label key {key!r} is not an integer") from None
        if value < 0 or str(value) != str(key).strip():
            raise DataError(f"{path}: label key {key!r} is not a non-negative integer")
        labels[value] = str(name)
    return dict(sorted(labels.items()))


def _entry(entry: object, i: int, split_key: str, split: str, root: Path, path: Path) -> Case:
    if isinstance(entry, str):  # MSD's test list holds bare paths
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise DataError(f"{path}: {split_key}[{i}] needs an \"image\" field")
    image = entry["image"]
    images = [image] if isinstance(image, str) else list(image) if isinstance(image, list) else []
    if not images or not all(isinstance(x, str) for x in images):
        raise DataError(f"{path}: {split_key}[{i}] \"image\" must be a path or a list of paths")
    label = entry.get("label")
    if label is not None and not isinstance(label, str):
        raise DataError(f"{path}: {split_key}[{i}] \"label\" must be a path")
    case_id = str(entry.get("case_id") or strip_suffix(images[0]))
    extra = {k: v for k, v in entry.items() if k not in {"image", "label", "case_id"}}
    return Case(
        case_id=case_id,
        images=[resolve(root, x) for x in images],
        label=None if label is None else resolve(root, label),
        split=str(extra.pop("split", split)),
        extra=extra,
    )
