"""Fuzz: hostile volumes, manifests, model cards and options against ``medsynth validate``,
``medsynth evaluate``, ``medsynth augment --dry-run`` and ``medsynth sample``.

A seeded generator writes hostile NIfTI (.nii, .nii.gz, NIfTI-2), MetaImage (.mha, .mhd) and NRRD
(.nrrd, .nhdr) files and manifests: the reproductions of the bounded-read bugs (symlinks to devices,
FIFOs, gzip bombs, tiny headers claiming gigabytes, data files outside the dataset) and random
mutations of valid files (dims, datatype, bitpix, vox_offset, scl_slope/inter, pixdim, qform/sform,
magic, truncated or extended payloads, corrupt gzip streams; MetaImage/NRRD header fields; JSON types,
NaN, huge numbers). The cases run through the CLI (typer's CliRunner) in a few subprocesses, each under
``RLIMIT_AS`` and with an alarm per case. Every case must end in exit code 0 or 1 with an ``error``
message and no traceback, within its time, and the subprocess's peak RSS must stay bounded.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

SEED = 20240613
RANDOM_NIFTI = 90  # random NIfTI header/payload mutations
RANDOM_ITK = 30  # random MetaImage / NRRD header mutations
RANDOM_MANIFEST = 24  # random JSON manifest mutations
RANDOM_CARDS = 16  # random model card mutations (sample)
#: the fixed reproductions, each also run through augment --dry-run
REPRODUCTIONS = ("dev-zero-link", "fifo-label", "dir-as-label", "dangling-label", "zeros-after-data", "members-1.6GB",
                 "claims-1.6GB-members", "tiny-nii-claims-2GB", "nii-claims-2GB", "nrrd-bomb", "mhd-dev-zero",
                 "mhd-passwd", "mhd-fifo-data", "mhd-link-dev-zero")
ADDRESS_SPACE = 3 << 30  # RLIMIT_AS of each runner process (bytes)
PEAK_RSS = 1 << 30  # the most resident memory a runner may reach (bytes)
CASE_SECONDS = 10  # alarm per case
MiB = 1 << 20

# Unexpected exceptions inside validate are reported as "... could not be checked (Type: ...)" or
# "cannot be read (Type: ...)": a hostile file must be refused on purpose, not by accident.
SURPRISES = ("could not be checked (", "cannot be read (", "cannot read manifest (", "too large to", "MemoryError")

RUNNER = r"""
import json, resource, signal, sys, time
limit, cases_file, results_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from typer.testing import CliRunner
from medsynth.cli import app

class CaseTimeout(BaseException):
    pass

def alarm(signum, frame):
    raise CaseTimeout()

