"""Paired image-quality metrics: SSIM, MS-SSIM, PSNR and MAE.

The convention is scikit-image's Wang et al. (2004) setting::

    skimage.metrics.structural_similarity(a, b, data_range=R, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False)

a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11 taps, built in float64), population
covariance, K1 = 0.01, K2 = 0.03, and the mean of the SSIM map over the *valid region* (the borders
of 5 voxels that the window would overhang are left out, so no padding is ever used).
PSNR is ``10 log10(R^2 / MSE)`` per image. See ``docs/evaluation.md``.

Inputs
    numpy arrays or torch tensors (any device; a CUDA tensor is evaluated on its GPU). Integer
    inputs are cast to float. ``x`` and ``y`` are symmetric for SSIM, PSNR and MAE.

    - unbatched: ``(H, W)`` or ``(D, H, W)`` (``spatial_dims`` may be left out) -> a Python ``float``;
    - batched: ``(N, C, *spatial)`` with ``spatial_dims`` = 2 or 3 -> one value per item, a float64
      ``torch.Tensor`` of shape ``(N,)`` on the input's device when either input is a tensor, else a
      float64 ``np.ndarray`` of shape ``(N,)``. An item's value is the mean over its channels (SSIM,
      MS-SSIM) or the metric over all its channels' voxels together (PSNR, MAE).

``data_range`` (R) is a required keyword: the intensity range of the images (e.g. 3000 for CT in
-1000..2000 HU, 1 for images scaled to [0, 1]); for a batch it may also be one value per item.

``mask`` restricts a metric to the mask's non-zero voxels: PSNR and MAE use the voxels in the mask;
SSIM is the mean of the SSIM map over the mask's voxels *inside the valid region* (the mask cropped
by 5 voxels on every side). Its shape is the image's, or ``(N, 1, *spatial)`` or ``spatial`` for a batch.

Precision: on the CPU, float64 inputs are evaluated in float64; other inputs (float32, integers,
half) in float32 after subtracting each image's mean, which keeps E[x^2] - E[x]^2 from cancelling
(within ~1e-6 of the float64 value even with a large offset; scikit-image's own float32 path, which
does not centre, can be off by 1e-4 on such data). On a GPU everything is float64 (the work is
memory-bound); Apple MPS has no float64 and uses the centred float32 path.

The separable filter works on all five local maps (x, y, x*x, y*y, x*y) stacked as ``5*C``
channels. On the CPU each axis is one product with a banded (Toeplitz) matrix of the 11 taps
(BLAS; on one thread measured ~2.5x faster than 11 shifted-slice additions and ~6x faster than
torch's grouped convolution); on a GPU it is one grouped (depthwise) convolution per axis.

Bad inputs (NaN/Inf, different shapes, a side shorter than the 11-voxel window, ``data_range`` <= 0,
an empty mask) raise :class:`MetricInputError`, which is both a :class:`~medsynth.errors.DataError`
and a ``ValueError``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.errors import DataError

__all__ = [
    "MS_SSIM_WEIGHTS",
    "MetricInputError",
    "WINDOW_SIZE",
    "gaussian_window",
    "mae",
    "max_scales",
    "ms_ssim",
    "psnr",
    "ssim",
    "ssim_map",
]

ArrayLike = np.ndarray | torch.Tensor
Result = float | np.ndarray | torch.Tensor

SIGMA = 1.5
TRUNCATE = 3.5
RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5, as scipy.ndimage computes it
WINDOW_SIZE = 2 * RADIUS + 1  # 11
K1 = 0.01
K2 = 0.03
#: Wang, Simoncelli & Bovik (2003) weights for five scales (finest first).
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class MetricInputError(DataError, ValueError):
    """A metric input that cannot be evaluated (NaN/Inf, shape mismatch, too small, bad data_range)."""


def gaussian_window(sigma: float = SIGMA, truncate: float = TRUNCATE) -> np.ndarray:
    """The normalised 1D Gaussian taps scipy.ndimage uses: ``(2r+1,)`` float64, ``r = int(truncate*sigma+0.5)``."""
    radius = int(truncate * sigma + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / (sigma * sigma) * k * k)
    return w / w.sum()


_TAPS: tuple[float, ...] = tuple(float(v) for v in gaussian_window())


# ------------------------------------------------------------------------------------ inputs


@dataclass
class _Inputs:
    x: torch.Tensor  # (N, C, *spatial), compute dtype, on the compute device
    y: torch.Tensor
    mask: torch.Tensor | None  # bool, broadcastable to x: (N, C or 1, *spatial)
    data_range: torch.Tensor  # (N,) float64 on the device
    batched: bool
    as_torch: bool
    device: torch.device

    @property
    def spatial_dims(self) -> int:
        return self.x.ndim - 2


def _to_tensor(value: object, name: str, device: torch.device | None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.kind not in "biuf":
            raise MetricInputError(f"{name} has dtype {arr.dtype}; expected real numbers")
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # float128
            arr = arr.astype(np.float64)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        t = torch.from_numpy(np.array(arr, copy=not arr.flags.writeable or not arr.flags.c_contiguous, order="C"))
    else:
        raise MetricInputError(f"{name} must be a numpy array or a torch tensor, got {type(value).__name__}")
    if t.is_complex():
        raise MetricInputError(f"{name} is complex; expected real numbers")
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _compute_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """The arithmetic precision (see the module doc): float64 on a GPU and for float64 inputs on the
    CPU, float32 (on mean-centred data) for other CPU inputs and on Apple MPS (which has no float64)."""
    if x.device.type == "mps":
        return torch.float32
    if x.device.type != "cpu" or torch.float64 in (x.dtype, y.dtype):
        return torch.float64
    return torch.float32


def _check_data_range(data_range: Any, n: int, batched: bool, device: torch.device) -> torch.Tensor:
    if data_range is None:
        raise MetricInputError("data_range is required (the images' intensity range, e.g. 1.0 or 3000 for CT)")
    if isinstance(data_range, bool):
        raise MetricInputError(f"data_range must be a positive number, got {data_range!r}")
    if isinstance(data_range, numbers.Real) or (
        isinstance(data_range, (np.ndarray, torch.Tensor)) and np.ndim(data_range) == 0
    ):
        values = np.full(n, float(data_range))
    else:
        if not batched:
            raise MetricInputError(f"data_range must be a positive number, got {data_range!r}")
        try:
            if isinstance(data_range, torch.Tensor):
                data_range = data_range.detach().cpu().numpy()
            values = np.asarray(data_range, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise MetricInputError(f"data_range must be a positive number or one per item, got {data_range!r}") from None
        if values.size != n:
            raise MetricInputError(f"data_range has {values.size} values for a batch of {n} items")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        bad = values[~(np.isfinite(values) & (values > 0))]
        raise MetricInputError(f"data_range must be finite and > 0, got {bad[0]!r}")
    return torch.as_tensor(values, dtype=torch.float64, device=device)


def _prepare(
    x: ArrayLike,
    y: ArrayLike,
    data_range: Any,
    spatial_dims: int | None,
    mask: ArrayLike | None,
    *,
    min_size: int = WINDOW_SIZE,
    what: str = "SSIM",
) -> _Inputs:
    as_torch = isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor)
    device = x.device if isinstance(x, torch.Tensor) else (y.device if isinstance(y, torch.Tensor) else None)
    xt = _to_tensor(x, "x", device)
    yt = _to_tensor(y, "y", device)
    device = xt.device
    if tuple(xt.shape) != tuple(yt.shape):
        raise MetricInputError(f"x and y have different shapes: {tuple(xt.shape)} and {tuple(yt.shape)}")
    # 1. unbatched or batched
    if spatial_dims is None:
        if xt.ndim not in (2, 3):
            raise MetricInputError(
                f"x has shape {tuple(xt.shape)}: unbatched inputs are (H, W) or (D, H, W); "
                "for a batch (N, C, *spatial) pass spatial_dims=2 or 3"
            )
        spatial_dims, batched = xt.ndim, False
    elif spatial_dims not in (2, 3):
        raise MetricInputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    elif xt.ndim == spatial_dims:
        batched = False
    elif xt.ndim == spatial_dims + 2:
        batched = True
    else:
        raise MetricInputError(
            f"x has shape {tuple(xt.shape)}: with spatial_dims={spatial_dims} expected "
            f"{spatial_dims} dims (unbatched) or {spatial_dims + 2} dims (N, C, *spatial)"
        )
    if xt.numel() == 0:
        raise MetricInputError(f"x has an empty axis: shape {tuple(xt.shape)}")
    spatial = tuple(xt.shape[-spatial_dims:])
    if min(spatial) < min_size:
        raise MetricInputError(
            f"image of spatial shape {spatial} is smaller than the {min_size}-voxel {what} window "
            f"along an axis (every spatial side must be >= {min_size})"
        )
    # 2. finite values
    for name, t in (("x", xt), ("y", yt)):
        if t.is_floating_point() and not _all_finite(t):
            raise MetricInputError(f"{name} contains NaN or Inf")
    dtype = _compute_dtype(xt, yt)
    xt = xt.to(dtype)
    yt = yt.to(dtype)
    if not batched:
        xt = xt.reshape(1, 1, *spatial)
        yt = yt.reshape(1, 1, *spatial)
    n, c = xt.shape[:2]
    # 3. mask
    mt = None
    if mask is not None:
        mt = _to_tensor(mask, "mask", device)
        mshape = tuple(mt.shape)
        if mt.is_floating_point() and not _all_finite(mt):
            raise MetricInputError("mask contains NaN or Inf")
        if not batched:
            if mshape != spatial:
                raise MetricInputError(f"mask has shape {mshape}, the images {spatial}")
            mt = mt.reshape(1, 1, *spatial)
        elif mshape == spatial:
            mt = mt.reshape(1, 1, *spatial).expand(n, 1, *spatial)
        elif mshape in ((n, 1, *spatial), (n, c, *spatial)):
            pass
        else:
            raise MetricInputError(
                f"mask has shape {mshape}; expected {(n, c, *spatial)}, {(n, 1, *spatial)} or {spatial}"
            )
        mt = mt != 0
    rng = _check_data_range(data_range, n, batched, device)
    return _Inputs(xt, yt, mt, rng, batched, as_torch, device)


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is NaN/Inf when an element is, and otherwise only on overflow: 10x faster than
    # isfinite().all() on the CPU. A non-finite sum is confirmed element by element.
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _finish(values: torch.Tensor, inp: _Inputs) -> Result:
    values = values.to(torch.float64)
    if not inp.batched:
        return float(values.reshape(-1)[0].item())
    if inp.as_torch:
        return values
    return values.cpu().numpy()


# ------------------------------------------------------------------------------------ filtering


def _filter_valid(t: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Gaussian-filter the last ``spatial_dims`` axes of ``(N, K, *spatial)``, valid region only.

    Returns ``(N, K, *(s - 10 for s in spatial))``. Banded matrix products on the CPU (and MPS),
    grouped convolutions on a GPU.
    """
    if t.device.type == "cuda":
        return _filter_conv(t, spatial_dims)
    for ax in range(t.ndim - 1, t.ndim - 1 - spatial_dims, -1):
        t = _filter_axis_matmul(t, ax)
    return t


