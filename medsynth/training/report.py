"""The run report: ``RUN/report.md`` and ``RUN/curves.png``, built from the run folder alone.

The training engine writes both on rank 0 at every checkpoint and at the end of each stage;
``medsynth report RUN`` rebuilds them from the same files, so the two agree. What is read::

    RUN/config.yaml        the resolved recipe (name, family, data settings)
    RUN/metrics.jsonl      {"kind": "start" | "train" | "eval", "step", ["stage"], ...} records
    RUN/previews/          the newest preview image of each stage
    RUN/model_card.json    when training finished: labels, channels, normalisation

One home for the numbers a run reports: :func:`stage_summaries` reads the last ``train`` and ``eval``
record of each stage; the progress line, the end-of-run summary (:func:`summary_line`) and the
report all print those records through :func:`format_losses`. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.data.ledger import made_by
from medsynth.errors import CheckpointError

__all__ = [
    "CURVES_FILE",
    "METRICS_FILE",
    "REPORT_FILE",
    "StageSummary",
    "curve_panels",
    "format_losses",
    "loss_values",
    "read_metrics",
    "stage_summaries",
    "summary_line",
    "write_report",
]

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"
#: record keys that are not logged quantities
_META_KEYS = frozenset({"kind", "step", "stage", "samples_per_s"})


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` in file order (a line cut by a kill is skipped; no file: [])."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict) and isinstance(rec.get("kind"), str) and isinstance(rec.get("step"), int):
                records.append(rec)
    return records


def loss_values(record: dict[str, Any]) -> dict[str, float]:
    """The logged quantities of a ``train`` or ``eval`` record (its numbers but step and throughput)."""
    return {k: float(v) for k, v in record.items()
            if k not in _META_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_losses(values: dict[str, float]) -> str:
    """``"g_l1=0.1234 d=1.98"``: 4 significant digits, in logging order."""
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


@dataclass
class StageSummary:
    """One stage's last records. stage: None for a family without stages; step: the last logged
    training step (0: none yet); max_steps: the steps the newest training call aimed at (None: not
    recorded); losses: the last ``train`` record's quantities (means over ``training.log_every``
    steps); evaluation / eval_step: the last ``eval`` record; samples_per_s: the last throughput;
    start: the newest ``start`` record (device, threads, processes)."""

    stage: str | None
    step: int = 0
    max_steps: int | None = None
    losses: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None
    samples_per_s: float | None = None
    start: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps


def _family_stages(config: dict[str, Any]) -> tuple[str, ...]:
    from medsynth.registry import family_names, get_family

    model = config.get("model")
    name = model.get("family") if isinstance(model, dict) else None
    return get_family(name).stages if isinstance(name, str) and name in family_names() else ()


def stage_summaries(records: list[dict[str, Any]], stages: tuple[str, ...] = ()) -> list[StageSummary]:
    """One :class:`StageSummary` per stage: ``stages`` in order (a staged family's, possibly not
    started yet), then any other stage the records name, in order of appearance."""
    found: dict[str | None, StageSummary] = {s: StageSummary(s) for s in stages}
    for rec in records:
        stage = rec.get("stage")
        summary = found.setdefault(stage if isinstance(stage, str) else None, StageSummary(stage))
        kind, step = rec["kind"], int(rec["step"])
        if kind == "start":
            summary.start = rec
            if isinstance(rec.get("max_steps"), int):
                summary.max_steps = int(rec["max_steps"])
            summary.step = max(summary.step, step)
        elif kind == "train":
            summary.step, summary.losses = step, loss_values(rec)
            rate = rec.get("samples_per_s")
            summary.samples_per_s = float(rate) if isinstance(rate, (int, float)) else None
        elif kind == "eval":
            summary.evaluation, summary.eval_step = loss_values(rec), step
    if stages:
        found.pop(None, None)  # a staged family logs nothing outside its stages
    return list(found.values())


def summary_line(run_dir: Path) -> str:
    """``trained N steps: RUN (losses)`` from the last ``train`` record of each stage in
    ``RUN/metrics.jsonl`` (N: the last stage's step; a staged run names each stage's steps)."""
    run_dir = Path(run_dir)
    summaries = [s for s in stage_summaries(read_metrics(run_dir)) if s.step or s.losses]
    if not summaries:
        return f"trained 0 steps: {run_dir}"
    last = summaries[-1]
    if len(summaries) == 1 and last.stage is None:
        detail = format_losses(last.losses)
    else:
        detail = "; ".join(f"{s.stage} {s.step} steps: {format_losses(s.losses) or 'no losses logged'}"
                           for s in summaries)
    return f"trained {last.step} steps: {run_dir}" + (f" ({detail})" if detail else "")


# ---------------------------------------------------------------------------- curves


def curve_panels(records: list[dict[str, Any]]) -> list[Any]:
    """:class:`medsynth.plots.CurvePanel` for every logged quantity: per stage (in order of
    appearance), the training losses, then the evaluation scores; evaluation steps are marked."""
    from medsynth.plots import CurvePanel

    series: dict[tuple[str | None, str, str], tuple[list[int], list[float]]] = {}
    eval_steps: dict[str | None, list[int]] = {}
    for rec in records:
        kind = rec["kind"]
        if kind not in ("train", "eval"):
            continue
        stage = rec.get("stage") if isinstance(rec.get("stage"), str) else None
        if kind == "eval":
            eval_steps.setdefault(stage, []).append(int(rec["step"]))
        for name, value in loss_values(rec).items():
            if math.isfinite(value):
                xs, ys = series.setdefault((stage, kind, name), ([], []))
                xs.append(int(rec["step"]))
                ys.append(value)
    stage_order = list(dict.fromkeys(stage for stage, _, _ in series))
    panels = []
    for stage in stage_order:
        for kind in ("train", "eval"):
            for (s, k, name), (xs, ys) in series.items():
                if s != stage or k != kind:
                    continue
                title = f"{stage}: {name}" if stage else name
                panels.append(CurvePanel(title=title if kind == "train" else f"{title} (eval)", steps=xs,
                                         values=ys, points=kind == "eval", marks=eval_steps.get(stage, [])))
    return panels


# ---------------------------------------------------------------------------- the report


_PREVIEW_RE = re.compile(r"^(?:(?P<stage>[A-Za-z0-9]+)_)?step_(?P<step>\d{8,})\.png$")


def _newest_previews(run_dir: Path) -> dict[str | None, tuple[int, str]]:
    """stage -> (step, file name) of the newest ``previews/[STAGE_]step_XXXXXXXX.png``."""
    newest: dict[str | None, tuple[int, str]] = {}
    folder = run_dir / "previews"
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _PREVIEW_RE.match(path.name)
        if m is None or not path.is_file():
            continue
        stage, step = m["stage"], int(m["step"])
        if stage not in newest or step > newest[stage][0]:
            newest[stage] = (step, path.name)
    return newest


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items()) or "-"


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A recipe section as a dict ({} when missing or malformed)."""
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _data_lines(config: dict[str, Any], card: Any) -> list[str]:
    data = _section(config, "data")
    dim, size = data.get("dim"), data.get("size")
    lines = []
    if card is not None:
        info = card.data
        if info.dim == 2 and info.volume_ndim == 3:
            shape = (f"a 2D model on slices along axis {info.slice_axis} of 3D volumes"
                     + (" (slices with foreground only)" if data.get("foreground_slices", True) else ""))
        else:
            shape = f"a {info.dim}D model on {info.volume_ndim}D volumes"
        lines.append(f"- data: {shape}; {info.num_cases} training cases")
        names = ", ".join(f"{v} {info.label_names.get(v, '')}".strip() for v in info.labels)
        lines.append(f"- labels: {names}; channels: {', '.join(info.channels)}"
                     + (f"; classes ({info.class_key}): {', '.join(info.classes)}" if info.classes else ""))
        norm = info.normalization
        lines.append(f"- intensities: {norm.mode} {[round(x, 4) for x in norm.lo]} .. "
                     f"{[round(x, 4) for x in norm.hi]} (dataset units) -> "
                     + ("[0, 0.8], brighter values softly towards 1 (upper_tail soft)" if norm.tail == "soft" else "[0, 1]"))
    else:
        lines.append(f"- data: a {dim}D model (data.dim); the data facts are written when training finishes")
    lines.append(f"- data.size {size}: the random crop each training step sees; generation works on the "
                 "whole mask")
    return lines


