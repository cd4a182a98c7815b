"""Where the job's files go: the output folder in the input's format, asked of the format registry.

Synthetic cases go where the format puts a case (:meth:`ManifestFormat.image_paths` /
:meth:`ManifestFormat.label_path`). Real cases go there too (``--real``, :data:`REAL_MODES`), so the
output folder is self-contained and can be moved: hard-linked when the file system allows it, else
copied (``auto``, the default), always linked (``link``), always copied (``copy``), or left where
they are and listed by relative path (``reference``; not for a format whose manifest is its file
layout, ``places_cases``: nnU-Net). A placed file keeps its bytes, so its header and its file
ending stay the input's. The manifest is written last.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from medsynth.data.export import DETACHED_SUFFIXES, PLACE_MODES, case_destinations, check_output_location, place_file
from medsynth.data.formats import ManifestFormat, get_format
from medsynth.data.manifest import Case, Manifest, write_manifest
from medsynth.data.nifti import volume_suffix
from medsynth.errors import ConfigError, DataError, JobError

#: how ``--real`` puts the real cases into the output folder (``auto``: link, else copy; ``reference``:
#: not at all, the output lists them where they are)
REAL_MODES = (*PLACE_MODES, "reference")

__all__ = ["REAL_MODES", "OutputLayout", "RealCase", "check_output_location", "check_real_mode", "place_real_file",
           "real_cases_out", "synthetic_case", "write_output_manifest"]


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


def check_real_mode(mode: str, fmt: ManifestFormat) -> None:
    """ConfigError unless ``mode`` is one of :data:`REAL_MODES` and fits the output format."""
    if mode not in REAL_MODES:
        raise ConfigError(f"--real must be one of {', '.join(m for m in REAL_MODES if m != 'auto')}, got {mode!r}")
    if mode == "reference" and fmt.places_cases:
        raise ConfigError(f"--real reference: a {fmt.name} dataset is its file layout, so its real cases must be "
                          "inside the output folder; use --real link or --real copy")


def real_cases_out(manifest: Manifest, out: Path, layout: OutputLayout, mode: str = "auto") -> list[RealCase]:
    """The real cases of the output manifest: placed inside ``out`` (the files to link or copy), or,
    with ``mode="reference"``, listed where they are. See :data:`REAL_MODES`."""
    check_real_mode(mode, layout.format)
    result = []
    detached: list[str] = []
    for case in manifest.cases:
        files = [*case.images, *([case.label] if case.label is not None else [])]
        if mode == "reference":
            result.append(RealCase(case, {}))
            continue
        # a header whose voxels lie in another file, or a DICOM series folder, cannot be one placed file
        if any(volume_suffix(f) in DETACHED_SUFFIXES or Path(f).is_dir() for f in files):
            if mode != "auto" or layout.format.places_cases:
                raise DataError(f"case {case.case_id}: {files[0]} keeps its voxels in separate files, which --real "
                                f"{mode} cannot place; convert the case to .nii.gz or .mha first (medsynth export), "
                                "or use --real reference")
            detached.append(case.case_id)
            result.append(RealCase(case, {}))
            continue
        ending = layout.ending if layout.format.places_cases else None
        images, label = case_destinations(layout.format, out, case, ending)
        placed = {p.relative_to(out).as_posix(): Path(src) for p, src in zip(images, case.images)}
        if label is not None and case.label is not None:
            placed[label.relative_to(out).as_posix()] = Path(case.label)
        result.append(RealCase(replace(case, images=images, label=label), placed))
    if detached:
        warnings.warn(f"{len(detached)} real case(s) ({', '.join(detached[:3])}) keep their voxels in separate files "
                      "(.mhd/.nhdr, or a DICOM series): they stay where they are and the output lists them by path",
                      stacklevel=2)
    return result


def place_real_file(src: Path, dst: Path, mode: str = "auto") -> None:
    """Put a real case's file ``src`` at ``dst`` as ``--real`` says (:func:`medsynth.data.export.place_file`)."""
    try:
        place_file(src, dst, mode)
    except JobError as exc:
        raise JobError(f"--real {mode}: {exc}; use --real copy") from None


def synthetic_case(case_id: str, images: list[str], label: str, source: str, out: Path) -> Case:
    """A synthetic case's manifest record (formats with per-case fields keep ``synthetic`` and ``source``)."""
    return Case(case_id, [out / p for p in images], out / label, "train", {"synthetic": True, "source": source})


def write_output_manifest(manifest: Manifest, cases: list[Case], out: Path, layout: OutputLayout) -> Path:
    """Write the output manifest (the input's format and facts, ``cases`` listed) into ``out``."""
    result = replace(manifest, cases=cases, labels=manifest.labels, source=None, root=out,
                     name=layout.format.output_name(manifest, out))
    return write_manifest(result, out, fmt=layout.format.name)