signal.signal(signal.SIGALRM, alarm)
results = []
for case in json.load(open(cases_file)):
    t0 = time.perf_counter()
    signal.alarm(case["seconds"])
    try:
        r = CliRunner().invoke(app, case["args"])
        code, output = r.exit_code, r.output
        exc = None if r.exception is None or isinstance(r.exception, SystemExit) else repr(r.exception)[:300]
    except CaseTimeout:
        code, output, exc = None, "", "timeout"
    finally:
        signal.alarm(0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.append({"name": case["name"], "code": code, "output": output[-2000:], "exception": exc,
                    "seconds": time.perf_counter() - t0, "peak_rss": rss})
json.dump(results, open(results_file, "w"))
"""


@dataclass
class Case:
    """One CLI call: ``args`` after ``medsynth``; ``expect_ok`` for the valid controls."""

    name: str
    args: list[str]
    seconds: int = CASE_SECONDS
    expect_ok: bool = False


# ------------------------------------------------------------------------------------ valid material


def _image(shape: tuple[int, ...] = (16, 16, 12)) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (np.sin(i / 3.0) + np.cos(j / 4.0) + k / 6.0).astype(np.float32)


def _label(shape: tuple[int, ...] = (16, 16, 12)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 4:12, 3:9] = 1
    lab[6:10, 6:10, 4:8] = 2
    return lab


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _nifti_bytes(array: np.ndarray, version: int = 1) -> bytes:
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    img = klass(array, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    return img.to_bytes()


def _dataset(folder: Path, image: tuple[str, bytes] | None = None, label: tuple[str, bytes] | None = None) -> Path:
    """An MSD dataset with one valid case and one case made of the given (name, bytes) files."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "imagesTr" / "good.nii.gz").write_bytes(gzip.compress(_nifti_bytes(_image()), 1))
    (folder / "labelsTr" / "good.nii.gz").write_bytes(gzip.compress(_nifti_bytes(_label()), 1))
    img_name, img_bytes = image or ("case.nii.gz", gzip.compress(_nifti_bytes(_image()), 1))
    lab_name, lab_bytes = label or ("case.nii.gz", gzip.compress(_nifti_bytes(_label()), 1))
    (folder / "imagesTr" / img_name).write_bytes(img_bytes)
    (folder / "labelsTr" / lab_name).write_bytes(lab_bytes)
    manifest = {
        "name": "fuzz", "labels": {"0": "background", "1": "a", "2": "b"}, "modality": {"0": "MR"},
        "numTraining": 2,
        "training": [{"image": "imagesTr/good.nii.gz", "label": "labelsTr/good.nii.gz"},
                     {"image": f"imagesTr/{img_name}", "label": f"labelsTr/{lab_name}"}],
    }
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder / "dataset.json"


# ------------------------------------------------------------------------------------ NIfTI mutations

_N1_FIELDS = {  # name: (offset, struct format) in a little-endian NIfTI-1 header
    **{f"dim[{i}]": (40 + 2 * i, "<h") for i in range(8)},
    "datatype": (70, "<h"), "bitpix": (72, "<h"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), **{f"pixdim[{i}]": (76 + 4 * i, "<f") for i in range(8)},
    "qform_code": (252, "<h"), "sform_code": (254, "<h"), "quatern_b": (256, "<f"), "quatern_c": (260, "<f"),
    "quatern_d": (264, "<f"), "qoffset_x": (268, "<f"), **{f"srow[{i}]": (280 + 4 * i, "<f") for i in range(12)},
    "sizeof_hdr": (0, "<i"), "intent_code": (68, "<h"), "glmax": (140, "<i"),
}
_N2_FIELDS = {
    **{f"dim[{i}]": (16 + 8 * i, "<q") for i in range(8)}, "datatype": (12, "<h"), "bitpix": (14, "<h"),
    "vox_offset": (168, "<q"), "scl_slope": (176, "<d"), **{f"pixdim[{i}]": (104 + 8 * i, "<d") for i in range(8)},
}
_INTS = [0, 1, -1, 2, 3, 4, 7, 8, 9, 255, 256, 1000, 2000, 32767, -32768]
_BIG_INTS = [2**31 - 1, -(2**31), 2**40, 2**62, 348, 540, 352, 544]
_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-30, 1e30, 3.4e38, math.nan, math.inf, -math.inf, 352.0, 352.5, 1e9]
_DTYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 3, 9999, -1]


def _pack(fmt: str, value: float) -> bytes:
    if fmt[-1] in "hiq":
        bits = {"h": 16, "i": 32, "q": 64}[fmt[-1]]
        value = int(value) if math.isfinite(value) else 0
        value = (value + 2 ** (bits - 1)) % 2**bits - 2 ** (bits - 1)  # wrap into range
    return struct.pack(fmt, value)


def _mutate_nifti(rng: np.random.Generator, raw: bytes, version: int) -> tuple[bytes, str]:
    fields = _N1_FIELDS if version == 1 else _N2_FIELDS
    b = bytearray(raw)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        name = list(fields)[int(rng.integers(len(fields)))]
        offset, fmt = fields[name]
        if name == "datatype":
            value: float = _DTYPES[int(rng.integers(len(_DTYPES)))]
        elif fmt[-1] in "hiq":
            pool = _INTS + (_BIG_INTS if fmt[-1] != "h" else [])
            value = pool[int(rng.integers(len(pool)))]
        else:
            value = _FLOATS[int(rng.integers(len(_FLOATS)))]
        b[offset:offset + struct.calcsize(fmt)] = _pack(fmt, value)
        done.append(f"{name}={value}")
    roll = rng.random()
    if roll < 0.2:
        cut = int(rng.integers(0, len(b)))
        b = b[:cut]
        done.append(f"cut@{cut}")
    elif roll < 0.35:
        extra = int(rng.integers(1, 4096))
        b += rng.integers(0, 256, extra, dtype=np.uint8).tobytes()
        done.append(f"+{extra}B")
    elif roll < 0.45:
        pos = int(rng.integers(0, len(b)))
        b[pos] ^= 1 << int(rng.integers(8))
        done.append(f"flip@{pos}")
    return bytes(b), ",".join(done)


