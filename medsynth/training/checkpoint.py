"""Training checkpoints: data, never code.

``RUN/checkpoints/[STAGE/]step_XXXXXXXX.pt`` is a ``torch.save`` of a dict holding only tensors and
plain Python types (dict, list, tuple, str, int, float, bool, None)::

    format "medsynth-checkpoint", version 1, step, family, stage,
    family_state   (modules, optimisers, schedulers, EMA copies, GradScaler, extras)
    rng            (torch CPU state, CUDA states, numpy legacy state, python random state)
    data_order     (seed, next_step, global_batch: the order is a function of seed and step)
    config_json    (the resolved recipe as JSON text)
    losses         (the last train record of metrics.jsonl: means over training.log_every steps)

Files are written atomically (temp file + fsync + rename); the last ``keep_last`` are kept. Reading
always passes ``weights_only=True`` explicitly, so a pickle that would run code is refused even when
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set. A refused, truncated or malformed newest checkpoint is
skipped with a warning in favour of the previous valid one.
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from medsynth.data.atomic import atomic_path
from medsynth.data.limits import format_bytes
from medsynth.errors import CheckpointError

FORMAT = "medsynth-checkpoint"
VERSION = 1
NAME_RE = re.compile(r"^step_(\d{8,})\.pt$")
_PLAIN = (str, int, float, bool, type(None))


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def remove_stale_temp_files(folder: Path) -> None:
    """Delete temp files a killed writer left behind (``.step_*.tmp-*.pt``)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".step_*.tmp-*"):
            p.unlink(missing_ok=True)


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError if ``obj`` holds anything but tensors and plain types (a family bug)."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}")
            check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} is not a tensor or plain type")


# ---------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors / plain types."""
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
        "torch_cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch_cpu"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_python_state_from_plain(state["python"]))
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _python_state_to_plain(s: tuple) -> dict[str, Any]:
    version, internal, gauss = s
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss}


def _python_state_from_plain(d: dict[str, Any]) -> tuple:
    return (d["version"], tuple(int(v) for v in d["internal"].tolist()), d["gauss"])


# ---------------------------------------------------------------------------- save / load


def make_payload(*, step: int, family: str, stage: str | None, family_state: dict[str, Any],
                 config_json: str, losses: dict[str, float], data_order: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "family": family,
        "stage": stage,
        "family_state": family_state,
        "rng": rng_state(),
        "data_order": data_order,
        "config_json": config_json,
        "losses": {k: float(v) for k, v in losses.items()},
    }


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], *, keep_last: int) -> Path:
    """Write ``payload`` atomically as ``folder/step_XXXXXXXX.pt``; keep the newest ``keep_last``."""
    check_plain(payload)
    path = Path(folder) / checkpoint_name(step)
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer on a full disk: "PytorchStreamWriter failed writing file"
            if "PytorchStreamWriter" not in str(exc) and "write failed" not in str(exc):
                raise
            raise write_error(path, exc) from None
    for old in checkpoint_paths(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def write_error(path: Path, exc: BaseException) -> CheckpointError:
    """A failed weights write (torch's zip writer and safetensors raise their own errors, not OSError,
    on a full disk) as one error naming the file and the free space left."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)[:200]
    try:
        free = f"{format_bytes(shutil.disk_usage(Path(path).parent).free)} free there"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"{path}: cannot be written ({first}; {free}); free some space, or check the folder")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load one checkpoint safely (``weights_only=True``, always); CheckpointError if it is refused,
    truncated or not a medsynth checkpoint."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused code), RuntimeError (truncated zip), EOFError, ...
        text = str(exc)
        first = (text.strip().splitlines() or [type(exc).__name__])[0]
        if "weights_only" in text.lower() or "Unsupported global" in text or "WeightsUnpickler" in text:
            found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", text)
            what = f"it references {found.group(1)}" if found else "weights_only load failed"
            raise CheckpointError(f"{path}: refused: it holds objects that would run code when loaded "
                                  f"({what})") from None
        raise CheckpointError(f"{path}: unreadable or truncated ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medsynth checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')!r}, expected {VERSION}")
    for key, typ in (("step", int), ("family_state", dict), ("rng", dict), ("config_json", str)):
        if not isinstance(state.get(key), typ):
            raise CheckpointError(f"{path}: malformed checkpoint ({key!r} missing or wrong type)")
    return state


def set_aside_newer(folder: Path, step: int) -> list[Path]:
    """Rename checkpoints newer than ``step`` (ones skipped as invalid) to ``*.pt.rejected`` so that
    keep-last never keeps them in place of valid ones and a later save cannot collide with them."""
    moved = []
    for p in checkpoint_paths(folder):
        m = NAME_RE.match(p.name)
        if m and int(m.group(1)) > step:
            target = p.with_name(p.name + ".rejected")
            p.replace(target)
            moved.append(target)
    return moved


def load_latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint in ``folder`` that loads safely; newer bad ones are skipped with a
    warning naming the file and the reason. CheckpointError when none is valid."""
    paths = checkpoint_paths(folder)
    if not paths:
        raise CheckpointError(f"{folder}: no checkpoint to resume from")
    problems = []
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"skipping checkpoint {exc}", stacklevel=2)
    raise CheckpointError(f"{folder}: no valid checkpoint:\n  " + "\n  ".join(problems))


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write inference weights as safetensors, atomically and byte-for-byte reproducibly.

    safetensors stores its metadata map in hash order, so several keys can come out in a different
    order from run to run; the metadata is therefore one key, ``"medsynth"``, holding sorted JSON.
    """
    import json

    from medsynth.safe_weights import write_safetensors

    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"medsynth": json.dumps(metadata, sort_keys=True, default=str)}
    from safetensors import SafetensorError

    with atomic_path(Path(path)) as tmp:
        try:
            write_safetensors(plain, tmp, meta)
        except SafetensorError as exc:  # "I/O error: No space left on device (os error 28)"
            raise write_error(Path(path), exc) from None
    return Path(path)
