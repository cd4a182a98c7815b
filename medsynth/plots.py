"""The pictures of medsynth's reports: figures, slices of volumes, and each chart as a function from
plain numbers to a PNG file. ``medsynth demo``, ``medsynth evaluate`` and the downstream report draw
with these.

Figures use matplotlib's Agg canvas directly (no pyplot, no global backend switch) and are written
atomically. Slices are shown the way the rest of medsynth shows them: NIfTI index ``(i, j)`` with
``i`` horizontal and ``j`` vertical, upwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsynth.data.atomic import atomic_write_with, shown

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = ["CasePair", "CurvePanel", "case_preview", "case_preview_figure", "downstream_chart", "fit_to_text", "grid",
           "label_preview", "label_preview_figure", "middle_slice", "new_figure", "outlines", "save_png", "show_slice",
           "shown_text", "text_overflow", "training_curves"]

#: label maps are drawn with this qualitative colour map, values 0..9
LABEL_CMAP = "tab10"


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure with its own Agg canvas (no global pyplot state, no display needed); inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def grid(rows: int, cols: int, scale: float = 1.6) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x cols`` axes, ``scale`` inches each; the axes as a ``(rows, cols)`` array."""
    fig = new_figure(cols * scale, rows * scale)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically (the folder is created if needed); a name that is not UTF-8 in
    its text is drawn escaped (:func:`shown_text`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    shown_text(fig)
    return atomic_write_with(Path(path), lambda tmp: fig.savefig(tmp, format="png"))


def shown_text(fig: Figure) -> Figure:
    """Every title, label and legend entry of ``fig`` with the bytes of a file name that are not UTF-8
    shown escaped (:func:`medsynth.data.atomic.shown`: ``c\\udcff``); matplotlib cannot draw a surrogate
    escape. Returns ``fig``."""
    from matplotlib.text import Text

    for artist in fig.findobj(Text):
        text = artist.get_text()
        if isinstance(text, str) and shown(text) != text:
            artist.set_text(shown(text))
    return fig


def middle_slice(array: np.ndarray) -> np.ndarray:
    """``(H, W)`` as it is; ``(X, Y, Z)``: the middle slice along the last axis, ``(X, Y)``."""
    return array if array.ndim == 2 else array[..., array.shape[-1] // 2]


def show_slice(ax: Axes, image: np.ndarray, *, vmin: float | None = None, vmax: float | None = None,
               cmap: str = "gray", label: bool = False, title: str | None = None) -> AxesImage:
    """Draw a 2D slice ``(i, j)`` on ``ax`` without ticks (``label``: a label map, in
    :data:`LABEL_CMAP`); returns the image artist (for a colour bar)."""
    if label:
        cmap, vmin, vmax = LABEL_CMAP, 0, 9
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax.imshow(np.asarray(image).T, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")


def downstream_chart(names: Sequence[str], per_seed: Sequence[Sequence[float | None]], path: Path, *,
                     reference: str | None = None, ylabel: str = "mean Dice",
                     ylim: tuple[float, float] = (0.0, 1.0)) -> Path:
    """A bar per variant (the mean over seeds) with each seed's value as a point; ``path`` (PNG).

    names: variant names; per_seed: for each variant, one value per seed (None or NaN: missing).
    reference: the variant drawn as a dashed horizontal line across the chart. ylim: the value axis
    (bars start at its lower end, so keep it at 0 for a quantity like Dice)."""
    values = [np.array([np.nan if x is None else float(x) for x in seeds], dtype=np.float64) for seeds in per_seed]
    means = [float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for v in values]
    fig = new_figure(max(4.0, 0.9 * len(names) + 1.5), 3.6)
    ax = fig.subplots()
    x = np.arange(len(names))
    colors = ["tab:gray" if n == reference else ("tab:orange" if n.endswith("+classic") else "tab:blue") for n in names]
    ax.bar(x, np.nan_to_num(means), color=colors, alpha=0.6, width=0.7)
    rng = np.random.default_rng(0)  # fixed jitter: the same numbers draw the same picture
    for i, v in enumerate(values):
        ok = v[np.isfinite(v)]
        ax.scatter(i + rng.uniform(-0.15, 0.15, ok.size), ok, color="black", s=12, zorder=3)
    if reference is not None and reference in names:
        ref = means[list(names).index(reference)]
        if np.isfinite(ref):
            ax.axhline(ref, color="tab:gray", linestyle="--", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title("bars: mean over seeds; points: one seed each", fontsize=8)
    return save_png(fig, Path(path))


@dataclass(frozen=True)
class CurvePanel:
    """One panel of :func:`training_curves`: a logged quantity over training steps.

    title: e.g. ``"diffusion: mse"``; steps / values: the points (equal length); points: draw markers
    (evaluations) rather than a line only; marks: steps to mark with a faint vertical line (the
    evaluation steps of the stage)."""

    title: str
    steps: Sequence[int]
    values: Sequence[float]
    points: bool = False
    marks: Sequence[int] = ()


def training_curves(panels: Sequence[CurvePanel], path: Path, *, columns: int = 4) -> Path:
    """Small multiples, one :class:`CurvePanel` each in the given order, ``columns`` per row; a panel
    whose values are all positive uses a log value axis. Writes ``path`` (PNG)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    n = max(1, len(panels))
    cols = min(columns, n)
    rows = -(-n // cols)
    width, height = 2.6 * cols, 1.9 * rows
    fig = new_figure(width, height)
    fig.set_layout_engine(None)  # fixed margins: constrained layout costs seconds for many panels
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": 0.55 / width, "right": 1 - 0.15 / width, "bottom": 0.4 / height, "top": 1 - 0.3 / height,
        "wspace": 0.45, "hspace": 0.7})
    for k, ax in enumerate(axes.ravel()):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        p = panels[k]
        steps = np.asarray(p.steps, dtype=np.float64)
        values = np.asarray(p.values, dtype=np.float64)
        for s in p.marks:
            ax.axvline(float(s), color="0.85", linewidth=0.8, zorder=0)
        ax.plot(steps, values, color="tab:orange" if p.points else "tab:blue", linewidth=1.2,
                marker="o" if p.points else None, markersize=3)
        finite = values[np.isfinite(values)]
        if finite.size and bool((finite > 0).all()):
            ax.set_yscale("log")
            lo, hi = float(finite.min()), float(finite.max())
            digits = 3 + max(0, int(np.ceil(np.log10(hi / max(hi - lo, hi * 1e-12)))) - 1)  # narrow ranges: more
            plain = FuncFormatter(lambda v, _, d=digits: f"{v:.{d}g}")
            ax.yaxis.set_major_formatter(plain)
            # within one decade the minor ticks carry the only labels; across decades they would crowd
            ax.yaxis.set_minor_formatter(plain if hi < 10 * lo else NullFormatter())
        ax.set_title(p.title, fontsize=8)
        ax.tick_params(which="both", labelsize=6)
        ax.set_xlabel("step", fontsize=6)
    if not panels:
        axes[0][0].text(0.5, 0.5, "nothing logged yet", ha="center", va="center", fontsize=8)
    return save_png(fig, Path(path))


def label_preview(masks: Sequence[np.ndarray], rows: Mapping[str, Sequence[np.ndarray]], legend: Sequence[str],
                  path: Path, *, scale: float = 1.8) -> Path:
    """:func:`label_preview_figure` written to ``path`` (PNG)."""
    return save_png(label_preview_figure(masks, rows, legend, scale=scale), Path(path))


def label_preview_figure(masks: Sequence[np.ndarray], rows: Mapping[str, Sequence[np.ndarray]],
                         legend: Sequence[str], *, scale: float = 1.8) -> Figure:
    """A grid of 2D slices with a label legend: the first row the label maps, then one row per entry
    of ``rows``, one column per sample; widened where the legend needs it (:func:`fit_to_text`).

    masks: label channel indices ``(i, j)`` (0 = background), drawn in :data:`LABEL_CMAP`; rows: name ->
    one image ``(i, j)`` in [0, 1] per sample (grey, 0 black, 1 white); legend: the name of each
    channel index, shown as given (at most the colour map's 10 colours are told apart)."""
    from matplotlib.patches import Patch

    names = ["mask", *rows]
    cells = [list(masks), *(list(v) for v in rows.values())]
    ncol = max(1, len(masks))
    fig = new_figure(scale * ncol, scale * len(names) + 0.5)
    axes = fig.subplots(len(names), ncol, squeeze=False)
    for r, (name, images) in enumerate(zip(names, cells)):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(images):
                ax.set_axis_off()
                continue
            if r == 0:
                show_slice(ax, images[c], label=True)
            else:
                show_slice(ax, np.clip(images[c], 0.0, 1.0), vmin=0.0, vmax=1.0)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    from matplotlib import colormaps

    colours = colormaps[LABEL_CMAP]
    handles = [Patch(color=colours(i % 10), label=name) for i, name in enumerate(legend)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=7,
                   frameon=False)
    return fit_to_text(fig)


def fit_to_text(fig: Figure, pad: float = 0.05, rounds: int = 4) -> Figure:
    """Widen ``fig`` until every title, label and legend lies inside it (``pad`` inches spare on each
    side); a figure whose text already fits is left as it is. Returns ``fig``."""
    for _ in range(rounds):
        over = text_overflow(fig)
        if over <= 0:
            break
        fig.set_figwidth(fig.get_figwidth() + 2 * (over + pad))
    return fig


def text_overflow(fig: Figure) -> float:
    """How far (inches) the widest-reaching visible text or legend of ``fig`` sticks out of its left
    or right edge after a draw (0 or less: everything fits)."""
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    shown_text(fig)
    fig.draw_without_rendering()
    width = fig.bbox.width
    over = 0.0
    for artist in fig.findobj(lambda a: isinstance(a, (Text, Legend))):
        if not artist.get_visible() or (isinstance(artist, Text) and not artist.get_text()):
            continue
        box = artist.get_window_extent(renderer)
        over = max(over, -box.x0, box.x1 - width)
    return over / fig.dpi


@dataclass(frozen=True)
class CasePair:
    """One panel pair of :func:`case_preview_figure`: a generated case beside its source.

    title: e.g. ``"syn_0003 (gan)"``; image: the generated image ``(i, j)``; label: its label map
    ``(i, j)`` (label values; outlined in :data:`LABEL_CMAP`, the colour of value ``v`` being that of
    the ``v``-th entry of the legend's values); source: the image it came from ``(i, j)`` (a real
    labelled case, or the unlabelled image of an anatomy bank), or None; source_title: its caption."""

    title: str
    image: np.ndarray
    label: np.ndarray
    source: np.ndarray | None = None
    source_title: str = "source"


def case_preview_figure(pairs: Sequence[CasePair], legend: Mapping[int, str], *, per_row: int = 3,
                        scale: float = 1.8) -> Figure:
    """Generated cases with their label maps outlined, each beside its source image: ``per_row``
    pairs (source, generated) a row, and a legend naming every non-zero label value of ``legend``
    (value -> name; colours by position, as :func:`label_preview`). Images are windowed at their
    0.5-99.5 percentiles. Fixed margins (no constrained layout: this is drawn at every augment)."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    colours = colormaps[LABEL_CMAP]
    order = sorted(legend)
    colour_of = {v: colours(i % 10) for i, v in enumerate(order)}
    cols = max(1, min(per_row, len(pairs)))
    rows = max(1, -(-len(pairs) // cols))
    width, height = 2 * cols * scale, rows * (scale + 0.25) + 0.45
    fig = new_figure(width, height)
    fig.set_layout_engine(None)
    axes = fig.subplots(rows, 2 * cols, squeeze=False, gridspec_kw={
        "left": 0.05 / width, "right": 1 - 0.05 / width, "bottom": 0.45 / height, "top": 1 - 0.25 / height,
        "wspace": 0.04, "hspace": 0.25 / scale})
    for k in range(rows * cols):
        left, right = axes[k // cols][2 * (k % cols)], axes[k // cols][2 * (k % cols) + 1]
        if k >= len(pairs):
            left.set_axis_off()
            right.set_axis_off()
            continue
        p = pairs[k]
        if p.source is None:
            left.set_axis_off()
        else:
            src = np.asarray(p.source, dtype=np.float64)
            show_slice(left, src, vmin=float(np.percentile(src, 0.5)), vmax=float(np.percentile(src, 99.5)),
                       title=p.source_title)
        img = np.asarray(p.image, dtype=np.float64)
        show_slice(right, img, vmin=float(np.percentile(img, 0.5)), vmax=float(np.percentile(img, 99.5)),
                   title=p.title)
        lab = np.asarray(p.label)
        right.imshow(outlines(lab, colour_of).transpose(1, 0, 2), origin="lower", interpolation="nearest",
                     extent=(-0.5, lab.shape[0] - 0.5, -0.5, lab.shape[1] - 0.5))
    handles = [Line2D([], [], color=colour_of[v], linewidth=2, label=f"{v} {legend[v]}".strip()) for v in order if v]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    return fit_to_text(fig)


def outlines(label: np.ndarray, colour_of: Mapping[int, tuple[float, ...]], side: int = 256) -> np.ndarray:
    """RGBA ``(f * i, f * j, 4)`` of a 2D label map ``(i, j)`` drawn ``f`` times finer (``f`` up to 8,
    so that the longer side is at most about ``side`` pixels): the boundary pixels of each non-zero
    label value in its colour (a pixel whose 4-neighbour has another value), transparent elsewhere,
    so that a thin line, not whole voxels, marks each boundary on a small image."""
    f = max(1, min(8, side // max(1, max(label.shape))))
    label = np.kron(np.asarray(label), np.ones((f,) * label.ndim, dtype=np.asarray(label).dtype))
    edge = np.zeros(label.shape, bool)
    for axis in range(label.ndim):
        diff = np.diff(label, axis=axis) != 0
        lo = [slice(None)] * label.ndim
        hi = [slice(None)] * label.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= diff
        edge[tuple(hi)] |= diff
    rgba = np.zeros((*label.shape, 4), np.float32)
    for v, colour in colour_of.items():
        if v:
            rgba[edge & (label == v)] = colour
    return rgba


def case_preview(pairs: Sequence[CasePair], legend: Mapping[int, str], path: Path, *, per_row: int = 3) -> Path:
    """:func:`case_preview_figure` written to ``path`` (PNG)."""
    return save_png(case_preview_figure(pairs, legend, per_row=per_row), Path(path))
