"""Each kind of bad input gives an error naming the file and the fault; on_bad_file="skip" logs and counts."""

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from hyper_dm.data import BadFileLog, BadInputError, build_datalist, fastmri_knee
from hyper_dm.data.synthetic import write_fastmri_knee_like, write_luna16_like


def ct_set(root, n=3):
    paths = write_luna16_like(root, n_series=n, seed=4, size_xy=32, n_slices=(2, 3), spacing_xy_mm=(10, 11))
    return {"task": "ct", "dataset_dir": str(root)}, paths


def mri_set(root, n=3):
    paths = write_fastmri_knee_like(root, n_files=n, seed=4, n_slices=(2, 2))
    return {"task": "mri", "dataset_dir": str(root)}, paths


def assert_bad(data, path, match):
    with pytest.raises(BadInputError, match=match) as info:
        build_datalist(data)
    assert info.value.path == path


def test_missing_directory(tmp_path):
    for task in ("ct", "mri"):
        assert_bad({"task": task, "dataset_dir": str(tmp_path / "nope")}, tmp_path / "nope", "does not exist")


def test_folder_without_series(tmp_path):
    (tmp_path / "subset0").mkdir()
    assert_bad({"task": "ct", "dataset_dir": str(tmp_path)}, tmp_path, "no LUNA16 series")
    assert_bad({"task": "mri", "dataset_dir": str(tmp_path)}, tmp_path, "no fastMRI .h5")


def test_truncated_raw(tmp_path):
    data, paths = ct_set(tmp_path)
    raw = paths[1].with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:100])
    assert_bad(data, raw, "truncated")


def test_broken_mhd_header(tmp_path):
    data, paths = ct_set(tmp_path)
    paths[0].write_text("ObjectType = Image\nNDims = three\nDimSize = 512 x\n")
    assert_bad(data, paths[0], "cannot parse the MetaImage header")


def test_nan_in_float_volume(tmp_path):
    data, paths = ct_set(tmp_path)
    volume = sitk.Cast(sitk.ReadImage(str(paths[2])), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(volume)
    array[1, 5, 5] = np.nan
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(volume)
    sitk.WriteImage(bad, str(paths[2]))
    assert_bad(data, paths[2], "1 NaN/infinite")


def test_h5_missing_kspace(tmp_path):
    data, paths = mri_set(tmp_path)
    with h5py.File(paths[0], "a") as hf:
        del hf["kspace"]
    assert_bad(data, paths[0], r"missing dataset\(s\) \['kspace'\]")


def test_h5_wrong_shape(tmp_path):
    data, paths = mri_set(tmp_path)
    with h5py.File(paths[1], "a") as hf:
        del hf["kspace"]
        hf["kspace"] = np.zeros((2, 640), dtype=np.complex64)
    assert_bad(data, paths[1], r"kspace has shape \(2, 640\)")


def test_h5_nan_and_not_hdf5(tmp_path):
    data, paths = mri_set(tmp_path)
    with h5py.File(paths[2], "a") as hf:
        hf["reconstruction_esc"][0, 3, 3] = np.nan
    assert_bad(data, paths[2], "reconstruction_esc contains 1 NaN")
    paths[0].write_bytes(b"not hdf5")
    assert_bad(data, paths[0], "not a readable HDF5")


def test_skip_logs_and_counts(tmp_path, caplog):
    data, paths = ct_set(tmp_path, n=5)
    raw = paths[0].with_suffix(".raw")
    raw.write_bytes(b"")
    paths[3].write_text("garbage")
    log = BadFileLog()
    lists = build_datalist({**data, "on_bad_file": "skip"}, bad_files=log)
    assert sorted(str(p) for p, _ in log.skipped) == sorted([str(raw), str(paths[3])])
    kept = [c["image"] for split in lists.values() for c in split]
    assert sorted(kept) == sorted(str(p) for p in paths[1:3] + paths[4:])
    assert "skipped 2 bad file(s)" in caplog.text


@pytest.mark.parametrize("edit", ["fewer slices", "uchar over short"])
def test_header_that_does_not_match_its_data(tmp_path, edit):
    data, paths = ct_set(tmp_path)
    header = paths[0].read_text()
    if edit == "fewer slices":
        dims = next(line for line in header.splitlines() if line.startswith("DimSize"))
        nx, ny, nz = dims.split("=")[1].split()
        header = header.replace(dims, f"DimSize = {nx} {ny} {int(nz) - 1}")
    else:
        header = header.replace("MET_SHORT", "MET_UCHAR")
    paths[0].write_text(header)
    assert_bad(data, paths[0], "DimSize or ElementType does not match the data")


def test_kspace_that_would_overflow_the_fft(tmp_path):
    _, paths = mri_set(tmp_path)
    with h5py.File(paths[0], "a") as hf:
        hf["kspace"][0, 320, 180] = 3e38
    for read in (lambda: fastmri_knee.read_volume(paths[0]), lambda: fastmri_knee.read_slice(paths[0], 0)):
        with pytest.raises(BadInputError, match="overflow the inverse FFT") as info:
            read()
        assert info.value.path == paths[0]
    fastmri_knee.read_slice(paths[0], 1)  # the other slice is fine


def test_local_data_checked_against_its_header_before_any_read(tmp_path):
    data, paths = ct_set(tmp_path)
    image = sitk.ReadImage(str(paths[0]))
    nx, ny, nz = image.GetSize()
    header = paths[0].read_text().replace(f"ElementDataFile = {paths[0].with_suffix('.raw').name}",
                                          "ElementDataFile = LOCAL")
    payload = paths[0].with_suffix(".raw").read_bytes()
    paths[0].with_suffix(".raw").unlink()
    paths[0].write_bytes(header.encode() + payload)
    build_datalist(data)  # a well-formed LOCAL series is fine
    huge = header.replace(f"DimSize = {nx} {ny} {nz}", f"DimSize = {nx} {ny} {nz * 100000}")
    paths[0].write_bytes(huge.encode() + payload)
    assert_bad(data, paths[0], "truncated")
