"""medsynth's registration beside ANTsPy SyN on the real-anatomy pairs: label Dice and seconds.

Pairs (``python benchmarks/real_anatomy.py build OUT --dim 2`` and ``--dim 3`` first):

- 2D: every training slice (fixed) with the training slices ``--offsets`` levels above it (moving,
  cyclic: 2 mm per level), so each pair shows different anatomy;
- 3D: the held-out right-hemisphere block (fixed) with the training right-hemisphere block (moving),
  72 mm lower: a hard pair;
- timing: a 128x128 pair (the first 2D pair padded with background) and a 96^3 pair (the whole 2 mm
  template cropped/padded to 96^3, moving = it through a smooth random deformation and a small affine).

For each pair: Dice per label (1 CSF, 2 GM, 3 WM) of the moving labels carried onto the fixed image
against the fixed labels, for identity (same voxel grid), affine-only, medsynth B-spline, medsynth
demons and ANTs SyN (``ants.registration(type_of_transform="SyN")``, labels through
``apply_transforms(interpolator="genericLabel")``), seconds of each registration, medsynth's folding.
Both run with ``--threads`` threads (ANTs through ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS, set before
ants is imported). ``fusion`` (2D): each training slice fused from all the others (leave one out),
majority vote against locally weighted voting, demons.

    python benchmarks/registration.py /tmp/ra2d /tmp/ra3d [--threads 2] [--offsets 2,4] [--out FILE]

Prints one JSON line per pair and a summary line; writes everything to
``benchmarks/results/registration.json`` (or ``--out``). antspyx is a benchmark-only extra (``bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from medsynth.data.manifest import read_manifest  # noqa: E402
from medsynth.data.nifti import read_volume  # noqa: E402
from medsynth.registration import (  # noqa: E402
    RegistrationError,
    RegistrationSettings,
    fuse_labels,
    local_weights,
    register,
    warp_image,
    warp_labels,
)
from medsynth.registration.geometry import to_itk_image  # noqa: E402

from _common import emit  # noqa: E402

LABELS = (1, 2, 3)
METHODS = ("identity", "affine", "bspline", "demons", "ants_syn")


def dice(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    out = {}
    for label in LABELS:
        x, y = a == label, b == label
        out[str(label)] = round(float(2 * (x & y).sum() / max(1, x.sum() + y.sum())), 4)
    return out


def read_cases(manifest: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    m = read_manifest(manifest)
    cases = []
    for c in m.cases:
        image = read_volume(c.images[0])
        assert c.label is not None
        cases.append((c.case_id, image.array.astype(np.float32), image.affine, read_volume(c.label, kind="label").array))
    return cases


def ants_image(ants: Any, array: np.ndarray, affine: np.ndarray) -> Any:
    """An ANTs image with the geometry medsynth gives ``array`` (ITK LPS, through the same converter)."""
    ref = to_itk_image(array, affine)
    d = len(array.shape)
    return ants.from_numpy(
        np.asarray(array, dtype=np.float32), origin=list(ref.GetOrigin()), spacing=list(ref.GetSpacing()),
        direction=np.array(ref.GetDirection()).reshape(d, d),
    )


def run_ants(ants: Any, fixed: tuple, moving: tuple) -> tuple[np.ndarray, float]:
    _, f_img, f_aff, _ = fixed
    _, m_img, m_aff, m_lab = moving
    fi, mi = ants_image(ants, f_img, f_aff), ants_image(ants, m_img, m_aff)
    start = time.perf_counter()
    out = ants.registration(fi, mi, type_of_transform="SyN")
    seconds = time.perf_counter() - start
    lab = ants.apply_transforms(fi, ants_image(ants, m_lab.astype(np.float32), m_aff), out["fwdtransforms"],
                                interpolator="genericLabel")
    return np.rint(lab.numpy()).astype(m_lab.dtype), seconds


SETTINGS = {
    "affine": lambda t: RegistrationSettings(transform="affine", threads=t),
    "bspline": lambda t: RegistrationSettings(deformable="bspline", histogram_bins=16, threads=t),
    "demons": lambda t: RegistrationSettings(deformable="demons", threads=t),
}


def one_pair(ants: Any, fixed: tuple, moving: tuple, threads: int, what: str, methods: tuple[str, ...] = METHODS
             ) -> dict[str, Any]:
    f_id, f_img, f_aff, f_lab = fixed
    m_id, m_img, m_aff, m_lab = moving
    record: dict[str, Any] = {"what": what, "fixed": f_id, "moving": m_id, "shape": list(f_img.shape),
                              "dice": {}, "seconds": {}, "folding": {}}
    if "identity" in methods and f_lab.shape == m_lab.shape:
        record["dice"]["identity"] = dice(f_lab, m_lab)
    for name in ("affine", "bspline", "demons"):
        if name not in methods:
            continue
        try:
            reg = register(f_img, f_aff, m_img, m_aff, SETTINGS[name](threads))
        except RegistrationError as err:
            record.setdefault("errors", {})[name] = str(err)
            continue
        record["dice"][name] = dice(f_lab, warp_labels(m_lab, m_aff, reg))
        record["seconds"][name] = round(reg.seconds, 3)
        record["folding"][name] = round(reg.folding_fraction, 5)
    if "ants_syn" in methods:
        lab, seconds = run_ants(ants, fixed, moving)
        record["dice"]["ants_syn"] = dice(f_lab, lab)
        record["seconds"]["ants_syn"] = round(seconds, 3)
    return record


def pad_to(case: tuple, size: tuple[int, int]) -> tuple:
    cid, img, aff, lab = case
    pads = [((n - s) // 2, n - s - (n - s) // 2) for s, n in zip(img.shape, size)]
    shift = np.eye(4)
    shift[:2, 3] = [-p[0] for p in pads]
    return (f"{cid}_pad128", np.pad(img, pads), aff @ shift, np.pad(lab, pads))


def template_pair(seed: int = 0) -> tuple[tuple, tuple]:
    """A 96^3 pair from the whole 2 mm template: itself, and itself through a smooth deformation and small affine."""
    from real_anatomy import load_template

    tpl = load_template()
    sl = (slice(1, 97), slice(10, 106), slice(0, 94))
    img = np.pad(tpl.t1[sl], ((0, 0), (0, 0), (1, 1)))
    lab = np.pad(tpl.labels[sl], ((0, 0), (0, 0), (1, 1)))
    shift = np.eye(4)
    shift[:3, 3] = [1, 10, -1]
    aff = tpl.affine @ shift
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(96.0)] * 3, indexing="ij"))
    disp = np.stack([ndimage.gaussian_filter(rng.normal(size=(96, 96, 96)), 8.0) for _ in range(3)])
    disp *= 3.0 / np.abs(disp).max()  # up to 3 voxels (6 mm)
    lin = np.eye(3) + rng.uniform(-0.05, 0.05, size=(3, 3))
    centre = np.full(3, 47.5)
    coords = np.einsum("ij,j...->i...", lin, grid - centre[:, None, None, None]) + centre[:, None, None, None] + 2 + disp
    m_img = ndimage.map_coordinates(img, coords, order=1, mode="constant").astype(np.float32)
    m_lab = ndimage.map_coordinates(lab, coords, order=0, mode="constant").astype(lab.dtype)
    return ("mni96", img, aff, lab), ("mni96_warped", m_img, aff, m_lab)


def fusion_2d(cases: list[tuple], threads: int) -> list[dict[str, Any]]:
    """Each training slice fused from all the others (demons): majority vote vs locally weighted."""
    out = []
    for k, target in enumerate(cases):
        t_id, t_img, t_aff, t_lab = target
        labs, imgs = [], []
        for j, atlas in enumerate(cases):
            if j == k:
                continue
            reg = register(t_img, t_aff, atlas[1], atlas[2], RegistrationSettings(threads=threads))
            labs.append(warp_labels(atlas[3], atlas[2], reg))
            imgs.append(warp_image(atlas[1], atlas[2], reg))
        record: dict[str, Any] = {"what": "fusion_2d", "target": t_id, "atlases": len(labs), "dice": {}}
        record["dice"]["majority"] = dice(t_lab, fuse_labels(labs)[0])
        for beta in (1.0, 4.0, 16.0):
            weights = local_weights(t_img, imgs, beta=beta)
            record["dice"][f"local_beta{beta:g}"] = dice(t_lab, fuse_labels(labs, weights=weights)[0])
        emit(**record)
        out.append(record)
    return out


def mean_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    names = sorted({n for r in records for n in r["dice"]})
    for name in names:
        rows = [r["dice"][name] for r in records if name in r["dice"]]
        table[name] = {"dice": {lab: round(float(np.mean([row[lab] for row in rows])), 4) for lab in rows[0]},
                       "pairs": len(rows)}
        secs = [r["seconds"][name] for r in records if name in r.get("seconds", {})]
        if secs:
            table[name]["seconds_mean"] = round(float(np.mean(secs)), 3)
        folds = [r["folding"][name] for r in records if name in r.get("folding", {})]
        if folds:
            table[name]["folding_max"] = round(float(np.max(folds)), 5)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root2d", type=Path)
    parser.add_argument("root3d", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--offsets", default="2,4", help="2D: moving slice = fixed slice + offset levels (cyclic)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: 2d,3d,timing,fusion")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "registration.json")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants  # benchmark-only; the variable above must be set before ITK starts

    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"threads": args.threads, "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    cases2d = read_cases(args.root2d / "train" / "dataset.json")
    if "2d" not in skip:
        pairs = []
        for offset in (int(o) for o in args.offsets.split(",")):
            for k in range(len(cases2d)):
                rec = one_pair(ants, cases2d[k], cases2d[(k + offset) % len(cases2d)], args.threads, "pair_2d")
                emit(**rec)
                pairs.append(rec)
        results["pairs_2d"] = pairs
        results["summary_2d"] = mean_table(pairs)
        emit(what="summary_2d", **results["summary_2d"])
    if "3d" not in skip:
        right = {c[0]: c for c in read_cases(args.root3d / "train" / "dataset.json")}["mni_right_train"]
        test = {c[0]: c for c in read_cases(args.root3d / "test" / "dataset.json")}["mni_right_test"]
        rec = one_pair(ants, test, right, args.threads, "pair_3d")
        emit(**rec)
        results["pair_3d"] = rec
    if "timing" not in skip:
        fixed, moving = pad_to(cases2d[0], (128, 128)), pad_to(cases2d[2], (128, 128))
        rec = one_pair(ants, fixed, moving, args.threads, "timing_2d_128", ("identity", "affine", "demons", "ants_syn"))
        emit(**rec)
        results["timing_2d_128"] = rec
        fixed, moving = template_pair()
        rec = one_pair(ants, fixed, moving, args.threads, "timing_3d_96", ("identity", "affine", "demons", "ants_syn"))
        emit(**rec)
        results["timing_3d_96"] = rec
    if "fusion" not in skip:
        fused = fusion_2d(cases2d, args.threads)
        results["fusion_2d"] = fused
        results["summary_fusion_2d"] = mean_table(fused)
        emit(what="summary_fusion_2d", **results["summary_fusion_2d"])
    results["load_avg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    emit(what="written", path=str(args.out))


if __name__ == "__main__":
    main()
