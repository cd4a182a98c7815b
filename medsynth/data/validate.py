"""Dataset validation: decode every file of a dataset and check it against the table of bad inputs.

``validate_dataset(path)`` reads the manifest (MSD JSON, CSV or nnU-Net raw folder), decodes every
image and label fully and collects *all* problems of the dataset in one :class:`ValidationReport`;
bad data never raises. When there is no error the report carries an nnU-Net-like fingerprint.
``load_valid_dataset(path)`` is the gate training and augmentation call first: it returns the
:class:`~medsynth.data.manifest.Manifest` or raises one :class:`DataError` listing every error.

The per-file checks are small functions named after the table of bad inputs:

====  ==========================================  ==============================
 #    input                                       check
====  ==========================================  ==============================
 1    qform and sform set and disagreeing         :func:`check_qform_sform`
 2    label with scl_slope / scl_inter            :func:`check_label_scaling`
 3    float label with residue                    :func:`check_label_integers`
 5    label geometry differs from the image       :func:`check_pair`
 6    4D file                                     :func:`check_axes`
 7    NaN / Inf in an image                       :func:`check_image_values`
 8-10 zero-size axis, truncated or short file     the reader (:func:`read_volume`)
 11   sheared affine                              :func:`check_shear`
 12   zero spacing                                :func:`check_spacing`
 13   plain .nii named .nii.gz                    the reader
 14   label shape differs from the image          :func:`check_pair`
 15   label value not declared                    :func:`check_label_declared`
 16   missing file, unreadable manifest           :func:`validate_dataset`
====  ==========================================  ==============================

Beyond the table: channels of a case agree with each other, duplicate case ids, 2D and 3D cases
mixed, nnU-Net ``numTraining`` against the files found, label files without images, a label map
that is all background (a warning), a constant image (a warning), no stored orientation (a warning).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from medsynth.data.formats import get_format
from medsynth.data.formats.base import duplicate_notes
from medsynth.data.labels import label_problems
from medsynth.data.manifest import read_manifest
from medsynth.data.unlabelled import unlabelled_from
from medsynth.errors import DataError
from medsynth.progress import progress_bar

if TYPE_CHECKING:
    from rich.console import Console

    from medsynth.data.manifest import Case, Manifest
    from medsynth.data.nifti import Kind, Volume

Severity = Literal["error", "warning"]

# Geometry tolerances ("a small tolerance"): far below anything that moves a voxel, far above
# the float32 rounding of headers written by different tools.
SPACING_RTOL = 1e-3  # relative difference of voxel sizes
DIRECTION_ATOL = 1e-3  # difference of direction cosines (unit vectors)
ORIGIN_VOXEL_TOL = 1e-2  # origin shift, as a fraction of the smallest voxel size
SHEAR_TOL = 1e-3  # |cos| of the angle between two voxel axes (0 = orthogonal)
INTENSITY_SAMPLES = 10_000  # foreground voxels sampled per case and channel (as nnU-Net)
MAX_LISTED = 10  # values listed in one message


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: ``severity`` (``"error"`` fails validation), the file, the message."""

    severity: Severity
    file: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "file": self.file, "message": self.message}


def error(file: str | Path | None, message: str) -> Problem:
    return Problem("error", str(file), message)


def warning(file: str | Path | None, message: str) -> Problem:
    return Problem("warning", str(file), message)


