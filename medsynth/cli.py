"""The ``medsynth`` command line.

Each command parses its options and calls one library function. This is the only place that turns a
:class:`~medsynth.errors.MedsynthError` into a one-line message and a non-zero exit. Heavy imports
(torch, MONAI, nibabel) happen inside the commands so that ``medsynth --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

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
    """Print one clear message to stderr and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn MedsynthError (and Ctrl-C) into a message and an exit code; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medsynth.errors import MedsynthError

        try:
            return func(*args, **kwargs)
        except MedsynthError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------------ validate


@app.command()
@user_errors
def validate(
    path: Annotated[Path, typer.Argument(help="An MSD dataset JSON, a CSV manifest or an nnU-Net raw folder.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Decode every file of a dataset and check it; print all problems, or a fingerprint."""
    from medsynth.data.validate import print_report, validate_dataset

    report = validate_dataset(path, progress=progress and not json_out)
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
    size: Annotated[Optional[int], typer.Option(help="Edge length in voxels (default 64 in 2D, 48 in 3D).")] = None,
    format: Annotated[str, typer.Option("--format", help="msd, nnunet or csv.")] = "msd",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
) -> None:
    """Write a labelled head-phantom dataset (the built-in default for the demo, tests and docs)."""
    from medsynth.data.phantoms import make_phantom_dataset

    path = make_phantom_dataset(out, dim=dim, cases=cases, seed=seed, size=size, format=format, overwrite=overwrite)
    typer.echo(f"wrote {cases} {dim}D phantom cases: {path}")


# ------------------------------------------------------------------------------------ evaluate
# (implemented in medsynth.evaluation; see issue 3)

# ------------------------------------------------------------------------------------ train / sample
# (implemented in medsynth.training and medsynth.synthesis; see issues 4 and 5)

# ------------------------------------------------------------------------------------ augment
# (implemented in medsynth.augment; see issue 6)

# ------------------------------------------------------------------------------------ demo


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, runs and report.")] = Path("medsynth-demo"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo folder.")] = False,
) -> None:
    """Run the whole job on the built-in phantom dataset and write a report."""
    try:
        from medsynth.demo import run_demo
    except ImportError:
        fail("medsynth demo is not yet available")
    run_demo(out, overwrite=overwrite)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
