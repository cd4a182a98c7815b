"""Dataset manifests: read and write any registered format through one record.

``read_manifest(path)`` accepts every format of :mod:`medsynth.data.formats` (built in: an MSD
``dataset.json`` under any name, an nnU-Net v2 raw folder or its ``dataset.json``, a CSV) and
returns a :class:`Manifest` of :class:`Case` records with absolute paths.
``write_manifest(manifest, path, fmt)`` writes one atomically. Writers never move volume files: a
format whose manifest is its file layout (nnU-Net) needs the files at its ``image_paths`` /
``label_path`` first (:func:`nnunet_image_path` / :func:`nnunet_label_path`).
"""

from __future__ import annotations

from pathlib import Path

from medsynth.data.atomic import atomic_write_text
from medsynth.data.formats import detect_format, get_format
from medsynth.data.formats.base import Case, Manifest
from medsynth.data.formats.nnunet import image_path as nnunet_image_path
from medsynth.data.formats.nnunet import label_path as nnunet_label_path

__all__ = [
    "Case",
    "Manifest",
    "detect_format",
    "manifest_path_for",
    "nnunet_image_path",
    "nnunet_label_path",
    "read_manifest",
    "write_manifest",
]


def read_manifest(path: str | Path) -> Manifest:
    """Read the dataset manifest at ``path`` (a file, or a folder for nnU-Net); DataError if unreadable."""
    path = Path(path).expanduser()
    return detect_format(path).read(path)


def manifest_path_for(fmt: str, out: Path) -> Path:
    """Where :func:`write_manifest` puts the manifest file of format ``fmt`` for a folder or file path."""
    return get_format(fmt).manifest_path(Path(out))


def write_manifest(manifest: Manifest, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``manifest`` atomically as ``fmt`` (default: its own format).

    path: the manifest file (``.json``/``.csv``) or an output folder (the format's file name inside).
    Paths are written relative to the manifest's folder. Returns the file written.
    """
    target_format = get_format(fmt or manifest.format)
    target = target_format.manifest_path(Path(path))
    # file names as the file system has them (a JSON format escapes them itself, as JSON does)
    return atomic_write_text(target, target_format.text(manifest, target.parent), names="as_stored")