@dataclass
class ValidationReport:
    """The outcome of :func:`validate_dataset`.

    problems: every problem found, manifest-level first, then case by case.
    fingerprint: dataset statistics (see :func:`fingerprint`), ``None`` when there are errors.
    manifest: the manifest read (``None`` if it could not be read); not part of :meth:`to_dict`.
    root: the folder file names are shown relative to.
    """

    path: str
    problems: list[Problem] = field(default_factory=list)
    fingerprint: dict[str, Any] | None = None
    manifest: Manifest | None = None
    root: str | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def display_file(self, problem: Problem) -> str:
        """The problem's file relative to the dataset root when it lies inside it."""
        if self.root:
            try:
                return Path(problem.file).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return problem.file

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``path, ok, errors, warnings`` (counts), ``problems``, ``fingerprint``."""
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [p.to_dict() for p in self.problems],
            "fingerprint": self.fingerprint,
        }


# ---------------------------------------------------------------------------- geometry helpers


def spatial_shape(volume: Volume) -> tuple[int, ...]:
    """``(H, W)`` or ``(X, Y, Z)``: the array shape without a channel axis (4D ``(X, Y, 1, C)`` is 2D)."""
    shape = volume.shape[:3] if volume.array.ndim >= 4 else volume.shape
    if len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    return tuple(shape)


def _grid(affine: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing (ndim,) mm, direction (3, ndim) unit columns, origin (3,) mm) of an affine."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :ndim]
    spacing = np.linalg.norm(cols, axis=0)
    direction = cols / np.where(spacing > 0, spacing, 1.0)
    return spacing, direction, np.asarray(affine, dtype=np.float64)[:3, 3]


def _fmt(values: np.ndarray | Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.ravel(values)) + ")"


def geometry_differences(affine: np.ndarray, reference: np.ndarray, ndim: int) -> list[str]:
    """What differs between two voxel->world affines beyond the tolerances, as short phrases.

    affine, reference: ``(4, 4)`` voxel -> RAS mm. ndim: spatial axes compared (2 or 3).
    """
    sp, di, og = _grid(affine, ndim)
    sp_r, di_r, og_r = _grid(reference, ndim)
    out = []
    if not np.allclose(sp, sp_r, rtol=SPACING_RTOL, atol=0):
        out.append(f"spacing {_fmt(sp)} vs {_fmt(sp_r)} mm")
    for axis in range(ndim):
        if not np.allclose(di[:, axis], di_r[:, axis], rtol=0, atol=DIRECTION_ATOL):
            flip = " (flipped)" if np.allclose(di[:, axis], -di_r[:, axis], atol=DIRECTION_ATOL) else ""
            out.append(f"direction of axis {axis} {_fmt(di[:, axis])} vs {_fmt(di_r[:, axis])}{flip}")
    voxel = float(np.min(sp_r)) if np.all(sp_r > 0) else 1.0
    shift = float(np.linalg.norm(og - og_r))
    if shift > ORIGIN_VOXEL_TOL * voxel:
        out.append(f"origin {_fmt(og)} vs {_fmt(og_r)} mm")
    return out


def compare_grids(volume: Volume, reference: Volume, what: str) -> list[Problem]:
    """``volume`` must lie on ``reference``'s voxel grid: same spatial shape and geometry."""
    problems = []
    shape, ref_shape = spatial_shape(volume), spatial_shape(reference)
    ref_name = "/".join(reference.path.parts[-2:]) if reference.path else "the reference"
    if shape != ref_shape:
        problems.append(error(volume.path, f"{what} shape {shape} differs from {ref_name} shape {ref_shape}"))
    ndim = min(len(shape), len(ref_shape), 3)
    diffs = geometry_differences(volume.affine, reference.affine, ndim)
    if diffs:
        problems.append(error(volume.path, f"{what} geometry differs from {ref_name}: " + "; ".join(diffs)))
    return problems


# ---------------------------------------------------------------------------- per-file checks


def check_qform_sform(volume: Volume) -> list[Problem]:
    """#1: qform and sform both set (codes > 0) must describe the same grid."""
    h = volume.header
    if h.get("format") != "nifti":
        return []
    if h.get("qform_code", 0) == 0 and h.get("sform_code", 0) == 0:
        return [warning(volume.path, "no orientation stored (qform_code and sform_code are 0); readers assume one")]
    if h.get("qform_code", 0) > 0 and h.get("sform_code", 0) > 0 and h.get("qform") is not None and h.get("sform") is not None:
        diffs = geometry_differences(h["qform"], h["sform"], len(spatial_shape(volume)))
        if diffs:
            return [error(volume.path, "qform and sform are both set but disagree (nibabel and MONAI use the sform, "
                          "SimpleITK the qform): qform vs sform " + "; ".join(diffs))]
    return []


def check_shear(volume: Volume) -> list[Problem]:
    """#11: the voxel axes must be orthogonal (no shear)."""
    ndim = len(spatial_shape(volume))
    cols = volume.affine[:3, :ndim]
    norms = np.linalg.norm(cols, axis=0)
    if not np.all(np.isfinite(cols)) or np.any(norms == 0):
        return []  # reported by check_spacing
    unit = cols / norms
    for i in range(ndim):
        for j in range(i + 1, ndim):
            cos = float(unit[:, i] @ unit[:, j])
            if abs(cos) > SHEAR_TOL:
                angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
                return [error(volume.path, f"sheared affine: voxel axes {i} and {j} are at {angle:.2f} degrees, "
                              "not 90 (SimpleITK refuses it, resampling would distort it)")]
    return []


