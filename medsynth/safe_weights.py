"""Weights read as data: the one home of ``torch.load`` in medsynth.

A ``.pt`` file is a pickle, and a pickle can name any Python callable to run while it loads. Every
``.pt`` medsynth reads goes through :func:`load_weights_only`: the globals the file's pickle names are
listed first *without unpickling anything* (``torch.serialization.get_unsafe_globals_in_checkpoint``);
one that is neither torch's own nor on the caller's short allow-list is refused by name; only then does
``torch.load(weights_only=True)`` (stated explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` changes
nothing) read it, with exactly those allowed globals. :func:`load_weights_into` loads a state dict
strictly, naming the file and the first missing, unexpected or misshapen key.

safetensors files (tensors only, by construction) are read and written by :func:`read_safetensors` and
:func:`write_safetensors`: through Python's own file objects, so a path that is not UTF-8 (safetensors'
``load_file`` / ``save_file`` take a UTF-8 string) works like any other.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from medsynth.errors import CheckpointError

__all__ = ["NUMPY_SCALAR_GLOBALS", "load_weights_into", "load_weights_only", "pickled_globals", "read_safetensors",
           "safetensors_metadata", "write_safetensors"]


def _numpy_scalar_globals() -> dict[str, Any]:
    """numpy scalars in a checkpoint (``np.float64(loss)``): their reconstructor and dtype classes. These
    rebuild numbers from bytes and call nothing else."""
    found: dict[str, Any] = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            mod = __import__(module, fromlist=["scalar"])
        except ImportError:
            continue
        found[f"{module}.scalar"] = mod.scalar
    found["numpy.dtype"] = np.dtype
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            found[f"numpy.dtypes.{name}"] = cls
    return found


#: globals a checkpoint may name beyond torch's own, by dotted name: numpy scalars only
NUMPY_SCALAR_GLOBALS: dict[str, Any] = _numpy_scalar_globals()


def pickled_globals(path: Path) -> list[str]:
    """The dotted names of the globals ``path``'s pickle would import that torch does not allow by
    itself; nothing is unpickled. CheckpointError for a file that is not a torch zip checkpoint."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # a legacy (non-zip) pickle, a broken zip, ...: refused, unread
        raise CheckpointError(f"{path}: not a torch checkpoint medsynth can read as weights ({type(exc).__name__}); "
                              "only zip-format .pt files are read, with torch.load(weights_only=True)") from None


def load_weights_only(path: str | Path, allowed: Mapping[str, Any] | None = None) -> Any:
    """The object stored in the ``.pt`` file ``path`` (tensors, numbers, strings, lists, dicts), read with
    ``torch.load(weights_only=True)`` on the CPU.

    allowed: dotted global name -> object that the file may name besides torch's defaults (e.g.
    :data:`NUMPY_SCALAR_GLOBALS`); any other global is refused by name before the pickle is read.
    CheckpointError naming the file otherwise."""
    path = Path(path)
    allowed = dict(allowed or {})
    unknown = [g for g in pickled_globals(path) if g not in allowed]
    if unknown:
        raise CheckpointError(f"{path}: cannot be loaded as plain weights: its pickle names {', '.join(unknown[:3])}"
                              f"{' and more' if len(unknown) > 3 else ''}, which is not a weights type (a pickle can "
                              "run code while it loads; medsynth reads tensors and plain values only, with "
                              "torch.load(weights_only=True))")
    try:
        with warnings.catch_warnings():  # torch warns before it refuses a TorchScript archive
            warnings.simplefilter("ignore", UserWarning)
            with torch.serialization.safe_globals(list(allowed.values())):
                return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for a refused or broken file
        raise CheckpointError(f"{path}: cannot be loaded as plain weights ({type(exc).__name__}; only tensors "
                              "are read, with torch.load(weights_only=True))") from None


def load_weights_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path,
                      key: str | None = None) -> torch.nn.Module:
    """``module`` with ``state`` loaded strictly; CheckpointError naming ``path`` (and ``key``, the
    entry of the file that held the state dict) and the first missing, unexpected or misshapen key. A
    ``module.`` prefix on every key (a DataParallel save) is dropped."""
    where = f"{path}" if key is None else f"{path} [{key!r}]"
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: key {name!r} holds a {type(value).__name__}, not a tensor")
    want = module.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: key {missing[0]!r} is missing{more}; the file does not hold this network")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where}: key {extra[0]!r} is unexpected{more}; the file does not hold this network")
    for name, tensor in want.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: key {name!r} has shape {tuple(state[name].shape)}, the network expects "
                                  f"{tuple(tensor.shape)}")
    module.load_state_dict(dict(state), strict=True)
    return module


def _utf8(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, nothing executed. A UTF-8 path is memory-mapped by safetensors;
    any other is read through a Python file object. Raises SafetensorError / OSError / ValueError as
    ``safetensors.torch.load_file`` does (callers name the file)."""
    path = Path(path)
    if _utf8(path):
        return safetensors.torch.load_file(str(path))
    with open(path, "rb") as fh:
        return safetensors.torch.load(fh.read())


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors file's header (read as JSON data, at most 100 MB of
    header, as the format allows); ValueError when the header is not one."""
    with open(Path(path), "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("file shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if size > 100_000_000:
            raise ValueError(f"header of {size} bytes, above the format's 100 MB")
        raw = fh.read(size)
    if len(raw) != size:
        raise ValueError("header cut short")
    header = json.loads(raw)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` as safetensors to ``path`` (any path the file system takes). Raises
    SafetensorError or OSError as ``safetensors.torch.save_file`` does."""
    path = Path(path)
    if _utf8(path):
        safetensors.torch.save_file(dict(tensors), str(path), metadata=metadata)
        return
    data = safetensors.torch.save(dict(tensors), metadata=metadata)
    with open(path, "wb") as fh:
        fh.write(data)

