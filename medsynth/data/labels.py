"""The one check of a label map's values: finite, whole, non-negative numbers.

A label map holds integer label values. Files and tensors often carry them as floats (MONAI's
loaders, resampled masks); those are accepted when every value is a whole number. Booleans count as
0/1. :func:`label_problems` lists what is wrong (for reports that show every problem);
:func:`as_label_array` raises one :class:`~medsynth.errors.DataError` and returns int64 values.
"""

from __future__ import annotations

import numpy as np

from medsynth.errors import DataError

__all__ = ["as_label_array", "label_problems"]

_SHOWN = 3  # example values named in a message


def label_problems(array: np.ndarray, *, stored_as: str | None = None, integer_dtype: bool = False) -> list[str]:
    """Every problem of ``array`` as a label map, as short phrases (empty: a valid label map).

    stored_as: the on-disk dtype to name in the message (a file's header), if it differs from
        ``array.dtype``.
    integer_dtype: also require an integer (or bool) dtype, not only whole values (for arrays
        medsynth made itself, which never carry labels as floats).
    """
    a = np.asarray(array)
    kind = a.dtype.kind
    if kind == "b":
        return []
    if kind not in "iuf":
        return [f"label data has dtype {a.dtype}, expected integers"]
    if integer_dtype and kind == "f":
        return [f"label dtype {a.dtype} is not integer"]
    problems = []
    if kind == "f":
        finite = np.isfinite(a)
        if not finite.all():
            problems.append(f"label data contains {int((~finite).sum())} NaN/Inf voxels")
        values = np.unique(a[finite])
        fractional = values[values != np.round(values)]
        if fractional.size:
            shown = ", ".join(f"{v:.6g}" for v in fractional[:_SHOWN])
            problems.append(f"label has {fractional.size} non-integer value(s) (e.g. {shown}) stored as "
                            f"{stored_as or a.dtype}; round them explicitly first (resample labels with "
                            "nearest neighbour)")
        negative = values[values < 0]
    else:
        negative = np.unique(a[a < 0]) if kind == "i" else np.array([])
    if negative.size:
        problems.append(f"label has negative value(s) {', '.join(f'{v:g}' for v in negative[:_SHOWN])}")
    return problems


def as_label_array(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` as int64 label values; DataError ``"{where}: ..."`` listing its problems otherwise.

    array: any shape; where: the file or object named in the message."""
    a = np.asarray(array)
    problems = label_problems(a)
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))
    return a.astype(np.int64)