def check_spacing(volume: Volume) -> list[Problem]:
    """#12: voxel spacing must be positive and finite, in the header and in the affine."""
    ndim = len(spatial_shape(volume))
    problems = []
    pixdim = volume.header.get("pixdim", ())
    bad = [i for i, v in enumerate(pixdim[:ndim]) if not math.isfinite(v) or v == 0]
    if bad:
        vals = ", ".join(f"pixdim[{i + 1}] = {pixdim[i]:g}" for i in bad)
        problems.append(error(volume.path, f"zero or invalid voxel spacing in the header ({vals}); "
                              "nibabel and SimpleITK silently use 1 mm"))
    if not np.all(np.isfinite(volume.affine)):
        problems.append(error(volume.path, "affine contains NaN or Inf"))
    else:
        norms = np.linalg.norm(volume.affine[:3, :ndim], axis=0)
        if np.any(norms == 0):
            problems.append(error(volume.path, f"affine has zero spacing along axis {int(np.argmin(norms))}"))
    return problems


def check_axes(volume: Volume, kind: Kind, channels: int = 1) -> list[Problem]:
    """#6: a volume is 2D or 3D; a 4th axis only holds declared channels (trailing singletons are squeezed).

    channels: how many channels this one file must hold (> 1 when a case has a single multi-channel file).
    """
    shape, nd = volume.shape, volume.array.ndim
    if nd < 2:
        return [error(volume.path, f"has {nd} axis (shape {shape}); expected a 2D or 3D volume")]
    if kind == "label":
        if nd > 3:
            return [error(volume.path, f"label map is {nd}D (shape {shape}); it must be one 2D or 3D map")]
        return []
    if nd > 4:
        return [error(volume.path, f"is {nd}D (shape {shape}); expected 2D or 3D (4D only for declared channels)")]
    if nd == 4:
        if channels == 1:
            return [error(volume.path, f"is 4D (shape {shape}) but the manifest declares one channel: declare its "
                          f"{shape[3]} channels (MSD \"modality\", nnU-Net channel_names) or split it into 3D files")]
        if shape[3] != channels:
            return [error(volume.path, f"holds {shape[3]} channels on its 4th axis (shape {shape}), "
                          f"the manifest declares {channels}")]
        return []
    if channels > 1:
        return [error(volume.path, f"holds one channel (shape {shape}) but the manifest declares {channels} "
                      "channels for this case's single image file")]
    return []


def check_label_scaling(volume: Volume) -> list[Problem]:
    """#2: labels are stored unscaled (slope in (nan, 0, 1), inter in (nan, 0))."""
    slope, inter = volume.header.get("slope", 1.0), volume.header.get("inter", 0.0)
    slope_ok = math.isnan(slope) or slope in (0.0, 1.0)
    inter_ok = math.isnan(inter) or inter == 0.0
    if slope_ok and inter_ok:
        return []
    dtype = volume.header.get("disk_dtype", "?")
    return [error(volume.path, f"label stored as {dtype} with scaling (scl_slope {slope:g}, scl_inter {inter:g}), "
                  "so readers turn its integers into other values; store labels unscaled as uint8/uint16")]


def check_label_integers(volume: Volume) -> list[Problem]:
    """#3 and more: label values are finite, non-negative integers (:func:`medsynth.data.labels.label_problems`)."""
    stored_as = volume.header.get("disk_dtype")
    return [error(volume.path, text) for text in label_problems(volume.array, stored_as=stored_as and str(stored_as))]


def check_label_range(volume: Volume) -> list[Problem]:
    """Label values fit the dtype medsynth writes labels in (uint16 at most, never scaled)."""
    from medsynth.data.nifti import LABEL_MAX, label_dtype

    a = volume.array
    top = a.max() if a.size and a.dtype.kind in "iuf" else 0
    if top > LABEL_MAX:
        try:
            label_dtype(int(top))
        except DataError as exc:  # the writer's own message, so validate and augment say the same
            return [error(volume.path, str(exc))]
    return []


def check_image_values(volume: Volume) -> list[Problem]:
    """#7 and more: image voxels are finite numbers; a constant image is suspicious (warning)."""
    a = volume.array
    if a.dtype.kind not in "biuf":
        return [error(volume.path, f"image data has dtype {a.dtype}; expected real numbers")]
    if a.dtype.kind == "f":
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            return [error(volume.path, f"image contains {nan} NaN and {inf} Inf voxels "
                          "(SimpleITK would read them as 0)")]
    if a.size and a.min() == a.max():
        return [warning(volume.path, f"image is constant (every voxel is {a.flat[0]:g})")]
    return []


