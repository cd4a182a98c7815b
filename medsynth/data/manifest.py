"""Dataset manifests: MSD ``dataset.json``, nnU-Net v2 raw folders and CSV, through one record.

``read_manifest(path)`` accepts
- an MSD-style JSON under any name (``"training": [{"image", "label"}]``, ``"labels": {"0": ...}``),
  paths relative to the JSON file's folder;
- an nnU-Net v2 raw folder (or its ``dataset.json``): ``channel_names``, ``labels`` name -> int,
  ``file_ending``, ``imagesTr/CASE_0000<ending>`` (one file per channel), ``labelsTr/CASE<ending>``;
- a CSV with columns ``image,label`` and optional ``case_id,split`` (several channels as
  ``image_0000,image_0001,...`` columns); extra columns become ``Case.extra``.

``write_manifest(manifest, path)`` writes the same three formats. Writers never move volume files:
for nnU-Net the caller puts files at :func:`nnunet_image_path` / :func:`nnunet_label_path`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from medsynth.data.atomic import atomic_write_text
from medsynth.data.nifti import strip_suffix, volume_suffix
from medsynth.errors import DataError

Format = Literal["msd", "nnunet", "csv"]


@dataclass
class Case:
    """One labelled case.

    case_id: unique name within the dataset.
    images: one path per channel (absolute).
    label: the label map's path (absolute), or None for an unlabelled case.
    split: ``"train"``, ``"val"`` or ``"test"`` (free text is kept).
    extra: any other fields the manifest had for this case (kept on round trips).
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """A dataset: its cases and the facts its manifest declares.

    labels: label value -> name (background 0 included), or None when the format has no list.
    channels: channel index -> name (modality), one per image channel.
    source: the file or folder it was read from; root: the folder relative paths resolve against.
    meta: other top-level fields, kept on round trips.
    """

    format: Format
    cases: list[Case]
    labels: dict[int, str] | None = None
    channels: list[str] = field(default_factory=lambda: ["image"])
    name: str = "dataset"
    file_ending: str = ".nii.gz"
    source: Path | None = None
    root: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def training_cases(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None and c.split != "test"]

    def with_cases(self, cases: list[Case]) -> Manifest:
        return replace(self, cases=list(cases))


# ---------------------------------------------------------------------------- detection


def detect_format(path: Path) -> Format:
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return "nnunet" if _looks_nnunet(path / "dataset.json") else "msd"
        raise DataError(f"{path}: folder has no dataset.json (expected an nnU-Net raw folder)")
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "nnunet" if _looks_nnunet(path) else "msd"
    raise DataError(f"{path}: unknown manifest type (expected a .json, a .csv or an nnU-Net raw folder)")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    return data


def _looks_nnunet(path: Path) -> bool:
    try:
        data = _load_json(path)
    except DataError:
        return False
    return "channel_names" in data and "training" not in data


# ---------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> Manifest:
    """Read an MSD JSON, an nnU-Net raw folder (or its dataset.json) or a CSV."""
    path = Path(path).expanduser()
    fmt = detect_format(path)
    if fmt == "nnunet":
        folder = path if path.is_dir() else path.parent
        return _read_nnunet(folder)
    if fmt == "csv":
        return _read_csv(path)
    if path.is_dir():
        path = path / "dataset.json"
    return _read_msd(path)


def _parse_labels_msd(raw: Any, path: Path) -> dict[int, str] | None:
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


def _parse_channels(raw: Any, path: Path) -> list[str]:
    if isinstance(raw, dict) and raw:
        items = []
        for k, v in raw.items():
            try:
                items.append((int(k), str(v)))
            except (TypeError, ValueError):
                raise DataError(f"{path}: channel key {k!r} is not an integer (expected {{\"0\": \"T1\", ...}})") from None
        items.sort(key=lambda kv: kv[0])
        if [i for i, _ in items] != list(range(len(items))):
            raise DataError(f"{path}: channel keys {[i for i, _ in items]} must be 0, 1, 2, ...")
        return [v for _, v in items]
    return ["image"]


