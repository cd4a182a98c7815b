"""Augment speed: synthetic pairs per second, medsynth against TorchIO, in the same run.

medsynth runs the real job (``run_augment``: read the source case, deform the mask, make the image,
QC, write image + label NIfTI atomically with re-read verification, sha256, journal) for
``synthseg`` and ``classic``; its file writes are counted. TorchIO runs in memory (no writes):

- ``torchio_synthseg``: RandomLabelsToImage + RandomElasticDeformation + RandomBiasField + RandomNoise
  (the peer of ``synthseg``);
- ``torchio_classic``: RandomAffine + RandomElasticDeformation + RandomBiasField + RandomNoise +
  RandomGamma on a real image and its label (the peer of ``classic``).

Volumes are head phantoms (``medsynth.data.phantoms``), ``--size``^3 voxels (default 100), one
thread. Prints one JSON object per line: ``{"impl", "pairs_per_s", ...}`` and the ``speedup`` ratios.
TorchIO is optional (``pip install torchio``; the ``bench`` extra).

    python benchmarks/augment.py                    # 100^3, 8 pairs per method
    python benchmarks/augment.py --size 64 --num 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def bench_medsynth(data: Path, work: Path, method: str, num: int) -> float:
    from medsynth.augment import AugmentOptions, run_augment

    out = work / f"out_{method}"
    # warm-up run (imports, MONAI transforms), then the timed one
    run_augment(AugmentOptions(input=data, out=work / f"warm_{method}", method=method, num=1, seed=1))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    s = run_augment(AugmentOptions(input=data, out=out, method=method, num=num, seed=0))  # type: ignore[arg-type]
    total = time.perf_counter() - t0
    emit(
        impl=f"medsynth_{method}", pairs_per_s=round(num / s.generate_seconds, 3),
        pairs_per_s_whole_job=round(num / total, 3), num=num, writes_counted=True,
        generate_s=round(s.generate_seconds, 2), job_s=round(total, 2), redraws=s.redraws,
    )
    return num / s.generate_seconds


def bench_torchio(image: np.ndarray, label: np.ndarray, num: int) -> dict[str, float]:
    try:
        import torchio as tio
    except ImportError:
        emit(impl="torchio", skipped="torchio is not installed (pip install torchio)")
        return {}
    rates = {}
    chains = {
        "torchio_synthseg": tio.Compose(
            [
                tio.RandomLabelsToImage(label_key="label", image_key="image"),
                tio.RandomElasticDeformation(),
                tio.RandomBiasField(),
                tio.RandomNoise(),
            ]
        ),
        "torchio_classic": tio.Compose(
            [tio.RandomAffine(), tio.RandomElasticDeformation(), tio.RandomBiasField(), tio.RandomNoise(), tio.RandomGamma()]
        ),
    }
    for name, chain in chains.items():
        torch.manual_seed(0)  # TorchIO draws from torch's global generator
        fields: dict[str, Any] = {"label": tio.LabelMap(tensor=torch.from_numpy(label[None].astype(np.int64)))}
        if name == "torchio_classic":
            fields["image"] = tio.ScalarImage(tensor=torch.from_numpy(image[None]))
        subject = tio.Subject(**fields)
        chain(subject)  # warm-up
        t0 = time.perf_counter()
        for _ in range(num):
            out = chain(subject)
            assert out["image"].data.shape[1:] == label.shape
        dt = time.perf_counter() - t0
        rates[name] = num / dt
        emit(impl=name, pairs_per_s=round(num / dt, 3), num=num, writes_counted=False, version=tio.__version__)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100, help="edge of the cubic phantom volumes (voxels)")
    parser.add_argument("--num", type=int, default=8, help="pairs per method")
    parser.add_argument("--cases", type=int, default=3, help="real phantom cases to draw from")
    args = parser.parse_args()

    from medsynth.data.nifti import read_volume
    from medsynth.data.phantoms import make_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_phantom_dataset(work / "data", dim=3, cases=args.cases, seed=0, size=args.size)
        image = np.asarray(read_volume(work / "data/imagesTr/phantom_000.nii.gz").array, dtype=np.float32)
        label = np.asarray(read_volume(work / "data/labelsTr/phantom_000.nii.gz", kind="label").array)
        emit(shape=list(label.shape), threads=torch.get_num_threads(), torch=torch.__version__)
        ours = {m: bench_medsynth(data, work, m, args.num) for m in ("synthseg", "classic")}
        peers = bench_torchio(image, label, args.num)
    for method, peer in (("synthseg", "torchio_synthseg"), ("classic", "torchio_classic")):
        if peer in peers:
            emit(speedup=f"medsynth_{method} / {peer}", ratio=round(ours[method] / peers[peer], 2), target=2.0)


if __name__ == "__main__":
    main()
