"""SSIM / PSNR / MS-SSIM speed and agreement: medsynth against scikit-image, MONAI and pytorch-msssim.

Prints one JSON object per line: a measurement (``impl``, ``device``, ``shape``, ``ms`` = median
wall time in milliseconds, ``value``) or a ratio (``speedup`` of medsynth over a peer, measured in
the same run). CPU runs use one thread (``torch.set_num_threads(1)``); the GPU part runs when CUDA
is present. pytorch-msssim is optional (``pip install pytorch-msssim``).

    python benchmarks/metrics.py                 # 96^3 on the CPU (and 160^3 on a GPU)
    python benchmarks/metrics.py --size 64 --repeats 3 --no-monai
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medsynth.evaluation.metrics import ms_ssim, psnr, ssim  # noqa: E402

R = 3000.0  # CT-like data in -1000..2000


def ct_like(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference (air, soft tissue, bone, noise) and a noisier, slightly blurred candidate, float32."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    centre = [(s - 1) / 2 for s in shape]
    r = np.sqrt(sum(((g - c) / (s / 2)) ** 2 for g, c, s in zip(grid, centre, shape)))
    ref = np.where(r < 0.85, 40.0, -1000.0)
    ref = np.where(r < 0.35, 1200.0, ref) + rng.normal(0.0, 15.0, shape)
    cand = ref + rng.normal(0.0, 40.0, shape) + 30.0 * np.sin(grid[0] / 7.0)
    return np.clip(ref, -1000, 2000).astype(np.float32), np.clip(cand, -1000, 2000).astype(np.float32)


def timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> tuple[float, Any]:
    value = fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), value


def emit(**record: Any) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def as_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean().cpu())
    return float(np.mean(v))


def peer_ssim(ta: torch.Tensor, tb: torch.Tensor, v: float, results: dict[str, float], common: dict[str, Any],
              repeats: int, *, monai_repeats: int, sync: Callable[[], None] = lambda: None) -> None:
    """Time MONAI's SSIMMetric (unless ``monai_repeats`` is 0) and pytorch-msssim on ``(1, 1, D, H, W)``
    tensors, emit their values against ours (``v``), then every peer/medsynth speed ratio."""
    if monai_repeats:
        from monai.metrics import SSIMMetric

        metric = SSIMMetric(spatial_dims=3, data_range=R, win_size=11, kernel_sigma=1.5)
        ms, vm = timed(lambda: metric(tb, ta), monai_repeats, sync)
        results["monai"] = ms
        emit(metric="ssim", impl="monai.SSIMMetric", ms=round(ms, 3), value=as_float(vm), abs_diff=abs(v - as_float(vm)),
             **common)
    try:
        import pytorch_msssim
    except ImportError:
        emit(metric="ssim", impl="pytorch_msssim", skipped="not installed", **common)
    else:
        ms, vp = timed(
            lambda: pytorch_msssim.ssim(ta, tb, data_range=R, win_size=11, win_sigma=1.5, size_average=True),
            repeats,
            sync,
        )
        results["pytorch_msssim"] = ms
        emit(metric="ssim", impl="pytorch_msssim", ms=round(ms, 3), value=as_float(vp), abs_diff=abs(v - as_float(vp)), **common)
    for peer, peer_ms in results.items():
        if peer != "medsynth":
            emit(metric="ssim", ratio=f"{peer}/medsynth", speedup=round(peer_ms / results["medsynth"], 2), **common)


def run_cpu(size: int, repeats: int, monai_on: bool) -> None:
    torch.set_num_threads(1)
    shape = (size, size - 8, size + 8)  # non-cubic on purpose
    a, b = ct_like(shape, seed=0)
    ta = torch.from_numpy(a)[None, None]
    tb = torch.from_numpy(b)[None, None]
    common = {"device": "cpu", "threads": torch.get_num_threads(), "shape": list(shape), "data_range": R}
    results: dict[str, float] = {}

    ms, v = timed(lambda: ssim(a, b, data_range=R), repeats)
    results["medsynth"] = ms
    emit(metric="ssim", impl="medsynth", dtype="float32", ms=round(ms, 2), value=v, **common)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ms64, v64 = timed(lambda: ssim(a64, b64, data_range=R), repeats)
    emit(metric="ssim", impl="medsynth", dtype="float64", ms=round(ms64, 2), value=v64, **common)

    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ms, v_sk = timed(
        lambda: structural_similarity(
            a, b, data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        ),
        repeats,
    )
    results["skimage"] = ms
    emit(metric="ssim", impl="skimage", dtype="float32", ms=round(ms, 2), value=float(v_sk), abs_diff=abs(v - v_sk), **common)
    v_sk64 = structural_similarity(a64, b64, data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    emit(metric="ssim", impl="skimage", dtype="float64", value=float(v_sk64), abs_diff_float32=abs(v - v_sk64),
         abs_diff_float64=abs(v64 - v_sk64), **common)

    # MONAI's full 11^3 window takes seconds per call on one thread: time it at most twice
    peer_ssim(ta, tb, v, results, common, repeats, monai_repeats=max(1, min(repeats, 2)) if monai_on else 0)

    ms_ours, p = timed(lambda: psnr(a, b, data_range=R), repeats)
    ms_sk, p_sk = timed(lambda: peak_signal_noise_ratio(a, b, data_range=R), repeats)
    emit(metric="psnr", impl="medsynth", ms=round(ms_ours, 2), value=p, **common)
    emit(metric="psnr", impl="skimage", ms=round(ms_sk, 2), value=float(p_sk), abs_diff=abs(p - p_sk), **common)

    # MS-SSIM needs >= 176 per side for five scales: a 2D 512x480 slice.
    a2, b2 = ct_like((512, 480), seed=1)
    common2 = {**common, "shape": [512, 480]}
    ms, v2 = timed(lambda: ms_ssim(a2, b2, data_range=R), repeats)
    emit(metric="ms_ssim", impl="medsynth", ms=round(ms, 2), value=v2, **common2)
    ta2, tb2 = torch.from_numpy(a2)[None, None], torch.from_numpy(b2)[None, None]
    if monai_on:
        from monai.metrics import MultiScaleSSIMMetric

        m2 = MultiScaleSSIMMetric(spatial_dims=2, data_range=R, kernel_size=11, kernel_sigma=1.5)
        ms, vm2 = timed(lambda: m2(tb2, ta2), repeats)
        emit(metric="ms_ssim", impl="monai.MultiScaleSSIMMetric", ms=round(ms, 2), value=as_float(vm2),
             abs_diff=abs(v2 - as_float(vm2)), **common2)


def run_cuda(size: int, repeats: int, monai_on: bool) -> None:
    dev = torch.device("cuda")
    shape = (size, size, size)
    a, b = ct_like(shape, seed=2)
    ta = torch.from_numpy(a)[None, None].to(dev)
    tb = torch.from_numpy(b)[None, None].to(dev)
    sync = torch.cuda.synchronize
    common = {"device": torch.cuda.get_device_name(0), "shape": list(shape), "data_range": R}
    results: dict[str, float] = {}
    ms, v = timed(lambda: ssim(ta[0, 0], tb[0, 0], data_range=R), repeats, sync)
    results["medsynth"] = ms
    emit(metric="ssim", impl="medsynth", ms=round(ms, 3), value=v, **common)
    ms, p = timed(lambda: psnr(ta[0, 0], tb[0, 0], data_range=R), repeats, sync)
    emit(metric="psnr", impl="medsynth", ms=round(ms, 3), value=p, **common)
    peer_ssim(ta, tb, v, results, common, repeats, monai_repeats=repeats if monai_on else 0, sync=sync)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96, help="CPU volume side (default 96)")
    parser.add_argument("--gpu-size", type=int, default=160, help="GPU volume side (default 160)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-monai", action="store_true", help="skip MONAI (about 2.5 s per 96^3 call on one CPU thread)")
    args = parser.parse_args()
    run_cpu(args.size, args.repeats, not args.no_monai)
    if torch.cuda.is_available():
        run_cuda(args.gpu_size, args.repeats, not args.no_monai)


if __name__ == "__main__":
    main()
