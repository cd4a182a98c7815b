"""Augment jobs whose bytes do not depend on the worker count or on torch's thread count, and that
grow: ``--resume --num M`` on a finished job of N < M cases writes what a fresh ``--num M`` job writes.

Outputs are compared byte for byte (sha256 of every file, journals excluded: they record the order
in which cases finished)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.augment import AugmentOptions, run_augment
from medsynth.augment import case as case_module
from medsynth.augment.case import JobContext, make_case
from medsynth.augment.facts import gather_facts
from medsynth.augment.layout import OutputLayout
from medsynth.augment.plan import plan_cases
from medsynth.data.manifest import read_manifest
from medsynth.data.nifti import Volume
from medsynth.errors import JobError
from medsynth.journal import JOURNAL_PREFIX
from medsynth.synthesis.pairs import PairSettings, QCConfig


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), journals excluded."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.name.startswith(JOURNAL_PREFIX)}


@pytest.fixture(scope="module")
def data3d(tmp_path_factory) -> Path:
    from medsynth.data.phantoms import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("grow") / "data", dim=3, cases=3, size=16, seed=5)


@pytest.fixture
def two_threads():
    """This process runs torch on two threads (as a user's machine would; the suite pins one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def opts(data: Path, out: Path, **kw) -> AugmentOptions:
    base = dict(input=data, out=out, method="classic", num=3, seed=11)
    base.update(kw)
    return AugmentOptions(**base)


def test_one_two_and_three_workers_write_the_same_bytes(data3d, tmp_path, two_threads):
    # synthseg keeps the spawned workers light; the torch side is the test below
    trees = {}
    for workers in (1, 2, 3):
        s = run_augment(opts(data3d, tmp_path / f"w{workers}", method="synthseg", workers=workers))
        assert s.generated == 3
        trees[workers] = tree(tmp_path / f"w{workers}")
    assert trees[1] == trees[2] == trees[3]
    assert len([k for k in trees[1] if k.startswith("imagesTr/syn_")]) == 3


class ConvSynthesizer:
    """A stand-in trained run: a fixed 1x1x1 Conv3d (16 -> 8 -> 1 channels) over features of the mask.

    On a 40^3 grid torch's CPU kernel for this convolution gives results that differ in the last bits
    between 1 and 2 threads (the cause of ``--workers 2`` writing other bytes than ``--workers 1``)."""

    run_dir = Path("conv-stand-in")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv3d(16, 8, 1)
        self.b = torch.nn.Conv3d(8, 1, 1)
        with torch.no_grad():
            for p in [*self.a.parameters(), *self.b.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.basis = torch.randn(16, 7, generator=g)

    def generate_volume(self, mask: Volume, seed: int, **options: object) -> Volume:
        lab = torch.from_numpy(np.asarray(mask.array, dtype=np.int64)).clamp(0, 6)
        onehot = torch.nn.functional.one_hot(lab, 7).permute(3, 0, 1, 2).float()  # (7, *spatial)
        noise = torch.randn(16, *lab.shape, generator=torch.Generator().manual_seed(seed))
        feats = torch.einsum("fl,l...->f...", self.basis, onehot) + 0.1 * noise
        with torch.no_grad():
            out = torch.sigmoid(self.b(torch.relu(self.a(feats[None]))))[0, 0]
        return Volume(array=(300.0 + 400.0 * out).numpy().astype(np.float32), affine=mask.affine)


def test_a_case_is_computed_on_one_torch_thread_whatever_the_process_has(tmp_path, monkeypatch, two_threads):
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "big", dim=3, cases=2, size=40, seed=2)
    manifest = read_manifest(data)
    facts = gather_facts(manifest, manifest.cases)
    options = opts(data, tmp_path / "o", method="gan", model=tmp_path, num=1)
    plan = plan_cases(options, manifest.cases, facts, OutputLayout.for_manifest(manifest))[0]
    synth = ConvSynthesizer()
    monkeypatch.setattr(case_module, "job_synthesizer", lambda run, labels=None: synth)
    written = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = tmp_path / f"t{threads}"
        # the stand-in has no training statistics: QC's label-agreement check is tested in test_pairs
        settings = PairSettings(method="gan", qc=QCConfig(label_agreement=False))
        ctx = JobContext(out=out, seed=0, settings=settings, facts=facts,
                         sources={c.case_id: c for c in manifest.cases}, model=tmp_path, model_sha=None)
        result = make_case(ctx, plan)
        assert torch.get_num_threads() == threads  # restored after the case
        written[threads] = {rel: hashlib.sha256((out / rel).read_bytes()).hexdigest() for rel in result.files}
    assert written[1] == written[2]
    # the stand-in itself does depend on the thread count: the test would fail without the pinning
    mask = Volume(array=_label(data), affine=np.eye(4))
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(synth.generate_volume(mask, 3).array)
    assert not np.array_equal(outs[0], outs[1])


def _label(data: Path) -> np.ndarray:
    from medsynth.data.nifti import read_volume

    case = read_manifest(data).cases[0]
    return np.asarray(read_volume(case.label, kind="label").array)


def test_resume_with_a_larger_num_grows_the_job_to_what_a_fresh_job_writes(data3d, tmp_path):
    small = run_augment(opts(data3d, tmp_path / "grown", method="synthseg", num=2))
    before = tree(tmp_path / "grown")
    grown = run_augment(opts(data3d, tmp_path / "grown", method="synthseg", num=5, resume=True))
    assert (grown.reused, grown.generated) == (2, 3)
    fresh = run_augment(opts(data3d, tmp_path / "fresh", method="synthseg", num=5))
    assert tree(tmp_path / "grown") == tree(tmp_path / "fresh")
    assert grown.manifest.read_bytes() == fresh.manifest.read_bytes()
    # the cases of the smaller job were kept, not made again
    after = tree(tmp_path / "grown")
    kept = [k for k in before if k.startswith(("imagesTr/syn_", "labelsTr/syn_"))]
    assert len(kept) == 4 and all(after[k] == before[k] for k in kept)
    assert json.loads((tmp_path / "grown" / ".medsynth_job.json").read_text())["num"] == 5
    assert small.synthetic_cases == 2 and len(read_manifest(grown.manifest).cases) == 3 + 5


def test_a_smaller_num_or_another_setting_is_refused_on_resume(data3d, tmp_path):
    run_augment(opts(data3d, tmp_path / "o", method="synthseg", num=3))
    before = tree(tmp_path / "o")
    with pytest.raises(JobError, match=r"--num 2: the job in .* was started with --num 3; a job can grow"):
        run_augment(opts(data3d, tmp_path / "o", method="synthseg", num=2, resume=True))
    with pytest.raises(JobError, match="seed was 11, now 12"):  # growing does not excuse another setting
        run_augment(opts(data3d, tmp_path / "o", method="synthseg", num=4, seed=12, resume=True))
    assert tree(tmp_path / "o") == before