def _yardstick_line(records: list[dict[str, Any]]) -> str | None:
    """The newest ``yardstick`` record (:mod:`medsynth.training.yardstick`) in its own words."""
    import dataclasses

    from medsynth.training.yardstick import Yardstick

    found = [r for r in records if r["kind"] == "yardstick"]
    if not found:
        return None
    names = [f.name for f in dataclasses.fields(Yardstick)]
    try:
        result = Yardstick(**{k: found[-1][k] for k in names})
    except (KeyError, TypeError):
        return None
    return f"Yardstick at step {found[-1]['step']}: {result.summary()}."


def _gate_line(records: list[dict[str, Any]]) -> str | None:
    """The newest ``gate`` record (:func:`medsynth.training.ldm.check_autoencoder_gate`) in words."""
    found = [r for r in records if r["kind"] == "gate"]
    if not found:
        return None
    g = found[-1]
    what = (f"Quality gate: the autoencoder reconstructs at PSNR {float(g['heldout_recon_psnr']):.2f} dB, below "
            f"model.autoencoder.target_psnr {float(g['target_psnr']):g} dB")
    if g.get("forced"):
        return what + "; the diffusion stage was trained on it anyway (--force)."
    return what + ": the diffusion stage was not started (train the autoencoder longer, or --force)."


