"""The end-of-training yardstick: does the model beat the label-mean fill on mask -> image?

The *label-mean fill* paints each label with its mean training intensity
(:attr:`medsynth.data.loader.DataInfo.label_means`, :func:`medsynth.models.conditioning.fill_image`).
A mask-conditioned generator that cannot beat it on SSIM *and* PSNR against the true image has
learned nothing the label map did not already say.

Which images (:func:`evaluation_items`):

- *held out*: the manifest's labelled cases of the ``test`` split (never trained on), when it has any;
- otherwise the *last* training cases of the manifest (trained on, so the score is optimistic; the
  result says ``held_out: false``). To hold cases out, list them with ``split: test`` and a label.

At most :data:`MAX_CASES` cases (2 for 3D runs). A 2D run on 3D volumes is scored on up to
:data:`MAX_SLICES` evenly spaced slices per case along ``data.slice_axis``, only slices with
foreground when ``data.foreground_slices`` is on (the slices it trained on); 3D runs and 2D images on
the whole case.

The result also scores the fill blurred by the partial-volume width fitted on the training set
(``DataInfo.fill_sigma``), a stronger yardstick (``beats_blurred_fill``); the generators start from
that blurred fill, so a model that learned something beats it too.

Scoring: intensities in the run's [0, 1] units (``DataInfo.normalization``, clipped), SSIM
(Gaussian window, scikit-image's setting, per 2D slice or 3D volume) and PSNR with data range 1, mean
over items. The model's image for each item is ``Synthesizer.generate(mask, seed=0)``, what
``medsynth sample`` writes. :func:`record_yardstick` runs it at the end of ``medsynth train`` (once the
run can generate), stores the result as the run card's ``yardstick`` field and a ``{"kind":
"yardstick"}`` line of ``metrics.jsonl``, and warns when the model does not beat the fill.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from medsynth.config import Config
    from medsynth.data.loader import DataInfo
    from medsynth.progress import ProgressBar

__all__ = ["MAX_CASES", "MAX_SLICES", "EvalItem", "Yardstick", "evaluation_items", "fill_unit",
           "record_yardstick", "score_pairs"]

MAX_CASES = 4
MAX_SLICES = 8
HELD_OUT_SPLIT = "test"


@dataclass
class EvalItem:
    """One scored image: ``image (C, *spatial)`` float32 in [0, 1] units; ``label (*spatial)`` the
    label values; ``index (*spatial)`` int64 label-channel indices (DataInfo.labels order);
    class_value: the case's condition class (class-conditioned runs only)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    index: np.ndarray
    class_value: str | None = None


@dataclass(frozen=True)
class Yardstick:
    """Mask -> image against the label-mean fill (see the module docstring)."""

    model_ssim: float
    model_psnr: float
    fill_ssim: float
    fill_psnr: float
    blurred_fill_ssim: float
    blurred_fill_psnr: float
    fill_sigma: float
    items: int
    cases: list[str]
    held_out: bool

    @property
    def beats_fill(self) -> bool:
        """Better than the fill on SSIM and on PSNR."""
        return self.model_ssim > self.fill_ssim and self.model_psnr > self.fill_psnr

    @property
    def beats_blurred_fill(self) -> bool:
        """Better than the fill blurred by the fitted partial-volume width on SSIM and on PSNR."""
        return self.model_ssim > self.blurred_fill_ssim and self.model_psnr > self.blurred_fill_psnr

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "beats_fill": self.beats_fill, "beats_blurred_fill": self.beats_blurred_fill,
                "data_range": 1.0, "seed": 0}

    def summary(self) -> str:
        where = "held-out" if self.held_out else "training (no labelled test cases: not held out)"
        verdict = "beats" if self.beats_fill else "does NOT beat"
        return (f"mask -> image on {self.items} {where} item(s) of {len(self.cases)} case(s): SSIM "
                f"{self.model_ssim:.4f} vs fill {self.fill_ssim:.4f}, PSNR {self.model_psnr:.2f} vs "
                f"{self.fill_psnr:.2f} dB: the model {verdict} the label-mean fill")


def fill_unit(index: np.ndarray, info: DataInfo, sigma: float = 0.0) -> np.ndarray:
    """The label-mean fill of label-channel indices ``(*spatial)`` -> ``(C, *spatial)`` float32 in
    [0, 1] units (all zero when the run's data has no label means), blurred by ``sigma`` voxels over
    every spatial axis when given (edges repeated)."""
    from medsynth.data.loader import label_mean_fill

    if info.label_means is None:
        return np.zeros((info.num_channels, *index.shape), np.float32)
    return label_mean_fill(np.asarray(info.label_means, np.float32), index, sigma)


