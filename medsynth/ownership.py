"""One ownership rule for every medsynth command that writes, through :func:`own_output`.

demo, report, phantoms, downstream, train, augment, export and evaluate follow it:

- A command removes or replaces only files it can prove it made: those its lines of the folder's
  ledger (``OUT/.medsynth-owner.jsonl``, :mod:`medsynth.data.ledger`) list with their sha256, each
  unchanged since; augment keeps the same proof in its journal (:mod:`medsynth.journal`). A changed
  one stops the command before anything is removed; a folder is removed only when that empties it.
- A command whose file names are not known in advance (demo) replaces only in a folder whose ledger
  names it; one that writes named files (evaluate, downstream, phantoms) may add them beside a user's
  files, never over one. ``medsynth report`` rewrites only a folder ``medsynth train`` claimed.
- It never writes inside, onto or around an input dataset (:func:`check_outside_inputs`, symbolic
  links resolved), and follows a symbolic link as ``--out`` only to apply the same rules at its target.
- It holds the folder's lock (:func:`medsynth.journal.output_lock`) while it writes: one job a folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from medsynth.data.ledger import (
    LEDGER,
    OwnedFolder,
    check_out_path,
    check_outside_inputs,
    claim_folder,
    dataset_folders,
    made_by,
)
from medsynth.journal import output_lock

__all__ = ["LEDGER", "OwnedFolder", "check_out_path", "check_outside_inputs", "dataset_folders", "made_by",
           "own_output"]


@contextlib.contextmanager
def own_output(out: Path, command: str, *, overwrite: bool = False, writes: Sequence[str] | None = None,
               inputs: Iterable[Path] = (), option: str = "--out") -> Iterator[OwnedFolder]:
    """Hold the output folder ``out`` for ``command`` (``"demo"``, ``"evaluate"``, ...) while it writes.

    Refused (JobError, nothing touched) when ``out`` is a broken link, a file, or lies inside, on or
    around a folder of ``inputs`` (dataset paths: :func:`dataset_folders`); when another job holds it;
    when it is not empty and not ``overwrite``; with ``overwrite``, when the files it would replace are
    not provably this command's (:func:`medsynth.data.ledger.claim_folder`). The yielded
    :class:`OwnedFolder` records the files the command writes."""
    out = Path(out)
    check_out_path(out, option)
    check_outside_inputs(out, inputs, option)
    with output_lock(out):
        owned = claim_folder(out, command, overwrite=overwrite, writes=writes, option=option)
        try:
            yield owned
        except BaseException:
            owned.withdraw()  # failed before writing: a folder this call created is left as it was, absent
            raise
