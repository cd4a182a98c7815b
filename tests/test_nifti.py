"""NIfTI I/O: the writer's label dtype rule, geometry kept (checked by re-reading with nibabel and
SimpleITK directly), atomic writes, 2D volumes, deterministic bytes, and the reader's refusals."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data import nifti
from medsynth.data.nifti import read_volume, write_volume
from medsynth.errors import DataError


def _oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted voxel -> RAS affine (spacing 0.8, 1.1, 2.5 mm)."""
    c, s = np.cos(0.3), np.sin(0.3)
    tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ tilt
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-90.5, 12.25, 40.0]
    return affine


@pytest.mark.parametrize("max_value,dtype",
                         [(1, np.uint8), (255, np.uint8), (256, np.uint16), (300, np.uint16), (65535, np.uint16)])
def test_label_dtype_rule(tmp_path: Path, max_value: int, dtype) -> None:
    lab = np.zeros((4, 5, 3), np.int64)
    lab[1, 2, 1] = max_value
    lab[0, 0, 0] = 1
    p = write_volume(tmp_path / "lab.nii.gz", lab, np.eye(4), kind="label")
    img = nib.load(str(p))
    assert img.get_data_dtype() == dtype
    assert img.dataobj.slope == 1.0 and img.dataobj.inter == 0.0  # no scaling stored
    back = np.asarray(img.dataobj)
    assert back.dtype == dtype and back[1, 2, 1] == max_value and back[0, 0, 0] == 1  # 300 stays 300, not 44
    assert np.array_equal(back, lab)


def test_label_writer_refusals(tmp_path: Path) -> None:
    p = tmp_path / "lab.nii.gz"
    with pytest.raises(DataError, match="non-integer"):
        write_volume(p, np.array([[0.0, 0.9999]]).reshape(2, 1, 1).repeat(2, 2), np.eye(4), kind="label")
    with pytest.raises(DataError, match="negative"):
        write_volume(p, -np.ones((2, 2, 2), np.int16), np.eye(4), kind="label")
    with pytest.raises(DataError, match="does not fit in uint16"):
        write_volume(p, np.full((2, 2, 2), 70000), np.eye(4), kind="label")
    # integer-valued floats and booleans are labels
    write_volume(p, np.array([0.0, 2.0]).reshape(1, 2, 1).repeat(2, 0), np.eye(4), kind="label")
    assert nib.load(str(p)).get_data_dtype() == np.uint8
    assert not list(tmp_path.glob(".*"))


def test_geometry_preserved(tmp_path: Path) -> None:
    affine = _oblique_affine()
    data = np.random.default_rng(0).normal(size=(6, 7, 5)) * 1000
    p = write_volume(tmp_path / "img.nii.gz", data, affine, kind="image")
    img = nib.load(str(p))
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    vol = read_volume(p)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.spacing == pytest.approx((0.8, 1.1, 2.5))
    # SimpleITK (which uses the qform) agrees: RAS -> LPS flips the first two world axes
    s = sitk.ReadImage(str(p))
    assert s.GetSpacing() == pytest.approx((0.8, 1.1, 2.5), abs=1e-5)
    np.testing.assert_allclose(s.GetOrigin(), affine[:3, 3] * [-1, -1, 1], atol=1e-4)