def check_volume(volume: Volume, kind: Kind, *, channels: int = 1) -> list[Problem]:
    """All checks of one decoded file on its own (header, axes, values)."""
    problems = check_axes(volume, kind, channels)
    problems += check_spacing(volume)
    problems += check_shear(volume)
    problems += check_qform_sform(volume)
    if kind == "label":
        scaling = check_label_scaling(volume)
        # a scaled label's non-integer values are the scaling's doing: report the cause only
        problems += scaling or check_label_integers(volume) or check_label_range(volume)
    else:
        problems += check_image_values(volume)
    return problems


def check_pair(image: Volume, label: Volume) -> list[Problem]:
    """#14 and #5: the label lies on the image's grid (shape, spacing, origin, direction)."""
    return compare_grids(label, image, "label")


def check_channels(images: list[Volume], names: list[str]) -> list[Problem]:
    """The channel files of one case lie on the same grid as channel 0."""
    problems = []
    for k, vol in enumerate(images[1:], start=1):
        name = names[k] if k < len(names) else str(k)
        problems += compare_grids(vol, images[0], f"channel {k} ({name})")
    return problems


def label_counts(array: np.ndarray) -> dict[float, int]:
    """Voxel count per distinct value of a label array (integer-valued keys as ``int``)."""
    flat = np.ravel(array)
    if flat.size == 0:
        return {}
    if flat.dtype.kind in "biu" and int(flat.min()) >= 0 and int(flat.max()) < 1 << 20:
        counts = np.bincount(flat.astype(np.int64, copy=False))
        return {int(v): int(c) for v, c in enumerate(counts) if c}
    values, counts = np.unique(flat, return_counts=True)
    out: dict[float, int] = {}
    for v, c in zip(values.tolist(), counts.tolist()):
        key = int(v) if isinstance(v, float) and v.is_integer() else v
        out[key] = out.get(key, 0) + int(c)
    return out


def check_label_declared(label: Volume, counts: dict[float, int], labels: dict[int, str] | None,
                         manifest_name: str = "the manifest") -> list[Problem]:
    """#15: every integer value is declared (0 always counts as background); all background warns."""
    problems = []
    if labels is not None:
        undeclared = sorted(v for v in counts if isinstance(v, int) and v > 0 and v not in labels)
        if undeclared:
            shown = ", ".join(str(v) for v in undeclared[:MAX_LISTED]) + (", ..." if len(undeclared) > MAX_LISTED else "")
            plural = "s" if len(undeclared) > 1 else ""
            declared = "{" + ", ".join(str(v) for v in sorted(labels)) + "}"
            problems.append(error(label.path, f"label value{plural} {shown} not in {manifest_name} labels {declared}"))
    if counts and all(v == 0 for v in counts):
        problems.append(warning(label.path, "label map is all background (0)"))
    return problems


# ---------------------------------------------------------------------------- per case


@dataclass
class _CaseStats:
    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_counts: dict[int, int] | None = None
    # per channel: (n, mean, M2, min, max, samples)
    intensity: list[tuple[int, float, float, float, float, np.ndarray]] | None = None


def _read(path: Path, kind: Kind, memory_limit: int, root: Path | None) -> tuple[Volume | None, list[Problem]]:
    """Read one file; any failure becomes a problem naming it (never an exception).

    memory_limit: bytes of voxel data the file may claim; root: the folder MetaImage/NRRD data
    files must lie in (the manifest's root)."""
    from medsynth.data.nifti import read_volume

    try:
        with warnings.catch_warnings():  # header oddities nibabel warns about are checked here instead
            warnings.simplefilter("ignore")
            return read_volume(path, kind=kind, memory_limit=memory_limit, root=root), []
    except DataError as exc:
        text = str(exc)
        prefix = f"{path}: "
        return None, [error(path, _one_line(text[len(prefix):] if text.startswith(prefix) else text))]
    except MemoryError:
        return None, [error(path, "too large to decode in memory")]
    except Exception as exc:  # a reader surprise must not hide the other files' problems
        return None, [error(path, _one_line(f"cannot be read ({type(exc).__name__}: {exc})"))]


