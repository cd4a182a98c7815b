"""Random transforms for making new image/label pairs from real ones.

Three groups, each "draw parameters, then apply a deterministic function" (the TorchIO way):

- **Spatial deformation of a label map (and optionally its image).** A random affine (rotation,
  scaling, translation, in millimetres so anisotropic voxels behave), optional flips on the axes the
  recipe allows, and a smooth random elastic displacement. The displacement is drawn on a coarse
  grid of control points and upsampled ONCE to the full grid with a separable cubic B-spline
  (three small matrix products, no full-resolution smoothing). One coordinate field is shared by
  image and label: the label is sampled with nearest neighbour (its values are copied, never
  blended, so no new label value can appear), the image with (bi/tri)linear interpolation
  (``torch.nn.functional.grid_sample``). Outside the volume both replicate the border.
- **Per-structure edits of a label map.** Grow or shrink one structure (city-block morphology),
  remove a structure (its voxels take the nearest other label), paste a lesion from another case.
- **The ``classic`` chain.** The spatial deformation applied jointly to a real image and its label,
  then MONAI's random intensity transforms (bias field, gamma, scaling, shift, smoothing, noise).

Arrays are ``(H, W)`` or ``(X, Y, Z)`` for labels and ``(C, *spatial)`` for images; spacing is
in millimetres per voxel, one value per spatial axis. All randomness comes from an explicit
``numpy.random.Generator`` (MONAI transforms get an explicit seed drawn from it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medsynth.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from monai.transforms import Compose

# ------------------------------------------------------------------------------------ configs


class DeformConfig(BaseModel):
    """Random spatial deformation of a label map (and image). Distances in millimetres."""

    model_config = ConfigDict(extra="forbid")

    affine_prob: float = Field(default=1.0, ge=0, le=1, description="Probability of a random affine.")
    rotate_deg: float = Field(default=10.0, ge=0, le=180, description="Max |rotation| per axis, degrees.")
    scale: float = Field(default=0.1, ge=0, lt=1, description="Scale factors drawn in [1-scale, 1+scale].")
    isotropic_scale: bool = Field(default=False, description="One scale factor for all axes.")
    translate_mm: float = Field(default=4.0, ge=0, description="Max |translation| per axis, mm.")
    elastic_prob: float = Field(default=1.0, ge=0, le=1, description="Probability of an elastic deformation.")
    elastic_mm: float = Field(default=4.0, ge=0, description="Max |displacement| of a control point, mm.")
    control_points: int = Field(default=6, ge=3, le=64, description="Control points per axis of the elastic grid.")
    flip_axes: list[int] = Field(
        default_factory=list,
        description="Axes that may be flipped (0, 1, 2). Empty (default): never flip (anatomy is lateralised).",
    )
    flip_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of flipping each allowed axis.")

    @field_validator("flip_axes")
    @classmethod
    def _check_axes(cls, v: list[int]) -> list[int]:
        bad = [a for a in v if a not in (0, 1, 2)]
        if bad:
            raise ValueError(f"flip axes must be 0, 1 or 2, got {bad}")
        return sorted(set(v))


class EditConfig(BaseModel):
    """Random per-structure edits of a label map (used by synthseg, gan and ldm; not by classic)."""

    model_config = ConfigDict(extra="forbid")

    structures: list[int] | None = Field(
        default=None, description="Labels that may grow or shrink (default: every foreground label)."
    )
    grow_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of growing each structure.")
    shrink_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of shrinking each structure.")
    max_radius: int = Field(default=2, ge=1, le=20, description="Largest grow/shrink radius, voxels (city-block).")
    removable: list[int] = Field(default_factory=list, description="Labels that may be removed entirely.")
    remove_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of removing each removable label.")
    paste_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of pasting a lesion from another case.")
    lesion_label: int | None = Field(default=None, ge=1, description="The lesion label to paste (e.g. 6).")
    lesion_hosts: list[int] | None = Field(
        default=None, description="Labels a pasted lesion may overwrite (default: every foreground label)."
    )

    @property
    def active(self) -> bool:
        return bool(self.grow_prob or self.shrink_prob or (self.remove_prob and self.removable) or self.paste_prob)


class ClassicConfig(BaseModel):
    """MONAI random intensity transforms of the ``classic`` chain. Sizes are fractions of the
    dataset's intensity range (robust p0.5..p99.5), so the same recipe suits MRI and CT."""

    model_config = ConfigDict(extra="forbid")

    bias_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of a smooth multiplicative bias field.")
    bias_coeff: float = Field(default=0.15, ge=0, le=1, description="Largest bias-field polynomial coefficient (MONAI).")
    gamma_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of a gamma contrast change.")
    gamma_range: tuple[float, float] = Field(default=(0.7, 1.5), description="Gamma drawn in this range.")
    scale_prob: float = Field(default=0.3, ge=0, le=1, description="Probability of scaling intensities.")
    scale: float = Field(default=0.1, ge=0, lt=1, description="Intensities scaled by 1 + U(-scale, scale).")
    shift_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of shifting intensities.")
    shift: float = Field(default=0.05, ge=0, description="Shift by U(-shift, shift) x range.")
    smooth_prob: float = Field(default=0.0, ge=0, le=1, description="Probability of Gaussian smoothing.")
    smooth_sigma: tuple[float, float] = Field(default=(0.25, 1.0), description="Smoothing sigma range, voxels.")
    noise_prob: float = Field(default=0.5, ge=0, le=1, description="Probability of additive Gaussian noise.")
    noise_std: float = Field(default=0.02, ge=0, description="Noise std (fraction of range).")

    @field_validator("gamma_range", "smooth_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError(f"need 0 < low <= high, got {list(v)}")
        return v


# ------------------------------------------------------------------------------------ smooth fields


def _bspline3(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    out = np.zeros_like(t)
    near = t < 1
    far = (t >= 1) & (t < 2)
    out[near] = 2.0 / 3.0 - t[near] ** 2 + 0.5 * t[near] ** 3
    out[far] = (2.0 - t[far]) ** 3 / 6.0
    return out


def upsample_weights(n: int, g: int) -> np.ndarray:
    """``(n, g)`` float64 weights that spread ``g`` control points evenly over ``n`` voxels
    with a cubic B-spline kernel, rows normalised to sum 1 (a smooth partition of unity)."""
    if g == 1:
        return np.ones((n, 1))
    u = np.linspace(0.0, g - 1.0, n) if n > 1 else np.zeros(1)
    w = _bspline3(u[:, None] - np.arange(g)[None, :])
    return w / w.sum(axis=1, keepdims=True)


def smooth_field(coarse: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Upsample a coarse grid ``(g0, g1[, g2])`` to ``shape`` with separable cubic B-spline
    weights. Returns float32 of ``shape``. Cost: a few small matrix products (no convolution)."""
    out = np.asarray(coarse, dtype=np.float32)
    if out.ndim != len(shape):
        raise ValueError(f"coarse grid has {out.ndim} axes, shape has {len(shape)}")
    for axis, n in enumerate(shape):
        w = upsample_weights(n, out.shape[axis]).astype(np.float32)
        if axis == out.ndim - 1:
            out = out @ w.T
        else:
            out = np.moveaxis(np.tensordot(w, out, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------ spatial


@dataclass(frozen=True)
class SpatialParams:
    """A drawn spatial transform (voxel coordinates, centred on the volume's centre).

    For an output voxel ``x`` the source position is
    ``matrix @ (flip * (x - c)) + c + offset + displacement(x)``, with ``c = (shape - 1) / 2``.
    matrix: ``(d, d)``; offset: ``(d,)`` voxels; flips: flipped axes; control: ``(d, *grid)``
    control-point displacements in voxels, or None for no elastic part.
    """

    shape: tuple[int, ...]
    matrix: np.ndarray
    offset: np.ndarray
    flips: tuple[int, ...] = ()
    control: np.ndarray | None = None

    @property
    def is_identity(self) -> bool:
        return (
            not self.flips
            and self.control is None
            and np.allclose(self.matrix, np.eye(len(self.shape)))
            and np.allclose(self.offset, 0.0)
        )

    def summary(self) -> dict[str, Any]:
        """Plain-JSON description for provenance records."""
        return {
            "matrix": np.round(self.matrix, 6).tolist(),
            "offset_vox": np.round(self.offset, 4).tolist(),
            "flips": list(self.flips),
            "elastic_max_vox": None if self.control is None else round(float(np.abs(self.control).max()), 4),
        }


def _rotation(angles: np.ndarray) -> np.ndarray:
    if angles.size == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    rx, ry, rz = angles
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def draw_spatial(
    shape: tuple[int, ...], spacing: tuple[float, ...], config: DeformConfig, rng: np.random.Generator
) -> SpatialParams:
    """Draw a random affine + flips + elastic transform for a volume of ``shape`` (2D or 3D)
    with voxel ``spacing`` (mm). The number of draws is fixed, so streams stay aligned."""
    d = len(shape)
    if d not in (2, 3):
        raise ValueError(f"spatial transforms need a 2D or 3D shape, got {shape}")
    sp = np.asarray(spacing[:d], dtype=np.float64)
    # 1. affine in millimetres, expressed in voxel units
    use_affine = rng.random() < config.affine_prob
    angles = np.deg2rad(rng.uniform(-config.rotate_deg, config.rotate_deg, size=1 if d == 2 else 3))
    if config.isotropic_scale:
        scales = np.full(d, rng.uniform(1 - config.scale, 1 + config.scale))
        rng.random(d - 1)  # keep the stream length independent of the option
    else:
        scales = rng.uniform(1 - config.scale, 1 + config.scale, size=d)
    shift_mm = rng.uniform(-config.translate_mm, config.translate_mm, size=d)
    if use_affine:
        m_mm = _rotation(angles) @ np.diag(scales)
        matrix = np.diag(1.0 / sp) @ m_mm @ np.diag(sp)
        offset = shift_mm / sp
    else:
        matrix, offset = np.eye(d), np.zeros(d)
    # 2. flips, only on allowed axes
    flip_draws = rng.random(3)
    flips = tuple(a for a in config.flip_axes if a < d and flip_draws[a] < config.flip_prob)
    # 3. elastic: control-point displacements (mm -> voxels)
    use_elastic = rng.random() < config.elastic_prob
    g = config.control_points
    drawn = rng.uniform(-config.elastic_mm, config.elastic_mm, size=(d,) + (g,) * d)
    control = drawn / sp.reshape((d,) + (1,) * d) if use_elastic and config.elastic_mm > 0 else None
    return SpatialParams(tuple(int(s) for s in shape), matrix, offset, flips, control)


def flip_only(shape: tuple[int, ...], axes: tuple[int, ...]) -> SpatialParams:
    """A transform that only flips ``axes`` (equal to ``np.flip``)."""
    d = len(shape)
    return SpatialParams(tuple(shape), np.eye(d), np.zeros(d), tuple(axes), None)


def source_coordinates(params: SpatialParams) -> np.ndarray:
    """``(d, *shape)`` float32 source positions (voxels) of every output voxel."""
    shape = params.shape
    d = len(shape)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    sign = np.ones(d)
    for a in params.flips:
        sign[a] = -1.0
    axes = []
    for b, n in enumerate(shape):
        p = (np.arange(n, dtype=np.float64) - centre[b]) * sign[b]
        axes.append(p.reshape([n if i == b else 1 for i in range(d)]))
    disp = None if params.control is None else [smooth_field(params.control[a], shape) for a in range(d)]
    coords = np.empty((d, *shape), dtype=np.float32)
    for a in range(d):
        acc = np.full(shape, centre[a] + params.offset[a], dtype=np.float32)
        for b in range(d):
            m = params.matrix[a, b]
            if m != 0.0:
                acc += (m * axes[b]).astype(np.float32)
        if disp is not None:
            acc += disp[a]
        coords[a] = acc
    return coords


def warp_label(label: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of ``label`` at ``coords`` ``(d, *shape)`` (border replicated).

    Values are copied from the input, so the output's label set is a subset of the input's."""
    shape = label.shape
    flat = np.zeros(coords.shape[1:], dtype=np.intp)
    for a, n in enumerate(shape):
        idx = np.rint(coords[a])
        np.clip(idx, 0, n - 1, out=idx)
        flat = flat * n + idx.astype(np.intp)
    return label.reshape(-1)[flat.reshape(-1)].reshape(coords.shape[1:])


def warp_image(image: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear resampling of ``image`` ``(C, *spatial)`` at ``coords`` ``(d, *shape)``; border
    replicated. Returns float32 ``(C, *shape)``."""
    import torch
    import torch.nn.functional as F

    d = coords.shape[0]
    in_shape = image.shape[1:]
    norm = np.empty((*coords.shape[1:], d), dtype=np.float32)
    for a in range(d):
        n = in_shape[a]
        # grid_sample wants the last spatial axis first in the grid's last dimension
        norm[..., d - 1 - a] = coords[a] * (2.0 / (n - 1)) - 1.0 if n > 1 else 0.0
    inp = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    grid = torch.from_numpy(norm)[None]
    out = F.grid_sample(inp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0].numpy()


def apply_spatial(
    params: SpatialParams, label: np.ndarray, image: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply ``params`` to a label ``(*spatial)`` and optionally an image ``(C, *spatial)`` with
    one shared coordinate field. Identity transforms return copies."""
    if params.is_identity:
        return label.copy(), None if image is None else np.asarray(image, dtype=np.float32).copy()
    coords = source_coordinates(params)
    out_label = warp_label(label, coords)
    out_image = None if image is None else warp_image(image, coords)
    return out_label, out_image


# ------------------------------------------------------------------------------------ edits


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    sl = []
    for a in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != a)
        hit = np.flatnonzero(mask.any(axis=other))
        sl.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + pad + 1, mask.shape[a])))
    return tuple(sl)


def _fill_from_nearest(label: np.ndarray, region: np.ndarray, value: int) -> None:
    """Give every voxel of ``region`` the label of its nearest voxel whose label is not ``value``
    (in place). ``region`` must lie inside the structure ``label == value``."""
    from scipy.ndimage import distance_transform_edt

    structure = label == value
    box = _bbox(structure, pad=2)
    if box is None:
        return
    sub = structure[box]
    if sub.all():  # the structure fills the whole volume: nothing to take from
        return
    _, idx = distance_transform_edt(sub, return_distances=True, return_indices=True)
    sub_label = label[box]
    nearest = sub_label[tuple(idx)]
    sub_region = region[box]
    sub_label[sub_region] = nearest[sub_region]


def grow_structure(label: np.ndarray, value: int, radius: int, into: list[int] | None = None) -> np.ndarray:
    """Dilate structure ``value`` by ``radius`` voxels (city-block) into neighbouring voxels whose
    label is in ``into`` (default: any other foreground label; background is kept)."""
    from scipy.ndimage import binary_dilation

    out = label.copy()
    mask = label == value
    box = _bbox(mask, pad=radius)
    if box is None:
        return out
    grown = binary_dilation(mask[box], iterations=radius)
    sub = label[box]
    allowed = (sub != 0) if into is None else np.isin(sub, into)
    target = grown & ~mask[box] & allowed
    out[box][target] = value
    return out


def shrink_structure(label: np.ndarray, value: int, radius: int) -> np.ndarray:
    """Erode structure ``value`` by ``radius`` voxels (city-block); the voxels it loses take the
    label of the nearest voxel outside it. A structure is never shrunk to nothing."""
    from scipy.ndimage import binary_erosion

    out = label.copy()
    mask = label == value
    box = _bbox(mask, pad=1)
    if box is None:
        return out
    core = binary_erosion(mask[box], iterations=radius)
    if not core.any():
        return out
    lost = np.zeros_like(mask)
    lost[box] = mask[box] & ~core
    _fill_from_nearest(out, lost, value)
    return out


def remove_structure(label: np.ndarray, value: int) -> np.ndarray:
    """Remove structure ``value``: each of its voxels takes the label of the nearest other voxel."""
    out = label.copy()
    mask = label == value
    if mask.any():
        _fill_from_nearest(out, mask, value)
    return out


def paste_lesion(
    label: np.ndarray,
    donor: np.ndarray,
    lesion: int,
    rng: np.random.Generator,
    hosts: list[int] | None = None,
    tries: int = 10,
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Copy one connected lesion (``donor == lesion``) into ``label`` at a random place.

    The lesion is centred on a random voxel whose label is in ``hosts`` (default: any foreground
    label) and written only over host voxels; a placement is accepted when at least half of the
    lesion lands on hosts (up to ``tries`` draws). Returns the new label map and a record, or the
    unchanged copy and None when the donor has no lesion or no placement fits."""
    from scipy.ndimage import label as connected

    out = label.copy()
    if donor.ndim != label.ndim:
        return out, None
    comps, n = connected(donor == lesion)
    host_mask = (label != 0) & (label != lesion) if hosts is None else np.isin(label, hosts)
    host_idx = np.flatnonzero(host_mask)
    if n == 0 or host_idx.size == 0:
        return out, None
    pick = int(rng.integers(1, n + 1))
    box = _bbox(comps == pick, pad=0)
    assert box is not None
    blob = comps[box] == pick
    size = np.asarray(blob.shape)
    if np.any(size > np.asarray(label.shape)):
        return out, None
    for _ in range(tries):
        centre = np.asarray(np.unravel_index(int(host_idx[rng.integers(host_idx.size)]), label.shape))
        start = np.clip(centre - size // 2, 0, np.asarray(label.shape) - size)
        sl = tuple(slice(int(s), int(s + k)) for s, k in zip(start, size))
        place = blob & host_mask[sl]
        if place.sum() * 2 >= blob.sum():
            out[sl][place] = lesion
            return out, {"op": "paste", "label": int(lesion), "voxels": int(place.sum()), "at": [int(s) for s in start]}
    return out, None


@dataclass
class EditResult:
    label: np.ndarray
    edits: list[dict[str, Any]] = field(default_factory=list)


def random_edits(
    label: np.ndarray,
    config: EditConfig,
    rng: np.random.Generator,
    labels: list[int],
    donor: np.ndarray | None = None,
    donor_id: str | None = None,
) -> EditResult:
    """Apply random per-structure edits in a fixed order: remove, grow/shrink, paste.

    labels: the dataset's declared label values (defines which structures are drawn for).
    donor: another case's label map for lesion pasting (same number of axes).
    Returns the edited label map (same dtype) and one record per edit made."""
    out = label
    edits: list[dict[str, Any]] = []
    # 1. remove whole structures
    for value in sorted(config.removable):
        if rng.random() < config.remove_prob and np.any(out == value):
            out = remove_structure(out, value)
            edits.append({"op": "remove", "label": int(value)})
    # 2. grow or shrink
    eligible = sorted(config.structures) if config.structures is not None else [v for v in labels if v != 0]
    for value in eligible:
        u, radius = rng.random(), int(rng.integers(1, config.max_radius + 1))
        if u < config.grow_prob:
            op = "grow"
        elif u < config.grow_prob + config.shrink_prob:
            op = "shrink"
        else:
            continue
        if not np.any(out == value):
            continue
        out = grow_structure(out, value, radius) if op == "grow" else shrink_structure(out, value, radius)
        edits.append({"op": op, "label": int(value), "radius": radius})
    # 3. paste a lesion from another case
    if config.paste_prob and config.lesion_label is not None and rng.random() < config.paste_prob and donor is not None:
        out, record = paste_lesion(out, donor, config.lesion_label, rng, hosts=config.lesion_hosts)
        if record is not None:
            record["donor"] = donor_id
            edits.append(record)
    return EditResult(out if out is not label else label.copy(), edits)


def check_edit_labels(config: EditConfig, labels: list[int]) -> None:
    """Raise ConfigError if the edit recipe names a label the dataset does not declare."""
    known = set(labels)
    named = {
        "edits.structures": config.structures or [],
        "edits.removable": config.removable,
        "edits.lesion_hosts": config.lesion_hosts or [],
        "edits.lesion_label": [] if config.lesion_label is None else [config.lesion_label],
    }
    for key, values in named.items():
        bad = sorted(set(values) - known)
        if bad:
            raise ConfigError(f"{key}: label(s) {bad} are not in the dataset's labels {sorted(known)}")
    if config.paste_prob and config.lesion_label is None:
        raise ConfigError("edits.paste_prob > 0 needs edits.lesion_label (the label value to paste)")


# ------------------------------------------------------------------------------------ classic chain


_CHAINS: dict[tuple[str, float, float], Compose] = {}


def _monai_chain(config: ClassicConfig, low: float, high: float) -> Compose:
    """The MONAI intensity chain of ``config`` for one channel's range, built once per process (building
    it costs about 30x applying it). Callers reseed it before each use (``set_random_state``), which resets
    every transform's draws, so a reused chain gives the same output as a new one."""
    key = (config.model_dump_json(), float(low), float(high))
    chain = _CHAINS.get(key)
    if chain is None:
        if len(_CHAINS) >= 64:
            _CHAINS.clear()
        chain = _CHAINS[key] = _build_chain(config, low, high)
    return chain


def _build_chain(config: ClassicConfig, low: float, high: float) -> Compose:
    from monai import transforms as T

    span = max(high - low, 1e-6)
    return T.Compose(
        [
            T.RandBiasField(coeff_range=(0.0, config.bias_coeff), prob=config.bias_prob),
            T.RandAdjustContrast(prob=config.gamma_prob, gamma=config.gamma_range),
            T.RandScaleIntensity(factors=config.scale, prob=config.scale_prob),
            T.RandShiftIntensity(offsets=config.shift * span, prob=config.shift_prob),
            T.RandGaussianSmooth(
                sigma_x=config.smooth_sigma, sigma_y=config.smooth_sigma, sigma_z=config.smooth_sigma,
                prob=config.smooth_prob,
            ),
            T.RandGaussianNoise(prob=config.noise_prob, mean=0.0, std=config.noise_std * span),
        ]
    )


def classic_pair(
    image: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, ...],
    *,
    deform: DeformConfig,
    intensity: ClassicConfig,
    ranges: list[tuple[float, float]],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The ``classic`` chain: one random spatial transform applied jointly to ``image``
    ``(C, *spatial)`` (linear) and ``label`` ``(*spatial)`` (nearest), then MONAI random intensity
    transforms per channel. ranges: per channel (low, high) robust intensity range, dataset units.
    Returns float32 image ``(C, *spatial)``, label (input dtype) and a JSON-able record."""
    params = draw_spatial(label.shape, spacing, deform, rng)
    out_label, warped = apply_spatial(params, label, image)
    assert warped is not None
    channels = []
    seeds = []
    for c in range(warped.shape[0]):
        low, high = ranges[c]
        chain = _monai_chain(intensity, low, high)
        seed = int(rng.integers(0, 2**31 - 1))
        chain.set_random_state(seed=seed)
        channels.append(np.asarray(chain(warped[c : c + 1]), dtype=np.float32)[0])
        seeds.append(seed)
    record = {"spatial": params.summary(), "monai_seeds": seeds}
    return np.stack(channels), out_label, record
