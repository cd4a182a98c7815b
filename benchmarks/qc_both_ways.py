"""QC both ways: how many held-out real images the label-agreement QC rejects (target <= 1 %), and how
many label-mean fill images it rejects when they stand in for ``gan`` output (target >= 99 %).

Reference statistics per training case (:class:`medsynth.synthesis.qc.LabelIntensityStats.from_pairs`),
the texture depth from the fill's partial-volume width fitted on the training cases as a run does.

- phantoms: 20 training 2D phantoms (64^2), 200 held-out; in every third case with a lesion, the
  lesion is made brighter than every tissue (x2.8);
- MNI (needs nilearn): ``python benchmarks/real_anatomy.py build OUT --dim 2``; OUT/test and OUT/val as
  held-out, OUT/train as reference.

- 3D: 10 training 3D phantoms (32^3), 100 held-out (the same bright lesions); the MNI 3D split (2 training,
  2 held-out blocks): ``real_anatomy.py build OUT3D --dim 3``.

    python benchmarks/qc_both_ways.py [--mni OUT] [--mni3d OUT3D]

Prints one JSON line per data set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from medsynth.data.loader import fit_fill_sigma, label_mean_fill
from medsynth.data.phantoms import case_rng, make_phantom
from medsynth.synthesis.qc import LabelIntensityStats, check_label_agreement

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rates(train: list[tuple[np.ndarray, np.ndarray]], test: list[tuple[np.ndarray, np.ndarray]],
          values: list[int]) -> dict[str, object]:
    images, labels = [t[0] for t in train], [t[1] for t in train]
    pooled = LabelIntensityStats.from_pairs(images, labels, values)
    sigma = fit_fill_sigma([(i[None], lab) for i, lab in zip(images, labels)], pooled.means.tolist(),
                           tuple(range(labels[0].ndim)))
    ref = LabelIntensityStats.from_pairs(images, labels, values, fill_sigma=sigma)
    lut = np.full(max(values) + 1, 0, np.int64)
    lut[values] = np.arange(len(values))
    real = [check_label_agreement(i, lab, ref) for i, lab in test]
    fills = [check_label_agreement(label_mean_fill(ref.means, lut[lab], s)[0], lab, ref)
             for _, lab in test for s in (0.0, sigma)]
    return {"train": len(train), "held_out": len(test), "fill_sigma": sigma, "texture_depth": ref.texture_depth,
            "false_reject": round(float(np.mean([not r.passed for r in real])), 4),
            "fill_reject": round(float(np.mean([not r.passed for r in fills])), 4), "fills": len(fills),
            "real_reasons": [r.reasons[:2] for r in real if not r.passed][:5],
            "real_min_texture_ratio": min(r.texture_ratio[0] or np.inf for r in real),
            "fill_max_texture_ratio": max(r.texture_ratio[0] or 0.0 for r in fills)}


def phantoms(seed: int, cases: int, dim: int = 2, size: int = 64) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for k in range(cases):
        p = make_phantom(dim, size, case_rng(seed, k))
        bright = bool((p.label == 6).any()) and k % 3 == 0
        out.append((np.where(p.label == 6, p.image * 2.8, p.image) if bright else p.image.astype(np.float64),
                    p.label.astype(np.int64)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mni", type=Path, help="the output folder of real_anatomy.py build --dim 2")
    parser.add_argument("--mni3d", type=Path, help="the output folder of real_anatomy.py build --dim 3")
    args = parser.parse_args()
    print(json.dumps({"what": "qc_both_ways", "data": "phantoms 2D 64^2", **rates(phantoms(0, 20), phantoms(1, 200),
                                                                               list(range(7)))}))
    print(json.dumps({"what": "qc_both_ways", "data": "phantoms 3D 32^3",
                      **rates(phantoms(0, 10, 3, 32), phantoms(1, 100, 3, 32), list(range(7)))}))
    if args.mni3d is not None:
        import real_anatomy as ra

        train = [(c.image, c.label) for c in ra.read_cases(args.mni3d / "train")]
        test = [(c.image, c.label) for c in ra.read_cases(args.mni3d / "test")]
        print(json.dumps({"what": "qc_both_ways", "data": "MNI152 2 mm 3D blocks", **rates(train, test, sorted(ra.LABELS))}))
    if args.mni is not None:
        import real_anatomy as ra

        train = [(c.image, c.label) for c in ra.read_cases(args.mni / "train")]
        test = [(c.image, c.label) for split in ("test", "val") for c in ra.read_cases(args.mni / split)]
        values = sorted(ra.LABELS)
        print(json.dumps({"what": "qc_both_ways", "data": "MNI152 2 mm axial slices", **rates(train, test, values)}))


if __name__ == "__main__":
    main()
