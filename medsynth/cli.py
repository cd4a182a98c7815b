"""The ``medsynth`` command line.

Each command parses its options and calls one library function. This is the only place that turns a
:class:`~medsynth.errors.MedsynthError` into a one-line message and a non-zero exit. Heavy imports
(torch, MONAI, nibabel) happen inside the commands so that ``medsynth --help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from medsynth.data.atomic import shown

#: ``--set key=value`` (augment; train's is :data:`TrainSetOption`): a dotted key and a YAML value, repeatable
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a setting: key=value (dotted key, YAML value, e.g. edits.grow_prob=0.5); repeatable.")]
TrainSetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe setting: key=value (dotted key, YAML value, e.g. training.lr=1e-4); "
    "repeatable.")]

app = typer.Typer(
    name="medsynth",
    help="Synthesize medical scans from label maps and grow segmentation datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print one clear message to stderr and exit non-zero (a name that is not UTF-8 shown escaped)."""
    typer.echo(f"error: {shown(message)}", err=True)
    raise typer.Exit(code)


def os_error_message(exc: OSError) -> str:
    """``<path>: <reason>`` for a file-system error (``No space left on device``, ``Read-only file
    system``, ``Permission denied``, ``File exists``, ...), naming both paths of a rename or link."""
    import os

    reason = exc.strerror or str(exc)
    path = exc.filename
    if path is None:
        return reason
    from medsynth.data.atomic import link_problem

    problem = link_problem(path) if isinstance(path, (str, bytes, os.PathLike)) else None
    if exc.errno in (errno.EEXIST, errno.ELOOP) and problem is not None:
        reason = problem
    elif exc.errno == errno.ELOOP:
        reason = "a symbolic link loop on the way (following it leads back to itself)"
    elif exc.errno == errno.EEXIST and exc.filename2 is None and os.path.exists(path) and not os.path.isdir(path):
        reason = "is a file where a folder should be"
    where = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