def _case_size_problem(case: Case, memory_limit: int, root: Path | None) -> list[Problem]:
    """The case's files together may claim at most ``memory_limit`` bytes (headers only are read)."""
    from medsynth.data.nifti import check_case_size

    files = [*case.images, *([case.label] if case.label is not None else [])]
    try:
        check_case_size(files, memory_limit, root=root)
    except DataError as exc:
        return [error(files[0], _one_line(_strip_prefix(str(exc), files[0])))]
    return []


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _channel_arrays(images: list[Volume], n_channels: int, spatial: tuple[int, ...]) -> list[np.ndarray]:
    """One array per channel: each file's, or the channels of one file holding all of them."""
    from medsynth.data.nifti import split_channels

    if len(images) == 1:
        return split_channels(images[0].array, spatial) or [images[0].array]
    return [v.array for v in images[:n_channels]]


def _intensity(arrays: list[np.ndarray], fg: np.ndarray, rng: np.random.Generator) -> list[tuple]:
    out = []
    for a in arrays:
        vals = np.asarray(a[fg], dtype=np.float64)
        n = int(vals.size)
        if n == 0:
            out.append((0, 0.0, 0.0, math.inf, -math.inf, np.empty(0)))
            continue
        mean = float(vals.mean())
        m2 = float(((vals - mean) ** 2).sum())
        samples = vals if n <= INTENSITY_SAMPLES else vals[rng.integers(0, n, INTENSITY_SAMPLES)]
        out.append((n, mean, m2, float(vals.min()), float(vals.max()), samples))
    return out


def _check_case(case: Case, manifest: Manifest, index: int, manifest_name: str,
                memory_limit: int) -> tuple[list[Problem], _CaseStats | None]:
    n_ch = manifest.num_channels
    problems: list[Problem] = []
    too_big = _case_size_problem(case, memory_limit, manifest.root)
    if too_big:
        return too_big, None

    def read(path: Path, kind: Kind) -> tuple[Volume | None, list[Problem]]:
        return _read(path, kind, memory_limit, manifest.root)

    # 1. image files: one per channel, or one file holding all channels on a 4th axis
    if len(case.images) not in (1, n_ch):
        problems.append(error(case.images[0], f"case {case.case_id} has {len(case.images)} image files, the manifest "
                              f"declares {n_ch} channel(s) ({', '.join(manifest.channels)})"))
    per_file = n_ch if len(case.images) == 1 else 1
    images: list[Volume] = []
    for p in case.images:
        vol, read_problems = read(p, "image")
        problems += read_problems
        if vol is not None:
            problems += check_volume(vol, "image", channels=per_file)
            images.append(vol)
    all_images = len(images) == len(case.images)
    if all_images and len(images) > 1:
        problems += check_channels(images, manifest.channels)
    # 2. the label, on its own and against the image
    label: Volume | None = None
    counts: dict[float, int] | None = None
    if case.label is None:
        if case.split not in ("test", "unlabelled"):
            problems.append(warning(case.images[0], f"case {case.case_id} has no label (an unlabelled image: "
                                    "`medsynth anatomy` can propagate labels to it)"))
    else:
        if case.label in case.images:
            problems.append(error(case.label, f"case {case.case_id} uses the same file as image and label"))
        label, read_problems = read(case.label, "label")
        problems += read_problems
        if label is not None:
            problems += check_volume(label, "label")
            if images:
                problems += check_pair(images[0], label)
            counts = label_counts(label.array)
            problems += check_label_declared(label, counts, manifest.labels, manifest_name)
    if any(p.severity == "error" for p in problems) or not all_images:
        return problems, None
    # 3. statistics for the fingerprint
    ref = images[0]
    stats = _CaseStats(case.case_id, spatial_shape(ref), tuple(_grid(ref.affine, len(spatial_shape(ref)))[0].tolist()))
    if label is not None and counts is not None:
        stats.label_counts = {int(k): v for k, v in counts.items()}
        fg = label.array > 0
        stats.intensity = _intensity(_channel_arrays(images, n_ch, label.array.shape), fg, np.random.default_rng(index))
    return problems, stats


# ---------------------------------------------------------------------------- dataset checks


def _check_manifest(manifest: Manifest) -> list[Problem]:
    src = manifest.source
    problems = []
    if not manifest.cases:
        problems.append(error(src, "the manifest lists no cases"))
    # case ids and files resolved before they are compared (./a is a; a symlink is its target)
    problems += [Problem(n.severity, str(n.file), n.message) for n in duplicate_notes(manifest)]
    if manifest.labels is not None and 0 not in manifest.labels and manifest.labels:
        problems.append(warning(src, "labels do not declare 0 (background); value 0 is taken as background"))
    fmt = get_format(manifest.format)
    if manifest.labels is None and fmt.declares_labels:
        problems.append(warning(src, "the manifest declares no labels; label values are not checked"))
    problems += [Problem(n.severity, str(n.file), n.message) for n in fmt.check(manifest)]
    return problems