def _read_card(run_dir: Path) -> tuple[Any, str | None]:
    """(RunCard or None, why not) without failing the report."""
    from medsynth.runcard import CARD_FILE, read_run_card

    if not (run_dir / CARD_FILE).is_file():
        return None, None
    try:
        return read_run_card(run_dir), None
    except CheckpointError as exc:
        return None, str(exc)


def _read_config(run_dir: Path) -> dict[str, Any]:
    from medsynth.config import read_yaml_mapping
    from medsynth.errors import ConfigError

    try:
        return read_yaml_mapping(run_dir / "config.yaml")
    except ConfigError as exc:
        raise CheckpointError(f"{run_dir}: not a training run folder ({exc})") from None


def check_run_folder(run_dir: Path) -> None:
    """CheckpointError unless ``run_dir`` is a run folder ``medsynth train`` made (its ownership ledger
    names train, or it holds a readable run card): the report never rewrites a user's ``report.md``."""
    from medsynth.runcard import CARD_FILE

    if made_by(run_dir, "train"):
        return
    card, _ = _read_card(run_dir)
    if card is None:
        raise CheckpointError(f"{run_dir}: not a training run folder made by `medsynth train` (no ownership record and no "
                              f"readable {CARD_FILE}); the report is written only into a training run's folder")


