"""Pictures whose titles and legends fit (medsynth.plots), and the preview ``medsynth augment`` writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from medsynth.plots import CasePair, case_preview_figure, label_preview_figure, text_overflow

NAMES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}


def _square_labels(size: int = 24) -> np.ndarray:
    m = np.zeros((size, size), np.int64)
    m[3:-3, 3:-3], m[6:-6, 6:-6], m[9:-9, 9:-9] = 1, 2, 3
    return m


def _inside(fig, artist) -> bool:
    fig.draw_without_rendering()
    box, page = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return box.x0 >= page.x0 - 0.5 and box.x1 <= page.x1 + 0.5 and box.y0 >= page.y0 - 0.5 and box.y1 <= page.y1 + 0.5


def test_one_column_label_preview_keeps_every_legend_entry_inside() -> None:
    """A 3D run's training preview has one column; its legend used to lose '3 WM' off the right edge."""
    m = _square_labels()
    legend = [f"{v} {n}" for v, n in NAMES.items()]
    fig = label_preview_figure([m], {"real": [m / 3.0], "generated": [m / 3.0]}, legend)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == legend
    assert _inside(fig, fig.legends[0])
    assert text_overflow(fig) <= 0


def test_case_preview_outlines_each_label_and_lists_it() -> None:
    m = _square_labels()
    pairs = [CasePair(f"syn_{k:04d} (gan)", m / 3.0 + 0.05 * k, m, m / 3.0, f"case_{k}") for k in range(4)]
    fig = case_preview_figure(pairs, NAMES, per_row=3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1 CSF", "2 GM", "3 WM"]
    assert _inside(fig, fig.legends[0]) and text_overflow(fig) <= 0
    # the outline image of the first synthetic panel (drawn transposed, as every slice): the
    # boundaries scikit-image finds, foreground side, one legend colour per label
    from skimage.segmentation import find_boundaries

    overlay = np.asarray(fig.axes[1].get_images()[1].get_array())
    ring = overlay[:, :, 3] > 0
    fine = np.kron(m, np.ones((8, 8), np.int64))  # 24 voxels drawn 8 times finer: thin lines
    np.testing.assert_array_equal(ring, (find_boundaries(fine, mode="thick") & (fine > 0)).T)
    colours = {tuple(np.round(c, 3)) for c in overlay[ring][:, :3]}
    assert len(colours) == 3
    assert [a.get_title() for a in fig.axes[:2]] == ["case_0", "syn_0000 (gan)"]


def test_feature_plot_title_fits_inside_the_figure() -> None:
    from medsynth.evaluation.report import LoadedSet, UnpairedExtras, _feature_figure

    rng = np.random.default_rng(0)
    rad = {"frechet_distance": 123.456789, "mmd2": 0.0123456, "frechet_ci": [101.234567, 150.987654],
           "mmd2_ci": [0.00923456, 0.0198765], "confidence": 0.95, "frechet_null": 98.7654321, "frechet_p": 0.0123,
           "mmd2_p": 0.0456, "warning": "few", "n_features": 64}
    empty = LoadedSet([], [], None)
    fig = _feature_figure({"radiomics": rad}, UnpairedExtras(empty, empty, rng.normal(size=(6, 5)),
                                                             rng.normal(size=(6, 5))))
    title = fig.axes[0].title
    assert "Frechet distance 123.5 [101.2, 151]" in title.get_text()
    assert _inside(fig, title)


def test_augment_writes_a_preview_it_records_as_its_own(tmp_path: Path) -> None:
    from medsynth.augment import AugmentOptions, run_augment
    from medsynth.data.phantoms import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "data", dim=2, cases=3, size=32, seed=0)
    out = tmp_path / "out"
    run_augment(AugmentOptions(input=data, out=out, method="synthseg", num=8, seed=0, progress=False))
    png = out / "preview.png"
    with Image.open(png) as im:
        width, height = im.size
    # 6 cases shown (of 8), 3 (source, synthetic) pairs a row: 2 rows of 6 panels
    assert 900 <= width <= 1400 and 350 <= height <= 600, (width, height)
    journal = [json.loads(line) for line in (out / ".journal.jsonl").read_text().splitlines()]
    assert {"preview.png"} in [set(e["files"]) for e in journal if e["key"] == "final:preview.png"]
    # an overwrite may replace it (the job's own file); a user's preview.png elsewhere is never touched
    run_augment(AugmentOptions(input=data, out=out, method="synthseg", num=2, seed=1, progress=False, overwrite=True))
    with Image.open(png) as im:
        assert im.size[0] < width  # two cases: one row of two pairs


def test_preview_shows_an_unlabelled_source_image(tmp_path: Path) -> None:
    """--anatomy unlabelled:BANK / pseudo: the source is a bank's unlabelled image, shown and named so."""
    from medsynth.augment.preview import preview_pairs
    from medsynth.data.manifest import Case
    from medsynth.data.nifti import write_volume

    m = _square_labels(16)
    rng = np.random.default_rng(0)
    source_image = rng.random((16, 16, 5)).astype(np.float32)
    paths = {name: write_volume(tmp_path / f"{name}.nii.gz", arr, np.eye(4), kind=kind) for name, arr, kind in (
        ("u", source_image, "image"), ("syn", source_image * 2, "image"),
        ("syn_label", np.repeat(m[..., None], 5, axis=2), "label"))}
    source = Case("u_000", [paths["u"]], None, "train", {"anatomy": {"bank": "bank", "image": str(paths["u"])}})
    synthetic = Case("syn_00000", [paths["syn"]], paths["syn_label"], "train", {"synthetic": True, "source": "u_000"})
    (pair,) = preview_pairs([synthetic], {"u_000": source}, "synthseg")
    assert pair.source_title == "u_000 (unlabelled)" and pair.title == "syn_00000 (synthseg)"
    np.testing.assert_allclose(pair.source, source_image[:, :, 2], rtol=1e-6)  # the middle slice, as written
    np.testing.assert_array_equal(pair.label, m)
