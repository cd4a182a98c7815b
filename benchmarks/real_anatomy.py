"""Real-anatomy development data (MNI152 2009 from nilearn's wheel) and the mask->image yardstick.

Data. nilearn's wheel ships the ICBM 2009a symmetric MNI152 T1 template (skull-stripped, uint8 0..255,
197x233x189 at 1 mm, RAS) with its grey- and white-matter probability maps under
``nilearn/datasets/data/`` (``nilearn.datasets.MNI152_FILE_PATH``, ``GM_MNI152_FILE_PATH``,
``WM_MNI152_FILE_PATH``); nothing is downloaded. The three maps are block-averaged 2x2x2 to 2 mm
(98x116x94; a block's centre is the mean of its voxel centres, so the affine stays exact) and labelled:

- brain: at least half of the block's 1 mm voxels are non-zero in the skull-stripped T1;
- inside the brain, ``p_csf = clip(1 - p_gm - p_wm, 0, 1)``; a voxel is **CSF (1)** when ``p_csf`` is
  larger than both tissue probabilities *and* its T1 is dark: below the midpoint between the median
  T1 of voxels with ``p_gm > 0.7`` and of brain voxels with ``p_csf > 0.7`` (about 119 on the 0..255
  scale);
- every other brain voxel is **GM (2)** or **WM (3)**, whichever probability is larger (a tie goes to
  the tissue whose median T1 is nearer the voxel's); outside the brain **background (0)**.

Images keep the template's intensities (float32, 0..~240) and every file its real geometry.

- ``--dim 2``: axial slices (file axis 2), cropped in-plane to the brain's bounding box rounded up to a
  multiple of 16 (80x96 at 2 mm). Training: 8 consecutive slices, MNI z = +0.5..+14.5 mm (basal
  ganglia, lateral ventricles); held-out: 12 slices, z = +24.5..+46.5 mm (tops of the ventricles,
  centrum semiovale), 4 slices (8 mm) of gap between the blocks. Each slice is its own 2D case
  ``(80, 96)``; its affine is the volume's with the crop offset and the slice position folded in.
  Validation (2D only, ``OUT/val``): the 4 gap slices (z +16.5..+22.5 mm) and 8 slices above the
  held-out block (z +54.5..+68.5 mm), for choosing settings (e.g. mask edits) without the held-out slices.
- ``--dim 3``: blocks of 48x96x32 voxels (96x192x64 mm): the left and the right hemisphere (split at
  the midline) x a lower block (training, z = -55.5..+6.5 mm, with cerebellum and temporal lobes) and
  an upper block (held-out, z = +16.5..+78.5 mm). The template is symmetric, so a left and a right
  block are near mirror images: 2 training cases with about one case's worth of anatomy.

Oracle (``oracle``, 2D): what a *perfect* generator could add. Two more sets of 8 real slices, listed as
synthetic sets for ``medsynth downstream`` (each case marked ``"synthetic": true``): **below**, MNI z
-15.5..-1.5 mm (under the training block: midbrain, temporal lobes) and **above**, z +54.5..+68.5 mm (over
the held-out block, 4 slices of gap: the high convexity). Real images on real new anatomy are what an
ideal mask generator plus an ideal image generator would give; fill pairs made from the *above* masks
(``benchmarks/fill_pairs.yaml``) separate the masks' share from the images'. The command writes them to
``OUT/oracle/``, makes the fill pairs of the training masks (the control) and of the above masks, and runs
``medsynth downstream`` on the four sets (``OUT/oracle/downstream/``).

Unlabelled pool (``build``, 2D): ``OUT/pool`` lists every slice with brain that lies outside the training block
and at least 6 mm from the held-out block as MSD ``test`` entries (images only; 46 slices), and ``OUT/pool_truth``
the same slices with their labels, marked synthetic: the ceiling, never read by the product. ``unlabelled OUT``
fits an anatomy bank (``medsynth anatomy``) on the training slices and the pool, makes the sets of each anatomy
source (``pseudo``, fill pairs on the propagated masks, fill pairs on bank-warped labelled masks) and runs
``medsynth downstream`` on them beside the pool's truth; it also prints the propagated masks' Dice against the
truth (measured, never used to choose anything).

Layout: ``OUT/train/dataset.json``, ``OUT/test/dataset.json`` and (2D) ``OUT/val/dataset.json`` (MSD; the
held-out cases are listed under ``training`` because they carry labels). Same command, same arrays.

Scoring (``fill``, ``sample-eval``). Both images are put on the [0, 255] scale of the *training* set,
``x' = 255 (x - lo) / (hi - lo)`` with ``lo``/``hi`` the minimum/maximum intensity over all training
images (no clipping), and compared with ``medsynth.ssim`` / ``medsynth.psnr`` at ``data_range=255``
(scikit-image's Gaussian-window SSIM, mean over the valid region of the whole slice or block; PSNR over
every voxel); the score of a set is the mean over its cases (PSNR averaged in dB). The *label-mean fill*
paints each label with its mean training intensity; the *blurred* fill smooths it with a Gaussian whose
sigma (the partial-volume width) is chosen on the training cases (0..2 voxels in 0.25 steps, best
training PSNR).

    python benchmarks/real_anatomy.py build OUT [--dim 2|3]
    python benchmarks/real_anatomy.py fill OUT/train OUT/test
    python benchmarks/real_anatomy.py sample-eval RUN OUT/test [--seeds 0,1,2]
    python benchmarks/real_anatomy.py oracle OUT [--seeds 0,1,2 --steps-seg 300 --num 64]
    python benchmarks/real_anatomy.py unlabelled OUT [--seeds 0,1,2 --steps-seg 300 --num 64 --no-plain-sets]
    python benchmarks/real_anatomy.py all OUT [--steps-gan 1000 --steps-ldm 1000 --seeds 0,1,2 --num 16]
        [--steps-seg N] [--tier auto|small|tiny] [--until build|train|sample-eval|augment|downstream]

Each command prints JSON lines; ``all`` also writes them to ``OUT/results.jsonl`` and ends with a
markdown table. ``all`` runs every stage as a ``medsynth`` subprocess (build -> validate -> fill ->
train GAN -> train LDM autoencoder -> diffusion -> sample-eval -> augment x4 -> downstream) and times
each. nilearn is in the ``bench`` extra (``pip install nilearn``), not a medsynth dependency.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FILL_PAIRS = REPO / "benchmarks" / "fill_pairs.yaml"  # augment recipe of the trivial "fill pairs" control
LABELS = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
FACTOR = 2  # 1 mm template -> 2 mm
MULTIPLE = 16  # in-plane crop rounded up to this many voxels
# 2D split: (first slice's MNI z in mm, number of consecutive 2 mm slices)
SLICES_2D = {"train": (0.5, 8), "test": (24.5, 12)}
VAL_2D = ((16.5, 4), (54.5, 8))  # validation blocks (2D): the gap, and above the held-out block
# 3D split: (first slice's MNI z in mm, slices), block shape in voxels
BLOCKS_3D = {"train": (-55.5, 32), "test": (16.5, 32)}
# oracle sets (2D): real slices from other levels, read as synthetic sets (first MNI z in mm, slices)
ORACLE_2D = {"below": (-15.5, 8), "above": (54.5, 8)}
BLOCK_3D_WIDTH = 48  # voxels on each side of the midline
# unlabelled pool (2D): every slice with brain at least POOL_GAP_MM from the held-out block and outside the
# training block (the validation slices included: pool settings are chosen by registration leave-one-out on
# the training slices, never on val); images only in OUT/pool, true labels in OUT/pool_truth (the ceiling)
POOL_GAP_MM = 6.0
POOL_MIN_BRAIN = 0.05  # a pool slice shows brain on at least this fraction of its in-plane crop
DATA_RANGE = 255.0
SIGMAS = [i * 0.25 for i in range(9)]  # blurred fill: candidate sigmas in voxels


# ---------------------------------------------------------------------------- the template


@dataclass
class Template:
    """The 2 mm template: t1 (X, Y, Z) float32 template units; labels (X, Y, Z) uint8 in LABELS;
    affine (4, 4) voxel -> RAS mm; csf_threshold: the T1 value below which CSF-dominant voxels are CSF."""

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    csf_threshold: float


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """(X, Y, Z) -> (X//f, Y//f, Z//f) means of f^3 blocks (trailing voxels that do not fill a block dropped)."""
    x, y, z = (s // f for s in a.shape)
    return a[: x * f, : y * f, : z * f].reshape(x, f, y, f, z, f).mean(axis=(1, 3, 5))


def load_template() -> Template:
    """Read the three bundled 1 mm maps, block-average them to 2 mm and label them (module doc)."""
    import nilearn.datasets as nd

    from medsynth.data.nifti import read_volume

    paths = [Path(nd.MNI152_FILE_PATH), Path(nd.GM_MNI152_FILE_PATH), Path(nd.WM_MNI152_FILE_PATH)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"error: nilearn's bundled templates are missing: {', '.join(missing)}")
    vols = [read_volume(p, kind="image") for p in paths]
    t1_1mm = vols[0].array.astype(np.float64)
    t1 = _block_mean(t1_1mm, FACTOR)
    gm = _block_mean(vols[1].array.astype(np.float64) / 255.0, FACTOR)
    wm = _block_mean(vols[2].array.astype(np.float64) / 255.0, FACTOR)
    brain = _block_mean((t1_1mm > 0).astype(np.float64), FACTOR) >= 0.5
    offset = (FACTOR - 1) / 2  # block centre in 1 mm voxel units
    scale = np.diag([FACTOR, FACTOR, FACTOR, 1.0])
    scale[:3, 3] = offset
    affine = vols[0].affine @ scale

    p_csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    med_gm = float(np.median(t1[gm > 0.7]))
    med_wm = float(np.median(t1[wm > 0.7]))
    med_csf = float(np.median(t1[brain & (p_csf > 0.7)]))
    threshold = (med_gm + med_csf) / 2
    nearer_wm = np.abs(t1 - med_wm) < np.abs(t1 - med_gm)
    tissue = np.where((wm > gm) | ((wm == gm) & nearer_wm), 3, 2)
    csf = (p_csf > np.maximum(gm, wm)) & (t1 < threshold)
    labels = np.where(brain, np.where(csf, 1, tissue), 0).astype(np.uint8)
    return Template(t1.astype(np.float32), labels, affine, threshold)


def _shift(affine: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    """The affine of a crop starting at voxel ``offset``."""
    t = np.eye(4)
    t[:3, 3] = offset
    return affine @ t


def _slice_index(tpl: Template, z_mm: float) -> int:
    """Index along file axis 2 of the slice centred at MNI z (mm); must hit a voxel centre."""
    k = (z_mm - tpl.affine[2, 3]) / tpl.affine[2, 2]
    if abs(k - round(k)) > 1e-6 or not 0 <= round(k) < tpl.t1.shape[2]:
        raise ValueError(f"z = {z_mm} mm is not a slice centre of the 2 mm grid")
    return int(round(k))


def _inplane_crop(tpl: Template) -> tuple[slice, slice]:
    """The brain's in-plane bounding box over all slices, rounded up to MULTIPLE and centred."""
    xy = np.argwhere(tpl.labels.any(axis=2))
    out = []
    for axis in range(2):
        lo, hi = int(xy[:, axis].min()), int(xy[:, axis].max()) + 1
        size = -(-(hi - lo) // MULTIPLE) * MULTIPLE
        start = min(max(0, (lo + hi - size) // 2), tpl.t1.shape[axis] - size)
        out.append(slice(start, start + size))
    return out[0], out[1]


def _fractions(labels: list[np.ndarray]) -> dict[str, float]:
    counts = np.bincount(np.concatenate([lab.ravel() for lab in labels]), minlength=len(LABELS))
    return {LABELS[v]: round(float(counts[v] / counts.sum()), 4) for v in LABELS}


def _write_split(root: Path, name: str, cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                 description: str, dim: int, synthetic: bool = False) -> None:
    from medsynth.data.nifti import write_volume

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for case_id, image, label, affine in cases:
        write_volume(root / "imagesTr" / f"{case_id}.nii.gz", image, affine, kind="image")
        write_volume(root / "labelsTr" / f"{case_id}.nii.gz", label, affine, kind="label")
        entries.append({"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz",
                        **({"synthetic": True} if synthetic else {})})
    manifest = {
        "name": name, "description": description, "reference": "ICBM 2009a nonlinear symmetric MNI152 (nilearn)",
        "licence": "see nilearn/datasets/description/icbm152_2009.rst", "tensorImageSize": f"{dim}D",
        "modality": {"0": "T1"}, "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(entries), "numTest": 0, "training": entries, "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _slices(tpl: Template, z0: float, count: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` consecutive axial slices from MNI z ``z0`` mm, cropped in-plane: (id, T1, labels, affine)."""
    cx, cy = _inplane_crop(tpl)
    k0 = _slice_index(tpl, z0)
    cases = []
    for k in range(k0, k0 + count):
        z = round(float(tpl.affine[2, 3] + tpl.affine[2, 2] * k), 1)
        cases.append((f"mni_z{z:+06.1f}".replace(".", "p"), tpl.t1[cx, cy, k], tpl.labels[cx, cy, k],
                      _shift(tpl.affine, (cx.start, cy.start, k))))
    return cases


def _blocks(tpl: Template, split: str, z0: float, count: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The right and left hemisphere blocks (split at the midline) of ``count`` slices from MNI z ``z0`` mm."""
    _, cy = _inplane_crop(tpl)
    k0 = _slice_index(tpl, z0)
    zs = slice(k0, k0 + count)
    mid = int(round((0 - tpl.affine[0, 3]) / tpl.affine[0, 0] + 0.5))  # the voxel boundary nearest x = 0 mm
    cases = []
    for side, xs in (("right", slice(mid, mid + BLOCK_3D_WIDTH)), ("left", slice(mid - BLOCK_3D_WIDTH, mid))):
        if xs.start < 0 or xs.stop > tpl.t1.shape[0]:
            raise ValueError(f"{side} block {xs} leaves the template")
        cases.append((f"mni_{side}_{split}", tpl.t1[xs, cy, zs], tpl.labels[xs, cy, zs],
                      _shift(tpl.affine, (xs.start, cy.start, zs.start))))
    return cases


def _pool_slices(tpl: Template) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """The unlabelled pool (2D): every slice showing brain, outside the training block and at least
    POOL_GAP_MM from the held-out block (module doc)."""
    cx, cy = _inplane_crop(tpl)
    train_z0, train_n = SLICES_2D["train"]
    test_z0, test_n = SLICES_2D["test"]
    test_lo, test_hi = test_z0 - POOL_GAP_MM, test_z0 + 2 * (test_n - 1) + POOL_GAP_MM
    cases = []
    for z0 in (float(tpl.affine[2, 3] + tpl.affine[2, 2] * k) for k in range(tpl.t1.shape[2])):
        z = round(z0, 1)
        if train_z0 <= z <= train_z0 + 2 * (train_n - 1) or test_lo < z < test_hi:
            continue
        case = _slices(tpl, z, 1)[0]
        if (case[2] > 0).mean() >= POOL_MIN_BRAIN:
            cases.append(case)
    return cases


def _write_pool(root: Path, cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], description: str) -> None:
    """The pool's images as an MSD dataset of unlabelled cases (``test`` entries, ``imagesTs/``), no labels."""
    from medsynth.data.nifti import write_volume

    (root / "imagesTs").mkdir(parents=True, exist_ok=True)
    for case_id, image, _label, affine in cases:
        write_volume(root / "imagesTs" / f"{case_id}.nii.gz", image, affine, kind="image")
    manifest = {
        "name": "mni152_2d_pool", "description": description, "tensorImageSize": "2D",
        "modality": {"0": "T1"}, "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": 0, "numTest": len(cases), "training": [],
        "test": [f"imagesTs/{case_id}.nii.gz" for case_id, *_ in cases],
    }
    (root / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _z_range(z0: float, count: int) -> str:
    return f"MNI z {z0:+.1f}..{z0 + 2 * (count - 1):+.1f} mm"


def build(out: Path, dim: int, overwrite: bool = False) -> dict[str, Path]:
    """Write OUT/train, OUT/test and (2D) OUT/val (module doc); returns their dataset.json paths."""
    targets = {split: out / split for split in (("train", "test", "val", "pool", "pool_truth") if dim == 2
                                                 else ("train", "test"))}
    clash = [str(p) for p in targets.values() if p.exists()]
    if clash and not overwrite:
        raise SystemExit(f"error: {', '.join(clash)} exist; pass --overwrite to replace them")
    for p in targets.values():
        if p.exists():
            shutil.rmtree(p)
    tpl = load_template()
    brain = tpl.labels > 0
    emit(what="template", spacing_mm=[float(v) for v in np.linalg.norm(tpl.affine[:3, :3], axis=0)],
         shape=list(tpl.t1.shape), csf_threshold=round(tpl.csf_threshold, 2),
         label_fraction=_fractions([tpl.labels]),
         label_fraction_in_brain={LABELS[v]: round(float((tpl.labels[brain] == v).mean()), 4) for v in (1, 2, 3)})
    notes = {"test": "; held-out cases (listed under training because they carry labels)",
             "val": "; validation cases, neither training nor held-out (listed under training because they carry labels)"}
    for split, root in targets.items():
        if split in ("pool", "pool_truth"):
            cases = _pool_slices(tpl)
            zs = sorted(float(c[3][2, 3]) for c in cases)
            what = (f"{len(cases)} unlabelled axial 2 mm slices, MNI z {zs[0]:+.1f}..{zs[-1]:+.1f} mm outside the "
                    f"training block and at least {POOL_GAP_MM:g} mm from the held-out block")
            if split == "pool":
                _write_pool(root, cases, f"MNI152 2009a T1 at 2 mm; unlabelled pool: {what}")
            else:
                _write_split(root, "mni152_2d_pool_truth", cases, f"MNI152 2009a T1 at 2 mm; the pool's true labels "
                             f"(the ceiling; the product never sees them): {what}", dim, synthetic=True)
            emit(what="build", dim=dim, split=split, manifest=str(root / "dataset.json"), cases=len(cases),
                 z_mm=[round(z, 1) for z in zs], label_fraction=_fractions([c[2] for c in cases]))
            continue
        if split == "val":
            cases = [c for z0, count in VAL_2D for c in _slices(tpl, z0, count)]
            what = "axial 2 mm slices, " + ", ".join(_z_range(z0, count) for z0, count in VAL_2D)
        elif dim == 2:
            z0, count = SLICES_2D[split]
            cases, what = _slices(tpl, z0, count), f"{count} axial 2 mm slices, {_z_range(z0, count)}"
        else:
            z0, count = BLOCKS_3D[split]
            cases = _blocks(tpl, split, z0, count)
            what = f"left/right hemisphere blocks, {count} 2 mm slices from MNI z {z0:+.1f} mm"
        desc = (f"MNI152 2009a T1 at 2 mm, labels from the GM/WM probability maps; {split} split: {what}"
                + notes.get(split, ""))
        _write_split(root, f"mni152_{dim}d_{split}", cases, desc, dim)
        emit(what="build", dim=dim, split=split, manifest=str(root / "dataset.json"), cases=len(cases),
             shape=list(cases[0][1].shape), spacing_mm=[float(FACTOR)] * dim,
             label_fraction=_fractions([c[2] for c in cases]))
    return {split: root / "dataset.json" for split, root in targets.items()}


# ---------------------------------------------------------------------------- scoring


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # template units, float64
    label: np.ndarray  # int
    label_path: Path
    affine: np.ndarray  # (4, 4) voxel -> RAS mm of the label file


def read_cases(path: Path) -> list[Case]:
    """The labelled cases of a dataset (a dataset.json, or a folder holding one)."""
    import medsynth
    from medsynth.data.nifti import read_volume

    if path.is_dir():
        path = path / "dataset.json"
    manifest = medsynth.read_manifest(path)
    out = []
    for c in manifest.cases:
        if c.label is None:
            continue
        image = read_volume(c.images[0], kind="image").array.astype(np.float64)
        lab = read_volume(c.label, kind="label")
        out.append(Case(c.case_id, image, lab.array.astype(np.int64), Path(c.label), np.asarray(lab.affine)))
    if not out:
        raise SystemExit(f"error: {path}: no labelled cases")
    return out


@dataclass
class Scale:
    """Training intensity range mapped to [0, DATA_RANGE]; label means in template units."""

    lo: float
    hi: float
    means: dict[int, float]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.lo) * (DATA_RANGE / (self.hi - self.lo))


def fit_scale(train: list[Case]) -> Scale:
    lo = min(float(c.image.min()) for c in train)
    hi = max(float(c.image.max()) for c in train)
    values = np.concatenate([c.image.ravel() for c in train])
    labels = np.concatenate([c.label.ravel() for c in train])
    means = {int(v): float(values[labels == v].mean()) for v in np.unique(labels)}
    return Scale(lo, hi, means)


def fill_image(label: np.ndarray, scale: Scale, sigma: float = 0.0) -> np.ndarray:
    """The label-mean fill of ``label`` (template units), optionally Gaussian-blurred (sigma in voxels).
    A label the training set lacks gets the overall training mean."""
    from scipy.ndimage import gaussian_filter

    default = float(np.mean(list(scale.means.values())))
    lut = np.full(int(label.max()) + 1, default)
    for v, m in scale.means.items():
        if v < lut.size:
            lut[v] = m
    image = lut[label]
    return gaussian_filter(image, sigma, mode="nearest") if sigma > 0 else image


def score(real: np.ndarray, fake: np.ndarray, scale: Scale) -> tuple[float, float]:
    """(SSIM, PSNR dB) of ``fake`` against ``real`` after the training-range scaling (module doc)."""
    import medsynth

    a, b = scale(real), scale(fake)
    return float(medsynth.ssim(a, b, data_range=DATA_RANGE)), float(medsynth.psnr(a, b, data_range=DATA_RANGE))


def _mean_scores(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))


def fill_scores(train: list[Case], test: list[Case]) -> list[dict[str, Any]]:
    """The plain and the blurred label-mean fill on ``test``; sigma fitted on ``train``."""
    scale = fit_scale(train)
    fit = {s: _mean_scores([score(c.image, fill_image(c.label, scale, s), scale) for c in train])[1] for s in SIGMAS}
    sigma = max(SIGMAS, key=lambda s: fit[s])
    rows = []
    for variant, s in (("label-mean", 0.0), ("label-mean-blur", sigma)):
        per_case = [score(c.image, fill_image(c.label, scale, s), scale) for c in test]
        ssim_v, psnr_v = _mean_scores(per_case)
        rows.append(dict(what="fill", variant=variant, sigma_vox=s, ssim=round(ssim_v, 4), psnr=round(psnr_v, 2),
                         ssim_min=round(min(p[0] for p in per_case), 4), psnr_min=round(min(p[1] for p in per_case), 2),
                         cases=len(test), data_range=DATA_RANGE, scale_lo=scale.lo, scale_hi=round(scale.hi, 3),
                         label_means={LABELS.get(k, str(k)): round(v, 2) for k, v in scale.means.items()}))
    return rows


def _medsynth(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsynth", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; on failure print the output and exit."""
    res = subprocess.run(cmd, text=True, capture_output=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"error: {shlex.join(cmd)} exited with {res.returncode}")
    return res


def sample_eval(run: Path, test_path: Path, train_path: Path, seeds: list[int], out: Path,
                name: str | None = None, extra: list[str] | None = None) -> list[dict[str, Any]]:
    """Sample the run for every held-out mask and seed with ``medsynth sample``; score like the fill."""
    train, test = read_cases(train_path), read_cases(test_path)
    scale = fit_scale(train)
    rows = fill_scores(train, test)
    out.mkdir(parents=True, exist_ok=True)
    fakes: dict[tuple[str, int], np.ndarray] = {}
    from medsynth.data.nifti import read_volume

    t0 = time.perf_counter()
    for case, seed in itertools.product(test, seeds):
        path = out / f"{case.case_id}_seed{seed}.nii.gz"
        _run(_medsynth("sample", str(run), "--mask", str(case.label_path), "--out", str(path),
                       "--seed", str(seed), "--overwrite", *(extra or [])))
        fakes[case.case_id, seed] = read_volume(path, kind="image").array.astype(np.float64)
    seconds = time.perf_counter() - t0

    per_seed = [_mean_scores([score(c.image, fakes[c.case_id, s], scale) for c in test]) for s in seeds]
    ssim_v, psnr_v = float(np.mean([p[0] for p in per_seed])), float(np.mean([p[1] for p in per_seed]))
    # diversity: SSIM between two seeds' images of the same mask (1 = the noise is ignored)
    between = [score(fakes[c.case_id, a], fakes[c.case_id, b], scale)[0]
               for c in test for a, b in itertools.combinations(seeds, 2)]
    fill = rows[0]
    label_mean, label_spread = {}, {}
    for v in sorted(scale.means):
        real = np.concatenate([c.image[c.label == v] for c in test])
        fake = np.concatenate([fakes[c.case_id, s][c.label == v] for c in test for s in seeds])
        label_mean[LABELS.get(v, str(v))] = [round(float(fake.mean()), 1), round(float(real.mean()), 1)]
        # spread of the per-image label mean: over all samples, over the seeds of one mask (mean over
        # masks), and over the real held-out cases
        has = [c for c in test if (c.label == v).any()]
        per = np.array([[fakes[c.case_id, s][c.label == v].mean() for s in seeds] for c in has])
        label_spread[LABELS.get(v, str(v))] = [
            round(float(per.std()), 2), round(float(per.std(axis=1).mean()), 2),
            round(float(np.std([c.image[c.label == v].mean() for c in has])), 2)]
    rows.append(dict(
        what="mask_to_image", model=name or run.name, run=str(run), seeds=seeds, cases=len(test),
        ssim=round(ssim_v, 4), psnr=round(psnr_v, 2),
        ssim_per_seed=[round(p[0], 4) for p in per_seed], psnr_per_seed=[round(p[1], 2) for p in per_seed],
        fill_ssim=fill["ssim"], fill_psnr=fill["psnr"],
        beats_fill=bool(ssim_v > fill["ssim"] and psnr_v > fill["psnr"]),
        beats_blurred_fill=bool(ssim_v > rows[1]["ssim"] and psnr_v > rows[1]["psnr"]),
        between_seed_ssim=round(float(np.mean(between)), 4) if between else None,
        label_mean_fake_real=label_mean,
        label_mean_spread_samples_seeds_real=label_spread,
        seconds_per_sample=round(seconds / len(fakes), 2),
    ))
    return rows


# ---------------------------------------------------------------------------- variety frontier

AMPLITUDES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]  # texture-transfer samplers: residual amplitude


def variety(data: Path, *, dim: int = 2) -> list[dict[str, Any]]:
    """How much a sampler can vary at a fixed mask on this data and still match the held-out image.

    Two families of ideal samplers, scored like ``sample-eval`` on every held-out mask (SSIM / PSNR to the
    real slice; between-sample SSIM over pairs of draws for the same mask):

    - *texture transfer*: the blurred label-mean fill of the mask plus ``a`` times the residual of one
      training case (its real image minus its own blurred fill: the part of a real image its mask does not
      predict, real texture at real amplitude when ``a = 1``); a draw picks the training case, ``a`` sweeps
      :data:`AMPLITUDES`.
    - *registered real*: each training image warped onto the held-out mask (diffeomorphic demons between the
      two label maps read as images: the mask decides the anatomy, the held-out image is never read): a real
      appearance of this anatomy, what a perfect generator's draw would look like.
    """
    from medsynth.registration import RegistrationError, RegistrationSettings, register, warp_image

    train, test = read_cases(data / "train"), read_cases(data / "test")
    scale = fit_scale(train)
    fit = {s: _mean_scores([score(c.image, fill_image(c.label, scale, s), scale) for c in train])[1] for s in SIGMAS}
    sigma = max(SIGMAS, key=lambda s: fit[s])
    residuals = [c.image - fill_image(c.label, scale, sigma) for c in train]
    rows: list[dict[str, Any]] = []

    def summarise(name: str, draws: dict[str, list[np.ndarray]], **extra: Any) -> None:
        to_real = [score(c.image, d, scale) for c in test for d in draws[c.case_id]]
        between = [score(a, b, scale)[0] for c in test for a, b in itertools.combinations(draws[c.case_id], 2)]
        row = dict(what="variety", sampler=name, **extra, ssim=round(float(np.mean([t[0] for t in to_real])), 4),
                   psnr=round(float(np.mean([t[1] for t in to_real])), 2),
                   between_ssim=round(float(np.mean(between)), 4) if between else None,
                   draws_per_mask=len(draws[test[0].case_id]), masks=len(test))
        emit(**row)
        rows.append(row)

    def crop(r: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.zeros(shape)
        region = tuple(slice(0, min(a, b)) for a, b in zip(r.shape, shape))
        out[region] = r[region]
        return out

    for a in AMPLITUDES:
        draws = {c.case_id: [fill_image(c.label, scale, sigma) + a * crop(r, c.image.shape) for r in residuals]
                 for c in test}
        summarise("texture transfer", draws, amplitude=a, sigma_vox=sigma)

    settings = RegistrationSettings(transform="deformable", deformable="demons", metric="mse")
    draws = {}
    t0 = time.perf_counter()
    try:
        for c in test:
            draws[c.case_id] = []
            for t in train:
                reg = register(c.label.astype(np.float32), c.affine, t.label.astype(np.float32), t.affine, settings)
                draws[c.case_id].append(warp_image(t.image, t.affine, reg))
    except RegistrationError as err:  # e.g. the 3D split: training and held-out blocks hold different anatomy
        row = dict(what="variety", sampler="registered real", skipped=str(err))
        emit(**row)
        rows.append(row)
        return rows
    summarise("registered real", draws, seconds=round(time.perf_counter() - t0, 1))
    return rows


# ---------------------------------------------------------------------------- end to end


STAGES = ("build", "train", "sample-eval", "augment", "downstream")


def _recipe(name: str, tier: str) -> Path:
    """configs/TIER/NAME.yaml; tier "auto": configs/small/ when it has the recipe, else configs/tiny/."""
    if tier == "auto":
        tier = "small" if (REPO / "configs" / "small" / f"{name}.yaml").is_file() else "tiny"
    return REPO / "configs" / tier / f"{name}.yaml"


def run_all(out: Path, *, steps_gan: int, steps_ldm: int, steps_seg: int | None, seeds: list[int], until: str,
            num: int, tier: str, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"error: {out} is not empty; pass --overwrite to replace it")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    results = out / "results.jsonl"
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        emit(**row)
        rows.append(row)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def timed(step: str, cmd: list[str] | None = None, fn: Any = None) -> Any:
        t0 = time.perf_counter()
        result = _run(cmd) if cmd is not None else fn()
        record(dict(what="timing", step=step, seconds=round(time.perf_counter() - t0, 1),
                    command=shlex.join(cmd) if cmd else None))
        return result

    # 1. data
    paths = timed("build", fn=lambda: build(out / "data", 2))
    train, test = paths["train"], paths["test"]
    for split, p in paths.items():
        timed(f"validate {split}", _medsynth("validate", str(p), "--no-progress"))
    for row in timed("fill", fn=lambda: fill_scores(read_cases(train), read_cases(test))):
        record(row)
    shape = list(read_cases(train)[0].image.shape)
    if until == "build":
        return _table(rows)

    # 2. generators (every run reads the slices at their own size)
    size = ",".join(map(str, shape))
    common = ["--data", str(train), "--no-progress", "--set", "data.dim=2", "--set", f"data.size=[{size}]"]
    runs = {"gan": out / "runs" / "gan", "ldm": out / "runs" / "ldm"}
    timed("train gan", _medsynth("train", str(_recipe("gan2d", tier)), "--out", str(runs["gan"]),
                                 "--max-steps", str(steps_gan), *common,
                                 "--set", f"training.checkpoint_every={max(1, steps_gan // 4)}"))
    for stage in ("autoencoder", "diffusion"):
        timed(f"train ldm {stage}", _medsynth("train", str(_recipe("ldm2d", tier)), "--out", str(runs["ldm"]),
                                              "--stage", stage, "--max-steps", str(steps_ldm), *common,
                                              "--set", f"training.checkpoint_every={max(1, steps_ldm // 4)}"))
    if until == "train":
        return _table(rows)

    # 3. mask -> image on the held-out masks
    for model, run in runs.items():
        model_rows = timed(f"sample-eval {model}", fn=lambda run=run, model=model: sample_eval(
            run, test, train, seeds, out / "samples" / model, name=model))
        record(model_rows[-1])
    if until == "sample-eval":
        return _table(rows)

    # 4. synthetic pairs
    # ("fill": the trivial control, synthseg with every random part off = the label-mean fill of each new mask)
    synthetic = []
    for name, method in (("fill", "synthseg"), ("synthseg", "synthseg"), ("classic", "classic"), ("gan", "gan"),
                         ("ldm", "ldm")):
        dest = out / "augment" / name
        extra = ["--model", str(runs[method])] if method in runs else []
        if name == "fill":
            extra = ["--config", str(FILL_PAIRS)]
        res = timed(f"augment {name}", _medsynth("augment", str(train), "--method", method, "--num", str(num),
                                                 "--out", str(dest), "--seed", "0", *extra, "--json", "--no-progress"))
        record(dict(what="augment", method=name, summary=_last_json(res.stdout)))
        synthetic += ["--synthetic", str(dest / "dataset.json")]
    if until == "augment":
        return _table(rows)

    # 5. downstream segmenter
    steps = [] if steps_seg is None else ["--steps", str(steps_seg)]
    cmd = _medsynth("downstream", str(train), "--test", str(test), *synthetic, "--seeds", ",".join(map(str, seeds)) + ",",
                    *steps, "--out", str(out / "downstream"), "--json", "--no-progress")
    if subprocess.run(_medsynth("downstream", "--help"), capture_output=True).returncode != 0:
        record(dict(what="skipped", step="downstream", reason="this medsynth has no `downstream` command",
                    command=shlex.join(cmd)))
    else:
        res = timed("downstream", cmd)
        written = out / "downstream" / "summary.json"
        summary = json.loads(written.read_text()) if written.is_file() else _last_json(res.stdout)
        record(dict(what="downstream", summary=summary))
    _table(rows)


def oracle(out: Path, *, seeds: list[int], steps_seg: int | None, num: int, overwrite: bool) -> None:
    """The oracle sets (module doc) and ``medsynth downstream`` on them, beside the fill-pairs control."""
    data, root = out / "data", out / "oracle"
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise SystemExit(f"error: {root} is not empty; pass --overwrite to replace it")
    if root.exists():
        shutil.rmtree(root)
    paths = ({split: data / split / "dataset.json" for split in ("train", "test")}
             if (data / "train" / "dataset.json").is_file() and (data / "test" / "dataset.json").is_file()
             else build(data, 2, overwrite=True))
    tpl = load_template()
    sets = {}
    for name, (z0, count) in ORACLE_2D.items():
        desc = (f"MNI152 2009a T1 at 2 mm; oracle set '{name}': {count} real axial slices, {_z_range(z0, count)}, "
                "listed as synthetic (a perfect generator's output)")
        _write_split(root / name, f"mni152_2d_oracle_{name}", _slices(tpl, z0, count), desc, 2, synthetic=True)
        sets[f"real {name}"] = root / name / "dataset.json"
    for name, source in (("fill", paths["train"]), ("fill above", sets["real above"])):
        dest = root / name.replace(" ", "_")
        _run(_medsynth("augment", str(source), "--method", "synthseg", "--config", str(FILL_PAIRS), "--num", str(num),
                       "--out", str(dest), "--seed", "0", "--synthetic-only", "--no-progress"))
        sets[name] = dest / "dataset.json"
    synthetic = [arg for p in (sets["fill"], sets["real below"], sets["real above"], sets["fill above"])
                 for arg in ("--synthetic", str(p))]
    steps = [] if steps_seg is None else ["--steps", str(steps_seg)]
    _run(_medsynth("downstream", str(paths["train"]), "--test", str(paths["test"]), *synthetic,
                   "--seeds", ",".join(map(str, seeds)) + ",", *steps, "--out", str(root / "downstream"),
                   "--json", "--no-progress"))
    summary = json.loads((root / "downstream" / "summary.json").read_text())
    emit(what="oracle", sets={k: str(v) for k, v in sets.items()}, summary=summary)
    print("\n".join(_downstream_table(summary)))


def unlabelled(out: Path, *, seeds: list[int], steps_seg: int | None, num: int, overwrite: bool,
               deformable: str | None, plain_sets: bool) -> None:
    """The unlabelled pool (2D): fit an anatomy bank on OUT/data/train + OUT/data/pool, make the sets of each
    anatomy source (pseudo labels, fill pairs on the propagated masks, fill pairs on bank-warped masks) and run
    ``medsynth downstream`` on them beside the pool's true labels (the ceiling)."""
    data, root = out / "data", out / "unlabelled"
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise SystemExit(f"error: {root} is not empty; pass --overwrite to replace it")
    if root.exists():
        shutil.rmtree(root)
    splits = ("train", "test", "pool", "pool_truth")
    paths = ({split: data / split / "dataset.json" for split in splits}
             if all((data / s / "dataset.json").is_file() for s in splits) else build(data, 2, overwrite=True))
    bank = root / "bank"
    t0 = time.perf_counter()
    _run(_medsynth("anatomy", str(paths["train"]), "--unlabelled", str(paths["pool"]), "--out", str(bank),
                   *(["--deformable", deformable] if deformable else []), "--no-progress"))
    facts = json.loads((bank / "bank.json").read_text())
    emit(what="bank", seconds=round(time.perf_counter() - t0, 1), loo=facts["loo"],
         targets=len(facts["targets"]), mean_agreement=round(float(np.mean([t["agreement"] for t in
                                                                            facts["targets"].values()])), 4))
    _pool_accuracy(bank, paths["pool_truth"])
    sets = {"pool truth (ceiling)": paths["pool_truth"]}
    n_pool = len(facts["targets"])
    jobs = {
        "pseudo": ["--method", "pseudo", "--anatomy", f"unlabelled:{bank}", "--num", str(n_pool)],
        "fill on unlabelled": ["--method", "synthseg", "--config", str(FILL_PAIRS), "--anatomy", f"unlabelled:{bank}",
                               "--num", str(num)],
        "fill on bank": ["--method", "synthseg", "--config", str(FILL_PAIRS), "--anatomy", f"bank:{bank}",
                         "--num", str(num)],
    }
    for name, args in jobs.items():
        dest = root / name.replace(" ", "_")
        _run(_medsynth("augment", str(paths["train"]), *args, "--out", str(dest), "--seed", "0", "--synthetic-only",
                       "--no-progress"))
        sets[name] = dest / "dataset.json"
    synthetic = [arg for p in sets.values() for arg in ("--synthetic", str(p))]
    steps = [] if steps_seg is None else ["--steps", str(steps_seg)]
    _run(_medsynth("downstream", str(paths["train"]), "--test", str(paths["test"]), *synthetic,
                   "--seeds", ",".join(map(str, seeds)) + ",", *steps, "--out", str(root / "downstream"),
                   *([] if plain_sets else ["--no-plain-sets"]), "--json", "--no-progress"))
    summary = json.loads((root / "downstream" / "summary.json").read_text())
    emit(what="unlabelled", sets={k: str(v) for k, v in sets.items()}, summary=summary)
    print("\n".join(_downstream_table(summary)))


def _pool_accuracy(bank: Path, truth: Path) -> None:
    """Dice per label of the bank's propagated masks against the pool's true labels (measured, never used)."""
    from medsynth.data.nifti import read_volume
    from medsynth.registration.bank import dice_per_label

    rows = []
    for case in read_cases(truth):
        mask = bank / "masks" / f"{case.case_id}.nii.gz"
        if mask.is_file():
            rows.append(dice_per_label(np.asarray(read_volume(mask, kind="label").array), case.label, [1, 2, 3]))
    emit(what="pool accuracy", cases=len(rows),
         dice={LABELS[v]: round(float(np.nanmean([r[v] for r in rows])), 4) for v in (1, 2, 3)})


def _last_json(text: str) -> Any:
    """The JSON object a ``--json`` command printed (the whole output, or the last object in it that starts
    a line), else the output's tail as text."""
    decoder = json.JSONDecoder()
    starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    for start in reversed(starts):
        if text[start:start + 1] != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        return obj
    return text.strip()[-2000:]


def _table(rows: list[dict[str, Any]]) -> None:
    """Print the mask->image and timing tables in markdown."""
    lines = ["", "| mask -> image (held-out) | SSIM | PSNR (dB) | between-seed SSIM |", "|---|---|---|---|"]
    for r in rows:
        if r["what"] == "fill":
            lines.append(f"| fill: {r['variant']} (sigma {r['sigma_vox']} vox) | {r['ssim']:.3f} | {r['psnr']:.1f} | |")
        elif r["what"] == "mask_to_image":
            lines.append(f"| {r['model']} (seeds {','.join(map(str, r['seeds']))}) | {r['ssim']:.3f} | {r['psnr']:.1f} "
                         f"| {r['between_seed_ssim'] if r['between_seed_ssim'] is not None else ''} |")
    for r in rows:
        if r["what"] == "downstream" and isinstance(r["summary"], dict):
            lines += _downstream_table(r["summary"])
    lines += ["", "| step | seconds |", "|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']} |" for r in rows if r["what"] == "timing"]
    print("\n".join(lines))


def _downstream_table(summary: dict[str, Any]) -> list[str]:
    """Rows of ``medsynth downstream --json``: mean Dice +- std, HD95, paired difference to the reference."""
    diffs = {c.get("variant"): c for c in summary.get("comparisons", []) if c.get("metric") == "dice"}
    ref = summary.get("reference", "real+classic")
    lines = ["", f"| training data ({len(summary.get('seeds', []))} seeds, {summary.get('steps')} steps) "
             f"| mean Dice | HD95 (mm) | Dice - {ref} [95% CI] |", "|---|---|---|---|"]
    for v in summary.get("variants", []):
        dice, hd = v.get("dice", {}), v.get("hd95", {})
        std = f" +- {dice['std']:.3f}" if dice.get("std") is not None else ""
        c = diffs.get(v.get("name"))
        diff = f"{c['mean_difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" if c else ""
        nan = float("nan")
        lines.append(f"| {v.get('name')} | {dice.get('mean', nan):.3f}{std} | {hd.get('mean', nan):.1f} | {diff} |")
    return lines


# ---------------------------------------------------------------------------- CLI


def _seeds(text: str) -> list[int]:
    """As ``medsynth downstream --seeds``: "0,1,2" -> [0, 1, 2]; a count "3" -> [0, 1, 2]; "5," -> [5]."""
    parts = [p.strip() for p in text.split(",")]
    return list(range(int(parts[0]))) if len(parts) == 1 else [int(p) for p in parts if p]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write OUT/train and OUT/test from the bundled MNI152 template")
    b.add_argument("out", type=Path)
    b.add_argument("--dim", type=int, choices=[2, 3], default=2)
    b.add_argument("--overwrite", action="store_true")
    f = sub.add_parser("fill", help="score the label-mean fill on the held-out cases")
    f.add_argument("train", type=Path)
    f.add_argument("test", type=Path)
    s = sub.add_parser("sample-eval", help="medsynth sample on every held-out mask, scored like the fill")
    s.add_argument("run", type=Path)
    s.add_argument("test", type=Path)
    s.add_argument("--train", type=Path, help="training set (default: the test folder's sibling train/)")
    s.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    s.add_argument("--out", type=Path, help="where the samples go (default: RUN's sibling RUN.heldout/)")
    s.add_argument("--name", help="model name in the output (default: RUN's folder name)")
    o = sub.add_parser("oracle", help="downstream with real slices of other levels as a perfect generator's sets")
    o.add_argument("out", type=Path, help="OUT of `build` (data under OUT/data, built when missing)")
    o.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    o.add_argument("--steps-seg", type=int, default=300, help="segmenter steps of `medsynth downstream`")
    o.add_argument("--num", type=int, default=64, help="fill pairs per set")
    o.add_argument("--overwrite", action="store_true")
    u = sub.add_parser("unlabelled", help="anatomy bank on the unlabelled pool, its sets, downstream beside the "
                       "pool's true labels")
    u.add_argument("out", type=Path, help="OUT of `build` (data under OUT/data, built when missing)")
    u.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    u.add_argument("--steps-seg", type=int, default=300, help="segmenter steps of `medsynth downstream`")
    u.add_argument("--num", type=int, default=64, help="fill pairs per set")
    u.add_argument("--deformable", choices=["demons", "bspline"], help="the bank's deformable stage")
    u.add_argument("--no-plain-sets", dest="plain_sets", action="store_false",
                   help="downstream trains only real+SET+classic per set")
    u.add_argument("--overwrite", action="store_true")
    v = sub.add_parser("variety", help="ideal samplers' SSIM to the held-out image against their between-draw SSIM")
    v.add_argument("data", type=Path, help="OUT of `build` (train/ and test/)")
    a = sub.add_parser("all", help="end to end on the 2D set: build, train, sample-eval, augment, downstream")
    a.add_argument("out", type=Path)
    a.add_argument("--steps-gan", type=int, default=1000)
    a.add_argument("--steps-ldm", type=int, default=1000, help="per stage (autoencoder, diffusion)")
    a.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    a.add_argument("--steps-seg", type=int, help="segmenter steps of `medsynth downstream` (default: its own)")
    a.add_argument("--num", type=int, default=16, help="synthetic cases per augment method")
    a.add_argument("--tier", choices=["auto", "small", "tiny"], default="auto",
                   help="recipes from configs/TIER/ (auto: small when it exists, else tiny)")
    a.add_argument("--until", choices=STAGES, default="downstream", help="stop after this stage")
    a.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()

    if args.cmd == "build":
        for p in build(args.out, args.dim, args.overwrite).values():
            _run(_medsynth("validate", str(p), "--no-progress"))
            emit(what="validate", manifest=str(p), ok=True)
    elif args.cmd == "fill":
        for row in fill_scores(read_cases(args.train), read_cases(args.test)):
            emit(**row)
    elif args.cmd == "sample-eval":
        test_dir = args.test if args.test.is_dir() else args.test.parent
        train = args.train or test_dir.parent / "train"
        out = args.out or args.run.with_name(args.run.name + ".heldout")
        for row in sample_eval(args.run, args.test, train, args.seeds, out, args.name):
            emit(**row)
    elif args.cmd == "unlabelled":
        unlabelled(args.out, seeds=args.seeds, steps_seg=args.steps_seg, num=args.num, overwrite=args.overwrite,
                   deformable=args.deformable, plain_sets=args.plain_sets)
    elif args.cmd == "variety":
        variety(args.data)
    elif args.cmd == "oracle":
        oracle(args.out, seeds=args.seeds, steps_seg=args.steps_seg, num=args.num, overwrite=args.overwrite)
    else:
        run_all(args.out, steps_gan=args.steps_gan, steps_ldm=args.steps_ldm, steps_seg=args.steps_seg,
                seeds=args.seeds, until=args.until, num=args.num, tier=args.tier, overwrite=args.overwrite)


if __name__ == "__main__":
    main()
