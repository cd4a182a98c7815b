"""The manifest-format registry: one :class:`ManifestFormat` per dataset format.

Everything that depends on a format (reading and writing manifests, where ``medsynth augment`` and
``medsynth phantoms`` put case files, the format checks of ``medsynth validate``) asks here instead
of branching on a format name. A new format is one module beside this one (a ``ManifestFormat``
subclass) and one :func:`register_format` call.

Detection tries the formats in :data:`LIST_OF_FORMATS` order and takes the first whose ``sniff``
accepts the path, so a specific format (nnU-Net's ``dataset.json`` with ``channel_names``) comes
before a general one (any ``.json`` is MSD).
"""

from __future__ import annotations

from pathlib import Path

from medsynth.data.formats.base import Case, FormatNote, Manifest, ManifestFormat
from medsynth.data.formats.csv import CsvFormat
from medsynth.data.formats.msd import MsdFormat
from medsynth.data.formats.nnunet import NnunetFormat
from medsynth.errors import ConfigError, DataError

#: the registered formats, in detection order
LIST_OF_FORMATS: list[ManifestFormat] = [NnunetFormat(), CsvFormat(), MsdFormat()]


def register_format(fmt: ManifestFormat, *, before: str | None = None) -> None:
    """Add ``fmt`` (replacing a format of the same name); ``before``: detect it ahead of that format."""
    unregister_format(fmt.name)
    names = [f.name for f in LIST_OF_FORMATS]
    LIST_OF_FORMATS.insert(names.index(before) if before in names else len(LIST_OF_FORMATS), fmt)


def unregister_format(name: str) -> None:
    """Remove the format called ``name`` (unknown names are ignored)."""
    LIST_OF_FORMATS[:] = [f for f in LIST_OF_FORMATS if f.name != name]


def format_names() -> tuple[str, ...]:
    """The registered format names, in detection order."""
    return tuple(f.name for f in LIST_OF_FORMATS)


def get_format(name: str) -> ManifestFormat:
    """The format called ``name``; ConfigError naming the known formats otherwise."""
    for fmt in LIST_OF_FORMATS:
        if fmt.name == name:
            return fmt
    raise ConfigError(f"manifest format {name!r} is unknown (known: {', '.join(format_names())})")


def detect_format(path: Path) -> ManifestFormat:
    """The format of the manifest file or dataset folder at ``path``; DataError if none reads it."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: manifest not found")
    for fmt in LIST_OF_FORMATS:
        if fmt.sniff(path):
            return fmt
    if path.is_dir():
        raise DataError(f"{path}: folder has no dataset.json (expected an nnU-Net raw folder)")
    raise DataError(f"{path}: unknown manifest type (expected one of: {', '.join(format_names())}; "
                    "a .json, a .csv or an nnU-Net raw folder)")


__all__ = [
    "LIST_OF_FORMATS",
    "Case",
    "FormatNote",
    "Manifest",
    "ManifestFormat",
    "detect_format",
    "format_names",
    "get_format",
    "register_format",
    "unregister_format",
]
