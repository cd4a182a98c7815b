"""Peak RSS of loading one training case, against the case's float32 bytes, JSON lines.

    python benchmarks/loader_memory.py                 # a 128^3 case stored as float32, int16, float64
    python benchmarks/loader_memory.py --side 160 --dtypes float32

Each measurement in a fresh process (``MALLOC_MMAP_THRESHOLD_=65536``: freed arrays leave the RSS), on one
MSD-style case of random intensities and a 4-label map written as .nii.gz; after a warm-up read, the peak
RSS (``VmHWM`` reset through ``/proc/self/clear_refs``) over the RSS before, of: ``load_case`` (read and
convert one case), ``build_training_data`` on the one-case dataset (normalisation fit, label statistics,
fingerprint), the memory the built dataset keeps (``resident``), and 50 training draws of 64^3 crops.
``x_float32`` divides by the case's float32 image bytes (the issue's target: at most 1.5). Not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(key)


def _reset() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def one(side: int, dtype: str) -> dict:
    import nibabel as nib
    import numpy as np
    import torch  # noqa: F401 - imported before measuring: the loader imports it at its first use

    from medsynth.config import load_config
    from medsynth.data.loader import build_training_data, load_case
    from medsynth.data.manifest import read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir()
        rng = np.random.default_rng(0)
        nib.save(nib.Nifti1Image((rng.random((side,) * 3) * 1000).astype(dtype), np.eye(4)), root / "imagesTr/c0.nii.gz")
        nib.save(nib.Nifti1Image((rng.random((side,) * 3) * 4).astype(np.uint8), np.eye(4)), root / "labelsTr/c0.nii.gz")
        (root / "dataset.json").write_text(json.dumps({
            "name": "x", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b", "3": "c"},
            "numTraining": 1, "file_ending": ".nii.gz",
            "training": [{"image": "./imagesTr/c0.nii.gz", "label": "./labelsTr/c0.nii.gz"}]}))
        manifest = read_manifest(root / "dataset.json")
        cfg = load_config(None, [f"data.manifest={json.dumps(str(root / 'dataset.json'))}", "data.dim=3",
                                 "data.size=[64,64,64]"])
        case = manifest.training_cases()[0]
        load_case(case, cfg.data, manifest.root)  # warm-up: imports and decoders
        build_training_data(manifest, cfg.data, seed=0).sample(0)
        gc.collect()
        base = _reset()
        arrays = load_case(case, cfg.data, manifest.root)
        load = _status("VmHWM") - base
        del arrays
        gc.collect()
        base = _reset()
        data = build_training_data(manifest, cfg.data, seed=0)
        build = _status("VmHWM") - base
        gc.collect()
        resident = _status("VmRSS") - base
        base = _reset()
        for g in range(50):
            data.collate([data.sample(g)], one_hot_labels=False)
        draws = _status("VmHWM") - base
    f32 = side**3 * 4
    return {"what": "loader_memory", "side": side, "stored": dtype, "float32_mib": f32 / 2**20,
            **{f"{k}_mib": v / 2**20 for k, v in (("load_case", load), ("build", build), ("resident", resident),
                                                   ("draws", draws))},
            "x_float32": {"load_case": load / f32, "build": build / f32, "resident": resident / f32}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,int16,float64")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1])), flush=True)
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    for dtype in args.dtypes.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", str(args.side), dtype], env=env, capture_output=True,
                             text=True, timeout=600, cwd=ROOT, check=False)
        lines = out.stdout.strip().splitlines()
        print(lines[-1] if lines else json.dumps({"what": "loader_memory", "stored": dtype, "error": out.stderr[-300:]}),
              flush=True)


if __name__ == "__main__":
    main()
