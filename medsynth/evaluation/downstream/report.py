"""The output folder of ``medsynth downstream``: ``summary.json``, ``metrics.csv``, ``report.md``, ``dice.png``.

Every file is written atomically, ``summary.json`` last (a folder with it is complete). The folder
follows :mod:`medsynth.ownership`: one that is not empty is refused unless ``overwrite``; then only the
files an earlier downstream run recorded as its own (unchanged) are replaced, a file of one of these
names it did not make stops it, and other files are never touched.
``metrics.csv`` has one row per variant x seed x test case x foreground label; an undefined value
(Dice of a label absent from the reference, HD95 without both surfaces) is an empty cell.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import astuple, fields
from pathlib import Path

from medsynth.data.atomic import atomic_write_text
from medsynth.data.ledger import OwnedFolder
from medsynth.evaluation.downstream.summary import REFERENCE, DownstreamSummary, MetricRow

OUTPUT_FILES = ("summary.json", "metrics.csv", "report.md", "dice.png")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def metrics_csv(rows: Sequence[MetricRow]) -> str:
    """The text of ``metrics.csv``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([f.name for f in fields(MetricRow)])
    for row in rows:
        writer.writerow([_cell(v) for v in astuple(row)])
    return buf.getvalue()


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(summary: DownstreamSummary) -> str:
    """The results as a markdown table: one row per variant."""
    labels = list(summary.variants[0].dice_per_label) if summary.variants else []
    head = ["variant", "mean Dice (mean +- std over seeds)", "per seed", *[f"Dice {n}" for n in labels],
            "HD95 mm", f"Dice - {REFERENCE} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in summary.variants:
        std = "" if v.dice.std is None else f" +- {v.dice.std:.3f}"
        seeds = ", ".join(_num(x) for x in v.dice.per_seed)
        per_label = [_num(v.dice_per_label[n]) for n in labels]
        if v.name == summary.reference:
            diff = "(reference)"
        else:
            c = summary.comparison(v.name)
            diff = "n/a" if c.mean_difference is None else \
                f"{c.mean_difference:+.3f} [{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
        lines.append("| " + " | ".join([f"`{v.name}`", f"{_num(v.dice.mean)}{std}", seeds, *per_label,
                                        _num(v.hd95.mean, 2), diff]) + " |")
    return "\n".join(lines) + "\n"


def _report_md(summary: DownstreamSummary) -> str:
    where = f"the test set `{summary.test}`" if summary.test else \
        f"{summary.folds}-fold cross-validation over the training cases"
    lines = [
        "# Downstream segmentation: does the synthetic data help?",
        "",
        f"Training set `{summary.train}` ({summary.train_cases} real cases), tested on {where} "
        f"({summary.test_cases} cases). Segmenter: {summary.segmenter}, {summary.parameters:,} parameters, "
        f"{summary.steps} steps of batch {summary.batch_size} per model, seeds {summary.seeds}, on {summary.device}.",
        "",
        format_table(summary),
        "![Dice per variant](dice.png)",
        "",
        "Labels present in a test case but predicted nowhere (Dice 0, no HD95), over cases x seeds: "
        + ", ".join(f"`{v.name}` {v.empty_predictions}" for v in summary.variants)
        + f". Labels absent from a test case's reference (no Dice): {summary.variants[0].absent_labels}"
        + " per variant.",
        "",
        "How it was measured:",
        "",
        *[f"- {rule}" for rule in summary.rules],
        f"- Real share of each batch in variants with a synthetic set: {summary.real_fraction:g}.",
        "",
    ]
    if summary.warnings:
        lines += ["Warnings:", "", *[f"- {w}" for w in summary.warnings], ""]
    lines += ["Per case and label: `metrics.csv`; everything above: `summary.json`.", ""]
    return "\n".join(lines)


def dice_chart(summary: DownstreamSummary, path: Path) -> Path:
    """``path`` (PNG): mean Dice per variant as bars with each seed's value as a point."""
    from medsynth.plots import downstream_chart

    return downstream_chart([v.name for v in summary.variants], [v.dice.per_seed for v in summary.variants],
                            path, reference=summary.reference, ylabel="mean Dice")


def write_outputs(summary: DownstreamSummary, rows: Sequence[MetricRow], owned: OwnedFolder) -> list[Path]:
    """Write the four outputs into the folder ``owned`` holds, each recorded as made; ``summary.json`` last."""
    out = owned.out
    written = [atomic_write_text(out / "metrics.csv", metrics_csv(rows)), dice_chart(summary, out / "dice.png"),
               atomic_write_text(out / "report.md", _report_md(summary))]
    written.append(atomic_write_text(out / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n"))
    owned.record(*written)
    return written
