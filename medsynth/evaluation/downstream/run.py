"""The downstream job: does a synthetic set make a segmenter better than classic augmentation?

``run_downstream(DownstreamOptions(...))`` (or ``medsynth.downstream(train, test, synthetic, ...)``)
trains the same segmenter (:mod:`medsynth.evaluation.downstream.segmenter`) with the same step budget and seeds
on each variant of the training data, tests every model on the same cases and compares:

- ``real``: the real training cases only;
- ``real+classic``: the same, each sample through the ``classic`` chain of ``medsynth augment``
  on the fly (the reference every other variant is compared against);
- ``real+<set>``: real cases plus one synthetic set (a fixed share ``real_fraction`` of every batch
  stays real); ``real+<set>+classic``: the same with the online classic chain on every sample.

``<set>`` is the augment method its ``provenance.jsonl`` records (``classic-pairs`` for a set made
by ``--method classic``, to keep it apart from the online chain), or the folder's name.

Stages: 1. check the options; 2. refuse an output folder that holds files this job did not make
(before any work); 3. validate and read every dataset, check them against each other; 4. the
splits: the test set, or K folds over the real cases (the same folds for every seed; a synthetic
case made from a held-out case is left out of that fold's training); 5. size the segmenter; 6. train
and test every variant x seed x fold; 7. aggregate: Dice and HD95 per label, per seed, mean +- std,
the paired difference to ``real+classic`` with a bootstrap interval; 8. write the outputs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.data.ledger import OwnedFolder
from medsynth.errors import ConfigError
from medsynth.evaluation.downstream.data import DownstreamData, DownstreamWarning, LoadedCase, SyntheticSet
from medsynth.evaluation.downstream.metrics import CaseMetrics, case_scores, nanmean, nanmean_axis, paired_bootstrap
from medsynth.evaluation.downstream.segmenter import NETWORKS, Network, SegmenterSpec
from medsynth.evaluation.downstream.summary import (
    REFERENCE,
    RULES,
    Comparison,
    DownstreamOptions,
    DownstreamSummary,
    MetricRow,
    SeedStat,
    VariantResult,
)
from medsynth.ownership import own_output
from medsynth.seeds import DownstreamTag, seed_sequence


@dataclass(frozen=True)
class Variant:
    name: str
    set_index: int | None
    classic: bool


@dataclass
class Split:
    """One training/test split: fold -1 for a given test set."""

    fold: int
    train: list[LoadedCase]
    test: list[LoadedCase]
    held_out: set[str]


def _check_options(o: DownstreamOptions) -> None:
    if not o.seeds:
        raise ConfigError("--seeds: give at least one seed")
    if any(isinstance(s, bool) or int(s) < 0 for s in o.seeds) or len(set(o.seeds)) != len(o.seeds):
        raise ConfigError(f"--seeds must be distinct non-negative integers, got {list(o.seeds)}")
    if o.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {o.steps}")
    if o.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {o.batch_size}")
    if o.network not in NETWORKS:
        raise ConfigError(f"--network must be one of {', '.join(NETWORKS)}, got {o.network!r}")
    if o.test is None and o.folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {o.folds}")
    if not 0.0 < o.real_fraction <= 1.0:
        raise ConfigError(f"real_fraction must be in (0, 1], got {o.real_fraction}")
    if o.channels is not None and o.channels < 1:
        raise ConfigError(f"channels must be at least 1, got {o.channels}")
    if o.patch_size is not None and o.patch_size < 8:
        raise ConfigError(f"patch_size must be at least 8 voxels, got {o.patch_size}")
    if o.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {o.workers}")
    if o.bootstrap < 100:
        raise ConfigError(f"bootstrap must be at least 100 replicates, got {o.bootstrap}")
    if o.device not in ("auto", "cpu", "cuda") and not str(o.device).startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {o.device!r}")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return name


def variant_names(sets: Sequence[SyntheticSet], plain: bool = True) -> list[Variant]:
    """The variants in report order: real, real+classic, then real+<set> (unless not ``plain``) and
    real+<set>+classic per set."""
    base = ["classic-pairs" if s.name == "classic" else s.name for s in sets]
    names = [f"{n}({_folder_name(s.path)})" if base.count(n) > 1 else n for n, s in zip(base, sets)]
    names = [f"{n}-{names[:i + 1].count(n)}" if names.count(n) > 1 else n  # same folder name too: number them
             for i, n in enumerate(names)]
    out = [Variant("real", None, False), Variant(REFERENCE, None, True)]
    for i, name in enumerate(names):
        out += [Variant(f"real+{name}", i, False)] if plain else []
        out += [Variant(f"real+{name}+classic", i, True)]
    return out


def _folder_name(path: Path) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.parent.name


def make_splits(data: DownstreamData, folds: int) -> list[Split]:
    """The test set as one split, or ``folds`` folds over the training cases (fixed assignment)."""

    if data.test is not None:
        return [Split(-1, data.train, data.test, set())]
    n = len(data.train)
    if n < folds:
        raise ConfigError(f"--folds {folds}: the training set {data.train_path} has only {n} labelled case(s)")
    ordered = sorted(data.train, key=lambda c: c.case_id)
    perm = np.random.default_rng(seed_sequence(0, DownstreamTag.FOLDS)).permutation(n)
    fold_of = {ordered[j].case_id: i % folds for i, j in enumerate(perm)}
    splits = []
    for f in range(folds):
        test = [c for c in ordered if fold_of[c.case_id] == f]
        train = [c for c in ordered if fold_of[c.case_id] != f]
        splits.append(Split(f, train, test, {c.case_id for c in test}))
    return splits


def _fold_synthetic(s: SyntheticSet, split: Split) -> list[LoadedCase]:
    return [c for c in s.cases if c.source is None or c.source not in split.held_out]


# ------------------------------------------------------------------------------------ the job


def run_downstream(options: DownstreamOptions) -> DownstreamSummary:
    """Run the comparison (see the module docstring for the stages); write ``out`` if given, a folder
    held and claimed before any work (:func:`medsynth.ownership.own_output`: never in, on or around an
    input dataset; an overwrite replaces only the files an earlier downstream run made)."""
    from medsynth.evaluation.downstream.report import OUTPUT_FILES

    t0 = time.perf_counter()
    # 1. options
    _check_options(options)
    if options.out is None:
        return _run_downstream(options, None, t0)
    # 2. the output folder, before any work
    inputs = [Path(options.train), *([Path(options.test)] if options.test is not None else []),
              *map(Path, options.synthetic)]
    with own_output(Path(options.out).expanduser().absolute(), "downstream", overwrite=options.overwrite,
                    writes=OUTPUT_FILES, inputs=inputs) as owned:
        return _run_downstream(options, owned, t0)


def _run_downstream(options: DownstreamOptions, owned: OwnedFolder | None, t0: float) -> DownstreamSummary:
    from medsynth.evaluation.downstream.data import load_inputs
    from medsynth.evaluation.downstream.report import write_outputs
    from medsynth.evaluation.downstream.segmenter import plan_segmenter
    from medsynth.progress import progress_bar

    device = _device(str(options.device))
    seeds = [int(s) for s in options.seeds]
    out = None if owned is None else owned.out
    # 3. the datasets
    data = load_inputs(Path(options.train), None if options.test is None else Path(options.test),
                       [Path(p) for p in options.synthetic], progress=options.progress)
    notes, rules = list(data.warnings), list(RULES)
    # 4. splits
    splits = make_splits(data, options.folds)
    if data.test is None:
        rules.append(f"{options.folds}-fold cross-validation over the real training cases (the same folds for every "
                     "seed); a synthetic case made from a held-out case is left out of that fold's training.")
        unknown = [str(s.path) for s in data.synthetic if any(c.source is None for c in s.cases)]
        if unknown:
            note = (f"{', '.join(unknown)}: synthetic cases without a recorded source case are used in every fold; "
                    "some may have been made from held-out cases")
            notes.append(note)
            warnings.warn(note, DownstreamWarning, stacklevel=2)
    # 5. the segmenter
    labels = sorted(data.labels)
    spec = plan_segmenter(options.network, data.spatial_dims, data.channels, len(labels),
                          [c.shape for c in data.train], base_channels=options.channels, patch_size=options.patch_size)
    variants = variant_names(data.synthetic, options.plain_sets)
    # 6. train and test every variant x seed x fold
    results: dict[tuple[str, int], dict[str, tuple[int, CaseMetrics]]] = {}
    seconds: dict[str, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    parameters = 0
    total = len(variants) * len(seeds) * len(splits) * options.steps
    with progress_bar("downstream", total=total, enabled=options.progress) as bar:
        for v in variants:
            t_v = time.perf_counter()
            n_real = n_syn = 0
            for seed in seeds:
                per_case: dict[str, tuple[int, CaseMetrics]] = {}
                for split in splits:
                    syn = [] if v.set_index is None else _fold_synthetic(data.synthetic[v.set_index], split)
                    if seed == seeds[0]:
                        n_real, n_syn = n_real + len(split.train), n_syn + len(syn)
                    net = _train_one(spec, data, split, syn, v, seed, options, device, bar)
                    parameters = parameters or sum(p.numel() for p in net.parameters())
                    for case, metrics in _test_one(net, spec, split, labels, data.foreground, device, options):
                        per_case[case.case_id] = (split.fold, metrics)
                results[(v.name, seed)] = per_case
            seconds[v.name] = time.perf_counter() - t_v
            counts[v.name] = (n_real, n_syn)
    # 7. aggregate
    case_ids = [c.case_id for s in splits for c in s.test]
    names = {v: data.labels[v] for v in data.foreground}
    variant_results = [_aggregate(v, data, seeds, case_ids, results, names, seconds[v.name], counts[v.name])
                       for v in variants]
    comparisons = _compare(variants, seeds, case_ids, results, options.bootstrap)
    summary = DownstreamSummary(
        train=str(data.train_path), test=None if data.test_path is None else str(data.test_path),
        synthetic=[str(s.path) for s in data.synthetic], folds=None if data.test is not None else options.folds,
        spatial_dims=data.spatial_dims, labels=dict(data.labels), seeds=seeds, steps=options.steps,
        batch_size=options.batch_size, real_fraction=options.real_fraction, segmenter=spec.describe(),
        parameters=int(parameters), patch=list(spec.patch), device=device, train_cases=len(data.train),
        test_cases=len(case_ids), variants=variant_results, comparisons=comparisons, rules=rules, warnings=notes,
        out=None if out is None else str(out),
    )
    summary.seconds = time.perf_counter() - t0
    # 8. outputs
    if owned is not None:
        rows = metric_rows(variants, seeds, case_ids, results, data)
        write_outputs(summary, rows, owned)
    return summary


def _train_one(spec: SegmenterSpec, data: DownstreamData, split: Split, syn: list[LoadedCase], v: Variant,
               seed: int, options: DownstreamOptions, device: str, bar: Any) -> Any:
    from medsynth.evaluation.downstream.segmenter import TrainingPool, train_segmenter

    pool = TrainingPool(split.train, syn, patch=spec.patch, labels=sorted(data.labels), ranges=data.ranges,
                        classic=v.classic, real_fraction=options.real_fraction, seed=seed, fold=max(split.fold, 0))
    where = f"{v.name} seed {seed}" + (f" fold {split.fold}" if split.fold >= 0 else "")

    def on_step(loss: float) -> None:
        bar.note(f"{where} loss {loss:.3f}")
        bar.advance()

    return train_segmenter(spec, pool, steps=options.steps, batch_size=options.batch_size, seed=seed,
                           fold=max(split.fold, 0), device=device, workers=options.workers, on_step=on_step)


def _test_one(net: Any, spec: SegmenterSpec, split: Split, labels: list[int], foreground: list[int], device: str,
              options: DownstreamOptions) -> list[tuple[LoadedCase, CaseMetrics]]:
    from medsynth.evaluation.downstream.metrics import label_metrics
    from medsynth.evaluation.downstream.segmenter import case_stats, normalise, predict

    values = np.asarray(labels, dtype=np.int64)
    out = []
    for case in split.test:
        index = predict(net, spec, normalise(case.image, case_stats(case.image)), device=device,
                        batch_size=options.batch_size)
        out.append((case, label_metrics(values[index], case.label, foreground, case.spacing)))
    return out


def _stat(values: list[float]) -> SeedStat:
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    mean = float(ok.mean()) if ok.size else None
    std = float(ok.std(ddof=1)) if ok.size > 1 else None
    return SeedStat(mean=mean, std=std, per_seed=[None if math.isnan(x) else float(x) for x in arr])


def _aggregate(v: Variant, data: DownstreamData, seeds: list[int], case_ids: list[str],
               results: Mapping[tuple[str, int], Mapping[str, tuple[int, CaseMetrics]]], names: dict[int, str],
               seconds: float, counts: tuple[int, int]) -> VariantResult:
    dice_seed, hd_seed, dice_label, hd_label = [], [], [], []
    empty = absent = 0
    for seed in seeds:
        per_case = results[(v.name, seed)]
        dice = np.stack([per_case[c][1].dice for c in case_ids])  # (cases, L)
        hd = np.stack([per_case[c][1].hd95 for c in case_ids])
        ref = np.stack([per_case[c][1].reference for c in case_ids])
        pred = np.stack([per_case[c][1].predicted for c in case_ids])
        dice_seed.append(nanmean(case_scores(dice)))
        hd_seed.append(nanmean(case_scores(hd)))
        dice_label.append(nanmean_axis(dice, 0))
        hd_label.append(nanmean_axis(hd, 0))
        empty += int(((ref > 0) & (pred == 0)).sum())
        absent += int((ref == 0).sum())
    fg = list(names)
    dl = nanmean_axis(np.stack(dice_label), 0)
    hl = nanmean_axis(np.stack(hd_label), 0)
    return VariantResult(
        name=v.name, synthetic_set=None if v.set_index is None else str(data.synthetic[v.set_index].path),
        classic=v.classic, dice=_stat(dice_seed), hd95=_stat(hd_seed),
        dice_per_label={names[k]: _opt(dl[i]) for i, k in enumerate(fg)},
        hd95_per_label={names[k]: _opt(hl[i]) for i, k in enumerate(fg)},
        empty_predictions=empty, absent_labels=absent, real_cases=counts[0], synthetic_cases=counts[1],
        seconds=round(seconds, 3),
    )


def _opt(x: float) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def score_matrix(name: str, seeds: list[int], case_ids: list[str],
                 results: Mapping[tuple[str, int], Mapping[str, tuple[int, CaseMetrics]]], metric: str = "dice") -> np.ndarray:
    """``(cases, seeds)`` case scores (mean over labels) of one variant."""
    cols = []
    for seed in seeds:
        per_case = results[(name, seed)]
        cols.append(case_scores(np.stack([getattr(per_case[c][1], metric) for c in case_ids])))
    return np.stack(cols, axis=1)


def _compare(variants: list[Variant], seeds: list[int], case_ids: list[str],
             results: Mapping[tuple[str, int], Mapping[str, tuple[int, CaseMetrics]]], n_boot: int) -> list[Comparison]:

    ref = score_matrix(REFERENCE, seeds, case_ids, results)
    out = []
    for k, v in enumerate(variants):
        if v.name == REFERENCE:
            continue
        diff = score_matrix(v.name, seeds, case_ids, results) - ref
        boot_seed = int(seed_sequence(0, DownstreamTag.BOOTSTRAP, k).generate_state(1)[0])
        mean, low, high = paired_bootstrap(diff, n_boot=n_boot, seed=boot_seed)
        pairs = int((~np.isnan(diff)).all(axis=1).sum()) * len(seeds)
        out.append(Comparison(v.name, REFERENCE, "dice", _opt(mean), _opt(low), _opt(high), pairs))
    return out


def metric_rows(variants: list[Variant], seeds: list[int], case_ids: list[str],
                results: Mapping[tuple[str, int], Mapping[str, tuple[int, CaseMetrics]]],
                data: DownstreamData) -> list[MetricRow]:
    """Every (variant, seed, test case, foreground label) as a :class:`MetricRow`."""
    fg = data.foreground
    rows = []
    for v in variants:
        for seed in seeds:
            per_case = results[(v.name, seed)]
            for cid in case_ids:
                fold, m = per_case[cid]
                for i, label in enumerate(fg):
                    rows.append(MetricRow(v.name, seed, fold, cid, label, data.labels[label], float(m.dice[i]),
                                          float(m.hd95[i]), int(m.reference[i]), int(m.predicted[i])))
    return rows


# ------------------------------------------------------------------------------------ the API


def downstream(
    train: str | Path,
    test: str | Path | None = None,
    synthetic: Sequence[str | Path] = (),
    out: str | Path | None = None,
    *,
    seeds: Sequence[int] | int = (0, 1, 2),
    steps: int = 500,
    network: Network = "unet",
    batch_size: int = 8,
    folds: int = 3,
    device: str = "auto",
    channels: int | None = None,
    patch_size: int | None = None,
    real_fraction: float = 0.5,
    bootstrap: int = 10_000,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> DownstreamSummary:
    """Train one segmenter per variant (real, real+classic, real+<set>, real+<set>+classic) and seed,
    test each on ``test`` (or K-fold over ``train``) and return the :class:`DownstreamSummary`.

    seeds: a list of seeds, or an int ``N`` for seeds ``0..N-1``. Writes ``summary.json``,
    ``metrics.csv``, ``report.md`` and ``dice.png`` into ``out`` when given. See
    :class:`DownstreamOptions` for every argument."""
    if isinstance(synthetic, (str, Path)):
        synthetic = [synthetic]
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    options = DownstreamOptions(
        train=Path(train), test=None if test is None else Path(test), synthetic=tuple(Path(p) for p in synthetic),
        out=None if out is None else Path(out), seeds=seed_list, steps=steps, network=network,
        batch_size=batch_size, folds=folds, device=device, channels=channels, patch_size=patch_size,
        real_fraction=real_fraction, bootstrap=bootstrap, workers=workers, overwrite=overwrite, progress=progress,
    )
    return run_downstream(options)
