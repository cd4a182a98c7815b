"""The ``--out`` report folder of ``medsynth evaluate``: ``metrics.csv``, ``summary.json`` and PNGs.

Pictures are drawn with :mod:`medsynth.plots` (matplotlib's Agg canvas, no pyplot), and every file
is written atomically.

Paired: ``metrics.csv`` (one row per case), ``summary.json``, ``metrics.png`` (per-case
distribution of each metric: box plot with the cases as points), ``montage.png`` (middle slices of
up to four cases, best / median / worst SSIM: reference, candidate, absolute difference).
Unpaired: ``metrics.csv`` (one row per candidate: nearest reference image and its SSIM, and its
SSIM to its own source image warped by the same deformation when the provenance tells it),
``summary.json``, ``features.png`` (the two sets in the first two principal components of the
z-normalised radiomic features; the title gives the distances with their bootstrap intervals and
says when the sets are too small for the number of features), ``memorisation.png`` (histogram of each candidate's highest SSIM
to a reference image, with the threshold) and ``montage.png`` (the most similar candidate/reference
pairs).

The records the report draws besides a summary (:class:`Preview`, :class:`LoadedSet`,
:class:`UnpairedExtras`) are defined here; :mod:`medsynth.evaluation.evaluate` fills them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsynth.data.atomic import atomic_write_text
from medsynth.plots import fit_to_text, middle_slice, new_figure, save_png, show_slice

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: every file a report may hold (an overwrite replaces only those an earlier evaluate made)
REPORT_FILES = ("metrics.csv", "summary.json", "metrics.png", "montage.png", "features.png", "memorisation.png")
PAIRED_COLUMNS = ("case_id", "ssim", "psnr", "mae", "ms_ssim", "data_range")
METRIC_LABELS = {"ssim": "SSIM", "psnr": "PSNR (dB)", "mae": "MAE / R", "ms_ssim": "MS-SSIM"}


@dataclass
class Preview:
    """Middle slices kept for the paired montage (channel 0; :func:`medsynth.plots.middle_slice`)."""

    case_id: str
    reference: np.ndarray
    candidate: np.ndarray


@dataclass
class LoadedSet:
    """One dataset of the unpaired comparison: case ids, images (channel 0, float64, 2D or 3D) and
    label maps (None when a case has none)."""

    ids: list[str]
    images: list[np.ndarray]
    labels: list[np.ndarray] | None


@dataclass
class UnpairedExtras:
    """What the unpaired report draws besides the summary: both sets and their z-normalised
    radiomic features ``(cases, features)``."""

    reference: LoadedSet
    candidate: LoadedSet
    reference_z: np.ndarray
    candidate_z: np.ndarray


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


# ------------------------------------------------------------------------------------ paired


def write_paired_report(summary: dict[str, Any], previews: Sequence[Preview], out: Path) -> list[Path]:
    """Write the paired report files into ``out`` (created if needed). Returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summary["cases"]
    written = [
        atomic_write_text(out / "metrics.csv", _csv(rows, PAIRED_COLUMNS)),
        atomic_write_text(out / "summary.json", _json(summary)),
        save_png(_distribution_figure(rows), out / "metrics.png"),
    ]
    if previews:
        written.append(save_png(_paired_montage(rows, previews), out / "montage.png"))
    return written


def _distribution_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    keys = [k for k in METRIC_LABELS if any(r.get(k) is not None for r in rows)]
    fig = new_figure(3.0 * max(len(keys), 1), 4.0)
    axes = fig.subplots(1, max(len(keys), 1), squeeze=False)[0]
    rng = np.random.default_rng(0)  # horizontal jitter of the points only
    for ax, key in zip(axes, keys):
        values = np.asarray([r[key] for r in rows if r.get(key) is not None], dtype=np.float64)
        ax.boxplot(values, widths=0.5, showfliers=False)
        ax.scatter(1 + rng.uniform(-0.12, 0.12, size=values.size), values, s=14, alpha=0.7, color="tab:blue", zorder=3)
        ax.set_title(f"{METRIC_LABELS[key]}\nmean {values.mean():.4g} (n={values.size})", fontsize=10)
        ax.set_xticks([])
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("per-case metrics", fontsize=11)
    return fig