def _resolve(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    # normalised, so "../x" written for a file outside the folder reads back as the same Path
    return Path(os.path.normpath(p if p.is_absolute() else (root / p)))


def _read_msd(path: Path) -> Manifest:
    data = _load_json(path)
    root = path.parent.resolve()
    labels = _parse_labels_msd(data.get("labels"), path)
    channels = _parse_channels(data.get("modality"), path)
    cases: list[Case] = []
    for split_key, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        entries = data.get(split_key, [])
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise DataError(f"{path}: \"{split_key}\" must be a list")
        for i, entry in enumerate(entries):
            cases.append(_msd_entry(entry, i, split_key, split, root, path))
    if "training" not in data:
        raise DataError(f"{path}: no \"training\" list (not an MSD dataset.json)")
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate case ids {dupes}")
    meta = {k: v for k, v in data.items() if k not in {"training", "validation", "test", "labels", "modality", "name", "numTraining", "numTest"}}
    return Manifest(
        format="msd",
        cases=cases,
        labels=labels,
        channels=channels,
        name=str(data.get("name", path.parent.name)),
        file_ending=".nii.gz",
        source=path.resolve(),
        root=root,
        meta=meta,
    )


def _msd_entry(entry: Any, i: int, split_key: str, split: str, root: Path, path: Path) -> Case:
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
    case_id = str(entry.get("case_id") or strip_suffix(Path(images[0])))
    extra = {k: v for k, v in entry.items() if k not in {"image", "label", "case_id"}}
    return Case(
        case_id=case_id,
        images=[_resolve(root, x) for x in images],
        label=None if label is None else _resolve(root, label),
        split=str(extra.pop("split", split)),
        extra=extra,
    )


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def _read_nnunet(folder: Path) -> Manifest:
    folder = folder.resolve()
    path = folder / "dataset.json"
    data = _load_json(path)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in data:
            raise DataError(f"{path}: missing \"{key}\" (required by nnU-Net v2)")
    ending = str(data["file_ending"])
    channels = _parse_channels(data["channel_names"], path)
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
            label = folder / ("labelsTr" if split == "train" else "labelsTs") / f"{case_id}{ending}"
            cases.append(
                Case(
                    case_id=case_id,
                    images=[chans[i] for i in range(len(channels))],
                    label=label if (split == "train" or label.exists()) else None,
                    split=split,
                )
            )
    meta = {k: v for k, v in data.items() if k not in {"channel_names", "labels", "file_ending", "numTraining", "name"}}
    return Manifest(
        format="nnunet",
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


def _read_csv(path: Path) -> Manifest:
    root = path.parent.resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read manifest ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    image_cols = ["image"] if "image" in fields else sorted(f for f in fields if re.fullmatch(r"image_\d{4}", f))
    if not image_cols:
        raise DataError(f"{path}: CSV needs an \"image\" column (or image_0000, image_0001, ...)")
    if "label" not in fields:
        raise DataError(f"{path}: CSV needs a \"label\" column")
    known = set(image_cols) | {"label", "case_id", "split"}
    cases: list[Case] = []
    seen: set[str] = set()
    for row_no, row in enumerate(reader, start=2):
        if None in row:  # DictReader puts cells beyond the header under the key None
            raise DataError(f"{path}: line {row_no} has more cells than the header has columns")
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not any(row.values()):
            continue
        images = [row.get(c, "") for c in image_cols]
        if not all(images):
            raise DataError(f"{path}: line {row_no} has an empty image path")
        case_id = row.get("case_id") or strip_suffix(Path(images[0]))
        if case_id in seen:
            raise DataError(f"{path}: line {row_no} repeats case id {case_id!r}")
        seen.add(case_id)
        label = row.get("label") or None
        cases.append(
            Case(
                case_id=case_id,
                images=[_resolve(root, x) for x in images],
                label=None if label is None else _resolve(root, label),
                split=row.get("split") or "train",
                extra={k: v for k, v in row.items() if k not in known},
            )
        )
    return Manifest(
        format="csv",
        cases=cases,
        labels=None,
        channels=[f"channel{i}" for i in range(len(image_cols))] if len(image_cols) > 1 else ["image"],
        name=path.stem,
        file_ending=volume_suffix(cases[0].images[0]) if cases else ".nii.gz",
        source=path.resolve(),
        root=root,
    )


# ---------------------------------------------------------------------------- writing


def nnunet_image_path(root: Path, case_id: str, channel: int, file_ending: str = ".nii.gz", split: str = "train") -> Path:
    sub = "imagesTs" if split == "test" else "imagesTr"
    return Path(root) / sub / f"{case_id}_{channel:04d}{file_ending}"


def nnunet_label_path(root: Path, case_id: str, file_ending: str = ".nii.gz", split: str = "train") -> Path:
    sub = "labelsTs" if split == "test" else "labelsTr"
    return Path(root) / sub / f"{case_id}{file_ending}"


def _rel(p: Path, root: Path) -> str:
    p = Path(p)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        import os

        return Path(os.path.relpath(p.resolve(), root.resolve())).as_posix()


def manifest_path_for(fmt: Format, out: Path) -> Path:
    """Where :func:`write_manifest` puts the manifest file for an output folder or file path."""
    out = Path(out)
    if fmt == "nnunet":
        return out / "dataset.json" if out.suffix != ".json" else out
    if out.suffix.lower() in {".json", ".csv"}:
        return out
    return out / ("dataset.csv" if fmt == "csv" else "dataset.json")


def write_manifest(manifest: Manifest, path: str | Path, fmt: Format | None = None) -> Path:
    """Write ``manifest`` atomically as ``fmt`` (default: its own format).

    path: the manifest file (``.json``/``.csv``) or, for nnU-Net, the raw folder.
    Paths are written relative to the manifest's folder. Returns the file written.
    """
    fmt = fmt or manifest.format
    target = manifest_path_for(fmt, Path(path))
    root = target.parent
    if fmt == "msd":
        text = _msd_text(manifest, root)
    elif fmt == "nnunet":
        text = _nnunet_text(manifest, root)
    elif fmt == "csv":
        text = _csv_text(manifest, root)
    else:
        raise DataError(f"unknown manifest format {fmt!r}")
    return atomic_write_text(target, text)


def _msd_text(m: Manifest, root: Path) -> str:
    def entry(c: Case) -> dict[str, Any]:
        imgs = [_rel(p, root) for p in c.images]
        e: dict[str, Any] = {"image": imgs[0] if len(imgs) == 1 else imgs}
        if c.label is not None:
            e["label"] = _rel(c.label, root)
        if c.case_id != strip_suffix(Path(c.images[0])):
            e["case_id"] = c.case_id
        if c.split not in {"train", "val", "test"}:  # free-text split: keep it
            e["split"] = c.split
        e.update(c.extra)
        return e

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


def _nnunet_text(m: Manifest, root: Path) -> str:
    for c in m.cases:
        want_imgs = [nnunet_image_path(root, c.case_id, i, m.file_ending, c.split) for i in range(len(c.images))]
        if [p.resolve() for p in c.images] != [p.resolve() for p in want_imgs]:
            raise DataError(f"case {c.case_id}: nnU-Net needs its files at {want_imgs[0].parent}; place them first")
    data: dict[str, Any] = {
        "channel_names": {str(i): n for i, n in enumerate(m.channels)},
        "labels": _nnunet_labels(m),
        "numTraining": sum(1 for c in m.cases if c.split != "test"),
        "file_ending": m.file_ending,
        "name": m.name,
    }
    data.update({k: v for k, v in m.meta.items() if k not in data and not k.startswith("declared_")})
    return json.dumps(data, indent=2) + "\n"


def _nnunet_labels(m: Manifest) -> dict[str, Any]:
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


def _csv_text(m: Manifest, root: Path) -> str:
    n_ch = max((len(c.images) for c in m.cases), default=1)
    image_cols = ["image"] if n_ch == 1 else [f"image_{i:04d}" for i in range(n_ch)]
    extra_cols = sorted({k for c in m.cases for k in c.extra})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case_id", *image_cols, "label", "split", *extra_cols])
    for c in m.cases:
        writer.writerow(
            [
                c.case_id,
                *[_rel(p, root) for p in c.images],
                "" if c.label is None else _rel(c.label, root),
                c.split,
                *[_csv_cell(c.extra.get(k, "")) for k in extra_cols],
            ]
        )
    return buf.getvalue()


def _csv_cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