def _check_dimensionality(stats: list[_CaseStats], source: Path | None) -> list[Problem]:
    dims: dict[int, list[str]] = {}
    for s in stats:
        dims.setdefault(len(s.shape), []).append(s.case_id)
    if len(dims) <= 1:
        return []
    parts = [f"{len(ids)} {d}D ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})" for d, ids in sorted(dims.items())]
    # A dataset of volumes plus slices is legitimate (2D runs draw slices from 3D volumes), so this
    # is a warning; a 3D recipe refuses 2D cases when it loads them.
    return [warning(source, "cases mix 2D and 3D volumes: " + "; ".join(parts))]


# ---------------------------------------------------------------------------- fingerprint


def _percentiles(samples: np.ndarray) -> tuple[float, float, float]:
    p = np.percentile(samples, [0.5, 50.0, 99.5])
    return float(p[0]), float(p[1]), float(p[2])


def fingerprint(manifest: Manifest, stats: list[_CaseStats]) -> dict[str, Any]:
    """nnU-Net-like dataset statistics (JSON-ready).

    shapes in voxels and spacings in mm per spatial axis; label voxel counts over all labelled
    cases; intensity over foreground (label > 0) voxels per channel: mean/std/min/max exact,
    percentiles 0.5/50/99.5 over up to ``INTENSITY_SAMPLES`` voxels per case.
    """
    # Summaries over the most common dimensionality (a dataset may mix volumes and slices).
    dim_counts: dict[int, int] = {}
    for s in stats:
        dim_counts[len(s.shape)] = dim_counts.get(len(s.shape), 0) + 1
    main_dim = max(dim_counts, key=lambda d: (dim_counts[d], d)) if dim_counts else 0
    main = [s for s in stats if len(s.shape) == main_dim]
    shapes = np.array([s.shape for s in main], dtype=np.float64).reshape(len(main), main_dim)
    spacings = np.array([s.spacing for s in main], dtype=np.float64).reshape(len(main), main_dim)
    labelled = [s for s in stats if s.label_counts is not None]
    by_value: dict[int, int] = {}
    cases_with: dict[int, int] = {}
    for s in labelled:
        for v, c in (s.label_counts or {}).items():
            by_value[v] = by_value.get(v, 0) + c
            cases_with[v] = cases_with.get(v, 0) + 1
    for v in manifest.labels or {}:
        by_value.setdefault(v, 0)
        cases_with.setdefault(v, 0)
    names = manifest.labels or {}
    by_name: dict[str, int] = {}
    for v in sorted(by_value):
        name = names.get(v, str(v))
        by_name[name] = by_name.get(name, 0) + by_value[v]
    intensity: dict[str, Any] = {}
    for k, ch in enumerate(manifest.channels):
        parts = [s.intensity[k] for s in labelled if s.intensity is not None and k < len(s.intensity) and s.intensity[k][0]]
        if not parts:
            intensity[ch] = None
            continue
        n = sum(p[0] for p in parts)
        mean = sum(p[0] * p[1] for p in parts) / n
        m2 = sum(p[2] + p[0] * (p[1] - mean) ** 2 for p in parts)
        p05, p50, p995 = _percentiles(np.concatenate([p[5] for p in parts]))
        intensity[ch] = {
            "voxels": int(n), "mean": mean, "std": math.sqrt(m2 / n),
            "min": min(p[3] for p in parts), "max": max(p[4] for p in parts),
            "percentile_00_5": p05, "median": p50, "percentile_99_5": p995,
        }
    return {
        "name": manifest.name,
        "format": manifest.format,
        "cases": len(stats),
        "labelled_cases": len(labelled),
        "unlabelled_cases": sum(1 for c in manifest.cases if c.label is None),
        "channels": list(manifest.channels),
        "dimensionality": main_dim if len(stats) else None,
        "cases_per_dimensionality": {f"{d}D": n for d, n in sorted(dim_counts.items())},
        "shapes": {
            "per_case": {s.case_id: list(s.shape) for s in stats},
            "median": np.median(shapes, axis=0).tolist() if len(stats) else None,
            "min": shapes.min(axis=0).astype(int).tolist() if len(stats) else None,
            "max": shapes.max(axis=0).astype(int).tolist() if len(stats) else None,
        },
        "spacings": {
            "per_case": {s.case_id: list(s.spacing) for s in stats},
            "median": np.median(spacings, axis=0).tolist() if len(stats) else None,
            "min": spacings.min(axis=0).tolist() if len(stats) else None,
            "max": spacings.max(axis=0).tolist() if len(stats) else None,
        },
        "labels": {str(v): n for v, n in sorted(names.items())} if manifest.labels is not None else None,
        "label_voxels": {
            "by_value": {str(v): by_value[v] for v in sorted(by_value)},
            "by_name": by_name,
            "cases_with_value": {str(v): cases_with[v] for v in sorted(cases_with)},
        },
        "intensity_foreground": intensity,
    }