def _escaped_output() -> None:
    """stdout and stderr show a file name's bytes that are not UTF-8 escaped (``c\\udcff``, as
    :func:`~medsynth.data.atomic.shown`) in every line a command prints (plans, tables, progress), on
    any terminal: a strict UTF-8 stream would raise UnicodeEncodeError, a surrogate-escaping one would
    print bytes the terminal cannot show."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):  # not a TextIOWrapper
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]


def user_errors(func: F) -> F:
    """Turn MedsynthError, file-system errors (an OSError with an errno: full disk, read-only file
    system, permissions, ...) and Ctrl-C into one message and an exit code; never a traceback.
    Anything else (a bug) keeps its traceback. Python warnings print as one ``warning:`` line
    (:func:`_plain_warnings`) in every command; a file name that is not UTF-8 prints escaped
    (:func:`_escaped_output`)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medsynth.errors import MedsynthError

        _escaped_output()
        try:
            with _plain_warnings():
                return func(*args, **kwargs)
        except MedsynthError as exc:
            fail(str(exc))
        except OSError as exc:
            if exc.errno is None:  # not a file-system error (e.g. io.UnsupportedOperation): a bug
                raise
            fail(os_error_message(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper  # type: ignore[return-value]


def check_seed(seed: int | None, option: str = "--seed") -> None:
    """Exit with one ``error:`` line unless ``seed`` is None or in ``0..2**63-1`` (:data:`medsynth.seeds.SEED_MAX`)."""
    from medsynth.seeds import SEED_MAX

    if seed is not None and not 0 <= seed <= SEED_MAX:
        fail(f"{option} {seed}: must be a whole number from 0 to {SEED_MAX} (2**63 - 1)")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ validate


@app.command()
@user_errors
def validate(
    path: Annotated[Path, typer.Argument(help="An MSD dataset JSON, a CSV manifest or an nnU-Net raw folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    memory_limit: Annotated[
        str | None,
        typer.Option("--memory-limit", help="Largest decoded size of one case, e.g. 8GiB; a file claiming more is "
                     "an error (default: a quarter of this machine's memory, at most 16 GiB)."),
    ] = None,
    unlabelled: Annotated[Path | None, typer.Option(help="More unlabelled images to check with the dataset: a manifest, "
                                                    "or a folder of NIfTI / .mha / .nrrd files.")] = None,
) -> None:
    """Decode every file of a dataset and check it; print all problems, or a fingerprint."""
    from medsynth.data.limits import parse_size
    from medsynth.data.validate import print_report, validate_dataset

    limit = None if memory_limit is None else parse_size(memory_limit, what="--memory-limit")
    report = validate_dataset(path, progress=progress and not json_out, memory_limit=limit, unlabelled=unlabelled)
    if json_out:
        print_json(report.to_dict())
    else:
        print_report(report)
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------ phantoms


@app.command()
@user_errors
def phantoms(
    out: Annotated[Path, typer.Argument(help="Output folder for the dataset.")],
    dim: Annotated[int, typer.Option(help="2 for slices, 3 for volumes.")] = 3,
    cases: Annotated[int, typer.Option(help="Number of cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int | None, typer.Option(help="Edge length in voxels (default 64 in 2D, 48 in 3D).")] = None,
    format: Annotated[str, typer.Option("--format", help="msd, nnunet or csv.")] = "msd",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write a labelled head-phantom dataset (the built-in default for the demo, tests and docs)."""
    check_seed(seed)
    from medsynth.data.phantoms import make_phantom_dataset

    path = make_phantom_dataset(out, dim=dim, cases=cases, seed=seed, size=size, format=format, overwrite=overwrite)
    typer.echo(f"wrote {cases} {dim}D phantom cases: {path}")


# ------------------------------------------------------------------------------------ evaluate


@app.command()
@user_errors
def evaluate(
    reference: Annotated[Path, typer.Argument(help="Real images: one NIfTI file, or a dataset (MSD JSON, CSV, nnU-Net folder).")],
    candidate: Annotated[Path, typer.Argument(help="Synthetic images: one NIfTI file, or a dataset paired by case id.")],
    data_range: Annotated[
        str,
        typer.Option("--data-range", help="Intensity range R for SSIM/PSNR: a number, or 'auto' "
                                          "(max - min of each reference image; recorded)."),
    ],
    mask: Annotated[
        str | None,
        typer.Option(help="Restrict paired metrics to a mask: a NIfTI file, or 'labels' (each reference case's label map)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (means and a 'cases' list).")] = False,
    out: Annotated[Path | None, typer.Option(help="Write metrics.csv, summary.json and PNG pictures into this folder.")] = None,
    unpaired: Annotated[
        bool,
        typer.Option("--unpaired", help="Compare two datasets as distributions: radiomic Frechet distance, MMD, "
                                        "diversity, memorisation."),
    ] = False,
    fid_weights: Annotated[
        Path | None,
        typer.Option(help="With --unpaired: FID from a local weights file, a .safetensors (or .pt) state dict of a "
                          "named network (--fid-network); off by default, nothing is downloaded, no code is loaded."),
    ] = None,
    fid_network: Annotated[
        str | None,
        typer.Option(help="The architecture of --fid-weights: medicalnet_resnet10, medicalnet_resnet18, "
                          "medicalnet_resnet34 or medicalnet_resnet50 (default: the name in the file's safetensors "
                          "metadata key medsynth.fid_network)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="With --out: replace the report files in an existing folder (other files stay)."),
    ] = False,
) -> None:
    """Compare synthetic images with real ones: SSIM, PSNR, MAE, MS-SSIM, or distribution metrics."""
    from medsynth.evaluation.evaluate import format_summary, run_evaluate

    summary = run_evaluate(
        reference,
        candidate,
        data_range=data_range,
        mask=mask,
        unpaired=unpaired,
        out=out,
        fid_weights=fid_weights,
        fid_network=fid_network,
        progress=progress,
        overwrite=overwrite,
    )
    if json_out:
        print_json(summary)
    else:
        typer.echo(format_summary(summary))

# ------------------------------------------------------------------------------------ train / sample


def _plain_warnings() -> Any:
    """A context in which Python warnings print as one ``warning: ...`` line on stderr (no file:line).
    Every command runs in it (:func:`user_errors`). medsynth's own warnings (UserWarning) show once per
    place; other categories keep the process's filters (library DeprecationWarnings stay hidden)."""
    import contextlib
    import warnings

    @contextlib.contextmanager
    def ctx() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            warnings.showwarning = lambda message, *a, **k: typer.echo(f"warning: {message}", err=True)
            yield

    return ctx()


def _stage_help() -> str:
    """``ldm: autoencoder, diffusion`` for every staged family of the registry (torch-free)."""
    from medsynth.registry import family_names, get_family

    staged = [get_family(n) for n in family_names() if get_family(n).stages]
    return "; ".join(f"{f.name}: {', '.join(f.stages)}" for f in staged) or "none registered"


@app.command()
@user_errors
def train(
    config: Annotated[Path, typer.Argument(help="A recipe: a YAML file, or a shipped name (see `medsynth recipes`).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Run folder to create (refused if it exists, unless --resume).")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset manifest (overrides data.manifest).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Total steps (overrides training.max_steps).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (overrides training.seed).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest valid checkpoint.")] = False,
    set_: TrainSetOption = None,
    stage: Annotated[str | None, typer.Option(help=f"Training stage of a staged family ({_stage_help()}).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    allow_changed_data: Annotated[bool, typer.Option(
        "--allow-changed-data", help="With --resume: go on although a training file changed since the run started.")
    ] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="ldm: start the diffusion stage although the autoencoder reconstructs below "
        "model.autoencoder.target_psnr (otherwise training stops there with an error).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help=(
        "Print the recipe's parameters and estimated peak training memory (the memory model) and train "
        "nothing; exit 1 when it cannot fit --device-memory."))] = False,
    device_memory: Annotated[str | None, typer.Option("--device-memory", help=(
        "With --dry-run: the memory to fit, e.g. 80GiB (default: 80GiB, or this machine's for a "
        "training.device: cpu recipe)."))] = None,
) -> None:
    """Train a mask-conditioned generator (the recipe's model.family) on a labelled dataset."""
    check_seed(seed)
    from medsynth.config import load_config
    from medsynth.distributed import torchrun_env

    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data.manifest={json.dumps(str(data.resolve()))}")
    if max_steps is not None:
        overrides.append(f"training.max_steps={max_steps}")
    if seed is not None:
        overrides.append(f"training.seed={seed}")
    from medsynth.recipes import recipe_path

    cfg = load_config(recipe_path(config), overrides)
    if dry_run:
        from medsynth.data.limits import format_bytes, parse_size
        from medsynth.training.memory import plan_memory

        limit = None if device_memory is None else parse_size(device_memory, what="--device-memory")
        estimates, available, what = plan_memory(cfg, limit)
        for estimate in estimates:
            typer.echo(estimate.line())
        typer.echo(f"fits the {format_bytes(available)} of the {what}; dry run: nothing trained")
        return
    if out is None:
        fail("--out: the run folder to create is needed (only --dry-run goes without)")
        return
    from medsynth.training import run_training

    with _plain_warnings():
        run_training(cfg, out, resume=resume, stage=stage, progress=progress, allow_changed_data=allow_changed_data,
                     force=force)
    if torchrun_env().is_main:  # under torchrun, rank 0 reports: the last records of metrics.jsonl
        from medsynth.training.report import REPORT_FILE, summary_line

        typer.echo(summary_line(out))
        typer.echo(f"report: {out / REPORT_FILE}")


@app.command()
@user_errors
def report(
    run: Annotated[Path, typer.Argument(help="A training run folder (holds config.yaml and metrics.jsonl).")],
) -> None:
    """Rebuild a run's report.md and curves.png from its folder (also mid-training)."""
    from medsynth.training.report import summary_line, write_report

    path = write_report(run)
    typer.echo(summary_line(run))
    typer.echo(f"report: {path}")


def _check_mask_size(mask: Path, shape: tuple[int, ...], synth: Any) -> None:
    """Exit with one ``error:`` line for a mask too small for the run's networks: padded to the run's
    size multiple, its coarsest feature map would hold a single voxel (normalisation needs more)."""
    mult = int(synth.backend.size_multiple)
    spatial = list(shape)
    if synth.dim == 2 and len(spatial) == 3:  # generated slice by slice
        del spatial[synth.info.slice_axis]
    if all(-(-s // mult) == 1 for s in spatial):
        fail(f"{mask}: a mask of shape {tuple(shape)} is too small for this run; at least one side must be longer "
             f"than {mult} voxels (the run's size multiple)")


@app.command()
@user_errors
def sample(
    run: Annotated[Path, typer.Argument(help="A trained run folder (holds model_card.json), or a downloaded MAISI CT "
                                        "bundle folder (configs/, models/; needs --labels; docs/maisi.md).")],
    mask: Annotated[Path, typer.Option("--mask", help="Label map (NIfTI) to generate an image for.")],
    out: Annotated[Path, typer.Option("--out", help="Output image (.nii.gz), written with the mask's on-disk shape, "
                                      "affine and header (codes, units, description).")],
    seed: Annotated[int, typer.Option(help="Seed of the latent (same seed, same image).")] = 0,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (diffusion runs).")] = None,
    sampler: Annotated[str | None, typer.Option(help="ddpm, ddim or rflow (diffusion runs).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale (diffusion runs).")] = None,
    class_value: Annotated[str | None, typer.Option("--class", help="Condition class (class-conditioned runs).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress (slices or chunks generated, ETA) on stderr.")] = True,
    labels: Annotated[Path | None, typer.Option("--labels", help="With a bundle: the YAML mapping of the mask's "
                                                "labels to the bundle's (`medsynth bundle-labels` writes one).")] = None,
) -> None:
    """Generate one image for a label map from a trained run (or a MAISI CT bundle: an image in HU)."""
    check_seed(seed)
    if sampler is not None and sampler not in ("ddpm", "ddim", "rflow"):
        fail(f"--sampler {sampler!r}: expected ddpm, ddim or rflow")
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: expected auto, cpu or cuda")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        fail(f"--guidance {guidance}: must be a finite number >= 0 (1: no guidance)")
    if steps is not None and steps < 1:
        fail(f"--steps {steps}: must be at least 1")
    from medsynth.data.nifti import NIFTI_SUFFIXES, read_volume, volume_suffix, write_volume

    if out.is_symlink() and not out.exists():
        fail(f"{out}: is a symbolic link to a missing target")
    if out.is_dir():
        fail(f"--out {out} is a folder; name the image file to write, e.g. {out / 'image.nii.gz'}")
    if volume_suffix(out) not in NIFTI_SUFFIXES:
        fail(f"--out {out}: the image is written as NIfTI; name it .nii.gz or .nii")
    if out.exists() and not overwrite:
        fail(f"{out}: exists; pass --overwrite to replace it")
    from medsynth.bundles import is_bundle

    if labels is not None or is_bundle(run):
        if sampler not in (None, "rflow", "ddpm") or guidance is not None or class_value is not None:
            fail("a bundle samples with its own scheduler: --sampler, --guidance and --class do not apply")
        from medsynth.bundles.sampler import sample_file

        with _plain_warnings():
            source, hu = sample_file(run, labels, mask, seed=seed, steps=steps, device=device)
        write_volume(out, hu.array, source.affine, kind="image", like=source)
        typer.echo(f"wrote {out} (shape {tuple(hu.array.shape)}, HU, seed {seed})")
        return
    from medsynth.synthesis.synthesizer import Synthesizer

    with _plain_warnings():
        synth = Synthesizer.from_run(run, device=device)
        if class_value is not None and len(synth.info.classes) <= 1:
            fail(f"--class {class_value!r}: the run {run} is not class-conditioned (trained without data.class_key)")
        label = read_volume(mask, kind="label")
        _check_mask_size(mask, label.array.shape, synth)
        image = synth.generate_volume(label, seed, class_value=class_value, steps=steps, sampler=sampler,
                                      guidance=guidance, progress=progress)
    if image.array.ndim == label.array.ndim:
        write_volume(out, image.array, label.affine, kind="image", like=label)
        typer.echo(f"wrote {out} (shape {tuple(image.array.shape)}, seed {seed})")
        return
    # a multi-channel run: one file per channel, named like nnU-Net's (OUT_0000.nii.gz, OUT_0001.nii.gz, ...)
    from medsynth.data.nifti import strip_suffix, volume_suffix

    names = [out.with_name(f"{strip_suffix(out)}_{c:04d}{volume_suffix(out) or '.nii.gz'}")
             for c in range(image.array.shape[0])]
    clash = [str(n) for n in names if n.exists()]
    if clash and not overwrite:
        fail(f"{', '.join(clash)}: exist; pass --overwrite to replace them")
    for c, name in enumerate(names):
        write_volume(name, image.array[c], label.affine, kind="image", like=label)
    typer.echo(f"wrote {len(names)} channels {names[0]} ... {names[-1]} (shape {tuple(image.array.shape[1:])}, seed {seed})")

@app.command("bundle-labels")
@user_errors
def bundle_labels(
    bundle: Annotated[Path, typer.Argument(help="A downloaded MAISI CT bundle folder (configs/label_dict.json).")],
    data: Annotated[Path, typer.Option("--data", help="The dataset whose label names to map (MSD JSON or nnU-Net raw folder).")],
    out: Annotated[Path, typer.Option("--out", help="The mapping YAML to write (check every line before use).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing mapping file.")] = False,
) -> None:
    """Write a first mapping of a dataset's labels onto a MAISI bundle's vocabulary, by name similarity."""
    from medsynth.bundles.sampler import write_mapping_file

    path = write_mapping_file(bundle, data, out, overwrite=overwrite)
    typer.echo(f"wrote {path}: check every line (names were matched by spelling), then pass it as --labels")

# ------------------------------------------------------------------------------------ augment


def _one_of(names: Sequence[str]) -> str:
    """``a, b or c``."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _method_help() -> str:
    """``synthseg, classic, gan or ldm``: every method of the family registry (torch-free)."""
    from medsynth.registry import method_names

    return (f"{_one_of(method_names())} (a trained model's family needs --model), or pseudo (the unlabelled images "
            "with their propagated masks; needs --anatomy unlabelled:BANK).")


@app.command()
@user_errors
def augment(
    input: Annotated[Path, typer.Argument(help="An MSD dataset JSON, a CSV manifest or an nnU-Net raw folder.")],
    method: Annotated[str, typer.Option(help=_method_help())],
    num: Annotated[int, typer.Option(help="Number of synthetic cases to make.")],
    out: Annotated[Path, typer.Option(help="Output folder (written in the input's format).")],
    seed: Annotated[int, typer.Option(help="Job seed: same seed, same bytes.")] = 0,
    model: Annotated[Path | None, typer.Option(help="Trained run folder (for a model family's --method, e.g. gan), or "
                                              "a downloaded MAISI CT bundle folder with --method ldm and --labels "
                                              "(docs/maisi.md).")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="With a MAISI bundle as --model: the YAML mapping of "
                                                "the dataset's labels to the bundle's (`medsynth bundle-labels`).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the job in OUT (same settings; a larger --num grows a finished job).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier augment output in OUT.")] = False,
    synthetic_only: Annotated[bool, typer.Option("--synthetic-only", help="List only synthetic cases in the manifest.")] = False,
    workers: Annotated[
        int, typer.Option(help="Parallel CPU worker processes (results do not depend on it; each case runs on one thread).")
    ] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and write nothing.")] = False,
    real: Annotated[
        str,
        typer.Option("--real", help="Real cases in OUT: link, copy or reference (their paths; OUT then cannot be moved). "
                     "Default: a hard link on the same file system, else a copy."),
    ] = "auto",
    config: Annotated[str | None, typer.Option(help="Augment settings: a YAML file, or a shipped name (augment: the "
                                               "defaults, documented; see `medsynth recipes`).")] = None,
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    anatomy: Annotated[
        str,
        typer.Option(help="Where new masks come from: deform (random deformations of the labelled masks), "
                     "bank:BANK (a labelled mask warped by a field of an anatomy bank, scaled), or unlabelled:BANK "
                     "(the bank's propagated masks of unlabelled images). BANK: made by `medsynth anatomy`."),
    ] = "deform",
) -> None:
    """Grow a segmentation dataset with synthetic image/label pairs (safely, resumably)."""
    check_seed(seed)
    from medsynth.augment import AugmentOptions, load_augment_config, run_augment
    from medsynth.recipes import recipe_path

    options = AugmentOptions(
        input=input, out=out, method=method, num=num, seed=seed, model=model, labels=labels, resume=resume,
        overwrite=overwrite, synthetic_only=synthetic_only, workers=workers, dry_run=dry_run,
        config=load_augment_config(None if config is None else recipe_path(config, "augment"), set_ or []),
        progress=progress and not json_out, real=real,
        anatomy=anatomy,
    )
    with _plain_warnings():  # e.g. "2D run given a 3D mask" as one line
        summary = run_augment(options)
    if json_out:
        print_json({**summary.to_dict(), "plan": [vars(p) for p in summary.plan] if dry_run else None})
        return
    if dry_run:
        from medsynth.data.limits import format_bytes

        typer.echo(f"plan: {summary.real_cases} real + {summary.synthetic_cases} synthetic cases -> {summary.out} "
                   f"(about {format_bytes(summary.estimated_bytes)} of new files)")
        for p in summary.plan:
            outputs = " ".join([*p.images, p.label])
            typer.echo(f"{p.case_id}  source={p.source}  donor={p.donor or '-'}  {outputs}")
        if summary.synthetic_cases > len(summary.plan):
            typer.echo(f"... and {summary.synthetic_cases - len(summary.plan)} more synthetic cases")
        typer.echo("dry run: nothing written")
        return
    if summary.manifest is None:  # a torchrun rank other than 0
        typer.echo(f"rank {summary.rank}: made {summary.generated} case(s), {summary.reused} already done")
        return
    typer.echo(
        f"wrote {summary.manifest}: {summary.real_cases} real + {summary.synthetic_cases} synthetic cases "
        f"({summary.generated} made now, {summary.reused} verified from before, {summary.redraws} QC redraw(s)) "
        f"in {summary.seconds:.1f} s"
    )

# ------------------------------------------------------------------------------------ anatomy


@app.command()
@user_errors
def anatomy(
    dataset: Annotated[Path, typer.Argument(help="The labelled dataset: MSD JSON, CSV or nnU-Net raw folder (its "
                                            "unlabelled cases, e.g. imagesTs, join the pool).")],
    out: Annotated[Path, typer.Option(help="The bank folder to write.")],
    unlabelled: Annotated[Path | None, typer.Option(help="More unlabelled images: a manifest, or a folder of NIfTI / "
                                                    ".mha / .nrrd files.")] = None,
    transform: Annotated[str, typer.Option(help="deformable (affine, then deformable) or affine.")] = "deformable",
    deformable: Annotated[str | None, typer.Option(help="The deformable stage: demons or bspline (default: the "
                                                   "registration settings' own).")] = None,
    fusion: Annotated[str, typer.Option(help="intensity (the atlases' votes as a prior, times an intensity model per "
                                        "label fitted on the image), majority (vote) or weighted (locally weighted "
                                        "voting).")] = "intensity",
    fields: Annotated[bool, typer.Option(help="Keep every displacement field (for augment --anatomy bank:BANK).")] = True,
    loo: Annotated[bool, typer.Option(help="Measure leave-one-out Dice on the labelled cases.")] = True,
    threads: Annotated[int, typer.Option(help="Threads per registration.")] = 1,
    seed: Annotated[int, typer.Option(help="Registration sampling seed: same seed, same bank.")] = 0,
    workers: Annotated[int, typer.Option(help="Processes, one unlabelled image each.")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Finish a bank a killed run left in OUT.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Fit the bank in OUT again.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress with an ETA.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Fit an anatomy bank: register the labelled cases to each unlabelled image and fuse their labels.

    A bank holds one propagated mask per unlabelled image (with an agreement map), the displacement fields,
    and the leave-one-out accuracy of propagation; `augment --anatomy bank:BANK | unlabelled:BANK` draws
    new masks from it."""
    check_seed(seed)
    from dataclasses import replace

    from medsynth.registration import RegistrationSettings
    from medsynth.registration.bank import BankOptions, fit_bank

    if transform not in ("deformable", "affine"):
        fail(f"--transform {transform!r}: must be deformable or affine")
    if fusion not in ("intensity", "majority", "weighted"):
        fail(f"--fusion {fusion!r}: must be intensity, majority or weighted")
    if not 1 <= threads <= 64:
        fail(f"--threads {threads}: must be from 1 to 64")
    if deformable not in (None, "demons", "bspline"):
        fail(f"--deformable {deformable!r}: must be demons or bspline")
    settings = replace(RegistrationSettings(), transform=transform, threads=threads, seed=seed)  # type: ignore[arg-type]
    if deformable is not None:
        settings = replace(settings, deformable=deformable)  # type: ignore[arg-type]
    options = BankOptions(dataset=dataset, out=out, unlabelled=unlabelled, registration=settings,
                          fusion=fusion, loo=loo, keep_fields=fields, workers=workers,  # type: ignore[arg-type]
                          resume=resume, overwrite=overwrite, progress=progress and not json_out)
    with _plain_warnings():
        summary = fit_bank(options)
    if json_out:
        print_json(summary.to_dict())
        return
    typer.echo(f"wrote {summary.out / 'bank.json'}: {summary.targets} propagated mask(s) ({summary.fitted} fitted now, "
               f"{summary.reused} from before, {summary.skipped_pairs} pair(s) skipped) in {summary.seconds:.0f} s")
    dl = summary.loo.get("deformable", {})
    if dl:
        typer.echo("leave-one-out Dice (mean over labels): " + ", ".join(
            f"{k} {v.get('mean', float('nan')):.3f}" for k, v in summary.loo.items()))


# ------------------------------------------------------------------------------------ export


def _format_help() -> str:
    """``nnunet, csv or msd``: every format of the manifest-format registry (torch-free)."""
    from medsynth.data.formats import format_names

    return _one_of(format_names())


@app.command()
@user_errors
def export(
    dataset: Annotated[Path, typer.Argument(help="The dataset: an MSD JSON, a CSV manifest or an nnU-Net raw folder.")],
    format: Annotated[str, typer.Option("--format", help=f"The new dataset's format: {_format_help()}.")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the dataset (nnU-Net: named DatasetNNN_Name, "
                                      "e.g. $nnUNet_raw/Dataset002_Brain).")],
    name: Annotated[str | None, typer.Option(help="The name its manifest declares (default: nnU-Net: the --out "
                                                "folder's name; other formats: the input's).")] = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy every file (default: a hard link where the file system "
                                       "allows, else a copy).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Write a dataset in another format (e.g. an augmented MSD dataset as an nnU-Net raw dataset)."""
    from medsynth.data.export import export_dataset

    summary = export_dataset(dataset, out, format, name=name, copy=copy, progress=progress and not json_out)
    if json_out:
        print_json(summary.to_dict())
        return
    typer.echo(f"wrote {summary.manifest}: {summary.cases} cases as {summary.format} dataset {summary.name!r} "
               f"({summary.linked} file(s) linked, {summary.copied} copied, {summary.rewritten} rewritten)")

# ------------------------------------------------------------------------------------ recipes


@app.command()
@user_errors
def recipes() -> None:
    """List the recipes that ship with medsynth (use a name wherever a recipe file is asked for)."""
    from medsynth.recipes import list_recipes, recipes_dir

    found = list_recipes()
    width = max(len(r.name) for r in found)
    for kind, heading in (("train", "Training recipes (medsynth train NAME --data DATASET --out RUN):"),
                          ("augment", "Augment configs (medsynth augment DATASET --config NAME, or a copy: --config FILE):")):
        typer.echo(heading)
        for r in found:
            if r.kind == kind:
                typer.echo(f"  {r.name:<{width}}  {r.description}")
    typer.echo(f"files: {recipes_dir()}")

# ------------------------------------------------------------------------------------ downstream


def _parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); a single number ``N`` -> (0, ..., N-1); ``"5,"`` -> (5,)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        if len(parts) == 1:
            return tuple(range(int(parts[0])))
        return tuple(int(p) for p in parts if p)
    except ValueError:
        fail(f"--seeds {text!r}: expected a number of seeds (3) or a list (0,1,2)")
    return ()


@app.command()
@user_errors
def downstream(
    train: Annotated[Path, typer.Argument(help="Real training set: MSD JSON, CSV or nnU-Net raw folder.")],
    out: Annotated[Path, typer.Option(help="Output folder: summary.json, metrics.csv, report.md, dice.png.")],
    test: Annotated[Path | None, typer.Option(help="Held-out labelled test set (default: K-fold over TRAIN).")] = None,
    synthetic: Annotated[
        list[Path] | None, typer.Option("--synthetic", help="A dataset written by `medsynth augment`; repeatable.")
    ] = None,
    seeds: Annotated[str, typer.Option(help="Training seeds: a count N means seeds 0..N-1; a list like 0,1,2 names them "
                                        "(one particular seed: 5, with the comma).")] = "3",
    steps: Annotated[int, typer.Option(help="Optimizer steps per model (the same for every variant).")] = 500,
    network: Annotated[str, typer.Option(help="unet or dynunet (MONAI), sized from the data.")] = "unet",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step.")] = 8,
    folds: Annotated[int, typer.Option(help="Folds of the cross-validation without --test.")] = 3,
    channels: Annotated[int | None, typer.Option(help="Channels of the network's first level (default 16).")] = None,
    patch_size: Annotated[
        int | None, typer.Option("--patch-size", help="Largest patch side (default 256 in 2D, 96 in 3D).")
    ] = None,
    real_fraction: Annotated[
        float, typer.Option("--real-fraction", help="Share of real samples in batches with a synthetic set.")
    ] = 0.5,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    workers: Annotated[int, typer.Option(help="Processes making training batches (results do not depend on it).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier downstream run's outputs in OUT.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    plain_sets: Annotated[bool, typer.Option(help="Also train real+SET without online classic augmentation "
                                             "(--no-plain-sets: only real+SET+classic per set, half the time).")] = True,
) -> None:
    """Train the same segmenter on real, real+classic, real+SET, real+SET+classic; compare Dice/HD95 on a test set."""
    from medsynth.evaluation.downstream import DownstreamOptions, run_downstream
    from medsynth.evaluation.downstream.report import format_table

    options = DownstreamOptions(
        train=train, test=test, synthetic=tuple(synthetic or ()), out=out, seeds=_parse_seeds(seeds), steps=steps,
        network=network, batch_size=batch_size, folds=folds, device=device, channels=channels,  # type: ignore[arg-type]
        patch_size=patch_size, real_fraction=real_fraction, workers=workers, overwrite=overwrite,
        progress=progress and not json_out, plain_sets=plain_sets,
    )
    with _plain_warnings():
        summary = run_downstream(options)
    if json_out:
        print_json(summary.to_dict())
        return
    typer.echo(format_table(summary).rstrip())
    typer.echo(f"wrote {out / 'report.md'} ({summary.seconds:.0f} s)")

# ------------------------------------------------------------------------------------ demo


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, runs and report.")] = Path("medsynth-demo"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
    quick: Annotated[bool, typer.Option(help="A smoke run: every stage, tiny sizes (seconds; numbers not meaningful).")] = False,
) -> None:
    """Run the whole job on the built-in phantom dataset and write DIR/report.md."""
    from medsynth.demo import run_demo

    result = run_demo(out, overwrite=overwrite, quick=quick)
    typer.echo(str(result.report))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
