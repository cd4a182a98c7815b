"""A small generator of hostile output paths, case ids and file names, for the ownership, error-line
and name tests.

:func:`hostile_out` makes one of :data:`HOSTILE_OUTS` under a folder and returns the ``--out`` to pass
and a fragment the one ``error:`` line must hold. :func:`hostile_dataset` writes a small phantom
dataset whose cases' files carry :data:`HOSTILE_NAMES`. :func:`snapshot` records every file (bytes)
and link under a folder, so a test can prove a command changed nothing there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from medsynth.data.phantoms import make_phantom_dataset

#: kind -> the words the error line must use
HOSTILE_OUTS = {
    "loop": "symbolic link loop",
    "dangling": "symbolic link to a missing target",
    "fifo": "not a folder (it is a FIFO",
    "file": "not a folder (it is a file)",
    "under_a_file": "is a file where a folder should be",
    "under_a_loop": "symbolic link loop",
    "lock_fifo": ".medsynth.lock is a FIFO (named pipe), not a regular file",
    "lock_folder": ".medsynth.lock is a folder, not a regular file",
}
#: --out kinds refused before any lock is taken (commands without a lock: phantoms, export)
PATH_KINDS = ("loop", "dangling", "fifo", "file", "under_a_file", "under_a_loop")
#: case ids that differ as strings, name bytes that are not UTF-8, or climb out of a folder
HOSTILE_CASE_IDS = ("c\udcff", "./a", "a/../../labelsTr/b", "../escape", "a\nb")


#: kind -> a case id a file system can hold as a file name ``<id>.nii.gz`` (the case's image and label)
HOSTILE_NAMES = {
    "space": "case one",
    "leading_dash": "--help",
    "unicode": "Bücher_脑_é",
    "dots": "..",
    "long": "n" * (255 - len(".nii.gz")),  # the file name is 255 bytes, the most most file systems allow
    "newline": "a\nb",
    "not_utf8": os.fsdecode(b"c\xff"),  # byte 0xff: Python's surrogate escape "c\udcff"
}


def hostile_dataset(root: Path, names: Sequence[str], *, dim: int = 2, size: int = 16) -> Path:
    """An MSD phantom dataset in ``root`` with ``len(names) + 1`` cases: case ``k`` (from 1) has image and
    label files named ``names[k - 1] + ".nii.gz"``, case 0 keeps its plain name. Returns its
    ``dataset.json``. OSError (from the rename) where the file system refuses a name: the caller skips."""
    manifest = make_phantom_dataset(root, dim=dim, cases=len(names) + 1, seed=0, size=size)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for k, name in enumerate(names, start=1):
        entry = data["training"][k]
        for key in ("image", "label"):
            old = root / entry[key]
            os.rename(old, old.with_name(f"{name}.nii.gz"))
            entry[key] = f"{old.parent.name}/{name}.nii.gz"
    manifest.write_text(json.dumps(data, indent=2), encoding="ascii")  # a name that is not UTF-8: JSON's \udcff
    return manifest


def hostile_out(kind: str, root: Path) -> tuple[Path, str]:
    """Make the hostile ``--out`` ``kind`` under ``root``; returns (the path, the expected fragment)."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"out_{kind}"
    if kind == "loop":
        out.symlink_to(out.name)
    elif kind == "dangling":
        out.symlink_to(root / "missing")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "file":
        out.write_bytes(b"a user's file")
    elif kind == "under_a_file":
        (root / "afile").write_bytes(b"a user's file")
        out = root / "afile" / "out"
    elif kind == "under_a_loop":
        (root / "loop").symlink_to("loop")
        out = root / "loop" / "out"
    elif kind in ("lock_fifo", "lock_folder"):
        out.mkdir()
        (out / "keep.txt").write_bytes(b"keep")
        if kind == "lock_fifo":
            os.mkfifo(out / ".medsynth.lock")
        else:
            (out / ".medsynth.lock").mkdir()
    else:
        raise ValueError(kind)
    return out, HOSTILE_OUTS[kind]


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's bytes, a link's target, ``"fifo"`` or ``"dir"``."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_fifo():
                found[rel] = "fifo"
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes()
    return found