# ---------------------------------------------------------------------------- entry points


def _check_unlabelled_dims(manifest: Manifest, stats: list[_CaseStats]) -> list[Problem]:
    """An error for each unlabelled case whose dimensionality differs from every labelled case's."""
    labelled = {c.case_id for c in manifest.cases if c.label is not None}
    dims = {len(s.shape) for s in stats if s.case_id in labelled}
    if len(dims) != 1:
        return []
    (dim,) = dims
    files = {c.case_id: c.images[0] for c in manifest.cases}
    return [error(files[s.case_id], f"unlabelled case {s.case_id} is {len(s.shape)}D, the labelled cases are {dim}D")
            for s in stats if s.case_id not in labelled and len(s.shape) != dim]


def validate_dataset(path: str | Path, *, progress: bool = False, memory_limit: int | None = None,
                     unlabelled: str | Path | None = None) -> ValidationReport:
    """Decode and check every file of the dataset at ``path``; return every problem found.

    path: an MSD JSON (any name), a CSV manifest, or an nnU-Net raw folder (or its dataset.json).
    progress: show a progress bar over cases on stderr (:func:`medsynth.progress.progress_bar`).
    memory_limit: bytes of voxel data one case's files may claim together (``None``:
        :func:`medsynth.data.limits.default_memory_limit`); a case claiming more is an error.
    unlabelled: more unlabelled images (``--unlabelled``: a manifest or a folder of images), checked as the
        dataset's own: decoded, finite, the channel count and dimensionality of the labelled cases.
    Never raises for bad data: unreadable manifests and files become problems of the report.
    """
    from medsynth.data.limits import default_memory_limit

    limit = default_memory_limit() if memory_limit is None else memory_limit
    path = Path(path).expanduser()
    report = ValidationReport(path=str(path.resolve()) if path.exists() else str(path))
    # 1. the manifest
    try:
        manifest = read_manifest(path)
    except DataError as exc:
        report.problems.append(error(path, _one_line(_strip_prefix(str(exc), path))))
        return report
    except Exception as exc:  # an unexpected manifest must still give a report, not a traceback
        report.problems.append(error(path, _one_line(f"cannot read manifest ({type(exc).__name__}: {exc})")))
        return report
    if unlabelled is not None:
        try:
            extra = unlabelled_from(unlabelled, manifest.num_channels)[0]
        except DataError as exc:
            report.problems.append(error(unlabelled, _one_line(_strip_prefix(str(exc), Path(unlabelled)))))
            return report
        manifest = manifest.with_cases([*manifest.cases, *extra])
    report.manifest = manifest
    report.root = str(manifest.root) if manifest.root else None
    report.problems += _check_manifest(manifest)
    # 2. every case, every file, fully decoded
    manifest_name = get_format(manifest.format).manifest_file(manifest.source).name if manifest.source else "the manifest"
    stats: list[_CaseStats] = []
    with progress_bar("validating", len(manifest.cases), enabled=progress, transient=True) as bar:
        for i, case in enumerate(manifest.cases):
            problems, case_stats = _check_case_safely(case, manifest, i, manifest_name, limit)
            report.problems += problems
            if case_stats is not None:
                stats.append(case_stats)
            bar.advance()
    # 3. across cases
    report.problems += _check_dimensionality(stats, manifest.source)
    report.problems += _check_unlabelled_dims(manifest, stats)
    if report.ok and stats:
        report.fingerprint = fingerprint(manifest, stats)
    return report


