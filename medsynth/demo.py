"""``medsynth demo``: the whole job on the built-in phantom dataset, with a report.

Stages (each a plain call into the library, the same ones the CLI commands make):

1. phantoms   a 3D and a 2D head-phantom dataset (MSD form)
2. validate   both datasets, fully decoded
3. train      a tiny SPADE GAN and a tiny latent diffusion model on the 2D slices
4. augment    3D with the training-free ``synthseg`` method; 2D with the GAN and the LDM
5. evaluate   paired (GAN/LDM images made from the real masks vs the real images) and
              unpaired (radiomic distances, diversity, memorisation of each synthetic set)
6. downstream "does it help?": the same small segmenter trained on real, real+classic and
              real + each 2D synthetic set (+ classic), tested on the held-out slices
7. report     ``DIR/report.md`` with PNG montages, loss curves, metrics and downstream tables

Everything is CPU-sized: about 2-4 minutes on two cores. ``quick=True`` shortens every stage
(tests use it); the numbers it gives are not meant to be read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.augment import SYNTHETIC_PREFIX, AugmentConfig, AugmentOptions, AugmentSummary, run_augment
from medsynth.augment.preview import preview_pairs
from medsynth.config import load_config
from medsynth.data.atomic import atomic_write_text
from medsynth.data.manifest import Case, read_manifest, write_manifest
from medsynth.data.nifti import read_volume, write_volume
from medsynth.data.phantoms import make_phantom_dataset
from medsynth.data.validate import validate_dataset
from medsynth.errors import JobError
from medsynth.evaluation.downstream import DownstreamSummary, downstream
from medsynth.evaluation.downstream.report import format_table
from medsynth.evaluation.evaluate import run_evaluate
from medsynth.ownership import own_output
from medsynth.plots import case_preview, grid, middle_slice, save_png, show_slice
from medsynth.progress import progress_bar
from medsynth.recipes import recipe_path
from medsynth.runcard import read_run_card
from medsynth.synthesis.pairs import QCConfig
from medsynth.synthesis.synthesizer import Synthesizer
from medsynth.training import run_training

# The tiny LDM recipe compresses 32^2 to 8^2 latents (fast tests); for the demo's pictures a latent of
# 16^2 with 3 channels and a diffusion batch of 8 look much better for ~1 minute of CPU time.
LDM_DEMO_SETTINGS = ("model.autoencoder.channels=[16,32]", "model.autoencoder.latent_channels=3",
                     "model.diffusion.batch_size=8")


@dataclass(frozen=True)
class DemoPlan:
    """How big each stage is."""
    cases_3d: int = 6
    size_3d: int = 40
    cases_2d: int = 24
    size_2d: int = 64
    gan_steps: int = 400
    ae_steps: int = 500
    diffusion_steps: int = 1200
    # as many synthetic as real cases, so every unpaired row compares sets of equal size
    num_synthseg: int = 6
    num_gan: int = 24
    num_ldm: int = 24
    sample_steps: int = 10
    # the "does it help?" segmenter: sized to keep the demo within about 3 minutes on two cores
    seg_seeds: int = 2
    seg_steps: int = 50
    seg_batch: int = 4
    seg_channels: int = 8
    # QC's check that each GAN/LDM image follows its mask (a few-step smoke model does not yet)
    label_agreement: bool = True
    # QC's texture floor inside labels: the demo's minutes-long tiny models paint smooth images, which a real
    # run's QC rightly redraws; the demo shows the job, so the floor is off here (the report says so)
    texture: bool = False

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(cases_3d=3, size_3d=24, cases_2d=6, size_2d=32, gan_steps=4, ae_steps=3, diffusion_steps=3,
                   num_synthseg=3, num_gan=6, num_ldm=6, sample_steps=2, seg_seeds=1, seg_steps=2,
                   label_agreement=False)


@dataclass
class DemoResult:
    out: Path
    report: Path
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


class _Stages:
    """Numbered stage headings and timings on stderr; ``done()`` after each stage (the demo records the
    files it made, so that ``--overwrite`` can prove them its own even after a kill)."""
    def __init__(self, total: int, done: Callable[[], None] = lambda: None) -> None:
        from rich.console import Console

        self.done = done
        self.console = Console(stderr=True, highlight=False)
        self.total = total
        self.k = 0
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self._name = ""
        self._start = self.t0

    def start(self, name: str, what: str) -> None:
        self._close()
        self.k += 1
        self._name, self._start = name, time.perf_counter()
        self.console.print(f"[bold cyan][{self.k}/{self.total}][/] {what}")

    def _close(self) -> None:
        if self._name:
            self.times[self._name] = round(time.perf_counter() - self._start, 2)
            self._name = ""
            self.done()

    def finish(self) -> float:
        self._close()
        return time.perf_counter() - self.t0


def run_demo(out: str | Path = "medsynth-demo", *, overwrite: bool = False, quick: bool = False,
             progress: bool = True) -> DemoResult:
    """Run every stage into ``out`` and write ``out/report.md``. Returns where it is and the headline numbers.

    ``out`` is new or empty, or (``overwrite``) a folder an earlier demo made: only the files that demo
    recorded as its own (:mod:`medsynth.ownership`) are replaced, a user's files there stay."""
    out = Path(out).absolute()
    with own_output(out, "demo", overwrite=overwrite) as owned:
        try:
            return _run_demo(out, quick, progress, _Stages(total=7, done=owned.record_new))
        finally:
            owned.record_new()


