"""A CSV table: one row per case.

Columns ``image`` (or ``image_0000, image_0001, ...`` for several channels) and ``label``, optional
``case_id`` and ``split``; any other column becomes ``Case.extra``. Paths are relative to the CSV
file's folder. A CSV cannot declare label values or channel names.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from medsynth.data.formats.base import Case, Manifest, ManifestFormat, channel_files, label_file, relative, resolve
from medsynth.data.nifti import strip_suffix, volume_suffix
from medsynth.errors import DataError


class CsvFormat(ManifestFormat):
    name = "csv"
    manifest_name = "dataset.csv"
    declares_labels = False

    def sniff(self, path: Path) -> bool:
        return Path(path).is_file() and Path(path).suffix.lower() == ".csv"

    def read(self, path: Path) -> Manifest:
        path = Path(path)
        root = path.parent.resolve()
        try:
            text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")  # names as the file system has them
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
        for row_no, raw_row in enumerate(reader, start=2):
            if None in raw_row:  # DictReader puts cells beyond the header under the key None
                raise DataError(f"{path}: line {row_no} has more cells than the header has columns")
            row = {(k or "").strip(): (v or "").strip() for k, v in raw_row.items()}
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
            cases.append(Case(
                case_id=case_id,
                images=[resolve(root, x) for x in images],
                label=None if label is None else resolve(root, label),
                split=row.get("split") or "train",
                extra={k: v for k, v in row.items() if k not in known},
            ))
        return Manifest(
            format=self.name,
            cases=cases,
            labels=None,
            channels=[f"channel{i}" for i in range(len(image_cols))] if len(image_cols) > 1 else ["image"],
            name=path.stem,
            file_ending=volume_suffix(cases[0].images[0]) if cases else ".nii.gz",
            source=path.resolve(),
            root=root,
        )

    def text(self, manifest: Manifest, root: Path) -> str:
        m = manifest
        n_ch = max((len(c.images) for c in m.cases), default=1)
        image_cols = ["image"] if n_ch == 1 else [f"image_{i:04d}" for i in range(n_ch)]
        extra_cols = sorted({k for c in m.cases for k in c.extra})
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case_id", *image_cols, "label", "split", *extra_cols])
        for c in m.cases:
            writer.writerow([
                c.case_id,
                *[relative(p, root) for p in c.images],
                "" if c.label is None else relative(c.label, root),
                c.split,
                *[_cell(c.extra.get(k, "")) for k in extra_cols],
            ])
        return buf.getvalue()

    def image_paths(self, root: Path, case_id: str, channels: int, ending: str, split: str = "train") -> list[Path]:
        return channel_files(root, case_id, channels, ending, split)

    def label_path(self, root: Path, case_id: str, ending: str, split: str = "train") -> Path:
        return label_file(root, case_id, ending, split)


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)