def _check_case_safely(case: Case, manifest: Manifest, index: int, manifest_name: str,
                       memory_limit: int) -> tuple[list[Problem], _CaseStats | None]:
    """:func:`_check_case`, with any surprise on odd data reported as a problem of the case."""
    try:
        return _check_case(case, manifest, index, manifest_name, memory_limit)
    except MemoryError:
        return [error(case.images[0], f"case {case.case_id} is too large to check in memory")], None
    except Exception as exc:  # a check surprise on odd data: report it, keep going
        return [error(case.images[0], _one_line(f"case {case.case_id} could not be checked "
                                                 f"({type(exc).__name__}: {exc})"))], None


def _strip_prefix(text: str, path: Path) -> str:
    for p in (str(path), str(path.resolve())):
        if text.startswith(p + ": "):
            return text[len(p) + 2:]
    return text


def load_valid_dataset(path: str | Path, *, progress: bool = False, memory_limit: int | None = None) -> Manifest:
    """Validate the dataset at ``path`` and return its manifest; raise :class:`DataError` listing every error.

    memory_limit: as :func:`validate_dataset`."""
    report = validate_dataset(path, progress=progress, memory_limit=memory_limit)
    if not report.ok:
        lines = [f"  {report.display_file(p)}: {p.message}" for p in report.errors]
        where = report.root or report.path
        raise DataError(f"{report.path}: dataset is not valid ({len(lines)} error(s), files relative to {where}):\n"
                        + "\n".join(lines))
    if report.manifest is None:  # cannot happen: a report without a manifest has an error
        raise DataError(f"{report.path}: manifest could not be read")
    return report.manifest


# ---------------------------------------------------------------------------- printing


def print_report(report: ValidationReport, console: Console | None = None) -> None:
    """Print problems (one line each: severity, file, problem), then the fingerprint, with rich."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = console or Console(highlight=False)
    m = report.manifest
    head = f"{report.path}" + (f" ({m.format}, {len(m.cases)} cases)" if m else "")
    console.print(Text(head, style="bold"), soft_wrap=True)
    for p in report.problems:
        line = Text()
        line.append(f"{p.severity:<8}", style="bold red" if p.severity == "error" else "yellow")
        line.append(f"{report.display_file(p)}: ", style="cyan")
        line.append(p.message)
        console.print(line, soft_wrap=True)
    n_err, n_warn = len(report.errors), len(report.warnings)
    summary = f"{n_err} error(s), {n_warn} warning(s)"
    if not report.ok:
        console.print(Text(f"FAILED: {summary}", style="bold red"), soft_wrap=True)
        return
    fp = report.fingerprint
    console.print(Text(f"OK: {summary}", style="bold green"), soft_wrap=True)
    if not fp:
        return
    info = Table(title="Fingerprint", show_header=False, title_justify="left")
    info.add_row("cases", f"{fp['cases']} ({fp['labelled_cases']} labelled, {fp.get('unlabelled_cases', 0)} unlabelled)")
    info.add_row("channels", escape(", ".join(f"{i}: {c}" for i, c in enumerate(fp["channels"]))))
    info.add_row("dimensionality", f"{fp['dimensionality']}D")
    for key, unit in (("shapes", "voxels"), ("spacings", "mm")):
        d = fp[key]
        info.add_row(f"{key[:-1]} ({unit})", f"median {_x(d['median'])}, min {_x(d['min'])}, max {_x(d['max'])}")
    console.print(info)
    labels = Table(title="Label voxels", title_justify="left")
    for col in ("value", "name", "voxels", "fraction", "cases"):
        labels.add_column(col, justify="right" if col != "name" else "left")
    by_value = fp["label_voxels"]["by_value"]
    total = sum(by_value.values()) or 1
    names = fp["labels"] or {}
    for v, n in by_value.items():
        labels.add_row(v, escape(names.get(v, "")), str(n), f"{n / total:.4f}", str(fp["label_voxels"]["cases_with_value"][v]))
    console.print(labels)
    inten = Table(title="Foreground intensity (label > 0)", title_justify="left")
    for col in ("channel", "p0.5", "median", "p99.5", "mean", "std"):
        inten.add_column(col, justify="right" if col != "channel" else "left")
    for ch, d in fp["intensity_foreground"].items():
        if d is None:
            inten.add_row(escape(ch), "-", "-", "-", "-", "-")
        else:
            inten.add_row(escape(ch), *(f"{d[k]:.4g}" for k in ("percentile_00_5", "median", "percentile_99_5", "mean", "std")))
    console.print(inten)


def _x(values: list[float] | None) -> str:
    return "-" if values is None else " x ".join(f"{v:.4g}" for v in values)