def _gzip_mutation(rng: np.random.Generator, gz: bytes) -> tuple[bytes, str]:
    roll = rng.random()
    if roll < 0.25:
        cut = int(rng.integers(2, len(gz)))
        return gz[:cut], f"gzcut@{cut}"
    if roll < 0.4:
        b = bytearray(gz)
        pos = int(rng.integers(10, len(b)))
        b[pos] ^= 0xFF
        return bytes(b), f"gzflip@{pos}"
    if roll < 0.5:
        return gz + b"garbage after the stream", "gztrail"
    return gz, ""


# ------------------------------------------------------------------------------------ fixed reproductions


def _gzip_with_zeros(parts: list[bytes], zeros: int) -> bytes:
    co = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [co.compress(p) for p in parts] + [co.compress(bytes(MiB)) for _ in range(zeros // MiB)]
    return b"".join(out) + co.flush()


def _claim(raw: bytes, shape: tuple[int, ...]) -> bytes:
    b = bytearray(raw)
    struct.pack_into("<8h", b, 40, len(shape), *shape, *([1] * (7 - len(shape))))
    return bytes(b)


def _itk_files(folder: Path, name: str, array: np.ndarray, compress: bool = False) -> dict[str, bytes]:
    """The files SimpleITK writes for ``name`` (header, and a detached data file if any)."""
    tmp = folder / "_itk"
    tmp.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing((1.0, 1.0, 2.0))  # the grid of AFFINE, in ITK's LPS world
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp / name), compress)
    files = {p.name: p.read_bytes() for p in tmp.iterdir()}
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return files