def test_image_refusals_and_atomicity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "img.nii.gz"
    bad = np.ones((3, 3, 3), np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        write_volume(p, bad, np.eye(4), kind="image")
    assert not p.exists()
    with pytest.raises(DataError, match="2D or 3D"):
        write_volume(p, np.ones((2, 2, 2, 2)), np.eye(4), kind="image")
    write_volume(p, np.ones((3, 3, 3)), np.eye(4), kind="image")
    before = p.read_bytes()

    def broken_verify(*args, **kwargs):
        raise DataError("re-read differs (simulated)")

    monkeypatch.setattr(nifti, "_verify_written", broken_verify)
    with pytest.raises(DataError, match="simulated"):
        write_volume(p, np.zeros((3, 3, 3)), np.eye(4), kind="image")
    with pytest.raises(DataError, match="simulated"):
        write_volume(tmp_path / "new.nii.gz", np.zeros((3, 3, 3)), np.eye(4), kind="image")
    assert p.read_bytes() == before  # the old file is untouched
    assert sorted(f.name for f in tmp_path.iterdir()) == ["img.nii.gz"]  # no temp file, no new file


def test_sitk_mha_reads_like_the_nifti_sitk_wrote(tmp_path: Path) -> None:
    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)  # SimpleITK order (z, y, x)
    s = sitk.GetImageFromArray(arr)
    s.SetSpacing((0.7, 1.3, 2.0))
    s.SetOrigin((10.0, -20.0, 30.0))
    c, n = np.cos(0.4), np.sin(0.4)
    s.SetDirection((c, -n, 0.0, n, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(s, str(tmp_path / "x.mha"))
    sitk.WriteImage(s, str(tmp_path / "x.nii.gz"))
    mha, nii = read_volume(tmp_path / "x.mha"), read_volume(tmp_path / "x.nii.gz")
    np.testing.assert_allclose(mha.affine, nii.affine, atol=1e-4)
    np.testing.assert_array_equal(mha.array, nii.array)
    assert mha.shape == (4, 5, 6) and mha.array[1, 2, 3] == arr[3, 2, 1]
    # hand check: RAS origin is the LPS origin with x and y negated
    np.testing.assert_allclose(mha.affine[:3, 3], [-10.0, 20.0, 30.0])


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1)])
def test_2d_volumes_read_as_2d(tmp_path: Path, shape: tuple) -> None:
    data = np.arange(35, dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.7, 3.0, 1.0])), str(tmp_path / "s.nii.gz"))
    vol = read_volume(tmp_path / "s.nii.gz")
    assert vol.shape == (7, 5) and vol.spatial_ndim == 2
    assert vol.spacing == pytest.approx((0.5, 0.7))
    np.testing.assert_array_equal(vol.array, data.reshape(7, 5))
    write_volume(tmp_path / "w.nii.gz", vol.array, vol.affine, kind="image")
    assert nib.load(str(tmp_path / "w.nii.gz")).shape == (7, 5)


def test_deterministic_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 5, (6, 6, 4))
    a = write_volume(tmp_path / "a" / "lab.nii.gz", data, _oblique_affine(), kind="label")
    b = write_volume(tmp_path / "b" / "other_name.nii.gz", data, _oblique_affine(), kind="label")
    assert a.read_bytes() == b.read_bytes()


def test_reader_refuses_what_nibabel_accepts(tmp_path: Path) -> None:
    data = np.random.default_rng(0).normal(size=(16, 16, 16))  # big enough that the header is read before the end
    p = write_volume(tmp_path / "v.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]), kind="image")
    raw = p.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[:-4])  # only the gzip trailer is gone
    assert np.asarray(nib.load(str(cut)).dataobj).shape == (16, 16, 16)  # nibabel alone does not notice
    with pytest.raises(DataError, match="cut.nii.gz: truncated or corrupt gzip"):
        read_volume(cut)
    plain = gzip.decompress(raw)
    zero = bytearray(plain)
    zero[80:84] = struct.pack("<f", 0.0)
    (tmp_path / "z.nii").write_bytes(bytes(zero))
    assert nib.load(str(tmp_path / "z.nii")).header["pixdim"][1] == 1.0  # nibabel rewrites it
    assert read_volume(tmp_path / "z.nii").header["pixdim"][0] == 0.0  # we keep what is stored
    (tmp_path / "g.nii").write_bytes(raw)
    with pytest.raises(DataError, match="named .nii but is gzip-compressed"):
        read_volume(tmp_path / "g.nii")
    (tmp_path / "e.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match="not gzip-compressed|empty"):
        read_volume(tmp_path / "e.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"x" * 400)
    with pytest.raises(DataError, match="junk.nii: not a NIfTI file"):
        read_volume(tmp_path / "junk.nii")
    with pytest.raises(DataError, match="file not found"):
        read_volume(tmp_path / "absent.nii.gz")


@pytest.mark.parametrize("spatial", [(6, 5, 4), (6, 5)])
def test_read_case_arrays_splits_one_file_holding_all_channels(tmp_path: Path, spatial) -> None:
    """MSD stores multi-modal cases as one 4D file (X, Y, Z, C) — or (H, W, 1, C) for 2D slices."""
    from medsynth.data.nifti import read_case_arrays

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, spatial).astype(np.uint8)
    chans = rng.normal(size=(*spatial, 2)).astype(np.float32)
    on_disk = chans if len(spatial) == 3 else chans[:, :, None, :]
    nib.save(nib.Nifti1Image(on_disk, np.eye(4)), str(tmp_path / "img.nii.gz"))
    write_volume(tmp_path / "lab.nii.gz", label, np.eye(4), kind="label")
    case = read_case_arrays([tmp_path / "img.nii.gz"], tmp_path / "lab.nii.gz")
    assert case.images.shape == (2, *spatial)
    np.testing.assert_array_equal(case.images[1], chans[..., 1])
    np.testing.assert_array_equal(case.label, label)
