"""Built-in head-MRI phantoms: the default dataset for the demo, the tests and the docs.

A phantom is a T1-weighted-looking head: scalp and skull, a CSF shell with sulci and an
interhemispheric fissure, a folded grey-matter cortex, deep grey nuclei, white matter, two lateral
ventricles in a butterfly shape and, in about half the cases, a white-matter lesion. Every case
varies smoothly in pose, size and shape (a low-frequency displacement field and a
spherical-harmonic-like modulation of each surface). The image gets tissue intensities with
per-case jitter, partial-volume blur, a multiplicative bias field and Rician noise.

Labels: ``0 background, 1 scalp/skull, 2 CSF, 3 grey matter, 4 white matter, 5 ventricles,
6 lesion`` (:data:`LABELS`). Arrays are in RAS index order: axis 0 left->right, 1 posterior->
anterior, 2 inferior->superior; 3D volumes are ``(size, size, size)`` with spacing
``1.0 x 1.0 x 1.2`` mm, 2D phantoms an axial ``(size, size)`` slice with spacing ``1.0 x 1.0`` mm.

:func:`make_phantom` builds one case in memory (numpy and scipy only);
:func:`make_phantom_dataset` writes a whole dataset (MSD, nnU-Net raw or CSV). Case ``k`` of seed
``s`` comes from ``numpy.random.SeedSequence([s, k])``, so it is the same whatever ``cases`` is, and
the same seed writes the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from medsynth.data.ledger import own_output
from medsynth.data.limits import format_bytes
from medsynth.errors import ConfigError, JobError

LABELS: dict[int, str] = {
    0: "background",
    1: "scalp_skull",
    2: "csf",
    3: "grey_matter",
    4: "white_matter",
    5: "ventricles",
    6: "lesion",
}
"""Label value -> name of every phantom structure (6, the lesion, is present in about half the cases)."""

DEFAULT_SIZE = {2: 64, 3: 48}
MIN_SIZE = 16
MAX_SIZE = 512
#: the most cases ``make_phantom_dataset`` writes (``phantom_00000`` .. ``phantom_99999``)
MAX_CASES = 100_000
SPACING = {2: (1.0, 1.0), 3: (1.0, 1.0, 1.2)}  # mm
CHANNEL = "T1"

# Mean T1-weighted intensities (arbitrary MRI units) before per-case jitter.
_MEANS = {
    "scalp": 700.0,
    "skull": 170.0,
    "csf": 200.0,
    "grey": 550.0,
    "deep_grey": 610.0,
    "white": 800.0,
    "ventricle": 190.0,
    "lesion": 400.0,
}


class Phantom(NamedTuple):
    """One phantom case.

    image: ``(H, W)`` or ``(X, Y, Z)`` float32, T1-like intensities (background ~0-50, WM ~800).
    label: same shape, uint8 values from :data:`LABELS`.
    affine: ``(4, 4)`` float64 voxel -> RAS mm (for 2D: the slice's place in the 3D head).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray


# ----------------------------------------------------------------------------------- helpers


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for case ``index`` of dataset ``seed`` (independent of the number of cases)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _sh_basis(u: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[np.ndarray]:
    """Real polynomials of a unit direction up to degree 3 (spans spherical harmonics l = 1..3)."""
    x, y, z = u
    return [
        x, y, z,
        x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1,
        x * (x * x - 3 * y * y), y * (3 * x * x - y * y), z * (x * x - y * y), x * y * z,
        x * (5 * z * z - 1), y * (5 * z * z - 1), z * (5 * z * z - 3),
    ]  # fmt: skip


class _Shape(NamedTuple):
    """The random draws that define one case's anatomy and contrast (independent of size and dim)."""

    center: np.ndarray  # head centre, normalised units
    axes: np.ndarray  # head semi-axes
    rotation: np.ndarray  # 3x3 pose
    warp_amp: np.ndarray  # (3, 3) displacement amplitudes
    warp_freq: np.ndarray  # (3, 3) wave vectors
    warp_phase: np.ndarray  # (3,)
    sh: np.ndarray  # (4, 15) surface modulations: head, inner skull, brain, white matter
    fold_dirs: np.ndarray  # (J, 3) gyral wave directions
    fold_freq: np.ndarray  # (J,)
    fold_phase: np.ndarray  # (J,)
    vent_scale: float
    vent_shift: np.ndarray  # (3,)
    has_lesion: bool
    lesion_pick: float
    lesion_radius: float
    lesion_sh: np.ndarray  # (15,)
    slice_z: float  # 2D: axial slice height, normalised units relative to the ventricles
    means: dict[str, float]
    blur_sigma: float
    bias: np.ndarray  # (9,) bias-field polynomial coefficients
    noise_frac: float


def _draw_shape(rng: np.random.Generator) -> _Shape:
    # Every draw is made in a fixed order so a case depends only on (seed, index).
    angles = np.deg2rad(rng.uniform([-6, -8, -5], [6, 8, 5]))  # roll (about y), pitch (x), yaw (z)
    cy, sy = np.cos(angles[0]), np.sin(angles[0])
    cx, sx = np.cos(angles[1]), np.sin(angles[1])
    cz, sz = np.cos(angles[2]), np.sin(angles[2])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = rng.uniform(0.93, 1.0)
    axes = np.array([0.78, 0.92, 0.98]) * scale * rng.uniform(0.96, 1.02, size=3)
    center = np.array([0.0, 0.0, 0.04]) + rng.normal(0, 0.015, size=3)
    jitter = rng.uniform(0.92, 1.08, size=len(_MEANS))
    gain = rng.uniform(0.9, 1.1)
    means = {k: float(v * j * gain) for (k, v), j in zip(_MEANS.items(), jitter)}
    n_folds = 10
    dirs = rng.normal(size=(n_folds, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return _Shape(
        center=center,
        axes=axes,
        rotation=rot_z @ rot_x @ rot_y,
        warp_amp=rng.normal(0, 0.025, size=(3, 3)),
        warp_freq=rng.normal(0, 1.6, size=(3, 3)),
        warp_phase=rng.uniform(0, 2 * np.pi, size=3),
        sh=rng.normal(0, 1, size=(4, 15)) * np.array([0.025, 0.02, 0.02, 0.035])[:, None],
        fold_dirs=dirs,
        fold_freq=rng.uniform(10.0, 16.0, size=n_folds),
        fold_phase=rng.uniform(0, 2 * np.pi, size=n_folds),
        vent_scale=float(rng.uniform(0.85, 1.35)),
        vent_shift=rng.normal(0, 0.015, size=3),
        has_lesion=bool(rng.random() < 0.5),
        lesion_pick=float(rng.random()),
        lesion_radius=float(rng.uniform(0.07, 0.13)),
        lesion_sh=rng.normal(0, 0.12, size=15),
        slice_z=float(rng.uniform(-0.02, 0.03)),
        means=means,
        blur_sigma=float(rng.uniform(0.5, 0.75)),
        bias=rng.normal(0, 0.07, size=9),
        noise_frac=float(rng.uniform(0.015, 0.035)),
    )


def _modulation(u, coeffs: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u[0])
    for c, b in zip(coeffs, _sh_basis(u)):
        out += np.float32(c) * b
    return out


def _anatomy(p: list[np.ndarray], s: _Shape) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Label the points ``p`` (three arrays, normalised head coordinates) for shape ``s``.

    Returns the label array and the sub-structure masks the intensity model needs.
    """
    # 1. pose, then a smooth low-frequency displacement (per-case shape variation)
    rel = [p[i] - np.float32(s.center[i]) for i in range(3)]
    q = [sum(np.float32(s.rotation[j, i]) * rel[i] for i in range(3)) for j in range(3)]
    waves = [
        np.sin(sum(np.float32(s.warp_freq[k, i]) * q[i] for i in range(3)) + np.float32(s.warp_phase[k]))
        for k in range(3)
    ]
    q = [q[j] + sum(np.float32(s.warp_amp[j, k]) * waves[k] for k in range(3)) for j in range(3)]
    x, y, z = q

    # 2. ellipsoidal radius and direction; nested surfaces as radius thresholds
    e = [q[i] / np.float32(s.axes[i]) for i in range(3)]
    r = np.sqrt(e[0] ** 2 + e[1] ** 2 + e[2] ** 2) + np.float32(1e-6)
    u = (e[0] / r, e[1] / r, e[2] / r)
    fold = np.zeros_like(r)
    for d, f, ph in zip(s.fold_dirs, s.fold_freq, s.fold_phase):
        along = np.float32(d[0]) * u[0] + np.float32(d[1]) * u[1] + np.float32(d[2]) * u[2]
        fold += np.sin(np.float32(f) * along + np.float32(ph))
    fold *= np.float32(1.0 / np.sqrt(len(s.fold_freq) / 2.0))  # ~unit variance
    r_head = 1.0 + _modulation(u, s.sh[0])
    r_skull = 0.93 * r_head  # scalp fat outside, bone inside (both label 1)
    r_csf = r_head * (0.85 + 0.3 * _modulation(u, s.sh[1]))  # scalp + skull ~15% of the radius
    base = _modulation(u, s.sh[2])
    r_gm = np.minimum(0.83 + base - 0.1 * np.maximum(-fold - 0.2, 0), r_csf - 0.035)
    r_wm = np.minimum(0.61 + base + _modulation(u, s.sh[3]) + 0.09 * fold, r_gm - 0.07)

    label = np.zeros(r.shape, dtype=np.uint8)
    label[r < r_head] = 1
    label[r < r_csf] = 2
    label[r < r_gm] = 3
    label[r < r_wm] = 4

    # 3. interhemispheric fissure: CSF between the hemispheres above the deep core, lined by
    #    medial cortex (grey matter)
    outer = r > 0.5
    label[(np.abs(x) < 0.09) & outer & (label == 4)] = 3
    label[(np.abs(x) < 0.035) & outer & (label >= 3)] = 2

    # 4. deep grey nuclei (thalamus / basal ganglia), both sides
    deep = np.zeros(r.shape, dtype=bool)
    for cx0, cy0, ax, ay, az in ((0.2, 0.06, 0.07, 0.12, 0.09), (0.1, -0.14, 0.07, 0.09, 0.08)):
        for side in (-1.0, 1.0):
            deep |= ((x - side * cx0) / ax) ** 2 + ((y - cy0) / ay) ** 2 + ((z + 0.05) / az) ** 2 < 1
    deep &= label == 4
    label[deep] = 3

    # 5. lateral ventricles: two arched, laterally bent horns (a butterfly in axial slices)
    vs = np.float32(s.vent_scale)
    yc = y - np.float32(0.03 + s.vent_shift[1])
    yn = yc / np.float32(0.36)
    zc = z - np.float32(0.08 + s.vent_shift[2]) - np.float32(0.05) * (1 - yn**2)
    vent_score = np.full(r.shape, np.inf, dtype=np.float32)
    for side in (-1.0, 1.0):
        bend = np.where(yn < 0, np.float32(0.24), np.float32(0.1)) * yn**2  # atria splay more than frontal horns
        xc = x - np.float32(s.vent_shift[0]) - np.float32(side) * (0.07 + bend)
        v = (xc / (0.048 * vs)) ** 2 + yn**2 + (zc / (0.085 * vs)) ** 2
        vent_score = np.minimum(vent_score, v)
    vent = (vent_score < 1) & (label >= 2)
    label[vent] = 5

    # 6. every structure present even at 16 voxels: stamp the most central voxel if one vanished
    for value, score in ((2, np.abs(r - r_csf)), (3, np.abs(r - r_gm)), (4, r - r_wm), (5, vent_score)):
        if not np.any(label == value):
            label.flat[int(np.argmin(score))] = value

    # 7. a lumpy lesion in white matter (about half the cases)
    if s.has_lesion:
        wm = np.flatnonzero((label == 4) & (r < 0.85 * r_wm))
        if wm.size == 0:
            wm = np.flatnonzero(label == 4)
        if wm.size:
            c = int(wm[min(int(s.lesion_pick * wm.size), wm.size - 1)])
            d = [qq - qq.flat[c] for qq in q]
            dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + np.float32(1e-6)
            ld = (d[0] / dist, d[1] / dist, d[2] / dist)
            lesion = (dist < s.lesion_radius * (1 + _modulation(ld, s.lesion_sh))) & (label == 4)
            lesion.flat[c] = True
            label[lesion] = 6

    parts = {"skull": (label == 1) & (r < r_skull), "deep_grey": deep & (label == 3)}
    return label, parts


def _intensity(label: np.ndarray, parts: dict[str, np.ndarray], p: list[np.ndarray], s: _Shape,
               rng: np.random.Generator, spacing: tuple[float, ...]) -> np.ndarray:
    """T1-like image for ``label``: tissue means, partial-volume blur, bias field, Rician noise."""
    from scipy import ndimage

    m = s.means
    table = np.array([0.0, m["scalp"], m["csf"], m["grey"], m["white"], m["ventricle"], m["lesion"]], dtype=np.float32)
    img = table[label]
    img[parts["skull"]] = m["skull"]
    img[parts["deep_grey"]] = m["deep_grey"]
    # tissue texture: +-3% smooth multiplicative variation (features ~ 1/12 of the field of view)
    texture = rng.standard_normal(label.shape, dtype=np.float32)
    texture = ndimage.gaussian_filter(texture, sigma=label.shape[0] / 24.0, mode="wrap")
    texture *= np.float32(0.03) / max(float(texture.std()), 1e-6)
    img *= 1 + texture
    # partial-volume blur: a Gaussian PSF of ~0.6 mm-equivalent voxels (scaled by spacing)
    sigma = [s.blur_sigma * min(spacing) / sp for sp in spacing]
    img = ndimage.gaussian_filter(img, sigma=sigma, mode="constant", truncate=3.0)
    # smooth multiplicative bias field (exp of a quadratic polynomial in position)
    x, y, z = p
    terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
    log_bias = sum(np.float32(c) * t for c, t in zip(s.bias, terms))
    img *= np.exp(log_bias - np.float32(np.mean(log_bias)))
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    sigma_n = np.float32(s.noise_frac * m["white"])
    real = img + sigma_n * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sigma_n * rng.standard_normal(img.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


# ----------------------------------------------------------------------------------- public API


def _check_args(dim: int, size: int | None) -> int:
    if dim not in (2, 3):
        raise ConfigError(f"dim must be 2 or 3, got {dim!r}")
    size = DEFAULT_SIZE[dim] if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ConfigError(f"size must be an integer, got {size!r}")
    if not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ConfigError(f"size must be between {MIN_SIZE} and {MAX_SIZE} voxels, got {size}")
    return int(size)


def phantom_affine(dim: int, size: int) -> np.ndarray:
    """The ``(4, 4)`` voxel -> RAS mm affine of a phantom (centred on the head, RAS axes).

    3D: spacing 1.0 x 1.0 x 1.2 mm. 2D: spacing 1.0 x 1.0 mm (1 mm thick); :func:`make_phantom`
    moves a 2D slice's origin to its height in the 3D head.
    """
    size = _check_args(dim, size)
    spacing = np.array(SPACING[dim] + ((1.0,) if dim == 2 else ()), dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2.0 * spacing
    affine[:3, 3] += (0.0, -4.0, 12.0)  # scanner origin not at the volume centre, as in real scans
    return affine


def make_phantom(dim: int = 3, size: int | None = None, rng: np.random.Generator | int = 0) -> Phantom:
    """One head phantom in memory (pure: no files, no global state).

    dim: 2 (an axial ``(size, size)`` slice through the ventricles) or 3 (``(size,)*3`` volume).
    size: edge length in voxels (>= 16; None: 64 in 2D, 48 in 3D).
    rng: the source of every random draw (see :func:`case_rng`); an int ``s`` means
        ``case_rng(s, 0)``, case 0 of a dataset with seed ``s``.
    Returns a :class:`Phantom` ``(image float32, label uint8, affine)``.
    """
    size = _check_args(dim, size)
    if not isinstance(rng, np.random.Generator):
        if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)) or rng < 0:
            raise ConfigError(f"rng must be a numpy Generator or a non-negative seed, got {rng!r}")
        rng = case_rng(int(rng), 0)
    shape_params = _draw_shape(rng)
    spacing = SPACING[dim]
    half = size * spacing[0] / 2.0  # mm per normalised unit (half the in-plane field of view)
    coords = [((np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * sp / half).astype(np.float32) for sp in spacing]
    if dim == 3:
        p = list(np.meshgrid(*coords, indexing="ij"))
    else:
        gx, gy = np.meshgrid(*coords, indexing="ij")
        # the axial slice sits through the ventricle bodies (head centre + ventricle height)
        zval = np.float32(shape_params.center[2] + 0.11 + shape_params.vent_shift[2] + shape_params.slice_z)
        p = [gx, gy, np.full_like(gx, zval)]
    label, parts = _anatomy(p, shape_params)
    image = _intensity(label, parts, p, shape_params, rng, spacing)
    affine = phantom_affine(dim, size)
    if dim == 2:
        affine[2, 3] += float(p[2][0, 0]) * half  # the slice's height in the 3D head
    return Phantom(image=image, label=label, affine=affine)


def make_phantom_dataset(
    out: str | Path,
    *,
    dim: int = 3,
    cases: int = 8,
    seed: int = 0,
    size: int | None = None,
    format: str = "msd",  # noqa: A002 - matches the CLI option
    overwrite: bool = False,
) -> Path:
    """Write a labelled head-phantom dataset to the folder ``out``; return the manifest's path.

    format: a registered manifest format (:func:`medsynth.data.formats.format_names`): ``"msd"``
        (``OUT/dataset.json``, ``OUT/imagesTr/phantom_000.nii.gz``, ``OUT/labelsTr/phantom_000.nii.gz``;
        returns the JSON), ``"nnunet"`` (nnU-Net v2 raw folder, ``imagesTr/phantom_000_0000.nii.gz``;
        returns ``OUT``) or ``"csv"`` (MSD file layout plus ``OUT/dataset.csv``; returns the CSV).
        Files go where the format puts a case; the return value is what ``read_manifest`` takes.
    cases: 1 to :data:`MAX_CASES`, and no more than the free disk space holds (about 4 bytes a voxel).
    An existing non-empty ``out`` is refused unless ``overwrite``; then only the phantom files an earlier
    ``make_phantom_dataset`` recorded as its own, unchanged, are replaced (:mod:`medsynth.ownership`), and
    never a folder that holds other files where cases go.
    Raises ConfigError for bad arguments, JobError for an output folder clash.
    """
    from medsynth.data.formats import format_names, get_format
    from medsynth.data.manifest import Case, Manifest, write_manifest
    from medsynth.data.nifti import write_volume

    # 1. check the arguments and the output folder before any work
    size = _check_args(dim, size)
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or not 1 <= cases <= MAX_CASES:
        raise ConfigError(f"cases must be a whole number from 1 to {MAX_CASES}, got {cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if format not in format_names():
        raise ConfigError(f"format must be one of {', '.join(format_names())}, got {format!r}")
    fmt = get_format(format)
    out = Path(out).expanduser()
    check_disk_space(out, dim, size, int(cases))
    ids = [f"phantom_{k:03d}" for k in range(int(cases))]
    files = [(fmt.image_paths(out, i, 1, ".nii.gz")[0], fmt.label_path(out, i, ".nii.gz")) for i in ids]
    writes = [p.relative_to(out).as_posix() for p in [*(p for pair in files for p in pair), fmt.manifest_path(out)]]
    _refuse_foreign_files(out, overwrite)
    # the folder's lock while it is claimed and written: a second job on it is refused
    with own_output(out, "phantoms", overwrite=overwrite, writes=writes, option="output folder") as owned:
        # 2. generate and write each case (case k depends only on seed and k)
        records: list[Case] = []
        for k, (case_id, (img_path, lab_path)) in enumerate(zip(ids, files, strict=True)):
            phantom = make_phantom(dim, size, case_rng(seed, k))
            write_volume(img_path, phantom.image, phantom.affine, kind="image")
            write_volume(lab_path, phantom.label, phantom.affine, kind="label")
            owned.record(img_path, lab_path)
            records.append(Case(case_id=case_id, images=[img_path], label=lab_path, split="train"))

        # 3. the manifest last, so a dataset with a manifest is complete
        manifest = Manifest(
            format=format,
            cases=records,
            labels=dict(LABELS),
            channels=[CHANNEL],
            name=f"medsynth_phantoms_{dim}d",
            meta={
                "description": f"medsynth head phantoms ({dim}D, size {size}, seed {seed}); T1-like, synthetic",
                "tensorImageSize": f"{dim}D",
            },
        )
        owned.record(write_manifest(manifest, out, fmt=format))
    return fmt.dataset_path(out)


def _owned() -> tuple[list[str], list[str]]:
    """(top-level folders, manifest file names) a phantom dataset of any registered format writes."""
    from medsynth.data.formats import LIST_OF_FORMATS

    folders: set[str] = set()
    for fmt in LIST_OF_FORMATS:
        for path in [*fmt.image_paths(Path(), "phantom_000", 1, ".nii.gz"), fmt.label_path(Path(), "phantom_000", ".nii.gz")]:
            folders.add(path.parts[0])
    return sorted(folders), sorted({fmt.manifest_name for fmt in LIST_OF_FORMATS})


def check_disk_space(out: Path, dim: int, size: int, cases: int) -> None:
    """JobError when ``cases`` phantoms (about 4 bytes a voxel on disk: float32 images compress little)
    need more space than the file system of ``out`` has free."""
    needed = cases * size**dim * 4
    here = Path(out).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        free = shutil.disk_usage(here).free
    except OSError:
        return  # not a folder: the output checks that follow name the problem
    if needed > free:
        raise JobError(f"--cases {cases}: {cases} phantoms of {size}^{dim} voxels need about {format_bytes(needed)}, "
                       f"but {here} has {format_bytes(free)} free; free some space or lower --cases")


def _refuse_foreign_files(out: Path, overwrite: bool) -> None:
    """JobError when an overwrite would write into a folder where cases go that holds other files (they
    would become part of the dataset); the claim itself is :func:`medsynth.ownership.own_output`'s."""
    if overwrite and out.is_dir():
        folders, _ = _owned()
        for sub in folders:
            folder = out / sub
            if folder.is_dir():
                foreign = [f.name for f in folder.iterdir() if not f.name.startswith(("phantom_", ".phantom_"))]
                if foreign:
                    raise JobError(
                        f"output folder {folder} holds files that are not phantoms "
                        f"({', '.join(sorted(foreign)[:3])}); refusing to overwrite it"
                    )
