"""The nnU-Net v2 raw dataset folder.

``dataset.json`` with ``channel_names``, ``labels`` (name -> value, or a list of values for a
region), ``numTraining`` and ``file_ending``; ``imagesTr/CASE_XXXX<ending>`` (one file per channel,
``XXXX`` the channel index), ``labelsTr/CASE<ending>``, optionally ``imagesTs/`` and ``labelsTs/``.
The file names are the manifest: a written dataset needs every case's files at
:meth:`NnunetFormat.image_paths` / :meth:`NnunetFormat.label_path` inside its folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from medsynth.data.formats.base import Case, FormatNote, Manifest, ManifestFormat, load_json, parse_channels
from medsynth.data.nifti import NIFTI_SUFFIXES
from medsynth.errors import ConfigError, DataError

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
#: the folder name nnU-Net v2 looks a dataset up by (``-d NNN``)
DATASET_FOLDER_RE = re.compile(r"Dataset\d{3}_[A-Za-z0-9][A-Za-z0-9_.\-]*")
_TOP_LEVEL = {"channel_names", "labels", "file_ending", "numTraining", "name"}


def _looks_nnunet(path: Path) -> bool:
    try:
        data = load_json(path)
    except DataError:
        return False
    return "channel_names" in data and "training" not in data


def image_path(root: Path, case_id: str, channel: int, file_ending: str = ".nii.gz", split: str = "train") -> Path:
    """``root/imagesTr/CASE_XXXX<ending>`` (``imagesTs`` for the test split)."""
    sub = "imagesTs" if split == "test" else "imagesTr"
    return Path(root) / sub / f"{case_id}_{channel:04d}{file_ending}"


def label_path(root: Path, case_id: str, file_ending: str = ".nii.gz", split: str = "train") -> Path:
    """``root/labelsTr/CASE<ending>`` (``labelsTs`` for the test split)."""
    sub = "labelsTs" if split == "test" else "labelsTr"
    return Path(root) / sub / f"{case_id}{file_ending}"


class NnunetFormat(ManifestFormat):
    name = "nnunet"
    manifest_name = "dataset.json"
    places_cases = True

    def sniff(self, path: Path) -> bool:
        path = Path(path)
        if path.is_dir():
            return (path / "dataset.json").is_file() and _looks_nnunet(path / "dataset.json")
        return path.is_file() and path.suffix.lower() == ".json" and _looks_nnunet(path)

    def manifest_file(self, source: Path) -> Path:
        source = Path(source)
        return source / "dataset.json" if source.is_dir() else source

    def dataset_path(self, folder: Path) -> Path:
        return Path(folder)

    def read(self, path: Path) -> Manifest:
        folder = (Path(path) if Path(path).is_dir() else Path(path).parent).resolve()
        path = folder / "dataset.json"
        data = load_json(path)
        for key in ("channel_names", "labels", "file_ending"):
            if key not in data:
                raise DataError(f"{path}: missing \"{key}\" (required by nnU-Net v2)")
        ending = str(data["file_ending"])
        channels = parse_channels(data["channel_names"], path)
        raw_labels = data["labels"]
        if not isinstance(raw_labels, dict):
            raise DataError(f"{path}: \"labels\" must map names to integers")
        labels: dict[int, str] = {}
        for name, value in raw_labels.items():
            values = value if isinstance(value, list) else [value]  # region-based labels
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise DataError(f"{path}: label {name!r} has value {v!r}, expected a non-negative integer")
                labels.setdefault(v, str(name))
        cases: list[Case] = []
        for sub, split in (("imagesTr", "train"), ("imagesTs", "test")):
            img_dir = folder / sub
            if not img_dir.is_dir():
                if sub == "imagesTr":
                    raise DataError(f"{folder}: missing imagesTr/ folder")
                continue
            groups: dict[str, dict[int, Path]] = {}
            for f in sorted(img_dir.iterdir()):
                if f.name.startswith(".") or not f.name.endswith(ending):
                    continue
                m = _CHANNEL_RE.match(f.name[: -len(ending)])
                if not m:
                    raise DataError(f"{f}: image name must end in _XXXX{ending} (channel index)")
                groups.setdefault(m["case"], {})[int(m["ch"])] = f
            for case_id, chans in sorted(groups.items()):
                missing = [i for i in range(len(channels)) if i not in chans]
                if missing:
                    names = ", ".join(f"{case_id}_{i:04d}{ending}" for i in missing)
                    raise DataError(f"{img_dir}: case {case_id} lacks channel file(s) {names}")
                extra_ch = sorted(set(chans) - set(range(len(channels))))
                if extra_ch:
                    raise DataError(f"{img_dir}: case {case_id} has channel(s) {extra_ch} not in channel_names")
                label = label_path(folder, case_id, ending, split)
                cases.append(Case(
                    case_id=case_id,
                    images=[chans[i] for i in range(len(channels))],
                    label=label if (split == "train" or label.exists()) else None,
                    split=split,
                ))
        meta = {k: v for k, v in data.items() if k not in _TOP_LEVEL}
        return Manifest(
            format=self.name,
            cases=cases,
            labels=dict(sorted(labels.items())),
            channels=channels,
            name=str(data.get("name", folder.name)),
            file_ending=ending,
            source=folder,
            root=folder,
            # the labels object as written (region-based labels map one name to several values)
            meta={"declared_numTraining": data.get("numTraining"), "declared_labels": raw_labels, **meta},
        )

    def check(self, manifest: Manifest) -> list[FormatNote]:
        """``numTraining`` against the cases found, files ignored for their ending, orphan labels."""
        root = Path(manifest.root or manifest.source or ".")
        notes: list[FormatNote] = []
        ending = manifest.file_ending
        train = [c for c in manifest.cases if c.split != "test"]
        declared = manifest.meta.get("declared_numTraining")
        if declared is None:
            notes.append(FormatNote("error", root / "dataset.json", "missing \"numTraining\" (required by nnU-Net v2)"))
        elif not isinstance(declared, int) or isinstance(declared, bool):
            notes.append(FormatNote("error", root / "dataset.json", f"numTraining must be a whole number, got "
                                    f"{declared!r} ({type(declared).__name__})"))
        elif declared != len(train):
            notes.append(FormatNote("error", root / "dataset.json",
                                    f"numTraining is {declared} but imagesTr/ holds {len(train)} cases"))
        for sub in ("imagesTr", "labelsTr"):
            folder = root / sub
            if not folder.is_dir():
                if sub == "labelsTr":
                    notes.append(FormatNote("error", folder, "missing labelsTr/ folder"))
                continue
            other = sorted(f.name for f in folder.iterdir() if not f.name.startswith(".") and not f.name.endswith(ending))
            if other:
                shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
                notes.append(FormatNote("warning", folder, f"{len(other)} file(s) ignored, not ending in file_ending "
                                        f"{ending!r}: {shown}"))
        labels_dir = root / "labelsTr"
        if labels_dir.is_dir():
            ids = {c.case_id for c in train}
            for f in sorted(labels_dir.iterdir()):
                if f.name.endswith(ending) and not f.name.startswith(".") and f.name[: -len(ending)] not in ids:
                    notes.append(FormatNote("error", f, "label file has no image in imagesTr/"))
        return notes

    def text(self, manifest: Manifest, root: Path) -> str:
        m = manifest
        for c in m.cases:
            want = self.image_paths(root, c.case_id, len(c.images), m.file_ending, c.split)
            if [p.resolve() for p in c.images] != [p.resolve() for p in want]:
                raise DataError(f"case {c.case_id}: nnU-Net needs its files at {want[0].parent}; place them first")
        data: dict[str, Any] = {
            "channel_names": {str(i): n for i, n in enumerate(m.channels)},
            "labels": _labels_object(m),
            "numTraining": sum(1 for c in m.cases if c.split != "test"),
            "file_ending": m.file_ending,
            "name": m.name,
        }
        data.update({k: v for k, v in m.meta.items() if k not in data and not k.startswith("declared_")})
        return json.dumps(data, indent=2) + "\n"

    def output_ending(self, manifest: Manifest) -> str:
        """The dataset's own ``file_ending``, which must be NIfTI (medsynth writes NIfTI only)."""
        if manifest.file_ending not in NIFTI_SUFFIXES:
            raise DataError(
                f"{manifest.source}: nnU-Net file_ending {manifest.file_ending!r} is not NIfTI; "
                "medsynth writes .nii.gz/.nii only (convert the dataset first)"
            )
        return manifest.file_ending

    def output_name(self, manifest: Manifest, folder: Path) -> str:
        """The folder's name when it is an nnU-Net dataset name ``DatasetNNN_Name``, else the input's."""
        return Path(folder).name if DATASET_FOLDER_RE.fullmatch(Path(folder).name) else manifest.name

    def export_ending(self, manifest: Manifest) -> str | None:
        """``.nii`` when every file of ``manifest`` is an uncompressed NIfTI, else ``.nii.gz``."""
        files = [f for c in manifest.cases for f in [*c.images, *([c.label] if c.label is not None else [])]]
        return ".nii" if files and all(str(f).lower().endswith(".nii") for f in files) else ".nii.gz"

    def export_manifest(self, manifest: Manifest, folder: Path, name: str | None) -> Manifest:
        """nnU-Net v2's rules: the folder is named ``DatasetNNN_Name`` (how ``-d NNN`` finds it), which
        is also the default ``name``; the labels are 0, 1, 2, ... with 0 called ``background``."""
        folder = Path(folder)
        if not DATASET_FOLDER_RE.fullmatch(folder.name):
            raise ConfigError(f"--out {folder}: nnU-Net finds a dataset by its folder name DatasetNNN_Name (three "
                              "digits, then a name), e.g. Dataset002_Brain; name the folder so")
        labels = dict(manifest.labels or {0: "background"})
        values = sorted(labels)
        if values[0] != 0 or values != list(range(len(values))):
            gaps = sorted(set(range(values[-1] + 1)) - set(values))
            raise DataError(f"{manifest.source}: nnU-Net needs the label values 0, 1, 2, ... without gaps; this dataset "
                            f"has {values} (missing {gaps}); relabel it first")
        labels[0] = "background"
        return super().export_manifest(replace(manifest, labels=labels), folder, name)

    def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
        return [image_path(root, case_id, c, ending, split) for c in range(channels)]

    def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
        return label_path(root, case_id, ending, split)


def _labels_object(m: Manifest) -> dict[str, Any]:
    """nnU-Net's name -> value(s) map: the one read from an nnU-Net dataset.json when it still
    describes the same values (region-based entries kept), else built from ``m.labels``."""
    labels = m.labels or {0: "background"}
    declared = m.meta.get("declared_labels")
    if isinstance(declared, dict):
        values = {v for x in declared.values() for v in (x if isinstance(x, list) else [x])}
        if values == set(labels):
            return dict(declared)
    out: dict[str, Any] = {}
    for value, name in sorted(labels.items()):
        out[name if name not in out else f"{name}_{value}"] = value  # names must stay unique keys
    return out