def _pick_cases(rows: Sequence[dict[str, Any]], limit: int = 4) -> list[int]:
    """Indices of up to ``limit`` cases spanning the SSIM range: best, median(s), worst."""
    order = sorted(range(len(rows)), key=lambda i: -(rows[i]["ssim"] if rows[i]["ssim"] is not None else -np.inf))
    if len(order) <= limit:
        return order
    picks = np.linspace(0, len(order) - 1, limit).round().astype(int)
    return [order[p] for p in picks]


def _paired_montage(rows: Sequence[dict[str, Any]], previews: Sequence[Preview]) -> Figure:
    picks = _pick_cases(rows)
    fig = new_figure(9.0, 3.0 * len(picks))
    axes = fig.subplots(len(picks), 3, squeeze=False)
    for r, i in enumerate(picks):
        p, row = previews[i], rows[i]
        lo = float(min(p.reference.min(), p.candidate.min()))
        hi = float(max(p.reference.max(), p.candidate.max()))
        diff = np.abs(p.reference.astype(np.float64) - p.candidate.astype(np.float64))
        show_slice(axes[r, 0], p.reference, vmin=lo, vmax=hi)
        show_slice(axes[r, 1], p.candidate, vmin=lo, vmax=hi)
        im = show_slice(axes[r, 2], diff, vmin=0.0, vmax=float(diff.max()) or 1.0, cmap="magma")
        fig.colorbar(im, ax=axes[r, 2], fraction=0.046)
        ssim_txt = "n/a" if row["ssim"] is None else f"{row['ssim']:.4f}"
        psnr_txt = "inf" if row["psnr"] is None else f"{row['psnr']:.2f} dB"
        axes[r, 0].set_ylabel(f"{p.case_id}\nSSIM {ssim_txt}\nPSNR {psnr_txt}", fontsize=9)
    axes[0, 0].set_title("reference")
    axes[0, 1].set_title("candidate")
    axes[0, 2].set_title("|difference|")
    return fig


# ------------------------------------------------------------------------------------ unpaired


def write_unpaired_report(summary: dict[str, Any], extras: UnpairedExtras, out: Path) -> list[Path]:
    """Write the unpaired report files into ``out`` (created if needed). Returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mem = summary["memorisation"]
    rows = [
        {"case_id": c["case_id"], "nearest_reference": c["nearest_id"], "max_ssim": c["max_ssim"],
         "warped_source_ssim": c.get("warped_source_ssim"), "flagged": c["flagged"]}
        for c in mem["cases"]
    ]
    columns = ("case_id", "nearest_reference", "max_ssim", "warped_source_ssim", "flagged")
    written = [
        atomic_write_text(out / "metrics.csv", _csv(rows, columns)),
        atomic_write_text(out / "summary.json", _json(summary)),
        save_png(_feature_figure(summary, extras), out / "features.png"),
        save_png(_memorisation_figure(mem), out / "memorisation.png"),
    ]
    montage = _nearest_montage(mem, extras)
    if montage is not None:
        written.append(save_png(montage, out / "montage.png"))
    return written


def _feature_figure(summary: dict[str, Any], extras: UnpairedExtras) -> Figure:
    ref, cand = extras.reference_z, extras.candidate_z
    centre = ref.mean(axis=0)
    # principal axes of the reference set (z-normalised features)
    _, _, vt = np.linalg.svd(ref - centre, full_matrices=False)
    comps = vt[: min(2, vt.shape[0])]
    pr, pc = (ref - centre) @ comps.T, (cand - centre) @ comps.T
    if pr.shape[1] == 1:
        pr = np.hstack([pr, np.zeros_like(pr)])
        pc = np.hstack([pc, np.zeros_like(pc)])
    fig = new_figure(5.5, 5.0)
    ax = fig.subplots()
    ax.scatter(pr[:, 0], pr[:, 1], s=22, alpha=0.75, label=f"reference (n={len(ref)})")
    ax.scatter(pc[:, 0], pc[:, 1], s=22, alpha=0.75, marker="^", label=f"candidate (n={len(cand)})")
    ax.set_title(radiomics_title(summary["radiomics"]), fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return fit_to_text(fig)


def _interval(ci: object) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f" [{ci[0]:.4g}, {ci[1]:.4g}]"
    return ""


def radiomics_title(rad: dict[str, Any]) -> str:
    """The distances of a radiomic comparison (``RadiomicComparison.to_dict()``) in a few lines: each with
    its bootstrap interval, the reference set's distance to itself, and a warning for small sets."""
    fd, mmd2 = rad.get("frechet_distance"), rad.get("mmd2")
    lines = ["radiomic features, reference PCA"]
    if fd is not None and mmd2 is not None:
        conf = f" ({100 * float(rad.get('confidence', 0.95)):.0f}% bootstrap)" if rad.get("frechet_ci") else ""
        lines.append(f"Frechet distance {fd:.4g}{_interval(rad.get('frechet_ci'))}{conf}")
        lines.append(f"MMD^2 {mmd2:.4g}{_interval(rad.get('mmd2_ci'))}")
        if rad.get("frechet_null") is not None and rad.get("frechet_p") is not None:
            lines.append(f"one distribution at these sizes gives Frechet {rad['frechet_null']:.4g}")
            lines.append(f"permutation p = {rad['frechet_p']:.3g} (MMD^2 p = {rad['mmd2_p']:.3g})")
    if rad.get("warning"):
        lines.append(f"too few images for {rad.get('n_features')} features: distances unreliable")
    return "\n".join(lines)