#: outputs per banded block: an axis of up to BLOCK + 10 samples is one matrix product
BLOCK = 128


@functools.lru_cache(maxsize=32)
def _banded(n_out: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``(n_out, n_out + 10)`` matrix whose row j holds the 11 taps at columns j..j+10."""
    k = np.zeros((n_out, n_out + WINDOW_SIZE - 1))
    for j, w in enumerate(_TAPS):
        k += w * np.eye(n_out, n_out + WINDOW_SIZE - 1, j)
    return torch.as_tensor(k, dtype=dtype, device=device)


def _filter_axis_matmul(t: torch.Tensor, ax: int) -> torch.Tensor:
    # One axis as products with a banded (Toeplitz) matrix: BLAS does the 11 taps for every line
    # at once, 2-4x faster than 11 shifted-slice passes on one CPU thread. Long axes go in
    # blocks of BLOCK outputs so the wasted multiplications by zero stay bounded.
    length = t.shape[ax]
    n = length - (WINDOW_SIZE - 1)
    lead = math.prod(t.shape[:ax])
    rest = math.prod(t.shape[ax + 1 :])
    x = t.reshape(lead, length, rest)
    outs = []
    for start in range(0, n, BLOCK):
        size = min(BLOCK, n - start)
        band = _banded(size, t.dtype, str(t.device))
        xs = x.narrow(1, start, size + WINDOW_SIZE - 1)
        if rest == 1:
            outs.append((xs.reshape(lead, -1) @ band.T).reshape(lead, size, 1))
        else:
            outs.append(torch.matmul(band, xs))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    shape = list(t.shape)
    shape[ax] = n
    return out.reshape(shape)


def _filter_conv(t: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    # One grouped (depthwise) convolution per axis over all K = 5*C channels. Used in float64,
    # so no TF32 path can be taken whatever the cuDNN settings.
    k = t.shape[1]
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    taps = torch.tensor(_TAPS, dtype=t.dtype, device=t.device)
    for axis in range(spatial_dims):
        shape = [k, 1] + [WINDOW_SIZE if a == axis else 1 for a in range(spatial_dims)]
        weight = taps.reshape([1, 1] + shape[2:]).expand(shape).contiguous()
        t = conv(t, weight, groups=k)
    return t


def _ssim_cs_maps(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: torch.Tensor,
    centre: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps over the valid region.

    x, y: ``(N, C, *spatial)`` in the compute dtype; data_range: ``(N,)``.
    centre: ``(mx, my)``, each ``(N, C, 1, ...)``, subtracted before the products (default each
    image's mean). Subtracting a constant changes no variance or covariance and keeps the second
    moments small, so E[x^2] - E[x]^2 does not cancel.
    Returns two ``(N, C, *(s - 10))`` maps in the compute dtype.
    """
    sd = x.ndim - 2
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    mx, my = _centres(x, y) if centre is None else centre
    buf = torch.empty((n, 5, c, *spatial), dtype=x.dtype, device=x.device)
    torch.sub(x, mx, out=buf[:, 0])
    torch.sub(y, my, out=buf[:, 1])
    torch.mul(buf[:, 0], buf[:, 0], out=buf[:, 2])
    torch.mul(buf[:, 1], buf[:, 1], out=buf[:, 3])
    torch.mul(buf[:, 0], buf[:, 1], out=buf[:, 4])
    f = _filter_valid(buf.view(n, 5 * c, *spatial), sd)
    f = f.view(n, 5, c, *f.shape[2:])
    # f is ours: work in place on its five maps (fewer passes over memory).
    ux, uy, uxx, uyy, uxy = f.unbind(1)
    r = data_range.to(x.dtype).reshape(n, *([1] * (x.ndim - 1)))
    c1 = (K1 * r) ** 2
    c2 = (K2 * r) ** 2
    vx = uxx.sub_(ux * ux)
    vy = uyy.sub_(uy * uy)
    vxy = uxy.sub_(ux * uy)
    cs = vxy.mul_(2.0).add_(c2).div_(vx.add_(vy).add_(c2))  # (2 vxy + C2) / (vx + vy + C2)
    ux.add_(mx)
    uy.add_(my)
    lum = (ux * uy).mul_(2.0).add_(c1)
    lum.div_(ux.square_().add_(uy.square_()).add_(c1))  # (2 ux uy + C1) / (ux^2 + uy^2 + C1)
    return lum.mul_(cs), cs


def _centres(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    red = tuple(range(2, x.ndim))
    return x.mean(dim=red, keepdim=True), y.mean(dim=red, keepdim=True)


#: Work memory per slab of the SSIM computation (the five maps); larger images go slab by slab.
SLAB_BYTES = 256 * 2**20


def _ssim_means(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: torch.Tensor,
    mask: torch.Tensor | None,
    what: str = "SSIM",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means of the SSIM map and of the contrast-structure map over the valid region
    (over the mask's voxels in it when given): two ``(N, C)`` float64 tensors.

    Large images are processed in slabs along the first spatial axis (each with the 10 planes of
    overlap the window needs), so memory stays near :data:`SLAB_BYTES` whatever the volume size.
    """
    n, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    depth = spatial[0] - (WINDOW_SIZE - 1)
    plane_bytes = 5 * n * c * math.prod(spatial[1:]) * x.element_size()
    step = max(1, min(depth, SLAB_BYTES // max(plane_bytes, 1) - (WINDOW_SIZE - 1)))
    centre = _centres(x, y)
    cropped = None if mask is None else _crop(mask)
    red = tuple(range(2, x.ndim))
    sum_s = torch.zeros((n, c), dtype=torch.float64, device=x.device)
    sum_cs = torch.zeros_like(sum_s)
    count = torch.zeros_like(sum_s)
    for z0 in range(0, depth, step):
        z = min(step, depth - z0)
        s, cs = _ssim_cs_maps(
            x.narrow(2, z0, z + WINDOW_SIZE - 1), y.narrow(2, z0, z + WINDOW_SIZE - 1), data_range, centre
        )
        if cropped is None:
            sum_s += s.sum(dim=red, dtype=torch.float64)
            sum_cs += cs.sum(dim=red, dtype=torch.float64)
            count += float(s[0, 0].numel())
        else:
            mk = cropped.narrow(2, z0, z).expand_as(s)
            zero = torch.zeros((), dtype=s.dtype, device=s.device)
            sum_s += torch.where(mk, s, zero).sum(dim=red, dtype=torch.float64)
            sum_cs += torch.where(mk, cs, zero).sum(dim=red, dtype=torch.float64)
            count += mk.sum(dim=red, dtype=torch.float64)
    if mask is not None and bool((count == 0).any()):
        raise MetricInputError(
            f"mask has no voxels inside the {what} valid region (5 voxels in from every border) "
            "for at least one image"
        )
    return sum_s / count, sum_cs / count


def _crop(mask: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    index = (slice(None), slice(None)) + tuple(slice(radius, s - radius) for s in mask.shape[2:])
    return mask[index]


# ------------------------------------------------------------------------------------ public API


def ssim(
    x: ArrayLike,
    y: ArrayLike,
    *,
    data_range: float | Sequence[float],
    spatial_dims: int | None = None,
    mask: ArrayLike | None = None,
) -> Result:
    """Structural similarity (Wang et al. 2004; equal to scikit-image's Gaussian-window setting).

    x, y: ``(H, W)``, ``(D, H, W)`` or, with ``spatial_dims``, ``(N, C, *spatial)``; every spatial
        side >= 11. data_range: intensity range R (> 0), or one per item for a batch.
    mask: optional; the mean is taken over the SSIM map's voxels where the mask is non-zero,
        inside the valid region.
    Returns a float (unbatched) or ``(N,)`` float64 values (mean over channels), see the module doc.
    """
    inp = _prepare(x, y, data_range, spatial_dims, mask)
    s, _ = _ssim_means(inp.x, inp.y, inp.data_range, inp.mask)
    return _finish(s.mean(dim=1), inp)


def ssim_map(x: ArrayLike, y: ArrayLike, *, data_range: float) -> np.ndarray:
    """The SSIM map of two unbatched images over the valid region.

    x, y: ``(H, W)`` or ``(D, H, W)``. Returns a float64 array of shape ``(*(s - 10 for s in shape))``,
    equal to ``skimage``'s ``full=True`` map cropped by 5 voxels on every side.
    """
    inp = _prepare(x, y, data_range, None, None)
    s, _ = _ssim_cs_maps(inp.x, inp.y, inp.data_range)
    return s[0, 0].to(torch.float64).cpu().numpy()


def psnr(
    x: ArrayLike,
    y: ArrayLike,
    *,
    data_range: float | Sequence[float],
    spatial_dims: int | None = None,
    mask: ArrayLike | None = None,
) -> Result:
    """Peak signal-to-noise ratio in dB: ``10 log10(R^2 / MSE)`` per image (per item for a batch).

    The MSE is over every voxel (and channel) of the image, or over the mask's voxels. Identical
    images give ``inf``. Average a set in dB (the mean of the per-image values).
    """
    inp = _prepare(x, y, data_range, spatial_dims, mask, min_size=1, what="PSNR")
    mse = _masked_mean((inp.x - inp.y).square(), inp.mask)
    value = 10.0 * torch.log10(inp.data_range.square() / mse)  # MSE 0 -> inf
    return _finish(value, inp)


def mae(
    x: ArrayLike,
    y: ArrayLike,
    *,
    data_range: float | Sequence[float],
    spatial_dims: int | None = None,
    mask: ArrayLike | None = None,
) -> Result:
    """Mean absolute error as a fraction of the range: ``mean(|x - y|) / R``.

    Pass ``data_range=1`` for the MAE in the images' own units (e.g. HU). Over the mask's voxels
    when a mask is given.
    """
    inp = _prepare(x, y, data_range, spatial_dims, mask, min_size=1, what="MAE")
    value = _masked_mean((inp.x - inp.y).abs(), inp.mask) / inp.data_range
    return _finish(value, inp)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N,)`` float64 mean over channels and voxels (in the mask)."""
    red = tuple(range(1, values.ndim))
    if mask is None:
        return values.mean(dim=red, dtype=torch.float64)
    mk = mask.expand_as(values)
    count = mk.sum(dim=red, dtype=torch.float64)
    if bool((count == 0).any()):
        raise MetricInputError("mask is empty (no non-zero voxel) for at least one image")
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(mk, values, zero).sum(dim=red, dtype=torch.float64) / count


def ms_ssim(
    x: ArrayLike,
    y: ArrayLike,
    *,
    data_range: float | Sequence[float],
    spatial_dims: int | None = None,
    mask: ArrayLike | None = None,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> Result:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003).

    ``prod_j relu(cs_j)^w_j * relu(ssim_M)^w_M`` over ``M = len(weights)`` scales, each scale an
    average pool by 2 (kernel 2, stride 2; an odd last row is dropped) of the previous one; ``cs_j``
    and ``ssim_M`` are valid-region means per channel, with the same C1, C2 at every scale; the
    result is the mean over channels. ``weights`` are used as given (default Wang's five:
    0.0448, 0.2856, 0.3001, 0.2363, 0.1333; this equals MONAI's MultiScaleSSIMMetric).

    Every spatial side must satisfy ``side // 2**(M-1) >= 11`` (176 for five scales); smaller
    images raise MetricInputError: pass fewer weights, e.g. ``weights=MS_SSIM_WEIGHTS[:3]``.
    With a mask, each coarser mask keeps a voxel only if all the finer voxels it pools are in the
    mask (a min-pool), and every scale averages over the cropped mask.
    """
    w = [float(v) for v in weights]
    if not w or not all(math.isfinite(v) and v >= 0 for v in w):
        raise MetricInputError(f"ms_ssim weights must be non-negative numbers, got {tuple(weights)!r}")
    scales = len(w)
    min_side = WINDOW_SIZE * 2 ** (scales - 1)
    inp = _prepare(x, y, data_range, spatial_dims, mask)
    spatial = tuple(inp.x.shape[2:])
    if any(s // 2 ** (scales - 1) < WINDOW_SIZE for s in spatial):
        raise MetricInputError(
            f"ms_ssim with {scales} scales needs every spatial side >= {min_side} "
            f"(got {spatial}); pass fewer weights, e.g. weights=MS_SSIM_WEIGHTS[:{max_scales(spatial)}]"
        )
    pool = F.avg_pool2d if inp.spatial_dims == 2 else F.avg_pool3d
    xs, ys, ms = inp.x, inp.y, inp.mask
    values: list[torch.Tensor] = []
    for j in range(scales):
        s, cs = _ssim_means(xs, ys, inp.data_range, ms, "MS-SSIM")
        last = j == scales - 1
        values.append(torch.relu(s if last else cs))
        if not last:
            xs = pool(xs, kernel_size=2)
            ys = pool(ys, kernel_size=2)
            if ms is not None:
                ms = _min_pool(ms, inp.spatial_dims)
    stack = torch.stack(values)  # (M, N, C)
    wt = torch.tensor(w, dtype=torch.float64, device=stack.device).reshape(-1, 1, 1)
    per_channel = torch.prod(stack**wt, dim=0)
    return _finish(per_channel.mean(dim=1), inp)


def _min_pool(mask: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    pool = F.max_pool2d if spatial_dims == 2 else F.max_pool3d
    outside = (~mask).to(torch.float32)
    n, c = mask.shape[:2]
    pooled = pool(outside.reshape(n * c, 1, *mask.shape[2:]), kernel_size=2)
    return (pooled == 0).reshape(n, c, *pooled.shape[2:])


def max_scales(spatial: Sequence[int]) -> int:
    """How many MS-SSIM scales an image of this spatial shape allows (0 if smaller than the window)."""
    m = 0
    while all(int(s) // 2**m >= WINDOW_SIZE for s in spatial):
        m += 1
    return m
