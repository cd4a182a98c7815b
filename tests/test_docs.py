"""Every tutorial's code runs as written.

Each ``docs/*.md`` file is one script: its ```python blocks run in order in one namespace and its
```bash blocks run in a shell, all in a fresh temporary working directory. A block whose fence says
``no-run`` (``python no-run``, ``bash no-run``) is shown only (GPU-only commands, for example).
The quickstart's ``medsynth demo --quick`` is such a block: the suite runs the quick demo once
(the ``quick_demo`` fixture) and the page's other blocks read a copy of its output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$", re.M | re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) for every runnable fenced block, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        words = m["info"].split()
        if not words or "no-run" in words[1:]:
            continue
        if words[0] in {"python", "bash"}:
            blocks.append((words[0], m["body"]))
    return blocks


def test_fence_parser_reads_languages_and_skips_no_run():
    text = "a\n```python\nx = 1\n```\n```bash no-run\nrm -rf /\n```\n```bash\necho hi\n```\n"
    assert code_blocks(text) == [("python", "x = 1\n"), ("bash", "echo hi\n")]


TUTORIALS = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("doc", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    blocks = code_blocks(doc.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip(f"{doc.name} has no runnable code")
    if doc.stem == "quickstart":
        shutil.copytree(request.getfixturevalue("quick_demo"), tmp_path / "demo_quick")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    namespace: dict = {"__name__": f"docs_{doc.stem}"}
    for i, (lang, code) in enumerate(blocks):
        where = f"{doc.name} block {i + 1} ({lang})"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs are our own code
        else:
            proc = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                capture_output=True, text=True, timeout=300,
            )
            assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_fill_pairs_recipe_in_the_docs_is_the_benchmarks_one():
    """docs/downstream.md shows the control's augment recipe; it is the one the benchmark uses, and valid."""
    import yaml

    from medsynth.augment.options import load_augment_config

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "downstream.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    recipe = root / "benchmarks" / "fill_pairs.yaml"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load(recipe.read_text())
    s = load_augment_config(recipe).synthseg
    assert s.fit_intensities and list(s.fit_std_scale) == [0.0, 0.0]
    assert s.bias_prob == s.resolution_prob == s.gamma_std == 0.0 and list(s.noise_std) == [0.0, 0.0]


def test_docs_install_nnunet_into_its_own_environment():
    """`pip install nnunetv2` in medsynth's environment replaces its torch (and pulls GBs of CUDA libraries):
    every page that installs nnU-Net does it with a virtual environment's own pip."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    installs = [(p.name, line.strip()) for p in pages for line in p.read_text().splitlines()
                if re.match(r"\s*(\S*pip3?|\S*python3? -m pip) install\b.*\bnnunetv2\b", line)]  # commands, not prose
    assert installs, "docs/nnunet.md shows how to install nnU-Net"
    for page, line in installs:
        assert re.match(r"~/venvs/nnunet/bin/pip install ", line), f"{page}: {line}"
    text = (root / "docs" / "nnunet.md").read_text()
    assert "python -m venv ~/venvs/nnunet" in text and "~/venvs/nnunet/bin/nnUNetv2_plan_and_preprocess" in text
