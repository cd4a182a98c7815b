"""Register one moving image to one fixed image with SimpleITK: centre, affine, then deformable.

Stages (each multi-resolution, shrink factors ``2**(levels-1) .. 1`` with Gaussian smoothing):

1. centring: ``CenteredTransformInitializer`` (image centres or intensity moments);
2. affine: ``ImageRegistrationMethod``, gradient descent with scales from physical shift;
3. deformable, on top of the affine: diffeomorphic demons on the affine-resampled moving image
   (an inverted contrast negated, then histogram matched; the field carried from level to level) or
   a cubic B-spline grid (gradient descent with line search, the grid refined at each level);
4. the composite transform sampled as a displacement field on the fixed grid (RAS mm), and the
   quality figures: similarity before/after, folding fraction.

Bounds: an image above ``settings.max_voxels`` is refused before any work; the optimisers stop
when ``settings.time_limit_s`` is reached and the registration then raises :class:`RegistrationError`
naming the limit; every ITK filter runs with ``settings.threads`` threads. Divergence (an ITK
exception, a non-finite metric or field, folding above ``settings.max_folding_fraction``) raises
:class:`RegistrationError` too.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import SimpleITK as sitk

from medsynth.registration.geometry import field_from_itk, to_itk_image
from medsynth.registration.result import Registration
from medsynth.registration.settings import RegistrationError, RegistrationSettings
from medsynth.registration.warp import folding_fraction

__all__ = ["register"]


class _Clock:
    """The time limit of one registration, checked from the optimisers' iteration events."""

    def __init__(self, limit_s: float) -> None:
        self.start = time.monotonic()
        self.limit_s = limit_s
        self.stopped = False

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def watch(self, method: Any) -> None:
        """Stop ``method`` (a registration method or demons filter) once the limit is reached."""

        def tick() -> None:
            if self.seconds > self.limit_s:
                self.stopped = True
                method.StopRegistration()

        method.AddCommand(sitk.sitkIterationEvent, tick)

    def check(self, stage: str) -> None:
        if self.stopped or self.seconds > self.limit_s:
            raise RegistrationError(
                f"registration exceeded its time limit time_limit_s={self.limit_s:g} s in the {stage} stage "
                f"({self.seconds:.1f} s); raise the limit or lower levels / iterations"
            )


def _checked(array: np.ndarray, name: str, settings: RegistrationSettings) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise RegistrationError(f"{name} image must be 2D (H, W) or 3D (X, Y, Z), got shape {array.shape}")
    if min(array.shape) < 4:
        raise RegistrationError(f"{name} image shape {array.shape} is too small: every axis needs >= 4 voxels")
    if array.size > settings.max_voxels:
        raise RegistrationError(
            f"{name} image has {array.size} voxels {array.shape}, above the limit max_voxels={settings.max_voxels}; "
            "resample it coarser or raise max_voxels"
        )
    if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
        raise RegistrationError(f"{name} image has non-finite or non-numeric values")
    if array.min() == array.max():
        raise RegistrationError(f"{name} image is constant (every voxel {array.flat[0]}): nothing to align")
    return _normalised(array)


def _normalised(array: np.ndarray) -> np.ndarray:
    """Intensities scaled so the 1st..99th percentiles span 0..1 (float32)."""
    low, high = np.percentile(array, [1.0, 99.0])
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return ((array.astype(np.float32) - low) / max(float(high - low), 1e-6)).astype(np.float32)


def _itk_seed(seed: int) -> int:
    # SimpleITK reads seed 0 as "from the wall clock"; derive a non-zero 32-bit seed instead
    return int(np.random.SeedSequence(seed).generate_state(1)[0]) or 1


def _method(settings: RegistrationSettings, mask: sitk.Image | None, *, sample: bool = True) -> Any:
    """An ImageRegistrationMethod with the metric, sampling, interpolator and threads of ``settings``."""
    method = sitk.ImageRegistrationMethod()
    if settings.resolved_metric == "mi":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    else:
        method.SetMetricAsMeanSquares()
    if sample and settings.sampling_fraction < 1:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(settings.sampling_fraction, _itk_seed(settings.seed))
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetNumberOfThreads(settings.threads)
    return method