def _reproductions(root: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, dataset manifest, hostile file) for each fixed reproduction."""
    out: list[tuple[str, Path, Path | None]] = []
    lab = _nifti_bytes(_label())
    img = _nifti_bytes(_image())

    def add(name: str, **files: tuple[str, bytes]) -> Path:
        manifest = _dataset(root / name, **files)
        out.append((name, manifest, None))
        return manifest

    m = add("dev-zero-link")
    target = m.parent / "labelsTr" / "case.nii.gz"
    target.unlink()
    target.symlink_to("/dev/zero")
    m = add("fifo-label")
    target = m.parent / "labelsTr" / "case.nii.gz"
    target.unlink()
    os.mkfifo(target)
    m = add("dir-as-label")
    target = m.parent / "labelsTr" / "case.nii.gz"
    target.unlink()
    target.mkdir()
    m = add("dangling-label")
    target = m.parent / "labelsTr" / "case.nii.gz"
    target.unlink()
    target.symlink_to(root / "nowhere.nii.gz")
    add("zeros-after-data", label=("case.nii.gz", _gzip_with_zeros([lab], 32 * MiB)))
    member = _gzip_with_zeros([], 16 * MiB)
    add("members-1.6GB", label=("case.nii.gz", gzip.compress(lab, 1) + member * 100))
    add("claims-1.6GB-members", label=("case.nii.gz", gzip.compress(_claim(lab, (1600, 1024, 1024)), 1) + member * 100))
    add("tiny-nii-claims-2GB", label=("case.nii", _claim(lab, (2000, 1000, 1000))[:352]))
    add("nii-claims-2GB", image=("case.nii", _claim(img, (2000, 1000, 1000))))
    add("plain-named-gz", label=("case.nii.gz", lab))
    add("gz-named-nii", label=("case.nii", gzip.compress(lab)))
    add("empty-label", label=("case.nii.gz", b""))
    nrrd = _itk_files(root, "v.nrrd", _label(), compress=True)["v.nrrd"]
    head = nrrd.split(b"\n\n")[0] + b"\n\n"
    add("nrrd-bomb", label=("case.nrrd", head + _gzip_with_zeros([bytes(16 * 16 * 12)], 32 * MiB)))
    add("nrrd-claims-1.5GB", label=("case.nrrd", head.replace(b"sizes: 16 16 12", b"sizes: 1500 1000 1000")
                                    + _gzip_with_zeros([], 8 * MiB)))
    mhd = _itk_files(root, "v.mhd", _label())
    text = mhd["v.mhd"].decode()
    for name, data_file, dims in (("mhd-dev-zero", "/dev/zero", "1500 1000 1000"), ("mhd-passwd", "/etc/passwd", "10 10 1"),
                                  ("mhd-list", "LIST", "16 16 12"), ("mhd-pattern", "slice%03d.raw 1 12 1", "16 16 12")):
        hdr = text.replace("DimSize = 16 16 12", f"DimSize = {dims}").replace("ElementDataFile = v.raw",
                                                                               f"ElementDataFile = {data_file}")
        add(name, label=("case.mhd", hdr.encode()))
    m = add("mhd-fifo-data", label=("case.mhd", text.replace("v.raw", "case.raw").encode()))
    os.mkfifo(m.parent / "labelsTr" / "case.raw")
    m = add("mhd-link-dev-zero", label=("case.mhd", text.replace("v.raw", "case.raw").encode()))
    (m.parent / "labelsTr" / "case.raw").symlink_to("/dev/zero")
    m = add("mhd-valid", label=("case.mhd", text.replace("v.raw", "case.raw").encode()))
    (m.parent / "labelsTr" / "case.raw").write_bytes(mhd["v.raw"])
    out[-1] = ("mhd-valid", m, None)
    return out


# ------------------------------------------------------------------------------------ ITK mutations

_MHA_VALUES = ["0", "-1", "1e30", "abc", "", "1500 1000 1000", "16 16", "16 16 12 2", "99999999999999999999",
               "MET_FLOAT", "MET_STRING", "True", "False", "LIST", "/dev/zero", "../../etc/passwd", "4", "2"]
_NRRD_VALUES = ["0", "-1", "abc", "", "1500 1000 1000", "16 16", "16 16 12 3", "bzip2", "ascii", "hex", "gzip",
                "block", "double", "int64", "/dev/zero", "LIST", "-1", "99999999999999999999", "big", "little"]


def _mutate_itk(rng: np.random.Generator, root: Path, k: int) -> tuple[str, Path]:
    kind = [".mha", ".mhd", ".nrrd", ".nhdr"][k % 4]
    files = _itk_files(root, "v" + kind, _label(), compress=bool(rng.integers(2)) and kind in (".mha", ".nrrd"))
    header_name = "v" + kind
    raw = files[header_name]
    sep = b"ElementDataFile" if kind in (".mha", ".mhd") else b"\n\n"
    cut = raw.find(sep)
    head, tail = (raw[:cut], raw[cut:]) if cut >= 0 else (raw, b"")
    lines = head.split(b"\n")
    done = []
    for _ in range(int(rng.integers(1, 3))):
        i = int(rng.integers(1 if kind in (".nrrd", ".nhdr") else 0, max(len(lines), 2)))
        i = min(i, len(lines) - 1)
        roll = rng.random()
        if roll < 0.6 and (b"=" in lines[i] or b": " in lines[i]):
            key = lines[i].split(b"=" if b"=" in lines[i] else b": ")[0]
            values = _MHA_VALUES if kind in (".mha", ".mhd") else _NRRD_VALUES
            value = values[int(rng.integers(len(values)))].encode()
            lines[i] = key + (b"= " if kind in (".mha", ".mhd") else b": ") + value
            done.append(f"{key.decode().strip()}={value.decode()}")
        elif roll < 0.75:
            lines.insert(i, lines[i])
            done.append(f"dup{i}")
        elif roll < 0.9:
            done.append(f"del{i}:{lines.pop(i)[:20]!r}")
        else:
            lines[i] = lines[i].upper()
            done.append(f"upper{i}")
    raw = b"\n".join(lines) + tail
    if rng.random() < 0.3:
        raw = raw[: int(rng.integers(len(raw) // 2, len(raw)))]
        done.append("cut")
    name = f"itk{k:03d}-{kind[1:]}"
    extra = {n: b for n, b in files.items() if n != header_name}
    manifest = _dataset(root / name, label=("case" + kind, raw))
    for n, b in extra.items():  # a detached data file keeps its name ("v.raw") beside the header
        (manifest.parent / "labelsTr" / n).write_bytes(b)
    return f"{name}:{';'.join(done)}", manifest


# ------------------------------------------------------------------------------------ manifests

_JSON_VALUES: list[object] = [None, True, 0, -1, 1e308, "x", "", [], {}, [1, 2], {"a": 1}, math.nan, math.inf,
                              10**30, "../../etc/passwd", "/dev/zero", "imagesTr/" + "a" * 300, "4", -(10**30)]
_MANIFEST_PATHS = [("numTraining",), ("labels",), ("labels", "1"), ("modality",), ("modality", "0"), ("training",),
                   ("training", 0), ("training", 1, "image"), ("training", 1, "label"), ("training", 1),
                   ("name",), ("test",), ("validation",)]


def _mutate_manifest(rng: np.random.Generator, root: Path, k: int) -> tuple[str, Path]:
    manifest = _dataset(root / f"manifest{k:03d}")
    data = json.loads(manifest.read_text())
    done = []
    for _ in range(int(rng.integers(1, 3))):
        path = _MANIFEST_PATHS[int(rng.integers(len(_MANIFEST_PATHS)))]
        value = _JSON_VALUES[int(rng.integers(len(_JSON_VALUES)))]
        node = data
        for key in path[:-1]:
            if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) and key < len(node):
                node = node[key]
            else:
                node = None
                break
        if isinstance(node, dict) or isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
            node[path[-1]] = value  # type: ignore[index]
            done.append(f"{'.'.join(map(str, path))}={str(value)[:20]}")
    manifest.write_text(json.dumps(data))  # NaN and Infinity written as the bare words
    return f"manifest{k:03d}:{';'.join(done)}", manifest


def _fixed_manifests(root: Path) -> list[tuple[str, Path]]:
    texts = {
        "top-list": "[1, 2, 3]", "empty": "", "binary": "\x00\x01\x02", "deep": "[" * 100000 + "]" * 100000,
        "bom-nan": "\ufeff{\"training\": [], \"numTraining\": NaN}", "huge-number": '{"training": [], "numTraining": 1e999}',
        "dup-keys": '{"training": [], "training": {"a": 1}}',
    }
    out = []
    for name, text in texts.items():
        folder = root / f"json-{name}"
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(text, encoding="utf-8")
        out.append((f"json-{name}", folder / "dataset.json"))
    # an nnU-Net folder with a bad numTraining and a CSV manifest naming a device
    nn = root / "nnunet"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    (nn / "imagesTr" / "c_0000.nii.gz").write_bytes(gzip.compress(_nifti_bytes(_image())))
    (nn / "labelsTr" / "c.nii.gz").write_bytes(gzip.compress(_nifti_bytes(_label())))
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2},
                                                 "numTraining": "1", "file_ending": ".nii.gz"}))
    out.append(("nnunet-numTraining-str", nn))
    csv = root / "csv"
    csv.mkdir()
    (csv / "cases.csv").write_text("image,label\n/dev/zero,/dev/null\n\x00,\"unterminated\n")
    out.append(("csv-devices", csv / "cases.csv"))
    return out


# ------------------------------------------------------------------------------------ the case list


@dataclass
class FuzzCases:
    """The CLI calls of each target, and the hostile volume files (name, path) the sample target reuses."""

    validate: list[Case]
    evaluate: list[Case]
    augment: list[Case]
    hostile: list[tuple[str, Path]]


def build_cases(root: Path) -> FuzzCases:
    """The validate, evaluate and ``augment --dry-run`` cases, all written under ``root``."""
    rng = np.random.default_rng(SEED)
    validate: list[Case] = []
    evaluate: list[Case] = []
    augment: list[Case] = []
    hostile_files: list[tuple[str, Path]] = []

    def check(name: str, manifest: Path, expect_ok: bool = False) -> None:
        limit = ["--memory-limit", "64MiB"] if len(validate) % 2 else []
        validate.append(Case(name, ["validate", str(manifest), "--no-progress", *limit], expect_ok=expect_ok))
        if len(validate) % 3 == 0 or expect_ok or name in REPRODUCTIONS:
            augment.append(Case(f"augment-{name}", ["augment", str(manifest), "--method", "synthseg", "--num", "2",
                                                    "--out", str(root / "augment-out" / name.split(":")[0]),
                                                    "--dry-run", "--no-progress"], expect_ok=expect_ok))

    # 1. valid controls: the harness must see them pass
    check("control", _dataset(root / "control"), expect_ok=True)
    check("control-nii2", _dataset(root / "control-nii2", image=("case.nii", _nifti_bytes(_image(), 2))), expect_ok=True)
    # 2. the reproductions
    for name, manifest, _ in _reproductions(root / "repro"):
        check(name, manifest, expect_ok=name == "mhd-valid")
        hostile_files.append((name, next((manifest.parent / "labelsTr").glob("case*"))))
    # 3. random NIfTI mutations, as image or label, .nii or .nii.gz, NIfTI-1 or -2
    for k in range(RANDOM_NIFTI):
        version = 2 if k % 9 == 8 else 1
        as_label = bool(k % 2)
        raw = _nifti_bytes(_label() if as_label else _image(), version)
        raw, what = _mutate_nifti(rng, raw, version)
        compressed = bool(rng.integers(2))
        name = "case.nii.gz" if compressed else "case.nii"
        data = gzip.compress(raw, 1) if compressed else raw
        if compressed:
            data, gz_what = _gzip_mutation(rng, data)
            what += f",{gz_what}" if gz_what else ""
        role = "label" if as_label else "image"
        manifest = _dataset(root / f"nifti{k:03d}", **{role: (name, data)})
        check(f"nifti{k:03d}-{role}:{what}", manifest)
        hostile_files.append((f"nifti{k:03d}", manifest.parent / f"{role}sTr" / name))
    # 4. random MetaImage / NRRD mutations
    for k in range(RANDOM_ITK):
        name, manifest = _mutate_itk(rng, root / "itk", k)
        check(name, manifest)
        hostile_files.append((name.split(":")[0], next((manifest.parent / "labelsTr").glob("case*"))))
    # 5. manifests
    for k in range(RANDOM_MANIFEST):
        check(*_mutate_manifest(rng, root / "manifests", k))
    for name, manifest in _fixed_manifests(root / "manifests"):
        check(name, manifest)
    # 6. evaluate: a good reference against hostile candidates and masks, and hostile datasets
    good = root / "good.nii.gz"
    good.write_bytes(gzip.compress(_nifti_bytes(_image())))
    evaluate.append(Case("control", ["evaluate", str(good), str(good), "--data-range", "1", "--no-progress"],
                         expect_ok=True))
    picks = rng.choice(len(hostile_files), size=min(36, len(hostile_files)), replace=False)
    for i, pick in enumerate(sorted(int(p) for p in picks)):
        name, path = hostile_files[pick]
        if i % 3 == 2:
            args = ["evaluate", str(good), str(good), "--data-range", "1", "--mask", str(path), "--no-progress"]
        else:
            args = ["evaluate", str(good), str(path), "--data-range", "auto" if i % 2 else "1", "--no-progress"]
        evaluate.append(Case(f"eval-{name}", args))
    control = root / "control" / "dataset.json"
    for name, manifest in [("zeros-after-data", root / "repro" / "zeros-after-data" / "dataset.json"),
                           ("dev-zero-link", root / "repro" / "dev-zero-link" / "dataset.json"),
                           ("nifti001", root / "nifti001" / "dataset.json"),
                           ("manifest000", root / "manifests" / "manifest000" / "dataset.json")]:
        evaluate.append(Case(f"eval-dataset-{name}", ["evaluate", str(control), str(manifest), "--data-range", "auto",
                                                      "--mask", "labels", "--no-progress"]))
        evaluate.append(Case(f"eval-unpaired-{name}", ["evaluate", str(control), str(manifest), "--data-range", "1",
                                                       "--unpaired", "--no-progress"]))
    # 7. augment: hostile options on the valid control
    for option, value in (("--num", "0"), ("--num", "-1"), ("--num", str(10**12)), ("--num", str(10**6 + 1)),
                          ("--workers", str(10**9)), ("--workers", "0"), ("--seed", "-1"), ("--seed", str(2**64)),
                          ("--method", "nope"), ("--out", str(control.parent)), ("--out", str(control))):
        args = ["augment", str(control), "--method", "synthseg", "--num", "2", "--out", str(root / "augment-out" / "o"),
                "--seed", "0", "--workers", "1", "--dry-run", "--no-progress"]
        args[args.index(option) + 1] = value
        augment.append(Case(f"augment-option{option}={value[:20]}", args))
    return FuzzCases(validate, evaluate, augment, hostile_files)


def _mutate_card(rng: np.random.Generator, card: dict[str, object]) -> str:
    """Set 1-2 random fields of a model card (nested, by path) to hostile JSON values; what was done."""
    done = []
    for _ in range(int(rng.integers(1, 3))):
        path = _CARD_PATHS[int(rng.integers(len(_CARD_PATHS)))]
        value = (_CARD_VALUES + _JSON_VALUES)[int(rng.integers(len(_CARD_VALUES) + len(_JSON_VALUES)))]
        node: object = card
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None  # type: ignore[union-attr]
        if isinstance(node, dict):
            node[path[-1]] = value
            done.append(f"{'.'.join(path)}={str(value)[:20]}")
    return ";".join(done)


_CARD_PATHS = [("version",), ("family",), ("format",), ("config", "model", "generator", "channels"),
               ("config", "model", "generator", "noise_channels"), ("config", "model", "family"), ("config", "data", "size"),
               ("config", "data", "dim"), ("data", "labels"), ("data", "channels"), ("data", "dim"), ("data", "size"),
               ("data", "normalization", "lo"), ("data", "normalization", "mode"), ("data", "classes"), ("steps",),
               ("model", "weights"), ("final_losses",), ("config", "model", "generator", "fill")]
_CARD_VALUES: list[object] = [[3000, 3000, 3000], [8] * 100, [100000, 100000], 99, 2, 3, -5, ["a"], [-1, 2**40], "ldm"]


def _safetensors_mutations(weights: bytes) -> dict[str, bytes]:
    """Hostile model.safetensors files: cut, a header claiming a huge tensor, a huge header length, noise."""
    n = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [100000, 100000, 100]
    header[name]["data_offsets"] = [0, 4 * 10**12]
    huge = json.dumps(header).encode()
    return {"cut": weights[: len(weights) // 2], "claims-4TB": struct.pack("<Q", len(huge)) + huge + weights[8 + n:],
            "header-2^60": struct.pack("<Q", 1 << 60) + weights[8:], "noise": bytes(range(256)) * 8, "empty": b""}


def sample_cases(root: Path, run: Path, mask: Path, hostile: list[tuple[str, Path]]) -> list[Case]:
    """``medsynth sample`` against hostile masks, model cards, weights files and options."""
    rng = np.random.default_rng(SEED + 1)
    out = root / "sample-out"
    cases = [Case("control", ["sample", str(run), "--mask", str(mask), "--out", str(out / "control.nii.gz"),
                              "--no-progress"], expect_ok=True)]
    picks = rng.choice(len(hostile), size=min(24, len(hostile)), replace=False)
    for pick in sorted(int(p) for p in picks):
        name, path = hostile[pick]
        cases.append(Case(f"sample-mask-{name}", ["sample", str(run), "--mask", str(path), "--out",
                                                  str(out / f"{name.split(':')[0]}.nii.gz"), "--no-progress"]))
    card = json.loads((run / "model_card.json").read_text())
    weights = (run / "model.safetensors").read_bytes()
    runs = root / "sample-runs"
    for k in range(RANDOM_CARDS):
        folder = runs / f"card{k:02d}"
        folder.mkdir(parents=True)
        mutated = json.loads(json.dumps(card))
        what = _mutate_card(rng, mutated)
        (folder / "model_card.json").write_text(json.dumps(mutated))
        (folder / "model.safetensors").write_bytes(weights)
        cases.append(Case(f"sample-card{k:02d}:{what}", ["sample", str(folder), "--mask", str(mask), "--out",
                                                        str(out / f"card{k:02d}.nii.gz"), "--no-progress"]))
    for name, data in _safetensors_mutations(weights).items():
        folder = runs / f"weights-{name}"
        folder.mkdir(parents=True)
        (folder / "model_card.json").write_text(json.dumps(card))
        (folder / "model.safetensors").write_bytes(data)
        cases.append(Case(f"sample-weights-{name}", ["sample", str(folder), "--mask", str(mask), "--out",
                                                     str(out / f"w-{name}.nii.gz"), "--no-progress"]))
    for option, value in (("--seed", str(2**64)), ("--seed", "-5"), ("--steps", "-1"), ("--guidance", "nan"),
                          ("--guidance", "inf"), ("--class", "T1"), ("--out", str(out)), ("--out", str(root / "x.png")),
                          ("--device", "tpu"), ("--sampler", "euler")):
        args = ["sample", str(run), "--mask", str(mask), "--out", str(out / "o.nii.gz"), "--no-progress", option, value]
        if option == "--out":
            args = ["sample", str(run), "--mask", str(mask), "--no-progress", "--out", value]
        cases.append(Case(f"sample-option{option}={value[:20]}", args))
    return cases


def _run_batch(cases: list[Case], folder: Path, label: str) -> list[dict[str, object]]:
    cases_file, results_file = folder / f"{label}.cases.json", folder / f"{label}.results.json"
    cases_file.write_text(json.dumps([asdict(c) for c in cases]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    budget = 30 + CASE_SECONDS * 2 + sum(1 for _ in cases)  # a hang beyond the alarms still ends
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(ADDRESS_SPACE), str(cases_file), str(results_file)],
                          capture_output=True, text=True, timeout=budget, env=env, cwd=folder)
    assert proc.returncode == 0, f"runner {label} died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(results_file.read_text())


def _problems(cases: list[Case], results: list[dict[str, object]]) -> list[str]:
    by_name = {c.name: c for c in cases}
    bad = []
    for r in results:
        case = by_name[str(r["name"])]
        output = str(r["output"])
        why = None
        if r["exception"] is not None:
            why = f"exception {r['exception']}"
        elif r["code"] not in (0, 1):
            why = f"exit code {r['code']}"
        elif "Traceback" in output:
            why = "traceback in the output"
        elif case.expect_ok and r["code"] != 0:
            why = "a valid control failed"
        elif r["code"] == 1 and "error" not in output.lower():
            why = "exit 1 without an error message"
        elif any(s in output for s in SURPRISES):
            why = "an unexpected exception reported as a problem"
        if why:
            bad.append(f"{case.name} [{' '.join(case.args[:1])}]: {why}\n    {output.strip()[-600:]}")
    return bad


@pytest.fixture(scope="module")
def fuzz_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FuzzCases]:
    root = tmp_path_factory.mktemp("fuzz")
    return root, build_cases(root)


def test_fuzz_validate(fuzz_cases: tuple[Path, FuzzCases]) -> None:
    root, fuzz = fuzz_cases
    cases = fuzz.validate
    assert len(cases) >= 150
    half = len(cases) // 2
    results = _run_batch(cases[:half], root, "validate-a") + _run_batch(cases[half:], root, "validate-b")
    assert len(results) == len(cases)
    bad = _problems(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad)
    assert max(float(r["seconds"]) for r in results) < CASE_SECONDS
    assert max(int(r["peak_rss"]) for r in results) < PEAK_RSS
    refused = sum(1 for r in results if r["code"] == 1)
    assert refused >= len(cases) * 0.7  # the mutations mostly break files: most cases must be refused


def test_fuzz_evaluate(fuzz_cases: tuple[Path, FuzzCases]) -> None:
    root, fuzz = fuzz_cases
    results = _run_batch(fuzz.evaluate, root, "evaluate")
    bad = _problems(fuzz.evaluate, results)
    assert not bad, f"{len(bad)} of {len(fuzz.evaluate)} cases misbehaved:\n" + "\n".join(bad)
    assert max(int(r["peak_rss"]) for r in results) < PEAK_RSS


def test_fuzz_augment_dry_run(fuzz_cases: tuple[Path, FuzzCases]) -> None:
    root, fuzz = fuzz_cases
    assert len(fuzz.augment) >= 60
    results = _run_batch(fuzz.augment, root, "augment")
    bad = _problems(fuzz.augment, results)
    assert not bad, f"{len(bad)} of {len(fuzz.augment)} cases misbehaved:\n" + "\n".join(bad)
    assert max(int(r["peak_rss"]) for r in results) < PEAK_RSS
    assert not (root / "augment-out").exists()  # a dry run writes nothing, not even an output folder


def test_fuzz_sample(fuzz_cases: tuple[Path, FuzzCases]) -> None:
    from medsynth.config import load_config
    from medsynth.training.engine import train

    root, fuzz = fuzz_cases
    control = root / "control" / "dataset.json"
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/tiny/gan2d.yaml",
                      [f"data.manifest={control}", "training.max_steps=1", "training.preview_every=0"])
    with pytest.warns(UserWarning):  # 3D volumes learned as 2D slices; one step does not beat the fill
        train(cfg, root / "run", progress=False)
    mask = root / "control" / "labelsTr" / "good.nii.gz"
    cases = sample_cases(root, root / "run", mask, fuzz.hostile)
    results = _run_batch(cases, root, "sample")
    bad = _problems(cases, results)
    assert not bad, f"{len(bad)} of {len(cases)} cases misbehaved:\n" + "\n".join(bad)
    assert max(int(r["peak_rss"]) for r in results) < PEAK_RSS
