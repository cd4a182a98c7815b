"""Where the job's files go: the output folder in the input's format, asked of the format registry.

Synthetic cases go where the format puts a case (:meth:`ManifestFormat.image_paths` /
:meth:`ManifestFormat.label_path`); real cases stay where they are, except in a format whose
manifest is its file layout (``places_cases``: nnU-Net), where they are hard-linked (or copied)
into the output folder. The manifest is written last.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from medsynth.data.atomic import temp_path_for
from medsynth.data.formats import ManifestFormat, get_format
from medsynth.data.manifest import Case, Manifest, write_manifest
from medsynth.errors import JobError


@dataclass(frozen=True)
class OutputLayout:
    """The output folder's layout for one dataset: its format, the new files' ending, channels."""

    format: ManifestFormat
    ending: str
    channels: int

    @classmethod
    def for_manifest(cls, manifest: Manifest) -> OutputLayout:
        fmt = get_format(manifest.format)
        return cls(format=fmt, ending=fmt.output_ending(manifest), channels=manifest.num_channels)

    def synthetic_images(self, case_id: str) -> list[str]:
        """A synthetic case's image files, relative to the output folder (POSIX)."""
        return [p.as_posix() for p in self.format.image_paths(Path(), case_id, self.channels, self.ending)]

    def synthetic_label(self, case_id: str) -> str:
        """A synthetic case's label file, relative to the output folder (POSIX)."""
        return self.format.label_path(Path(), case_id, self.ending).as_posix()


@dataclass
class RealCase:
    """A real case as the output manifest lists it; placed: files to put in the output folder
    (relative path -> source file), empty when the case stays where it is."""

    case: Case
    placed: dict[str, Path]


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def check_output_location(out: Path, manifest: Manifest) -> None:
    """Refuse an output folder that is, or lies inside, an input folder, or contains an input."""
    out_r = Path(out).expanduser().resolve()
    source = Path(manifest.source or manifest.root or ".").resolve()
    manifest_dir = source if source.is_dir() else source.parent
    files: list[Path] = [] if source.is_dir() else [source]
    for case in manifest.cases:
        files.extend(Path(p).resolve() for p in case.images)
        if case.label is not None:
            files.append(Path(case.label).resolve())
    folders = sorted({manifest_dir, *(f.parent for f in files)})
    for folder in folders:
        if _is_within(out_r, folder):
            raise JobError(f"--out {out} lies inside the input folder {folder}; choose a folder outside the dataset")
    for f in [source, *files]:
        if _is_within(f, out_r):
            raise JobError(f"--out {out} contains the input {f}; choose another output folder")


def real_cases_out(manifest: Manifest, out: Path, layout: OutputLayout) -> list[RealCase]:
    """The real cases of the output manifest, with the files a ``places_cases`` format needs placed."""
    result = []
    for case in manifest.cases:
        if not layout.format.places_cases:
            result.append(RealCase(case, {}))
            continue
        images = layout.format.image_paths(out, case.case_id, len(case.images), layout.ending, case.split)
        placed = {p.relative_to(out).as_posix(): Path(src) for p, src in zip(images, case.images)}
        label = None
        if case.label is not None:
            label = layout.format.label_path(out, case.case_id, layout.ending, case.split)
            placed[label.relative_to(out).as_posix()] = Path(case.label)
        result.append(RealCase(replace(case, images=images, label=label), placed))
    return result


def place_real_file(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (atomically, via a temp name); copy if linking fails."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def synthetic_case(case_id: str, images: list[str], label: str, source: str, out: Path) -> Case:
    """A synthetic case's manifest record (formats with per-case fields keep ``synthetic`` and ``source``)."""
    return Case(case_id, [out / p for p in images], out / label, "train", {"synthetic": True, "source": source})


def write_output_manifest(manifest: Manifest, cases: list[Case], out: Path, layout: OutputLayout) -> Path:
    """Write the output manifest (the input's format and facts, ``cases`` listed) into ``out``."""
    result = replace(manifest, cases=cases, labels=manifest.labels, source=None, root=out)
    return write_manifest(result, out, fmt=layout.format.name)
