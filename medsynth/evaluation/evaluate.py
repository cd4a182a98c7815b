"""The ``medsynth evaluate`` job: paired metrics for a pair of files or two datasets, or (unpaired)
distribution metrics for two datasets; optionally a report folder.

Inputs are NIfTI (or MetaImage/NRRD) files read with :func:`medsynth.data.nifti.read_volume`, or
datasets read with :func:`medsynth.data.manifest.read_manifest` (MSD JSON, CSV, nnU-Net folder)
and paired by case id. Images are converted to float64 (as nibabel's ``get_fdata()`` does), so the
metrics are computed in float64 and equal ``medsynth.ssim(img.get_fdata(), ...)`` exactly. The result
is one plain ``dict`` (JSON-ready: non-finite numbers are None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from medsynth.errors import DataError
from medsynth.evaluation.report import (
    REPORT_FILES,
    LoadedSet,
    Preview,
    UnpairedExtras,
    radiomics_summary_lines,
    write_paired_report,
    write_unpaired_report,
)
from medsynth.ownership import own_output
from medsynth.plots import middle_slice
from medsynth.progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import torch

T = TypeVar("T")

#: Paired metric keys, in report order.
PAIRED_METRICS = ("ssim", "psnr", "mae", "ms_ssim")
AFFINE_TOLERANCE_MM = 1e-3

CONVENTIONS = {
    "ssim": "Wang et al. 2004 = skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
    "use_sample_covariance=False): 11-tap Gaussian, mean over the valid region (5-voxel borders left out)",
    "psnr": "10*log10(R^2/MSE) per case; the set value is the mean of the per-case dB values",
    "mae": "mean |reference - candidate| / R",
    "ms_ssim": "Wang 2003, 5 scales (weights 0.0448, 0.2856, 0.3001, 0.2363, 0.1333); only for images "
    "with every side >= 176, else null",
    "mask": "PSNR/MAE over the mask's voxels; SSIM = mean of the SSIM map over mask voxels in the valid region",
}


# ------------------------------------------------------------------------------------ helpers


def parse_data_range(value: str | float) -> float | str:
    """``"auto"`` or a finite number > 0 (as given on the command line)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(f"--data-range must be a number > 0 or 'auto', got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise DataError(f"--data-range must be a number > 0 or 'auto', got {value!r}")
    return number


def jsonable(value: Any) -> Any:
    """Replace non-finite floats (and numpy scalars) by JSON-safe values: NaN/Inf -> None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _with_progress(items: Sequence[T], description: str, enabled: bool) -> Iterator[T]:
    """Iterate over ``items`` with :func:`medsynth.progress.progress_bar` (shown for several items)."""
    with progress_bar(description, len(items), enabled=enabled and len(items) >= 2, transient=True) as bar:
        for item in items:
            yield item
            bar.advance()


def _is_volume_path(path: Path) -> bool:
    from medsynth.data.nifti import volume_suffix

    return bool(volume_suffix(path)) and not path.is_dir()


def _read_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from medsynth.data.nifti import read_volume

    vol = read_volume(path, kind="image")
    if vol.array.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, got shape {vol.array.shape} (one channel per file)")
    arr = np.asarray(vol.array)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: image dtype {arr.dtype} is not real-valued")
    arr = arr.astype(np.float64)  # like nibabel's get_fdata(): the metrics then run in float64
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: image contains NaN or Inf")
    return arr, vol.affine


def _read_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mask file as booleans (non-zero voxels); DataError unless it holds label values (whole,
    non-negative numbers: :func:`medsynth.data.labels.as_label_array`)."""
    from medsynth.data.labels import as_label_array
    from medsynth.data.nifti import read_volume

    vol = read_volume(path, kind="label")
    return as_label_array(vol.array, f"{path} (mask)") != 0, vol.affine


def _same_geometry(a_path: Path, a_shape: tuple, a_aff: np.ndarray, b_path: Path, b_shape: tuple, b_aff: np.ndarray) -> None:
    if tuple(a_shape) != tuple(b_shape):
        raise DataError(f"geometry differs: {a_path} has shape {tuple(a_shape)}, {b_path} has shape {tuple(b_shape)}")
    if not np.allclose(a_aff, b_aff, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        worst = float(np.max(np.abs(a_aff - b_aff)))
        raise DataError(
            f"geometry differs: the affines of {a_path} and {b_path} differ by up to {worst:.4g} mm "
            f"(tolerance {AFFINE_TOLERANCE_MM} mm)"
        )


def _list_ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


# ------------------------------------------------------------------------------------ paired


@dataclass
class PairSpec:
    """One reference/candidate pair: paths per channel and an optional mask file."""

    case_id: str
    reference: list[Path]
    candidate: list[Path]
    mask: Path | None = None


def _pairs(reference: Path, candidate: Path, mask: str | None) -> tuple[str, list[PairSpec], list[str]]:
    """Resolve the inputs into pairs: ``(mode, pairs, reference ids without a candidate)``."""
    ref_is_file, cand_is_file = _is_volume_path(reference), _is_volume_path(candidate)
    if ref_is_file != cand_is_file:
        raise DataError(
            f"REFERENCE and CANDIDATE must both be image files or both be datasets "
            f"(got {reference} and {candidate})"
        )
    if ref_is_file:
        if mask is not None and mask.strip().lower() == "labels":
            raise DataError("--mask labels needs datasets; for two files pass a mask file")
        mask_path = None if mask is None else Path(mask)
        from medsynth.data.nifti import strip_suffix

        return "pair", [PairSpec(strip_suffix(candidate), [reference], [candidate], mask_path)], []
    from medsynth.data.manifest import read_manifest

    ref_m = read_manifest(reference)
    cand_m = read_manifest(candidate)
    ref_cases = {c.case_id: c for c in ref_m.cases}
    missing = [c.case_id for c in cand_m.cases if c.case_id not in ref_cases]
    if missing:
        raise DataError(
            f"{len(missing)} candidate case id(s) have no reference case in {reference}: {_list_ids(missing)}"
        )
    if not cand_m.cases:
        raise DataError(f"{candidate}: the dataset has no cases")
    use_labels = mask is not None and mask.strip().lower() == "labels"
    mask_file = None if (mask is None or use_labels) else Path(mask)
    pairs = []
    for c in cand_m.cases:
        r = ref_cases[c.case_id]
        if len(r.images) != len(c.images):
            raise DataError(f"case {c.case_id}: {len(r.images)} reference channel(s) but {len(c.images)} candidate channel(s)")
        if use_labels and r.label is None:
            raise DataError(f"case {c.case_id}: --mask labels, but the reference case has no label map")
        pairs.append(PairSpec(c.case_id, list(r.images), list(c.images), r.label if use_labels else mask_file))
    files = [f for p in pairs for f in [*p.reference, *p.candidate, *([p.mask] if p.mask else [])]]
    missing_files = list(dict.fromkeys(str(f) for f in files if not Path(f).is_file()))
    if missing_files:
        raise DataError(f"{len(missing_files)} file(s) not found: {_list_ids(missing_files, 10)}")
    matched = {p.case_id for p in pairs}
    unmatched = [cid for cid in ref_cases if cid not in matched]
    return "dataset", pairs, unmatched


def _evaluate_pair(spec: PairSpec, data_range: float | str) -> tuple[dict[str, Any], Preview]:
    from medsynth.data.nifti import check_case_size
    from medsynth.evaluation.metrics import MS_SSIM_WEIGHTS, WINDOW_SIZE, mae, ms_ssim, psnr, ssim

    # the images are held as float64: check what that takes before reading them
    check_case_size([*spec.reference, *spec.candidate], itemsize=np.dtype(np.float64).itemsize)
    refs: list[np.ndarray] = []
    cands: list[np.ndarray] = []
    ref_affine: np.ndarray | None = None
    for rp, cp in zip(spec.reference, spec.candidate):
        ra, raff = _read_image(rp)
        ca, caff = _read_image(cp)
        _same_geometry(rp, ra.shape, raff, cp, ca.shape, caff)
        if refs and ra.shape != refs[0].shape:
            raise DataError(f"case {spec.case_id}: channel files have different shapes ({rp})")
        refs.append(ra)
        cands.append(ca)
        ref_affine = raff if ref_affine is None else ref_affine
    if ref_affine is None:
        raise DataError(f"case {spec.case_id}: no reference image")
    ref = np.stack(refs)[None]  # (1, C, *spatial)
    cand = np.stack(cands)[None]
    spatial = ref.shape[2:]
    mask = None
    if spec.mask is not None:
        m, maff = _read_mask(spec.mask)
        _same_geometry(spec.reference[0], spatial, ref_affine, spec.mask, m.shape, maff)
        if not m.any():
            raise DataError(f"{spec.mask}: the mask is empty")
        mask = m
    if data_range == "auto":
        r = float(ref.max()) - float(ref.min())
        if not r > 0:
            raise DataError(f"case {spec.case_id}: the reference image is constant, so 'auto' gives range 0; pass --data-range R")
    else:
        r = float(data_range)
    if min(spatial) < WINDOW_SIZE:
        raise DataError(f"case {spec.case_id}: image of shape {tuple(spatial)} is smaller than the 11-voxel SSIM window")
    dims = len(spatial)

    def first(value: float | np.ndarray | torch.Tensor) -> float:
        return float(np.asarray(value).reshape(-1)[0])

    try:
        row: dict[str, Any] = {
            "case_id": spec.case_id,
            "ssim": first(ssim(ref, cand, data_range=r, spatial_dims=dims, mask=mask)),
            "psnr": first(psnr(ref, cand, data_range=r, spatial_dims=dims, mask=mask)),
            "mae": first(mae(ref, cand, data_range=r, spatial_dims=dims, mask=mask)),
            "ms_ssim": None,
        }
    except DataError as exc:
        raise DataError(f"case {spec.case_id}: {exc}") from None
    if all(s // 2 ** (len(MS_SSIM_WEIGHTS) - 1) >= WINDOW_SIZE for s in spatial):
        try:
            row["ms_ssim"] = first(ms_ssim(ref, cand, data_range=r, spatial_dims=dims, mask=mask))
        except DataError as exc:  # optional: e.g. a small mask has no voxel left at the coarsest scale
            row["ms_ssim_note"] = str(exc)
    row["data_range"] = r
    row["shape"] = list(spatial)
    preview = Preview(spec.case_id, middle_slice(ref[0, 0]), middle_slice(cand[0, 0]))
    return row, preview


def _stats(values: Iterable[float | None]) -> dict[str, float | None] | None:
    vals = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if vals.size == 0:
        return None
    with np.errstate(invalid="ignore"):
        return {
            "mean": float(vals.mean()),
            "std": float(vals.std()),
            "median": float(np.median(vals)),
            "min": float(vals.min()),
            "max": float(vals.max()),
        }


def evaluate_paired(
    reference: str | Path,
    candidate: str | Path,
    *,
    data_range: float | str,
    mask: str | Path | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[Preview]]:
    """Paired SSIM, PSNR, MAE (and MS-SSIM where the images are large enough) per case.

    reference, candidate: two image files, or two datasets paired by case id (every candidate case
        must exist in the reference; reference cases without a candidate are listed, not evaluated).
    data_range: R > 0, or ``"auto"``: each reference image's ``max - min`` (recorded per case).
    mask: a mask file (non-zero voxels; same geometry) or ``"labels"`` (each reference case's label map).
    Returns ``(summary, previews)``: the JSON-ready summary (top-level means ``ssim``, ``psnr``,
    ``mae``, ``ms_ssim``; ``cases``) and middle slices for the montage.
    """
    data_range = parse_data_range(data_range)
    reference, candidate = Path(reference), Path(candidate)
    mask_arg = None if mask is None else str(mask)
    mode, pairs, unmatched = _pairs(reference, candidate, mask_arg)
    rows, previews = [], []
    for spec in _with_progress(pairs, "evaluate", progress):
        row, preview = _evaluate_pair(spec, data_range)
        rows.append(row)
        previews.append(preview)
    summary: dict[str, Any] = {
        "mode": mode,
        "reference": str(reference),
        "candidate": str(candidate),
        "data_range": data_range,
        "mask": mask_arg,
        "n_cases": len(rows),
    }
    for key in PAIRED_METRICS:
        st = _stats(row[key] for row in rows)
        summary[key] = None if st is None else st["mean"]
    summary["stats"] = {key: _stats(row[key] for row in rows) for key in PAIRED_METRICS}
    summary["reference_cases_without_candidate"] = unmatched
    summary["conventions"] = CONVENTIONS
    summary["cases"] = rows
    return jsonable(summary), previews


# ------------------------------------------------------------------------------------ unpaired


def _load_set(path: Path, what: str, progress: bool) -> LoadedSet:
    from medsynth.data.labels import as_label_array
    from medsynth.data.manifest import read_manifest
    from medsynth.data.nifti import check_case_size, read_volume

    if _is_volume_path(path):
        raise DataError(f"--unpaired compares two datasets; {what} {path} is a single image file")
    manifest = read_manifest(path)
    if not manifest.cases:
        raise DataError(f"{path}: the dataset has no cases")
    missing = [str(p) for c in manifest.cases for p in [c.images[0], *([c.label] if c.label else [])] if not Path(p).exists()]
    if missing:
        raise DataError(f"{what} {path}: {len(missing)} file(s) not found: {_list_ids(missing, 10)}")
    with_labels = all(c.label is not None for c in manifest.cases)
    ids, images, labels = [], [], []
    for case in _with_progress(manifest.cases, f"read {what}", progress):
        check_case_size([case.images[0]], itemsize=np.dtype(np.float64).itemsize, root=manifest.root)
        arr, _ = _read_image(case.images[0])
        ids.append(case.case_id)
        images.append(arr)
        if with_labels:
            lab = as_label_array(read_volume(case.label, kind="label").array, str(case.label))  # type: ignore[arg-type]
            if lab.shape != arr.shape:
                raise DataError(f"case {case.case_id}: label shape {lab.shape} differs from image shape {arr.shape}")
            labels.append(lab)
    return LoadedSet(ids, images, labels if with_labels else None)


def evaluate_unpaired(
    reference: str | Path,
    candidate: str | Path,
    *,
    data_range: float | str,
    threshold: float = 0.95,
    max_pairs: int = 200,
    seed: int = 0,
    fid_weights: str | Path | None = None,
    fid_network: str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], UnpairedExtras]:
    """Distribution metrics of a candidate (synthetic) dataset against a reference (real) dataset.

    Uses channel 0 of each case. data_range: R, or ``"auto"`` = the reference set's ``max - min``
    over all its images (used for diversity and memorisation SSIM). Radiomic features use label
    regions when both datasets have label maps (the values present in all of them), else the
    foreground; they are z-normalised with the reference set. Memorisation compares each candidate
    with every reference image (the reference plays the training set). FID only with ``fid_weights``
    (a state dict for the architecture ``fid_network``, or the one its safetensors metadata names).
    """
    from medsynth.augment.provenance import read_provenance
    from medsynth.data.manifest import read_manifest
    from medsynth.evaluation.distribution import (
        compare_radiomics,
        diversity,
        fid,
        grouped_diversity,
        memorisation,
        warped_sources,
    )
    from medsynth.evaluation.fid_networks import check_fid_weights

    data_range = parse_data_range(data_range)
    if fid_weights is not None:  # before any work: the file, its ending and its architecture's name
        fid_network = check_fid_weights(fid_weights, fid_network)
    reference, candidate = Path(reference), Path(candidate)
    ref = _load_set(reference, "reference", progress)
    cand = _load_set(candidate, "candidate", progress)
    if len(ref.images) < 2 or len(cand.images) < 2:
        raise DataError(f"--unpaired needs at least 2 cases per dataset (got {len(ref.images)} and {len(cand.images)})")
    low = float(min(im.min() for im in ref.images))
    high = float(max(im.max() for im in ref.images))
    if data_range == "auto":
        if not high > low:
            raise DataError("the reference images are all one constant value, so 'auto' gives range 0; pass --data-range R")
        r = high - low
    else:
        r = float(data_range)
    radiomics = compare_radiomics(
        ref.images,
        cand.images,
        ref.labels,
        cand.labels,
        intensity_range=(low, high) if high > low else (low, low + r),
        reference_ids=ref.ids,
        candidate_ids=cand.ids,
        progress=progress,
    )
    div = diversity(cand.images, data_range=r, max_pairs=max_pairs, seed=seed)
    # an augmented candidate's provenance: each case's source, and its deformation drawn again
    records = read_provenance(read_manifest(candidate)) or {}
    warped = warped_sources(records, cand.ids, dict(zip(ref.ids, ref.images)))
    mem = memorisation(cand.images, ref.images, data_range=r, threshold=threshold, synthetic_ids=cand.ids,
                       training_ids=ref.ids, warped=warped)
    sources = [str(records.get(i, {}).get("source", i)) for i in cand.ids]
    within = None
    if len(set(sources)) < len(sources):  # some source made several cases
        within = grouped_diversity(cand.images, sources, data_range=r, max_pairs=max_pairs, seed=seed).to_dict()
    summary: dict[str, Any] = {
        "mode": "unpaired",
        "reference": str(reference),
        "candidate": str(candidate),
        "n_reference": len(ref.images),
        "n_candidate": len(cand.images),
        "data_range": r,
        "data_range_source": "auto (reference set max - min)" if data_range == "auto" else "given",
        "radiomics": radiomics.to_dict(),
        "diversity": div.to_dict(),
        "diversity_within_source": within,
        "diversity_note": "mask deformation and the image method together; the model's own variety (one mask, "
        "several seeds) is medsynth.evaluation.distribution.seed_diversity",
        "memorisation": mem.to_dict(),
        "fid": None,
        "fid_note": "off; pass --fid-weights FILE (a local safetensors state dict of a named network, "
        "see --fid-network) to compute it",
    }
    if fid_weights is not None:
        summary["fid"] = fid(ref.images, cand.images, feature_weights=fid_weights, network=fid_network)
        summary["fid_note"] = f"features from {fid_weights}" + (f" ({fid_network})" if fid_network else "")
    extras = UnpairedExtras(ref, cand, radiomics.reference_z, radiomics.candidate_z)
    return jsonable(summary), extras


# ------------------------------------------------------------------------------------ the job


def run_evaluate(reference: str | Path, candidate: str | Path, *, out: str | Path | None = None,
                 overwrite: bool = False, **options: Any) -> dict[str, Any]:
    """The job behind ``medsynth evaluate``: compute, optionally write the report folder, return the summary.

    out: the report folder, claimed before anything is computed (:func:`medsynth.ownership.own_output`):
    new or empty, or with ``overwrite`` a folder where only the report files an earlier evaluate made
    are replaced (other files stay, and a file of the same name it did not make stops it); never in,
    on or around an input dataset's folder. options: those of :func:`evaluate_report`."""
    if out is None:
        return evaluate_report(reference, candidate, **options)
    with own_output(Path(out), "evaluate", overwrite=overwrite, writes=REPORT_FILES,
                    inputs=[Path(reference), Path(candidate)]) as owned:
        summary = evaluate_report(reference, candidate, out=out, **options)
        owned.record(*map(Path, summary["files"]))
    return summary


def evaluate_report(
    reference: str | Path,
    candidate: str | Path,
    *,
    data_range: float | str,
    mask: str | Path | None = None,
    unpaired: bool = False,
    out: str | Path | None = None,
    fid_weights: str | Path | None = None,
    fid_network: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute the metrics and, with ``out`` (a folder :func:`run_evaluate` holds), write the report
    files there; return the summary."""
    out_path = None if out is None else Path(out)
    if unpaired:
        if mask is not None:
            raise DataError("--mask applies to paired evaluation only")
        summary, extras = evaluate_unpaired(
            reference, candidate, data_range=data_range, fid_weights=fid_weights, fid_network=fid_network,
            progress=progress,
        )
        if out_path is not None:
            summary["files"] = [str(p) for p in write_unpaired_report(summary, extras, out_path)]
        return summary
    if fid_weights is not None or fid_network is not None:
        raise DataError("--fid-weights and --fid-network apply to --unpaired evaluation only")
    summary, previews = evaluate_paired(reference, candidate, data_range=data_range, mask=mask, progress=progress)
    if out_path is not None:
        summary["files"] = [str(p) for p in write_paired_report(summary, previews, out_path)]
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable text of a summary (what the CLI prints without --json)."""

    def num(v: object, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = []
    if summary["mode"] == "unpaired":
        rad, div, mem = summary["radiomics"], summary["diversity"], summary["memorisation"]
        lines.append(f"{summary['n_candidate']} candidate vs {summary['n_reference']} reference images "
                     f"(unpaired, R = {summary['data_range']:g})")
        regions = "foreground" if rad["regions"] is None else f"labels {rad['regions']}"
        lines.append(f"  radiomic Frechet distance {num(rad['frechet_distance'], '.4g')}   "
                     f"MMD^2 {num(rad['mmd2'], '.4g')}   ({rad['n_features']} scikit-image features, {regions})")
        lines.extend(radiomics_summary_lines(rad))
        lines.append(f"  diversity: mean pairwise {div['metric']} {num(div['mean'], '.4f')} over {div['pairs']} pairs "
                     "(lower = more diverse)")
        within = summary.get("diversity_within_source")
        if within:
            lines.append(f"    within one source case (its deformations and images): {within['metric']} "
                         f"{num(within['mean'], '.4f')} over {within['pairs']} pairs")
        lines.append(f"  memorisation: {mem['flagged']} of {summary['n_candidate']} with SSIM >= {mem['threshold']} "
                     f"to a reference image (max {num(mem['max_ssim_max'], '.4f')}) or to its own source warped "
                     f"the same way ({mem['warped_source_checked']} checked, max "
                     f"{num(mem['warped_source_ssim_max'], '.4f')})")
        if mem["flagged_cases"]:
            lines.append(f"    flagged: {_list_ids(mem['flagged_cases'])}")
        lines.append(f"  FID: {num(summary['fid'], '.4g')} ({summary['fid_note']})")
    else:
        st = summary["stats"]
        mask_text = f", mask {summary['mask']}" if summary["mask"] else ""
        lines.append(f"{summary['n_cases']} case(s), data range {summary['data_range']}{mask_text}")
        for key, fmt in (("ssim", ".4f"), ("psnr", ".2f"), ("mae", ".4g"), ("ms_ssim", ".4f")):
            if st.get(key):
                s = st[key]
                lines.append(f"  {key:8s} mean {num(s['mean'], fmt)}  std {num(s['std'], fmt)}  "
                             f"min {num(s['min'], fmt)}  max {num(s['max'], fmt)}")
        if summary["reference_cases_without_candidate"]:
            skipped = len(summary["reference_cases_without_candidate"])
            lines.append(f"  ({skipped} reference case(s) without a candidate were skipped)")
    if summary.get("files"):
        lines.append(f"  wrote {len(summary['files'])} file(s) to {Path(summary['files'][0]).parent}")
    return "\n".join(lines)
