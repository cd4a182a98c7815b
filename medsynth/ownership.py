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
- It holds the folder's lock (:func:`medsynth.data.ledger.output_lock`) while it writes: one job a folder.

:func:`own_output` (at home in :mod:`medsynth.data.ledger`, so that the data layer's writers, phantoms
and export, take it as the jobs do) checks, locks and claims a folder in one step.
"""

from __future__ import annotations

from medsynth.data.ledger import (
    LEDGER,
    OwnedFolder,
    check_out_path,
    check_outside_inputs,
    dataset_folders,
    made_by,
    own_output,
)

__all__ = ["LEDGER", "OwnedFolder", "check_out_path", "check_outside_inputs", "dataset_folders", "made_by",
           "own_output"]