def radiomics_summary_lines(rad: dict[str, Any]) -> list[str]:
    """Text lines (indented) that say how far to trust a radiomic comparison (``RadiomicComparison.to_dict()``):
    the bootstrap intervals, the distance two sets of one distribution give at these sizes, the permutation
    p-values, and the small-set warning. Empty without bootstrap and warning."""
    lines = []
    if rad.get("frechet_ci") and rad.get("frechet_null") is not None:
        conf = 100 * float(rad.get("confidence", 0.95))
        lines.append(f"    {conf:.0f}% bootstrap interval: Frechet{_interval(rad['frechet_ci'])}, "
                     f"MMD^2{_interval(rad.get('mmd2_ci'))}; one distribution at these sizes gives Frechet "
                     f"{rad['frechet_null']:.4g}; permutation p = {rad['frechet_p']:.3g} (MMD^2 p = {rad['mmd2_p']:.3g})")
    if rad.get("warning"):
        lines.append(f"    warning: {rad['warning']}")
    return lines


def _memorisation_figure(mem: dict[str, Any]) -> Figure:
    values = np.asarray([c["max_ssim"] for c in mem["cases"] if c["max_ssim"] is not None], dtype=np.float64)
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    if values.size:
        ax.hist(values, bins=min(30, max(5, values.size)), color="tab:blue", alpha=0.8)
    ax.axvline(mem["threshold"], color="tab:red", linestyle="--", label=f"threshold {mem['threshold']}")
    ax.set_xlabel("highest SSIM of a candidate to any reference image")
    ax.set_ylabel("candidates")
    ax.set_title(f"memorisation check: {mem['flagged']} flagged", fontsize=10)
    ax.legend(fontsize=9)
    return fig


def _nearest_montage(mem: dict[str, Any], extras: UnpairedExtras, limit: int = 4) -> Figure | None:
    cases = [c for c in mem["cases"] if c["max_ssim"] is not None]
    if not cases:
        return None
    cases = sorted(cases, key=lambda c: -c["max_ssim"])[:limit]
    cand_index = {cid: i for i, cid in enumerate(extras.candidate.ids)}
    ref_index = {cid: i for i, cid in enumerate(extras.reference.ids)}
    fig = new_figure(6.5, 3.0 * len(cases))
    axes = fig.subplots(len(cases), 2, squeeze=False)
    for r, c in enumerate(cases):
        a = middle_slice(extras.candidate.images[cand_index[c["case_id"]]])
        b = middle_slice(extras.reference.images[ref_index[c["nearest_id"]]])
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        show_slice(axes[r, 0], a, vmin=lo, vmax=hi)
        show_slice(axes[r, 1], b, vmin=lo, vmax=hi)
        flag = "  FLAGGED" if c["flagged"] else ""
        axes[r, 0].set_ylabel(f"{c['case_id']}\nSSIM {c['max_ssim']:.4f}{flag}", fontsize=9)
        axes[r, 1].set_ylabel(c["nearest_id"], fontsize=9)
    axes[0, 0].set_title("candidate")
    axes[0, 1].set_title("nearest reference")
    return fig