def evaluation_items(config: Config, info: DataInfo, *, max_cases: int = MAX_CASES,
                     max_slices: int = MAX_SLICES) -> tuple[list[EvalItem], bool]:
    """The items the yardstick scores and whether they are held out (see the module docstring).

    Cases with label values (or a condition class) the run does not know are skipped."""
    from medsynth.data.loader import load_case
    from medsynth.data.manifest import read_manifest

    if config.data.manifest is None:
        return [], False
    manifest = read_manifest(config.data.manifest)
    held = [c for c in manifest.cases if c.label is not None and c.split == HELD_OUT_SPLIT]
    cap = min(max_cases, 2) if info.dim == 3 else max_cases
    cases = held[:cap] if held else manifest.training_cases()[-cap:]
    lut = info.label_lut()
    items: list[EvalItem] = []
    for case in cases:
        cls = None
        if len(info.classes) > 1 and info.class_key is not None:
            cls = str(case.extra.get(info.class_key))
            if cls not in info.classes:
                continue
        image, lab, _ = load_case(case, config.data, manifest.root)
        lab = lab.astype(np.int64)
        if lab.min() < 0 or lab.max() >= lut.size or (lut[lab] < 0).any():
            continue
        unit, index = info.normalization.to_unit(image), lut[lab]
        if info.dim == 2 and lab.ndim == 3:
            axis = info.slice_axis
            other = tuple(a for a in range(3) if a != axis)
            ks = np.arange(lab.shape[axis])
            if config.data.foreground_slices and (index != 0).any():
                ks = np.nonzero((index != 0).any(axis=other))[0]
            ks = ks[np.unique(np.linspace(0, len(ks) - 1, min(max_slices, len(ks))).round().astype(int))]
            items += [EvalItem(f"{case.case_id}[{int(k)}]", np.take(unit, k, axis=axis + 1),
                               np.take(lab, k, axis=axis), np.take(index, k, axis=axis), cls) for k in ks]
        else:
            items.append(EvalItem(case.case_id, unit, lab, index, cls))
    return items, bool(held)


def score_pairs(reals: list[np.ndarray], fakes: list[np.ndarray]) -> tuple[float, float]:
    """Mean SSIM and mean PSNR (dB) of ``(C, *spatial)`` pairs in [0, 1] units (data range 1; channels
    averaged; sides shorter than 11 voxels are edge-padded to 11 for SSIM)."""
    from medsynth.evaluation.metrics import psnr, ssim

    s_values, p_values = [], []
    for real, fake in zip(reals, fakes):
        for c in range(real.shape[0]):
            a, b = real[c].astype(np.float64), np.clip(fake[c], 0.0, 1.0).astype(np.float64)
            pads = [(0, max(0, 11 - n)) for n in a.shape]
            s_values.append(float(ssim(np.pad(a, pads, mode="edge"), np.pad(b, pads, mode="edge"), data_range=1.0)))
            mse = float(np.mean((a - b) ** 2))
            p_values.append(float(psnr(a, b, data_range=1.0)) if mse > 0 else 100.0)
    return float(np.mean(s_values)), float(np.mean(p_values))


def measure(run_dir: Path, config: Config, info: DataInfo, *, device: str = "cpu",
            bar: ProgressBar | None = None) -> Yardstick | None:
    """The yardstick of the trained run in ``run_dir`` (None when there is nothing to score); ``bar``:
    an open progress bar the generation moves (its total grows by it)."""
    from medsynth.synthesis.synthesizer import Synthesizer

    items, held_out = evaluation_items(config, info)
    if not items:
        return None
    synth = Synthesizer.from_run(run_dir, device=device)
    fakes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # option and slice-by-slice notes
        for item in items:
            image = synth.generate(item.label, seed=0, class_value=item.class_value,
                                   progress=bar if bar is not None else False)
            image = image[None] if image.ndim == item.label.ndim else image
            fakes.append(info.normalization.to_unit(image))
    reals = [item.image for item in items]
    model = score_pairs(reals, fakes)
    fill = score_pairs(reals, [fill_unit(item.index, info) for item in items])
    blurred = score_pairs(reals, [fill_unit(item.index, info, info.fill_sigma) for item in items])
    return Yardstick(model_ssim=round(model[0], 5), model_psnr=round(model[1], 3), fill_ssim=round(fill[0], 5),
                     fill_psnr=round(fill[1], 3), blurred_fill_ssim=round(blurred[0], 5),
                     blurred_fill_psnr=round(blurred[1], 3), fill_sigma=info.fill_sigma, items=len(items),
                     held_out=held_out,
                     cases=sorted({i.case_id.split("[")[0] for i in items}))


def record_yardstick(run_dir: Path, config: Config, stage: str | None, *, device: str = "cpu",
                     bar: ProgressBar | None = None) -> Yardstick | None:
    """End of training: measure the yardstick when the run can generate (a one-stage family, or the
    last stage of a staged one, with exported weights), store it in the run card (``yardstick``)
    and ``metrics.jsonl``, and warn when the model does not beat the fill. Returns it (or None).
    bar: an open progress bar the generation moves (:meth:`Synthesizer.generate`)."""
    from medsynth.registry import get_family
    from medsynth.runcard import read_run_card, write_run_card

    stages = get_family(config.model.family).stages
    if stages and stage != stages[-1]:
        return None
    card = read_run_card(run_dir)
    if not card.weights_path.is_file() or card.data.label_means is None:
        return None
    result = measure(run_dir, config, card.data, device=device, bar=bar)
    if result is None:
        return None
    write_run_card(run_dir, replace(card, yardstick=result.to_dict()))
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": "yardstick", "step": card.steps, **({"stage": stage} if stage else {}),
                             **result.to_dict()}) + "\n")
    if not result.beats_fill:
        warnings.warn(f"{run_dir}: {result.summary()}; its images say no more than the label map "
                      "(train longer or use a larger recipe)", stacklevel=2)
    return result