def write_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.md`` and ``RUN/curves.png`` from the files of ``RUN`` (see the module
    docstring); returns the report's path. CheckpointError when RUN is not a training run folder."""
    from medsynth.data.atomic import atomic_write_text
    from medsynth.plots import training_curves

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    check_run_folder(run_dir)
    config = _read_config(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise CheckpointError(f"{run_dir}: no {METRICS_FILE}; not a training run folder (or training has not "
                              "started)")
    records = read_metrics(run_dir)
    stages = _family_stages(config)
    summaries = stage_summaries(records, stages)
    card, card_problem = _read_card(run_dir)
    model = _section(config, "model")
    family = model.get("family", "?")
    training_cfg = _section(config, "training")
    training_curves(curve_panels(records), run_dir / CURVES_FILE)

    finished = card is not None and all(s.done for s in summaries)
    if finished:
        status = "finished"
    else:
        current = next((s for s in summaries if not s.done), summaries[-1] if summaries else None)
        where = "" if current is None else (f"{current.stage + ' ' if current.stage else ''}step {current.step}"
                                            + (f" of {current.max_steps}" if current.max_steps is not None else ""))
        status = f"in progress ({where})" if where else "in progress"
    out = [f"# Training report: {config.get('name', run_dir.name)}", "",
           f"Run folder `{run_dir.name}`: family `{family}`, {status}. The recipe is `config.yaml`; every setting is "
           "explained in the recipe reference (docs/recipes.md).", ""]
    if card_problem:
        out += [f"Warning: {card_problem}", ""]

    # 1. the numbers
    out += ["| stage | steps | losses (last record) | evaluation | samples/s |", "|---|---|---|---|---|"]
    for s in summaries:
        steps = f"{s.step}" + (f" / {s.max_steps}" if s.max_steps is not None else "")
        ev = f"{_fmt(s.evaluation)} (step {s.eval_step})" if s.eval_step is not None else "-"
        rate = f"{s.samples_per_s:.3g}" if s.samples_per_s is not None else "-"
        out.append(f"| {s.stage or family} | {steps} | {_fmt(s.losses)} | {ev} | {rate} |")
    log_every = training_cfg.get("log_every", "log_every")
    out += ["", f"Losses are the last `train` record of `metrics.jsonl` (each the mean over the last {log_every} "
            "steps, `training.log_every`); the progress line and the summary `medsynth train` prints show the "
            "same numbers. Evaluations score a fixed batch with fixed noise, so they are comparable across steps.",
            ""]
    yardstick = _yardstick_line(records)
    if yardstick:
        out += [yardstick, ""]
    gate = _gate_line(records)
    if gate:
        out += [gate, ""]
    starts = [s.start for s in summaries if s.start]
    if starts:
        st = starts[-1]
        out += [f"Trained on {st.get('device', '?')} with {st.get('threads', '?')} CPU thread(s) per process and "
                f"{st.get('world_size', 1)} process(es), batch {st.get('batch_size', '?')} per process.", ""]

    # 2. curves
    out += ["## Curves", "", f"![training curves]({CURVES_FILE})", "",
            "One panel per logged quantity and stage: lines are training losses, points are evaluations (faint "
            "vertical lines mark their steps); a panel whose values are all positive has a log scale.", ""]

    # 3. previews
    previews = _newest_previews(run_dir)
    out += ["## Previews", ""]
    if not previews:
        out += ["No preview yet (`training.preview_every` 0 turns them off).", ""]
    for s in summaries:
        found = previews.get(s.stage)
        if found is None:
            continue
        step, name = found
        what = ("the fixed training crops (this model does not preview at full size)"
                if s.start.get("previews") == "crops" else
                "full-size slices (a 3D model shows the middle slice of a slab through the whole volume)")
        out += [f"{s.stage or family}, step {step}: the first row is the label map (legend below the rows), "
                f"then the model's rows on the same cases; {what}.", "",
                f"![{s.stage or family} preview, step {step}](previews/{name})", ""]

    # 4. data and use
    out += ["## Data", "", *_data_lines(config, card), ""]
    if finished:
        out += ["## Use it", "", "With RUN this folder:", "", "```bash no-run",
                "medsynth sample RUN --mask MASK.nii.gz --out image.nii.gz --seed 0",
                f"medsynth augment DATASET --method {family} --model RUN --num 20 --out DATASET_plus",
                "```", ""]
    path = run_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(out))
    return path