def _multires(method: Any, settings: RegistrationSettings) -> None:
    method.SetShrinkFactorsPerLevel(settings.shrink_factors)
    method.SetSmoothingSigmasPerLevel([f / 2 for f in settings.shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()


def _run(method: Any, fixed: sitk.Image, moving: sitk.Image, clock: _Clock, stage: str) -> Any:
    clock.watch(method)
    try:
        transform = method.Execute(fixed, moving)
    except RuntimeError as err:
        clock.check(stage)
        raise RegistrationError(f"the {stage} stage failed in ITK: {_first_line(err)}") from err
    clock.check(stage)
    if not math.isfinite(method.GetMetricValue()):
        raise RegistrationError(f"the {stage} stage diverged: metric value {method.GetMetricValue()}")
    return transform


def _first_line(err: Exception) -> str:
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    useful = [s for s in lines if s.lower().startswith("description:")]
    return (useful or lines or ["(no message)"])[-1]


def _affine_stage(
    fixed: sitk.Image, moving: sitk.Image, settings: RegistrationSettings, mask: sitk.Image | None, clock: _Clock
) -> sitk.Transform:
    # 1. centring: image centres or intensity moments
    init = sitk.CenteredTransformInitializerFilter()
    init.SetNumberOfThreads(settings.threads)
    init.SetOperationMode(init.MOMENTS if settings.initializer == "moments" else init.GEOMETRY)
    try:
        start = init.Execute(fixed, moving, sitk.AffineTransform(fixed.GetDimension()))
    except RuntimeError as err:
        raise RegistrationError(f"the centring stage failed in ITK: {_first_line(err)}") from err
    # 2. affine: at most settings.affine_samples random (seeded) voxels per level; 12 parameters need few
    method = _method(settings, mask)
    voxels = [float(np.prod(fixed.GetSize())) / f ** fixed.GetDimension() for f in settings.shrink_factors]
    fractions = [min(settings.sampling_fraction, settings.affine_samples / n) for n in voxels]
    if min(fractions) < 1:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentagePerLevel(fractions, _itk_seed(settings.seed))
    # regular-step descent halves its step when the gradient turns: plain gradient descent overshoots
    # and oscillates on Mattes MI (a 6 mm shift ended at 10 mm)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=settings.affine_iterations, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(start, inPlace=False)
    _multires(method, settings)
    return _run(method, fixed, moving, clock, "affine")


def _bspline_stage(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings,
    mask: sitk.Image | None, clock: _Clock,
) -> tuple[sitk.Transform, bool]:
    extent = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    coarse = settings.grid_spacing_mm * 2 ** (settings.levels - 1)
    mesh = [max(1, round(float(e) / coarse)) for e in extent]
    grid = sitk.BSplineTransformInitializer(fixed, mesh, 3)
    method = _method(settings, mask)
    method.SetInitialTransformAsBSpline(grid, inPlace=True, scaleFactors=[2**level for level in range(settings.levels)])
    method.SetMovingInitialTransform(affine)
    # L-BFGS-B refuses the refined grid (its scales keep the coarse size); a line search does not
    method.SetOptimizerAsGradientDescentLineSearch(
        learningRate=5.0, numberOfIterations=settings.iterations, convergenceMinimumValue=1e-5, convergenceWindowSize=5,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    _multires(method, settings)
    deform = _run(method, fixed, moving, clock, "bspline")
    stop = method.GetOptimizerStopConditionDescription().lower()
    converged = "maximum" not in stop and "too many" not in stop and "exceed" not in stop
    return sitk.CompositeTransform([affine, deform]), converged


def _resampled(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, threads: int) -> sitk.Image:
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(reference)
    resample.SetTransform(transform)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetDefaultPixelValue(0.0)
    resample.SetNumberOfThreads(threads)
    return resample.Execute(image)


def _shrunk(image: sitk.Image, factor: int, threads: int) -> sitk.Image:
    """``image`` smoothed (sigma factor/2 voxels) on a grid ``factor`` times coarser, same extent."""
    if factor == 1:
        return image
    smooth = sitk.SmoothingRecursiveGaussianImageFilter()
    smooth.SetSigma([factor / 2 * s for s in image.GetSpacing()])
    smooth.SetNumberOfThreads(threads)
    size = [max(4, round(n / factor)) for n in image.GetSize()]
    spacing = [s * n / m for s, n, m in zip(image.GetSpacing(), image.GetSize(), size)]
    # keep the first voxel's corner in place: origin moves by half the change of spacing
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    shift = direction @ ((np.array(spacing) - np.array(image.GetSpacing())) / 2)
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing(spacing)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin([float(o) for o in np.array(image.GetOrigin()) + shift])
    return _resampled(smooth.Execute(image), reference, sitk.Transform(image.GetDimension(), sitk.sitkIdentity), threads)


def _upright(aligned: sitk.Image, fixed: sitk.Image, inside: sitk.Image) -> sitk.Image:
    """``aligned`` negated where its intensities fall as the fixed ones rise (an inverted contrast).

    Demons forces compare intensities directly; after this and histogram matching an inverted copy
    registers like a same-contrast one. (Mapping by the conditional mean of the joint histogram, which
    would also cover non-monotone contrast changes, measured 0.04 Dice worse on same-contrast MNI slices.)"""
    m = sitk.GetArrayViewFromImage(aligned)
    f = sitk.GetArrayViewFromImage(fixed)
    keep = sitk.GetArrayViewFromImage(inside) > 0.5
    if keep.sum() < 2 or np.corrcoef(m[keep], f[keep])[0, 1] >= 0:
        return aligned
    return sitk.Cast(-aligned, sitk.sitkFloat32)


def _levelled_off(history: list[float], window: int = 5, tolerance: float = 0.01) -> bool:
    """The demons metric (mean squared difference) improved by less than ``tolerance`` (relative) over
    the last ``window`` iterations: demons forces never vanish between different anatomies, so the
    update size (RMS change) is no convergence test; the metric levelling off is."""
    if len(history) <= window or history[-window - 1] <= 0:
        return False
    return (history[-window - 1] - history[-1]) / history[-window - 1] < tolerance


def _demons_stage(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, settings: RegistrationSettings, clock: _Clock
) -> tuple[sitk.Transform, bool]:
    threads = settings.threads
    aligned = _resampled(moving, fixed, affine, threads)
    if settings.resolved_metric == "mi":
        ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
        ones.CopyInformation(moving)
        inside = _resampled(ones, fixed, affine, threads)
        aligned = _upright(aligned, fixed, inside)
    match = sitk.HistogramMatchingImageFilter()
    match.SetNumberOfHistogramLevels(256)
    match.SetNumberOfMatchPoints(15)
    match.ThresholdAtMeanIntensityOn()
    match.SetNumberOfThreads(threads)
    aligned = match.Execute(aligned, fixed)
    ndim = fixed.GetDimension()
    field: sitk.Image | None = None
    converged = False
    for factor in settings.shrink_factors:
        fixed_l, moving_l = _shrunk(fixed, factor, threads), _shrunk(aligned, factor, threads)
        to_field = sitk.TransformToDisplacementFieldFilter()
        to_field.SetReferenceImage(fixed_l)
        to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
        to_field.SetNumberOfThreads(threads)
        start = sitk.Transform(ndim, sitk.sitkIdentity) if field is None else sitk.DisplacementFieldTransform(field)
        initial = to_field.Execute(start)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        # half the iterations at full resolution (as ANTs' schedules do): 96^3 went 8.4 s -> 5.1 s for -0.002 Dice
        iterations = settings.iterations if factor > 1 else max(1, settings.iterations // 2)
        demons.SetNumberOfIterations(iterations)
        demons.UseFirstOrderExpOn()  # exp(v) ~ x + v each step: faster, and 2D Dice was no worse
        demons.SetStandardDeviations(settings.demons_sigma_vox)
        demons.SmoothDisplacementFieldOn()
        demons.SetUseGradientType(demons.Symmetric)
        demons.SetMaximumRMSError(0.01)
        demons.SetNumberOfThreads(threads)
        clock.watch(demons)
        history: list[float] = []
        demons.AddCommand(sitk.sitkIterationEvent, lambda d=demons, h=history: h.append(d.GetMetric()))
        try:
            field = demons.Execute(fixed_l, moving_l, initial)
        except RuntimeError as err:
            clock.check("demons")
            raise RegistrationError(f"the demons stage failed in ITK: {_first_line(err)}") from err
        clock.check("demons")
        converged = demons.GetElapsedIterations() < iterations or _levelled_off(history)
    assert field is not None  # settings.levels >= 1
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)]), converged


def _similarity(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, settings: RegistrationSettings,
    mask: sitk.Image | None,
) -> float:
    """The metric at ``transform``, full sampling, higher is better (NaN where ITK cannot evaluate it)."""
    method = _method(settings, mask, sample=False)
    method.SetMovingInitialTransform(transform)
    method.SetInitialTransform(sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity))
    try:
        value = -float(method.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def _field(transform: sitk.Transform, fixed: sitk.Image, threads: int) -> np.ndarray:
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    to_field.SetNumberOfThreads(threads)
    return field_from_itk(to_field.Execute(transform))


def register(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    settings: RegistrationSettings = RegistrationSettings(),  # noqa: B008 (frozen dataclass: immutable default)
    *,
    fixed_mask: np.ndarray | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed``: a displacement field on the fixed grid.

    fixed, moving: ``(H, W)`` or ``(X, Y, Z)`` intensity arrays in file index order (same
        dimensionality, any size and geometry); fixed_affine, moving_affine: ``(4, 4)`` voxel -> RAS mm.
    fixed_mask: optional array of the fixed shape; the metric is evaluated only where it is non-zero.
    Returns a :class:`Registration` (field in RAS mm: fixed point ``p`` -> moving point ``p + field``).
    Raises :class:`RegistrationError` for unusable input (shapes, non-finite values, above
    ``settings.max_voxels``), a stage that fails or diverges, the time limit, or folding above
    ``settings.max_folding_fraction``.
    """
    clock = _Clock(settings.time_limit_s)
    # 1. check the inputs and build the ITK images (LPS, reversed axes)
    fixed_n, moving_n = _checked(fixed, "fixed", settings), _checked(moving, "moving", settings)
    if fixed_n.ndim != moving_n.ndim:
        raise RegistrationError(f"fixed image is {fixed_n.ndim}D {fixed_n.shape}, moving is {moving_n.ndim}D {moving_n.shape}")
    fixed_img = to_itk_image(fixed_n, fixed_affine, name="fixed")
    moving_img = to_itk_image(moving_n, moving_affine, name="moving")
    mask_img = None
    if fixed_mask is not None:
        if np.shape(fixed_mask) != fixed_n.shape:
            raise RegistrationError(f"fixed_mask has shape {np.shape(fixed_mask)}, the fixed image {fixed_n.shape}")
        if not np.any(fixed_mask):
            raise RegistrationError("fixed_mask is empty: the metric would have no voxels to compare")
        mask_img = to_itk_image(np.asarray(fixed_mask) != 0, fixed_affine, name="fixed_mask", dtype=np.uint8)
    identity = sitk.Transform(fixed_n.ndim, sitk.sitkIdentity)
    before = _similarity(fixed_img, moving_img, identity, settings, mask_img)

    # 2. centring and affine
    transform = _affine_stage(fixed_img, moving_img, settings, mask_img, clock)
    stages: tuple[str, ...] = ("affine",)
    affine_only = transform
    converged = True
    # 3. deformable on top of the affine
    if settings.transform == "deformable":
        if settings.deformable == "bspline":
            transform, converged = _bspline_stage(fixed_img, moving_img, transform, settings, mask_img, clock)
        else:
            transform, converged = _demons_stage(fixed_img, moving_img, transform, settings, clock)
        stages += (settings.deformable,)

    # 4. the field on the fixed grid and its quality
    field = _field(transform, fixed_img, settings.threads)
    if not np.all(np.isfinite(field)):
        raise RegistrationError(f"the registration diverged: the {stages[-1]} field has non-finite values")
    after = _similarity(fixed_img, moving_img, transform, settings, mask_img)
    if not math.isfinite(after):
        raise RegistrationError(f"the registration diverged: the {settings.resolved_metric} metric after it is not finite")
    folding = folding_fraction(field, fixed_affine)
    if folding > settings.max_folding_fraction:
        # the affine stage alone folded (inside out): a clearer cause than the deformable stage's folding
        affine_folding = folding if affine_only is transform else \
            folding_fraction(_field(affine_only, fixed_img, settings.threads), fixed_affine)
        if affine_folding > settings.max_folding_fraction:
            raise RegistrationError(
                f"the affine stage turns the moving image inside out ({100 * affine_folding:.2f} % of the fixed "
                "voxels with Jacobian determinant <= 0): the two images hold mirror-image or different anatomy, or "
                "do not overlap after centring (try initializer='moments')"
            )
        raise RegistrationError(
            f"the registration folds {100 * folding:.2f} % of the fixed voxels (Jacobian determinant <= 0), above "
            f"max_folding_fraction={settings.max_folding_fraction:g}"
        )
    return Registration(
        field=field, fixed_affine=np.asarray(fixed_affine, dtype=np.float64).copy(), similarity_before=before,
        similarity_after=after, folding_fraction=folding, converged=converged, seconds=clock.seconds,
        metric=settings.resolved_metric, stages=stages,
    )
