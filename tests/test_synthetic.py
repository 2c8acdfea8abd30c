"""Synthetic sets in the real formats, read back by SimpleITK and by fastMRI's own SliceDataset."""

import csv

import fastmri
import h5py
import numpy as np
import pytest
import SimpleITK as sitk
from fastmri.data import SliceDataset
from fastmri.data import transforms as T

from hyper_dm.data.synthetic import KNEE_FOLDER, LUNA16_ANNOTATION_COLUMNS, write_fastmri_knee_like, write_luna16_like

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # in-plane 90 degree turn, z flipped


@pytest.mark.parametrize("direction", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), ROTATED])
def test_luna16_geometry_and_annotations(tmp_path, direction):
    paths = write_luna16_like(tmp_path, n_series=3, seed=2, size_xy=128, n_slices=(6, 8),
                              spacing_xy_mm=(2.6, 2.9), direction=direction)
    assert sorted(p.parent.name for p in paths) == ["subset0", "subset0", "subset1"]
    with open(tmp_path / "annotations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == LUNA16_ANNOTATION_COLUMNS and len(rows) >= 3
    images = {p.stem: sitk.ReadImage(str(p)) for p in paths}
    for image in images.values():
        assert image.GetPixelID() == sitk.sitkInt16
        assert 2.6 <= image.GetSpacing()[0] == image.GetSpacing()[1] <= 2.9
        assert image.GetSpacing()[2] in (1.25, 1.5, 2.0, 2.5)
        np.testing.assert_allclose(image.GetDirection(), direction)
        hu = sitk.GetArrayViewFromImage(image)
        assert hu.min() == -2000 and hu.max() > 700  # padding outside the scan circle; bone
        lungs = hu[(hu > -950) & (hu < -700)]
        assert lungs.size > 0.05 * hu.size
    for row in rows:
        image = images[row["seriesuid"]]
        point = [float(row[k]) for k in ("coordX", "coordY", "coordZ")]
        index = image.TransformPhysicalPointToIndex(point)
        assert float(row["diameter_mm"]) >= 4 and float(row["diameter_mm"]) <= 30
        assert -200 < image[index] < 250, f"annotation {point} is not in soft tissue"
        if float(row["diameter_mm"]) >= 8:  # the nearest voxel centre is inside the nodule (80 HU; muscle: 40 HU)
            assert image[index] > 58, f"annotation {point} does not hit a nodule"


def test_luna16_is_seeded(tmp_path):
    a = write_luna16_like(tmp_path / "a", n_series=1, seed=5, size_xy=64, n_slices=(3, 3))
    b = write_luna16_like(tmp_path / "b", n_series=1, seed=5, size_xy=64, n_slices=(3, 3))
    c = write_luna16_like(tmp_path / "c", n_series=1, seed=6, size_xy=64, n_slices=(3, 3))
    raw = [p[0].with_suffix(".raw").read_bytes() for p in (a, b, c)]
    assert raw[0] == raw[1] != raw[2]


def test_fastmri_knee_files_load_in_fastmri(tmp_path):
    paths = write_fastmri_knee_like(tmp_path, n_files=2, seed=0, n_slices=(2, 3))
    dataset = SliceDataset(root=tmp_path / KNEE_FOLDER, challenge="singlecoil")
    with h5py.File(paths[0]) as hf, h5py.File(paths[1]) as hf1:
        assert len(dataset) == hf["kspace"].shape[0] + hf1["kspace"].shape[0]
    kspace, mask, target, attrs, fname, slice_num = dataset[0]
    assert kspace.shape == (640, 368) and kspace.dtype == np.complex64 and mask is None
    assert target.shape == (320, 320) and target.dtype == np.float32
    assert attrs["encoding_size"] == (640, 368, 1) and attrs["recon_size"] == (320, 320, 1)
    assert attrs["padding_left"] == 0 and attrs["padding_right"] == 368
    assert attrs["acquisition"] in ("CORPD_FBK", "CORPDFS_FBK") and len(attrs["patient_id"]) == 16
    with h5py.File(tmp_path / KNEE_FOLDER / fname) as hf:
        esc = hf["reconstruction_esc"][()]
    assert attrs["max"] == pytest.approx(esc.max()) and attrs["norm"] == pytest.approx(np.linalg.norm(esc), rel=1e-5)
    # fastMRI's convention: target = |centered orthonormal ifft2(kspace)| cropped to 320 x 320
    image = fastmri.complex_abs(fastmri.ifft2c(T.to_tensor(kspace)))
    np.testing.assert_allclose(T.center_crop(image, (320, 320)).numpy(), target, rtol=1e-4, atol=1e-4 * target.max())
    assert 1e-5 < target.max() < 1e-3  # fastMRI single-coil magnitude scale
    outside = image.numpy()[:100]  # readout oversampling: the object sits in the central 320 rows
    assert outside.mean() < 0.05 * target.mean()