def _run_demo(out: Path, quick: bool, progress: bool, st: _Stages) -> DemoResult:
    import torch

    plan = DemoPlan.quick() if quick else DemoPlan()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data, runs, aug, ev = out / "data", out / "runs", out / "augmented", out / "evaluation"

    # 1. phantom datasets
    st.start("phantoms", f"phantom datasets: {plan.cases_3d} 3D cases ({plan.size_3d}^3), "
                         f"{plan.cases_2d} 2D slices ({plan.size_2d}^2)")
    real3d = make_phantom_dataset(data / "phantoms3d", dim=3, cases=plan.cases_3d, seed=0, size=plan.size_3d)
    real2d = make_phantom_dataset(data / "phantoms2d", dim=2, cases=plan.cases_2d, seed=1, size=plan.size_2d)
    # held-out real slices (never trained on): the real-vs-real floor of the distribution distances
    heldout2d = make_phantom_dataset(data / "phantoms2d_heldout", dim=2, cases=plan.cases_2d, seed=2, size=plan.size_2d)

    # 2. validation (the same checks `medsynth validate` runs)
    st.start("validate", "validating both datasets")
    fingerprints = {}
    for name, path in (("3D", real3d), ("2D", real2d)):
        checked = validate_dataset(path)
        if not checked.ok:  # cannot happen for phantoms; a bug if it does
            raise JobError(f"{path}: the demo's own phantom dataset failed validation: {checked.errors[0].message}")
        fingerprints[name] = checked.fingerprint

    # 3. training
    st.start("train", f"training a SPADE GAN ({plan.gan_steps} steps) and a latent diffusion model "
                      f"({plan.ae_steps} autoencoder + {plan.diffusion_steps} diffusion steps) on the 2D slices")
    every = max(1, plan.gan_steps // 4)
    gan_cfg = load_config(recipe_path("tiny/gan2d"), [f"data.manifest={json.dumps(str(real2d))}",
                                                      f"training.max_steps={plan.gan_steps}",
                                                      f"training.checkpoint_every={plan.gan_steps}",
                                                      f"training.preview_every={every}", "training.keep_last=1"])
    gan_run = runs / "gan2d"
    gan_result = run_training(gan_cfg, gan_run, progress=progress)
    ldm_cfg = load_config(recipe_path("tiny/ldm2d"), [f"data.manifest={json.dumps(str(real2d))}", *LDM_DEMO_SETTINGS,
                                             f"training.max_steps={plan.diffusion_steps}",
                                             f"model.autoencoder.max_steps={plan.ae_steps}",
                                             f"training.checkpoint_every={plan.diffusion_steps}", "training.keep_last=1",
                                             f"training.preview_every={max(1, plan.diffusion_steps // 3)}",
                                             f"model.diffusion.sample_steps={plan.sample_steps}"])
    ldm_run = runs / "ldm2d"
    ldm_result = run_training(ldm_cfg, ldm_run, progress=progress)

    # 4. augmentation
    st.start("augment", f"augmenting: {plan.num_synthseg} synthseg 3D cases, {plan.num_gan} GAN and {plan.num_ldm} LDM 2D cases")
    model_qc = AugmentConfig(qc=QCConfig(label_agreement=plan.label_agreement, texture=plan.texture))
    summaries = {
        "synthseg3d": run_augment(AugmentOptions(input=real3d, out=aug / "synthseg3d", method="synthseg",
                                                 num=plan.num_synthseg, seed=0, progress=progress)),
        "gan2d": run_augment(AugmentOptions(input=real2d, out=aug / "gan2d", method="gan", model=gan_run,
                                            num=plan.num_gan, seed=0, progress=progress, config=model_qc)),
        "ldm2d": run_augment(AugmentOptions(input=real2d, out=aug / "ldm2d", method="ldm", model=ldm_run,
                                            num=plan.num_ldm, seed=0, progress=progress, config=model_qc)),
    }

    # 5. evaluation
    st.start("evaluate", "evaluating synthetic against real (paired and unpaired)")
    paired = {
        "gan2d": _paired_from_real_masks(gan_run, real2d, ev / "gan_from_real_masks", plan, progress),
        "ldm2d": _paired_from_real_masks(ldm_run, real2d, ev / "ldm_from_real_masks", plan, progress),
    }
    paired_summaries = {
        name: run_evaluate(real2d, manifest, data_range="auto", out=ev / f"paired_{name}", progress=progress)
        for name, manifest in paired.items()
    }
    n2, n3 = plan.cases_2d, plan.cases_3d
    unpaired_sets = {  # label -> (folder under evaluation/, reference = training set, candidate)
        f"held-out real 2D ({n2}) vs real 2D ({n2}): the floor": ("unpaired_heldout2d", real2d, heldout2d),
        f"GAN 2D ({plan.num_gan}) vs real 2D ({n2})":
            ("unpaired_gan2d", real2d, _synthetic_only(_manifest(summaries["gan2d"]), ev / "sets" / "gan2d.json")),
        f"LDM 2D ({plan.num_ldm}) vs real 2D ({n2})":
            ("unpaired_ldm2d", real2d, _synthetic_only(_manifest(summaries["ldm2d"]), ev / "sets" / "ldm2d.json")),
        f"synthseg 3D ({plan.num_synthseg}) vs real 3D ({n3})":
            ("unpaired_synthseg3d", real3d,
             _synthetic_only(_manifest(summaries["synthseg3d"]), ev / "sets" / "synthseg3d.json")),
    }
    unpaired = {}
    for name, (folder, ref, cand) in unpaired_sets.items():
        st.console.print(f"      {name}")
        unpaired[name] = run_evaluate(ref, cand, data_range="auto", unpaired=True, out=ev / folder, progress=progress)
        unpaired[name]["folder"] = f"evaluation/{folder}"

    # 6. does it help? (a synthseg 2D set joins the GAN and LDM sets)
    st.start("downstream", f"does it help? a segmenter trained {plan.seg_seeds} time(s) x {plan.seg_steps} steps on "
                           "real, real+classic and real+each 2D synthetic set (+classic)")
    summaries["synthseg2d"] = run_augment(AugmentOptions(input=real2d, out=aug / "synthseg2d", method="synthseg",
                                                         num=plan.num_gan, seed=0, progress=progress))
    helps = _does_it_help(real2d, heldout2d, [summaries[k].manifest for k in ("gan2d", "ldm2d", "synthseg2d")],
                          out / "downstream", plan, progress)

    # 7. report
    st.start("report", "writing the report")
    figures = out / "figures"
    figs = {
        "data": _data_figure(real3d, figures / "phantoms.png"),
        "methods": _methods_figure(real2d, paired, figures / "gan_ldm_from_real_masks.png"),
        "augmented": _augmented_figure(summaries, {"synthseg3d": real3d, "gan2d": real2d, "ldm2d": real2d,
                                                   "synthseg2d": real2d}, figures / "augmented_cases.png"),
        "losses": _loss_figure({"GAN": gan_run, "LDM": ldm_run}, figures / "training_losses.png"),
    }
    seconds = st.finish()
    report = _write_report(out, plan, quick, fingerprints, {"gan2d": gan_result, "ldm2d": ldm_result}, summaries,
                           paired_summaries, unpaired, figs, st.times, seconds, helps)
    headline = {
        "paired": {k: {"ssim": v["ssim"], "psnr": v["psnr"]} for k, v in paired_summaries.items()},
        "unpaired": {k: {"frechet": v["radiomics"]["frechet_distance"], "mmd2": v["radiomics"]["mmd2"]}
                     for k, v in unpaired.items()},
        "downstream_dice": {v.name: v.dice.mean for v in helps.variants},
        "stage_seconds": st.times,
    }
    atomic_write_text(out / "summary.json", json.dumps(headline, indent=2) + "\n")
    st.console.print(f"[bold green]done[/] in {seconds:.0f} s. Report: [bold]{report}[/]")
    return DemoResult(out=out, report=report, seconds=seconds, metrics=headline)


# ------------------------------------------------------------------------------------ helpers


def _does_it_help(train: Path, test: Path, sets: list[Path | None], out: Path, plan: DemoPlan,
                  progress: bool) -> DownstreamSummary:
    """``medsynth downstream`` on the 2D slices: trained on ``train``, tested on the held-out ``test``."""
    manifests = [m for m in sets if m is not None]
    return downstream(train, test, manifests, out, seeds=plan.seg_seeds, steps=plan.seg_steps,
                      batch_size=plan.seg_batch, channels=plan.seg_channels, bootstrap=2000, progress=progress)


def _downstream_lines(summary: DownstreamSummary, out: Path) -> list[str]:
    chart = (Path(summary.out or out) / "dice.png").relative_to(out).as_posix()
    return [
        "## 5. Does it help?",
        "",
        "The question a user has: does a synthetic set make a segmenter better than the augmentation they already "
        "use? `medsynth downstream` trained the same segmenter with the same step budget and seeds on the real "
        f"2D slices alone, with MONAI classic augmentation on the fly, and with each synthetic set (half of every "
        f"batch real), then tested every model on the {summary.test_cases} held-out slices.",
        "",
        f"Segmenter: {summary.segmenter}, {summary.parameters:,} parameters; {summary.steps} steps of batch "
        f"{summary.batch_size}, seeds {summary.seeds}.",
        "",
        "> **A smoke check, not evidence.** Phantoms are easy and this budget is tiny (sized to keep the demo "
        "within about 3 minutes on two cores): these numbers show the command works, not whether a method helps. "
        "Measure on your own data with a real budget and at least 3 seeds "
        "(`medsynth downstream TRAIN --test TEST --synthetic AUG --out DIR`, see `docs/downstream.md`).",
        "",
        format_table(summary),
        f"![downstream Dice]({chart})",
        "",
        "Mean Dice: per test slice the mean over the foreground labels it contains, then the mean over slices; the "
        "last column is the paired difference to `real+classic` with a bootstrap 95% interval over slices and "
        "seeds. Per case and label: `downstream/metrics.csv`; everything: `downstream/summary.json` and "
        "`downstream/report.md`.",
        "",
    ]



def _paired_from_real_masks(run: Path, real: Path, out: Path, plan: DemoPlan, progress: bool) -> Path:
    """Generate one image per real case from that case's own mask: a dataset paired by case id."""
    manifest = read_manifest(real)
    synth = Synthesizer.from_run(run, device="cpu")
    steps = plan.sample_steps if read_run_card(run).family == "ldm" else None
    cases = []
    with progress_bar(f"generating from the real masks ({run.name})", len(manifest.cases), enabled=progress) as bar:
        for k, case in enumerate(manifest.cases):
            label = read_volume(_label(case), kind="label")
            image = synth.generate_volume(label, k, steps=steps)
            img_path = write_volume(out / "imagesTr" / f"{case.case_id}.nii.gz", image.array, label.affine,
                                    kind="image")
            cases.append(Case(case_id=case.case_id, images=[img_path], label=case.label))
            bar.advance()
    return write_manifest(manifest.with_cases(cases), out / "dataset.json", fmt="msd")


def _label(case: Case) -> Path:
    """The label file of a case the demo made (every one has one)."""
    if case.label is None:
        raise JobError(f"case {case.case_id} has no label map")
    return case.label


def _manifest(summary: AugmentSummary) -> Path:
    """The manifest an augment job wrote (rank 0 of a finished job always writes one)."""
    if summary.manifest is None:
        raise JobError(f"augment wrote no manifest into {summary.out}")
    return summary.manifest


def _synthetic_only(manifest_path: Path, out: Path) -> Path:
    """A manifest of an augmented dataset's synthetic cases only (for unpaired evaluation)."""
    m = read_manifest(manifest_path)
    syn = [c for c in m.cases if c.case_id.startswith(SYNTHETIC_PREFIX)]
    return write_manifest(m.with_cases(syn), out, fmt="msd")


def _data_figure(real3d: Path, path: Path) -> Path:
    m3 = read_manifest(real3d)
    fig, axes = grid(2, 6)
    for r, case in enumerate(m3.cases[:2]):
        img = read_volume(case.images[0]).array
        lab = read_volume(_label(case), kind="label").array
        x, y, z = (s // 2 for s in img.shape)
        views = [("axial", img[:, :, z], lab[:, :, z]), ("coronal", img[:, y, :], lab[:, y, :]),
                 ("sagittal", img[x, :, :], lab[x, :, :])]
        for c, (name, im, lb) in enumerate(views):
            show_slice(axes[r, 2 * c], im, title=f"3D {case.case_id} {name}")
            show_slice(axes[r, 2 * c + 1], lb, label=True, title="labels")
    save_png(fig, path)
    return path


def _methods_figure(real2d: Path, paired: dict[str, Path], path: Path, n: int = 4) -> Path:
    real = read_manifest(real2d)
    gens = {name: {c.case_id: c for c in read_manifest(p).cases} for name, p in paired.items()}
    cases = real.cases[:n]
    fig, axes = grid(len(cases), 2 + len(gens))
    for r, case in enumerate(cases):
        img = middle_slice(read_volume(case.images[0]).array)
        lo, hi = np.percentile(img, [0.5, 99.5])
        show_slice(axes[r, 0], middle_slice(read_volume(_label(case), kind="label").array), label=True,
                   title="mask" if r == 0 else None)
        show_slice(axes[r, 1], img, vmin=lo, vmax=hi, title="real" if r == 0 else None)
        for c, (name, by_id) in enumerate(gens.items()):
            gen = middle_slice(read_volume(by_id[case.case_id].images[0]).array)
            show_slice(axes[r, 2 + c], gen, vmin=lo, vmax=hi, title=f"{name.upper()[:3]} from mask" if r == 0 else None)
    save_png(fig, path)
    return path


def _augmented_figure(summaries: dict[str, AugmentSummary], reals: dict[str, Path], path: Path, n: int = 3) -> Path:
    """The first ``n`` synthetic cases of each augmented output, mask outlined, beside their source
    (the picture ``medsynth augment`` writes as OUT/preview.png); reals: output name -> its real dataset."""
    pairs, legend = [], {}
    for name, s in summaries.items():
        real = read_manifest(reals[name])
        legend.update(real.labels or {})
        cases = [c for c in read_manifest(_manifest(s)).cases if c.case_id.startswith(SYNTHETIC_PREFIX)][:n]
        pairs += preview_pairs(cases, {c.case_id: c for c in real.cases}, name)
    return case_preview(pairs, legend, path, per_row=n)


def _loss_figure(runs: dict[str, Path], path: Path) -> Path:
    fig, axes = grid(1, len(runs), scale=3.2)
    for ax, (name, run) in zip(axes[0], runs.items()):
        series: dict[str, tuple[list[int], list[float]]] = {}
        metrics = run / "metrics.jsonl"
        for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.exists() else []:
            rec = json.loads(line)
            if rec.get("kind") != "train":
                continue
            for key, value in rec.items():
                if key in {"kind", "step", "samples_per_s", "stage", "lr", "seconds"} or not isinstance(value, (int, float)):
                    continue
                label = f"{rec.get('stage', '')} {key}".strip()
                xs, ys = series.setdefault(label, ([], []))
                xs.append(int(rec["step"]))
                ys.append(float(value))
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, linewidth=1)
        ax.set_title(f"{name} training losses", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("symlog", linthresh=1e-2)
        if series:
            ax.legend(fontsize=6)
    save_png(fig, path)
    return path


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _memorisation_threshold(unpaired: dict[str, Any]) -> str:
    values = {s["memorisation"]["threshold"] for s in unpaired.values()}
    return ", ".join(str(v) for v in sorted(values))


def _write_report(out: Path, plan: DemoPlan, quick: bool, fingerprints: dict[str, Any], results: dict[str, Any],
                  augments: dict[str, AugmentSummary], paired: dict[str, Any], unpaired: dict[str, Any],
                  figs: dict[str, Path], times: dict[str, float], seconds: float,
                  downstream: DownstreamSummary) -> Path:

    rel = {k: p.relative_to(out).as_posix() for k, p in figs.items()}
    rerun = "medsynth demo --out DIR --overwrite" + (" --quick" if quick else "")
    lines = [
        "# medsynth demo report" + (" (quick smoke run)" if quick else ""),
        "",
        *(["> **This is a `--quick` smoke run**: every stage ran at toy sizes with a few training steps, so "
           "the pictures and numbers below mean nothing. Run `medsynth demo` without `--quick` for the real demo.", ""]
          if quick else []),
        f"Everything below was made on this machine in {seconds:.0f} s from the built-in head phantoms "
        f"(no downloads). Rerun with `{rerun}`.",
        "",
        "## 1. The data",
        "",
        f"- 3D: {fingerprints['3D']['cases']} volumes of {plan.size_3d}^3 voxels "
        f"(spacing {', '.join(_fmt(s, 2) for s in fingerprints['3D']['spacings']['median'])} mm), "
        f"labels {fingerprints['3D'].get('labels')}.",
        f"- 2D: {fingerprints['2D']['cases']} axial slices of {plan.size_2d}^2 pixels for training, and as many "
        "held-out slices (never trained on) as the reference for the distribution metrics.",
        "- Both validated with every check `medsynth validate` runs (geometry, label values, NaN, truncation, ...).",
        "",
        f"![phantoms]({rel['data']})",
        "",
        "## 2. Training",
        "",
        f"A SPADE GAN ({plan.gan_steps} steps) and a latent diffusion model (autoencoder {plan.ae_steps} steps, "
        f"then a mask-conditioned diffusion UNet {plan.diffusion_steps} steps, rectified flow, sampled with "
        f"{plan.sample_steps} steps) were trained on the 2D slices with the shipped recipes `tiny/gan2d` "
        f"and `tiny/ldm2d` (`medsynth recipes`; with `{' '.join(LDM_DEMO_SETTINGS)}`). Runs, checkpoints, previews "
        "and `metrics.jsonl` are in `runs/`; each run's `config.yaml` is the exact recipe.",
        "",
        f"![losses]({rel['losses']})",
        "",
        "The GAN's discriminator loss `d` stays near 2, the hinge loss's value when real and generated "
        "patches get the same score: with L1 and feature matching weighted 10x, the tiny generator matches "
        "the real slices' statistics within a few dozen steps. Judge it by the pictures and the metrics below.",
        "",
        "Images each model made from the **real** masks (same mask, same scale as the real image):",
        "",
        f"![from real masks]({rel['methods']})",
        "",
        "## 3. Augmented datasets",
        "",
        "| output | method | real cases | synthetic cases | QC redraws | manifest |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in augments.items():
        lines.append(f"| `augmented/{name}` | {s.method} | {s.real_cases} | {s.synthetic_cases} | {s.redraws} | "
                     f"`{_manifest(s).relative_to(out).as_posix()}` |")
    lines += [
        "",
        "Each synthetic case has a new mask made by deforming a real one, and an image made for it; "
        "`provenance.jsonl` beside each manifest records the method, seed, source case and model checksum. "
        "The QC's texture floor (`qc.texture`, which redraws GAN/LDM images flatter inside their labels than "
        "the training images) is off in the demo: its minutes-long tiny models paint smooth images. Leave it on "
        "for a real run.",
        "",
        "Below, the first cases of each output: the source real image, then the synthetic image with its "
        "mask outlined (each augment output folder has the same picture as `preview.png`).",
        "",
        f"![augmented]({rel['augmented']})",
        "",
        "## 4. Metrics",
        "",
        "### Paired: model image from a real mask vs the real image",
        "",
        "| model | SSIM | PSNR (dB) | MAE / R | cases |",
        "|---|---|---|---|---|",
    ]
    for name, s in paired.items():
        lines.append(f"| {name} | {_fmt(s.get('ssim'))} | {_fmt(s.get('psnr'), 2)} | {_fmt(s.get('mae'), 2)} | "
                     f"{s.get('n_cases')} |")
    lines += [
        "",
        "- **SSIM** (structural similarity, scikit-image's Wang et al. setting, Gaussian window sigma 1.5, "
        "data range = each real image's max - min): 1 is identical; it rewards matching local structure and contrast.",
        "- **PSNR** = 10 log10(R^2 / MSE), averaged over cases in dB: higher is closer. **MAE** = mean |real - synthetic| / R "
        "(a fraction of the data range; multiply by R for intensity units).",
        "- A generator is not meant to reproduce the real image (noise, bias field and texture are random), so these "
        "say how faithfully it follows the mask, not how realistic it is. See `evaluation/paired_*/` for per-case CSVs "
        "and pictures.",
        "",
        "### Unpaired: synthetic set vs real set",
        "",
        "| comparison | radiomic Frechet distance | MMD^2 | diversity (mean pairwise SSIM) | memorised "
        f"(max SSIM to a real case >= {_memorisation_threshold(unpaired)}) | details |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in unpaired.items():
        rad, div, mem = s["radiomics"], s["diversity"], s["memorisation"]
        lines.append(f"| {name} | {_fmt(rad['frechet_distance'], 2)} | {_fmt(rad['mmd2'], 3)} | "
                     f"{_fmt(div['mean'])} ({div['metric']}) | {mem['flagged']} of {s['n_candidate']} | "
                     f"`{s['folder']}/` |")
    lines += [
        "",
        "- **Radiomic Frechet distance / MMD^2**: distance between the distributions of hand-crafted "
        "scikit-image features (first-order intensity statistics and GLCM texture per label region), "
        "z-normalised with the real set. 0 = same distribution, but sets this small never reach 0: compare "
        "each row with the *held-out real* row (real slices the models never saw, same set sizes), which is "
        "what a perfect generator would score. This is not the published FRD (no pyradiomics), so do not "
        "compare with papers.",
        "- `synthseg` draws a new random contrast per label on purpose (so a segmenter learns shape, not one "
        "scanner's contrast): its distance to the real set is large by design; judge it by the segmenter it trains.",
        "- **Diversity**: mean pairwise similarity inside the synthetic set; lower = more varied.",
        "- **Memorised**: synthetic images whose most similar real image has SSIM above the threshold "
        "(a copy of the training data would be flagged).",
        "- Full details: `evaluation/unpaired_*/summary.json` and its pictures; conventions in `docs/evaluation.md`.",
        "",
        *_downstream_lines(downstream, out),
        "## 6. Time per stage",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in times.items()],
        "",
    ]
    return atomic_write_text(out / "report.md", "\n".join(lines))
