"""Volume-native inference on what a user has: files, folders, DICOM series, datalists; simulated or measured input.

Geometry is checked with nibabel and SimpleITK against the source file; outputs are read back as a user would.
The bundle run is a subprocess exactly as users type it.
"""

import hashlib
import json
import locale
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import SMALL_MODEL
from ignite.engine import Events
from monai.data import MetaTensor

from hyper_dm.calibration import INPUT_CHECK_ALPHA, Calibration, local_eu_contrast
from hyper_dm.data.config import resolve_data_config
from hyper_dm.data.synthetic import (
    insert_checkered_knee_square,
    write_challenge_like,
    write_fastmri_knee_like,
    write_luna16_like,
)
from hyper_dm.data.validation import BadInputError
from hyper_dm.engines.writer import CaseWriter
from hyper_dm.inference import HyperDM, InputMode, VolumeReconstructor, find_cases, load_case, to_source_layout
from hyper_dm.physics.mri import zero_filled

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
DATA = {"task": "ct", "img_size": 32}


def write_dicom_series(volume_zyx: np.ndarray, folder: Path, spacing, origin, series_uid: str, prefix="s") -> None:
    """Axial int16 DICOM slices (one file each) of ``volume_zyx`` [z, y, x] HU, LPS origin in mm.

    GDCM's writer sets the process's C locale; the caller's is put back, or later tests would decode their
    subprocesses' UTF-8 output as ASCII."""
    folder.mkdir(parents=True, exist_ok=True)
    ctype = locale.setlocale(locale.LC_CTYPE)
    try:
        _write_dicom_slices(volume_zyx, folder, spacing, origin, series_uid, prefix)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)


def _write_dicom_slices(volume_zyx: np.ndarray, folder: Path, spacing, origin, series_uid: str, prefix: str) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume_zyx.shape[0]):
        image = sitk.GetImageFromArray(np.rint(volume_zyx[k:k + 1]).astype(np.int16))
        image.SetSpacing(spacing)
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1", "0020|000e": series_uid, "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.4f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0028|0030": f"{spacing[1]}\\{spacing[0]}", "0018|0050": str(spacing[2]),
                "0008|0018": f"{series_uid}.{k + 1}", "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(image)


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("luna16")
    write_luna16_like(root, n_series=3, seed=5, size_xy=96, n_slices=(3, 4), spacing_xy_mm=(3.4, 3.6))
    return root


def oblique_nifti(source_mhd: Path, path: Path) -> nib.Nifti1Image:
    """The series cropped to an odd in-plane size and stored in RAS voxel order (not LUNA16's LPS)."""
    image = sitk.ReadImage(str(source_mhd))[5:88, 2:79, :]
    sitk.WriteImage(sitk.Flip(image, [True, False, False]), str(path))
    return nib.load(path)


def test_find_cases_in_files_folders_datalists_and_dicom(tmp_path, luna):
    series = sorted(luna.rglob("*.mhd"))
    assert [c["image"] for c in find_cases(series[0], "ct")] == [str(series[0].resolve())]
    assert {c["case_id"] for c in find_cases(luna, "ct")} == {p.stem for p in series}
    write_dicom_series(np.zeros((2, 20, 20)), tmp_path / "dcm" / "patient 1", (1.0, 1.0, 2.0), (0, 0, 0), "1.2.3")
    dicom = find_cases(tmp_path / "dcm", "ct")
    assert [c["case_id"] for c in dicom] == ["patient_1"]
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": str(series[1])},
                                                                {"image": "dcm/patient 1", "n_views": 24}]}))
    listed = find_cases(tmp_path / "list.json", "ct")
    assert [c["case_id"] for c in listed] == [series[1].stem, "patient_1"] and listed[1]["n_views"] == 24
    (tmp_path / "pair").mkdir()
    for name in ("case one.nii.gz", "case_one.nii.gz", ".hidden.nii.gz", "x" * 240 + ".nii.gz"):
        (tmp_path / "pair" / name).write_bytes(b"")
    stems = [c["case_id"] for c in find_cases(tmp_path / "pair", "ct")]  # a folder search skips hidden files
    assert len(set(stems)) == 3 and stems == [c["case_id"] for c in find_cases(tmp_path / "pair", "ct")]
    assert sorted(s[:9] for s in stems if s.startswith("case_one_")) == ["case_one_"] * 2  # + a hash of the path
    assert max(map(len, stems)) == 200
    assert [c["case_id"] for c in find_cases(tmp_path / "pair" / ".hidden.nii.gz", "ct")] == ["_hidden"]
    (tmp_path / "dup.json").write_text(json.dumps({"testing": [{"image": str(series[0]), "case_id": "a"},
                                                               {"image": str(series[1]), "case_id": "a"}]}))
    with pytest.raises(BadInputError, match="case_id. 'a' is also that of"):
        find_cases(tmp_path / "dup.json", "ct")
    with pytest.raises(BadInputError, match="no fastMRI .h5"):
        find_cases(luna, "mri")
    with pytest.raises(BadInputError, match="does not exist"):
        find_cases(tmp_path / "missing.nii.gz", "ct")


def test_calibration_covers_each_fbp_pitch_asked_for(luna):
    """``inference_cfg#calibration_fbp_pitches``: the calibration set holds the validation cases once per photon
    count and FBP pitch, the source-pitch FBPs on the series' own grid (the reconstructor averages them down)."""
    from hyper_dm.inference import calibration_dataset

    data = resolve_data_config({**DATA, "dataset_dir": str(luna)})
    one = calibration_dataset(data, [1e5, 1e3])
    both = calibration_dataset(data, [1e5, 1e3], fbp_pitches=["model", "source"])
    assert len(both) == 2 * len(one) > 0
    ids = [d.data[0]["case_id"] for d in both.datasets]
    assert ids[0].endswith("_i0100000_model_pitch") and ids[-1].endswith("_i01000_source_pitch"), ids
    model_pitch, source_pitch = both[0], both[len(both) - 1]
    assert model_pitch["cond"].shape[1:3] == (32, 32)
    assert source_pitch["cond"].shape[1:3] == source_pitch["volume"].shape[1:3] == (96, 96)
    with pytest.raises(ValueError, match="fbp_pitch must be one of"):
        calibration_dataset(data, [1e5], fbp_pitches=["native"])


def test_calibration_covers_each_mri_acceleration_asked_for(tmp_path, caplog):
    """``inference_cfg#calibration_accelerations``: the validation files once per k-space noise level and fastMRI
    mask (4x with an 8% centre, 8x with 4%): the 8x cases see half the columns; another acceleration gets the
    centre fastMRI's pairs imply (0.32 / acceleration), and one of 1 or less is refused naming the key. A
    validation split of one file is used with a warning that the calibration then describes one patient."""
    from hyper_dm.inference import calibration_dataset

    write_fastmri_knee_like(tmp_path, n_files=3, seed=4, n_slices=(2, 2))
    data = resolve_data_config({"task": "mri", "dataset_dir": str(tmp_path), "img_size": 32})
    with caplog.at_level(logging.WARNING, logger="hyper_dm.inference"):
        both = calibration_dataset(data, [0.0, 0.1], accelerations=[4, 8])
    assert f"calibrating on 1 validation case(s) of {tmp_path}" in caplog.text
    assert "describe one patient; list at least 3" in caplog.text
    assert len(both) == 2 * len(calibration_dataset(data, [0.0, 0.1])) > 0
    ids = [d.data[0]["case_id"] for d in both.datasets]
    assert ids[0].endswith("_kspace_noise0_4x") and ids[-1].endswith("_kspace_noise0.1_8x"), ids
    masks = [(d.settings["accelerations"], d.settings["center_fractions"]) for d in both.datasets]
    assert masks == [([4], [0.08])] * 2 + [([8], [0.04])] * 2
    columns = [float(both[i]["kspace_mask"].mean()) for i in (0, len(both) - 1)]  # sampled fraction
    assert columns[1] < 0.7 * columns[0], columns
    six = calibration_dataset(data, [0.0], accelerations=[6])  # not one of fastMRI's: centre 0.32 / 6
    assert six.datasets[0].settings["center_fractions"] == [pytest.approx(0.32 / 6)]
    assert 0.13 < float(six[0]["kspace_mask"].mean()) < 0.22  # about one column in six
    with pytest.raises(ValueError, match=r"calibration_accelerations: acceleration 1 is not above 1"):
        calibration_dataset(data, [0.0], accelerations=[4, 1])


def test_ct_volume_keeps_its_geometry_through_orientation_and_back(tmp_path, luna):
    source = sorted(luna.rglob("*.mhd"))[0]
    nifti = oblique_nifti(source, tmp_path / "oblique.nii.gz")
    entry = find_cases(tmp_path / "oblique.nii.gz", "ct")[0]
    case = load_case(entry, resolve_data_config({**DATA, "i0": 1e5}), InputMode.SIMULATE, 32)
    assert case["volume"].shape[1:] == (nifti.shape[0], nifti.shape[1], nifti.shape[2])
    assert case["cond"].shape == (1, 32, 32, nifti.shape[2]) and case["label"].shape == case["volume"].shape
    back = to_source_layout(case["label"], case["volume"])
    np.testing.assert_allclose(back.affine.numpy(), nifti.affine, atol=1e-4)
    np.testing.assert_allclose(back[0].numpy(), np.clip(nifti.get_fdata(), -1000, 1000), atol=1e-3)
    # the oriented grid is LUNA16's: first axis towards patient left (RAS x decreasing)
    assert case["volume"].affine[0, 0] < 0 and case["volume"].affine[1, 1] < 0


def test_dicom_series_and_its_faults(tmp_path):
    hu = np.random.default_rng(0).uniform(-900, 900, (3, 24, 28))
    write_dicom_series(hu, tmp_path / "one", (0.8, 0.8, 2.5), (-10.0, -20.0, -50.0), "1.2.840.1")
    case = load_case({"image": str(tmp_path / "one"), "case_id": "one", "n_views": 24},
                     {**DATA, "hu_window": [-1000.0, 1000.0], "n_views": 24, "noise": "poisson", "i0": 1e5},
                     "measured", 32)
    assert case["label"] is None and case["cond"].shape == (1, 28, 24, 3)
    reference = sitk.ReadImage(sorted(str(p) for p in (tmp_path / "one").iterdir()))
    back = to_source_layout(case["cond"], case["volume"])
    np.testing.assert_allclose(back[0].numpy().transpose(2, 1, 0), sitk.GetArrayFromImage(reference), atol=0.5)
    write_dicom_series(hu, tmp_path / "one", (0.8, 0.8, 2.5), (-10.0, -20.0, -50.0), "1.2.840.2", prefix="t")
    with pytest.raises(BadInputError, match="2 DICOM series"):
        load_case({"image": str(tmp_path / "one"), "case_id": "one"}, {**DATA, "hu_window": [-1000.0, 1000.0]},
                  "measured", 32)


def test_measured_ct_checks_the_stated_acquisition_and_dimensionality(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 3), np.float32), np.eye(4)), tmp_path / "fbp.nii.gz")
    data = {**DATA, "hu_window": [-1000.0, 1000.0], "n_views": 24, "noise": "poisson", "i0": 1e5}
    entry = {"image": str(tmp_path / "fbp.nii.gz"), "case_id": "fbp"}
    with pytest.raises(BadInputError, match="n_views=60.*n_views=24"):
        load_case({**entry, "n_views": 60}, data, "measured", 32)
    assert load_case({**entry, "n_views": 24}, data, "measured", 32)["cond"].shape == (1, 40, 40, 3)
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    with pytest.raises(BadInputError, match="3-D volume"):
        load_case({"image": str(tmp_path / "slice.nii.gz"), "case_id": "s"}, data, "measured", 32)
    with pytest.raises(ValueError, match="input_mode"):
        load_case(entry, data, "guess", 32)


def test_measured_knee_kspace_with_its_mask(tmp_path):
    full = write_fastmri_knee_like(tmp_path, n_files=1, seed=3, n_slices=(2, 2))[0]
    challenge = write_challenge_like(full, tmp_path / "test" / "challenge.h5", acceleration=4, seed=1)
    data = resolve_data_config({"task": "mri", "img_size": 32, "mri_norm": "volume_max", "mask_type": "random",
                                "center_fractions": [0.08], "accelerations": [4], "split_seed": 0})
    measured = load_case({"image": str(challenge), "case_id": "c"}, data, "measured", 32)
    assert measured["label"] is None and measured["cond"].shape == (1, 320, 320, 2)
    with h5py.File(challenge) as hf:
        kept = hf["mask"][()]
        assert "reconstruction_esc" not in hf and 3 < len(kept) / kept.sum() < 5
    np.testing.assert_array_equal(measured["kspace_mask"], kept.astype(bool))  # the measurement, for consistency
    assert measured["kspace"].shape[0] == 2 and not measured["kspace"][..., ~measured["kspace_mask"]].any()
    np.testing.assert_allclose(measured["volume"].affine.numpy()[:3, :3], np.diag([140 / 320, 140 / 320, 3.0]))
    simulated = load_case({"image": str(full), "case_id": "f"}, data, "simulate", 32)
    assert simulated["label"].shape == (1, 320, 320, 2) and float(simulated["gain"][0]) > 0
    np.testing.assert_allclose(simulated["cond"][0].permute(2, 0, 1).numpy(), zero_filled(simulated["kspace"]),
                               rtol=1e-5, atol=1e-9)
    with pytest.raises(BadInputError, match="already undersampled"):
        load_case({"image": str(challenge), "case_id": "c"}, data, "simulate", 32)
    with pytest.raises(BadInputError, match="no 'mask'"):
        load_case({"image": str(full), "case_id": "f"}, data, "measured", 32)


def test_a_knee_file_without_its_max_takes_the_scale_ratio_the_calibration_measured(tmp_path, caplog):
    """A challenge file has no fully sampled max, and its zero-filled max is lower than the max the model trained
    on: a case with a reference records the ratio of the two, the calibration keeps its median per acceleration, and a
    case whose scale is the zero-filled max alone is multiplied by it (without one, a warning names the case)."""
    import logging

    from hyper_dm.calibration import fit_calibration
    from hyper_dm.inference import scale_like_calibration

    full = write_fastmri_knee_like(tmp_path, n_files=1, seed=3, n_slices=(2, 2))[0]
    challenge = write_challenge_like(full, tmp_path / "test" / "challenge.h5", acceleration=4, seed=1)
    with_max = tmp_path / "test" / "with_max.h5"
    with_max.write_bytes(challenge.read_bytes())
    with h5py.File(full) as hf, h5py.File(with_max, "a") as out:
        out.attrs["max"] = hf.attrs["max"]
    data = resolve_data_config({"task": "mri", "img_size": 32, "mri_norm": "volume_max", "mask_type": "random",
                                "center_fractions": [0.08], "accelerations": [4], "split_seed": 0})
    simulated = load_case({"image": str(full), "case_id": "f"}, data, "simulate", 32)
    measured = load_case({"image": str(challenge), "case_id": "c"}, data, "measured", 32)
    known = load_case({"image": str(with_max), "case_id": "m"}, data, "measured", 32)
    ratio = float(known["scale_ratio"][0])
    assert measured["scale_ratio"] is None and 1.05 < ratio < 1.4, ratio  # the zero-filled peak is blurred down
    torch.testing.assert_close(known["gain"], measured["gain"] * ratio, rtol=1e-6, atol=0)
    assert 1.05 < float(simulated["scale_ratio"].min()) <= float(simulated["scale_ratio"].max()) < 1.4

    residuals = [torch.rand(2, 64)] * 3
    calibration = fit_calibration(residuals, accelerations=[4.1, 3.9, 8.2], acceleration_groups=[4, 8],
                                  scale_ratios=[(4.1, ratio), (3.9, 1.1), (8.2, 1.3)])
    loaded = Calibration.load(calibration.save(tmp_path / "calibration.json"))
    four = loaded.at_acceleration(4.0)
    assert four.scale_ratio == pytest.approx(min(ratio, 1.1))  # the lower middle of two
    assert four.scale_ratio_range == pytest.approx(sorted([1.1, ratio]))
    assert loaded.accelerations["8"].scale_ratio == pytest.approx(1.3)
    assert loaded.scale_ratio == pytest.approx(sorted([ratio, 1.1, 1.3])[1])
    exact = fit_calibration(residuals[:1], scale_ratios=[(4.0, ratio)])  # a calibration that saw this very mask
    rescaled = scale_like_calibration(measured, exact)
    torch.testing.assert_close(rescaled["gain"], known["gain"], rtol=1e-6, atol=0)
    torch.testing.assert_close(rescaled["offset"], known["offset"], rtol=1e-6, atol=0)
    assert rescaled["scale_ratio_applied"] == pytest.approx(ratio) and measured["gain"] is not rescaled["gain"]
    assert scale_like_calibration(known, exact) is known and scale_like_calibration(simulated, exact) is simulated
    with caplog.at_level(logging.WARNING, logger="hyper_dm.inference"):
        assert scale_like_calibration(measured, fit_calibration(residuals)) is measured  # no ratio recorded
    assert "case c: no fully sampled max" in caplog.text and "read high" in caplog.text
    content = json.loads((tmp_path / "calibration.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**content, "scale_ratio": -1.0}))
    with pytest.raises(ValueError, match=r"bad.json.*scale_ratio -1.0 is not a positive number"):
        Calibration.load(tmp_path / "bad.json")
    # calibrate measures the ratio on the training and validation files (no reconstruction), many more than it
    # reconstructs: here each of the 4 files at two k-space noise levels and two masks
    from hyper_dm.inference import scale_ratio_cases

    root = tmp_path / "set"
    write_fastmri_knee_like(root, n_files=4, seed=5, n_slices=(2, 2))  # 2 training files, 1 validation, 1 test
    cases = scale_ratio_cases({**data, "dataset_dir": str(root)}, [0.0, 0.1], [4, 8])
    assert len(cases) == 3 * 2 * 2, cases
    assert all(1.05 < r < 1.6 for _, r in cases) and sum(a < 4 * 2**0.5 for a, _ in cases) == 6, cases  # 4x, 8x
    assert scale_ratio_cases({**data, "dataset_dir": str(root)}, [0.0], [4], max_files=2).__len__() == 2
    assert scale_ratio_cases({"task": "ct"}, [1e5]) == []


def test_reconstructor_returns_the_source_grid_and_the_exact_decomposition(checkpoint):
    model = HyperDM.from_bundle(checkpoint, device="cpu", **SMALL_MODEL)
    recon = model.reconstructor(M=2, N=3, steps=2, seed=7)
    assert isinstance(recon, VolumeReconstructor)
    cond = torch.linspace(-800, 800, 50 * 44 * 3).reshape(1, 50, 44, 3)
    gain, offset = torch.full((3,), 1000.0), torch.zeros(3)
    out = recon(cond, gain, offset)
    again = model.reconstructor(M=2, N=3, steps=2, seed=7)(cond, gain, offset)
    assert out["mean"].shape == (1, 50, 44, 3)
    torch.testing.assert_close(out["total"], out["eu"] + out["au"])
    assert (out["eu"] > 0).float().mean() > 0.5 and (out["au"] > 0).float().mean() > 0.5  # M, N > 1: spread
    assert out["mean"].abs().max() <= 1000.0 + 1e-3  # x0 clipped to the model range, mapped to HU
    torch.testing.assert_close(out["mean"], again["mean"])
    reseeded = recon.with_seed(8)
    assert (reseeded.seed, recon.seed, reseeded.m_weights, reseeded.network) == (8, 7, 2, recon.network)
    assert not torch.equal(reseeded(cond, gain, offset)["eu"], out["eu"])  # other weight sets


def test_writer_writes_whole_cases_or_nothing(tmp_path, monkeypatch):
    from hyper_dm.engines import writer as writer_module

    volume = MetaTensor(torch.rand(1, 6, 5, 4), affine=torch.diag(torch.tensor([-2.0, -2.0, 3.0, 1.0])))
    volumes = {name: volume.clone() for name in ("mean", "eu", "au", "total")}
    writer = CaseWriter(tmp_path, previews=False)
    killed = tmp_path / ".a.partial-999999999-beef"  # left by a killed run (no such process)
    live = tmp_path / f".b.partial-{os.getpid()}-cafe"  # another writer still at work
    killed.mkdir()
    live.mkdir()
    assert writer.pending(["a"]) == ["a"]
    assert not killed.exists() and live.exists()
    live.rmdir()
    calls = []

    def failing(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args)

    real = writer_module._save_nifti
    monkeypatch.setattr(writer_module, "_save_nifti", failing)
    with pytest.raises(OSError, match="No space"):
        writer.write("a", volumes, {"case_id": "a", "psnr_db": 20.0})
    assert os.listdir(tmp_path) == [".hyper_dm.lock"]  # no partial case, no staging folder left
    monkeypatch.setattr(writer_module, "_save_nifti", real)
    folder = writer.write("a", volumes, {"case_id": "a", "psnr_db": 20.0})
    assert sorted(p.name for p in folder.iterdir()) == ["a_au.nii.gz", "a_eu.nii.gz", "a_manifest.json",
                                                         "a_mean.nii.gz", "a_metrics.json", "a_total.nii.gz"]
    manifest = json.loads((folder / "a_manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in folder.iterdir() if p.name != "a_manifest.json")
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()
    np.testing.assert_allclose(nib.load(folder / "a_mean.nii.gz").affine, np.diag([-2.0, -2.0, 3.0, 1.0]))
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "case_id,psnr_db"
    with pytest.raises(FileExistsError, match=r"--overwrite \(python scripts/infer\.py\), --inference_cfg#overwrite "
                       r"True .* inference\.skip_existing=true \(scripts/infer\.py\)"):
        writer.pending(["a", "b"])
    assert writer.pending(["a", "b"], skip_existing=True) == ["b"] and writer.already_written == ["a"]
    assert writer.pending(["b"]) == ["b"] and writer.already_written == []  # each call says what it found
    with pytest.raises(FileExistsError, match="another run"):
        writer.write("a", volumes)  # a second run finishing the same case: refused, the first result kept
    bad = {**volumes, "au": volumes["au"] * float("nan")}
    with pytest.raises(ValueError, match="case b: the au volume holds NaN"):
        writer.write("b", bad)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="cannot be used as an output file name"):
        writer.write("../escape", volumes)


LOCK_HOLDER = """
import sys, time
from hyper_dm.engines import CaseWriter
CaseWriter(sys.argv[1]).pending([])
print("locked", flush=True)
time.sleep(600)
"""


def test_one_run_at_a_time_per_output_folder_and_a_killed_run_frees_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match=f"another run \\(process {holder.pid}\\)"):
            CaseWriter(tmp_path).pending(["a"])
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    assert CaseWriter(tmp_path).pending(["a"]) == ["a"]


def test_skip_mode_covers_faults_found_while_sampling(checkpoint):
    from hyper_dm.inference import VolumeEvaluator

    model = HyperDM.from_bundle(checkpoint, device="cpu", **SMALL_MODEL)
    cond = torch.zeros(1, 32, 32, 2)

    def case(name: str, value: float) -> list[dict]:
        return [{"case_id": name, "image": f"/data/{name}.nii.gz", "volume": MetaTensor(torch.zeros(1, 40, 36, 2)),
                 "cond": cond + value, "gain": torch.full((2,), 1000.0), "offset": torch.zeros(2)}]

    cases = [case("good", 0.0), case("bad", float("nan")), case("fine", 100.0)]
    with pytest.raises(BadInputError, match="the reconstructed mean holds"):
        VolumeEvaluator("cpu", cases, model.reconstructor(M=2, N=2, steps=2)).run()
    evaluator = VolumeEvaluator("cpu", cases, model.reconstructor(M=2, N=2, steps=2), on_error="skip")
    written = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: written.append(e.state.output))
    evaluator.run()
    assert [o["case_id"] for o in written if "volumes" in o] == ["good", "fine"]
    assert evaluator.state.skipped[0][0] == "bad" and "/data/bad.nii.gz" in evaluator.state.skipped[0][1]


def bundle_inference(*args: str, run_id: str = "inference") -> subprocess.CompletedProcess:
    files = f"['{CONFIGS / 'common.yaml'}','{CONFIGS / 'inference.yaml'}']"
    small = [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", json.dumps(v).replace("false", "False"))]
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files, *small,
                           "--inference_cfg#M", "2", "--inference_cfg#N", "2", "--diffusion#ddim_steps", "2",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_bundle_reconstructs_one_user_file_at_its_native_grid(tmp_path, luna, checkpoint):
    nifti = oblique_nifti(sorted(luna.rglob("*.mhd"))[1], tmp_path / "patient 7.nii.gz")
    out = tmp_path / "results"
    args = ["--inference_cfg#ckpt", str(checkpoint), "--inference_cfg#input", str(tmp_path / "patient 7.nii.gz"),
            "--inference_cfg#input_mode", "measured", "--inference_cfg#outdir", str(out), "--data#img_size", "32"]
    run = bundle_inference(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    mean = nib.load(out / "patient_7" / "patient_7_mean.nii.gz")
    assert mean.shape == nifti.shape
    np.testing.assert_allclose(mean.affine, nifti.affine, atol=1e-4)
    eu, au, total = (nib.load(out / "patient_7" / f"patient_7_{n}.nii.gz").get_fdata() for n in ("eu", "au", "total"))
    np.testing.assert_allclose(total, eu + au, rtol=1e-5, atol=1e-3)
    assert np.isfinite(mean.get_fdata()).all() and -1001 <= mean.get_fdata().min() <= mean.get_fdata().max() <= 1001
    assert not (out / "patient_7" / "patient_7_metrics.json").exists()  # measured input: no reference
    again = bundle_inference(*args)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr + again.stdout
    assert "--inference_cfg#skip_existing True (bundle)" in again.stderr + again.stdout  # the way used next
    resumed = bundle_inference(*args, "--inference_cfg#skip_existing", "True")
    assert resumed.returncode == 0 and "nothing to reconstruct" in resumed.stderr + resumed.stdout
    summary = json.loads((out / "inference_summary.json").read_text())  # the folder's state, not only this run's work
    assert summary["reconstructed"] == [] and summary["already_written"] == ["patient_7"]


def test_bundle_benchmark_mode_scores_the_test_split_and_skips_bad_cases(tmp_path, luna, checkpoint):
    series = sorted(luna.rglob("*.mhd"))
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": str(series[0])},
                                                                {"image": str(tmp_path / "gone.mhd")}]}))
    out = tmp_path / "results"
    run = bundle_inference("--inference_cfg#ckpt", str(checkpoint), "--inference_cfg#input",
                           str(tmp_path / "list.json"), "--inference_cfg#outdir", str(out), "--data#img_size", "32",
                           "--data#on_bad_file", "skip")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped case gone" in run.stderr + run.stdout
    metrics = json.loads((out / series[0].stem / f"{series[0].stem}_metrics.json").read_text())
    for key in ("psnr_db", "ssim", "crps", "coverage_50", "coverage_90", "coverage_95", "uce", "ause", "mean_eu"):
        assert metrics[key] is not None, key
    assert 0 <= metrics["coverage_50"] <= metrics["coverage_90"] <= metrics["coverage_95"] <= 1
    assert metrics["n_slices"] == sitk.ReadImage(str(series[0])).GetSize()[2]
    assert (out / "metrics.csv").read_text().count("\n") == 2
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["reconstructed"] == [series[0].stem] and summary["skipped"][0]["case_id"] == "gone"


def test_split_conformal_scale_reaches_nominal_coverage_on_fresh_pixels():
    from hyper_dm.calibration import fit_calibration, standardised_residuals
    from hyper_dm.uncertainty import gaussian_coverage

    rng = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 64, 64)
    predicted_var = torch.full_like(label, 4.0)  # the model claims std 2; the truth is std 6 (3x too confident)
    fit = [standardised_residuals(torch.randn(64, 64, generator=rng) * 6, predicted_var[0], label[0]) for _ in range(3)]
    calibration = fit_calibration(fit, checkpoint_sha256="abc")
    assert calibration.scale == pytest.approx(3.0, rel=0.05) and calibration.n_cases == 3
    assert calibration.raw_coverage["0.9"] < 0.5
    fresh = torch.randn(2, 64, 64, generator=rng) * 6
    for level in (0.5, 0.9, 0.95):
        raw = gaussian_coverage(fresh, predicted_var, label, [level])[level]
        calibrated = gaussian_coverage(fresh, predicted_var * calibration.scales[str(level)] ** 2, label, [level])
        assert raw < level - 0.2 and abs(calibrated[level] - level) < 0.02
    with pytest.raises(ValueError, match="no residuals"):
        fit_calibration([torch.empty(0)])
    with pytest.raises(ValueError, match="not a usable Hyper-DM calibration"):
        Calibration.load(__file__)


def test_the_eu_threshold_flags_a_thousandth_of_familiar_pixels_and_an_object_whose_weight_sets_disagree(tmp_path):
    """The calibration's 99.9% quantile of EU in model units: about 0.1% of fresh pixels like the calibration's lie
    above it, a region whose EU is 10x the calibration's typical level is flagged whole, and the scale of each
    slice (its gain) is divided out before comparing."""
    from hyper_dm.calibration import eu_in_model_units, fit_calibration, slice_samples

    rng = torch.Generator().manual_seed(0)
    gain = torch.tensor([1000.0, 2000.0, 500.0])  # physical units per model unit, one per slice
    eu_of = lambda: torch.rand(1, 64, 64, 3, generator=rng) ** 4 * 1e-4 * gain**2  # noqa: E731 [1, X, Y, Z] units^2
    samples = [slice_samples(eu_in_model_units(eu_of(), gain)) for _ in range(20)]
    calibration = fit_calibration([torch.ones(3, 10)] * 20, eu=samples)
    pooled = torch.cat([x.flatten() for x in samples]).sort().values
    assert calibration.eu_threshold == pooled[math.ceil((pooled.numel() + 1) * 0.999) - 1]
    assert calibration.eu_threshold == pytest.approx(0.999**4 * 1e-4, rel=0.01)  # the quantile of U^4 x 1e-4
    fresh = eu_of()
    assert 0.0003 < float(calibration.unfamiliar(fresh, gain).double().mean()) < 0.002
    fresh[:, 20:30, 20:30] = 1e-3 * gain**2  # an object: 10x the largest EU on the calibration data
    loaded = Calibration.load(calibration.save(tmp_path / "c.json"))
    flagged = loaded.unfamiliar(fresh, gain)
    assert flagged.shape == fresh.shape and flagged[:, 20:30, 20:30].all()
    assert not calibration.unfamiliar(fresh / 100, gain)[:, 20:30, 20:30].any()
    assert 0.001 < calibration.eu_flagged_max < 0.003  # the most-flagged of the 20 cases (about 60 of 12288 pixels)
    with pytest.raises(ValueError, match="2 cases of EU samples for 20 cases of residuals"):
        fit_calibration([torch.ones(3, 10)] * 20, eu=samples[:2])
    content = json.loads((tmp_path / "c.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**content, "eu_level": 99.9}))
    with pytest.raises(ValueError, match="eu_level 99.9 is not a quantile level"):
        Calibration.load(tmp_path / "bad.json")
    older = fit_calibration([torch.ones(2, 10)])  # a calibration file written before the EU threshold
    assert older.eu_threshold is None
    with pytest.raises(ValueError, match="holds no EU threshold; refit it"):
        older.unfamiliar(fresh, gain)


def test_each_noise_bin_has_its_own_eu_threshold_so_a_quiet_slice_is_not_judged_by_the_noisiest(tmp_path):
    """Weight sets trained to disagree where they are unsure also disagree more on noisy inputs: calibration slices
    at two noise levels, EU 10x higher on the noisy ones. Pooled, the threshold is the noisy slices' and an object
    on a quiet slice goes unseen; per bin, the quiet slice is judged by the quiet slices, and about 0.1% of fresh
    pixels of either kind are flagged."""
    from hyper_dm.calibration import eu_in_model_units, fit_calibration, slice_samples

    rng = torch.Generator().manual_seed(1)
    gain = torch.full((4,), 1000.0)
    noise = torch.tensor([0.05, 0.05, 0.2, 0.2])  # model units: two quiet slices, two noisy
    level = torch.tensor([1e-5, 1e-5, 1e-4, 1e-4])
    eu_of = lambda: torch.rand(1, 48, 48, 4, generator=rng) ** 4 * level * gain**2  # noqa: E731 [1, X, Y, Z]
    samples = [slice_samples(eu_in_model_units(eu_of(), gain)) for _ in range(12)]
    binned = fit_calibration([torch.ones(4, 10)] * 12, [noise] * 12, bins=2, eu=samples)
    pooled = fit_calibration([torch.ones(4, 10)] * 12, eu=samples)
    quiet, noisy = binned.noise_eu_thresholds
    assert quiet == pytest.approx(0.999**4 * 1e-5, rel=0.02) and noisy == pytest.approx(0.999**4 * 1e-4, rel=0.02)
    assert binned.eu_threshold == pooled.eu_threshold > 5 * quiet  # overall: set by the noisy slices
    assert binned.eu_threshold_at(noise).tolist() == [quiet, quiet, noisy, noisy]
    fresh = eu_of()
    flagged = binned.unfamiliar(fresh, gain, noise).double()
    assert 0.0002 < float(flagged[..., :2].mean()) < 0.003 and 0.0002 < float(flagged[..., 2:].mean()) < 0.003
    assert 0.0005 < binned.eu_flagged_max < 0.004
    fresh[:, 10:20, 10:20, 0] = 3e-5 * gain[0] ** 2  # an object on a quiet slice: 3x its bin's largest EU
    assert binned.unfamiliar(fresh, gain, noise)[0, 10:20, 10:20, 0].all()
    assert not pooled.unfamiliar(fresh, gain, noise)[0, 10:20, 10:20, 0].any()
    assert binned.unfamiliar(fresh, gain).sum() == pooled.unfamiliar(fresh, gain).sum()  # no noise: the overall
    path = binned.save(tmp_path / "c.json")
    assert Calibration.load(path).noise_eu_thresholds == [quiet, noisy]
    path.write_text(path.read_text().replace('"noise_eu_thresholds": [', '"noise_eu_thresholds": [0.5, '))
    with pytest.raises(ValueError, match="3 noise bins of noise_eu_thresholds but 2 of scales"):
        Calibration.load(path)


def test_the_local_eu_test_flags_an_object_that_stands_out_from_its_own_slice(tmp_path):
    """Calibration series differ tenfold in EU level; an object at 7x its own quiet slice's typical EU stays below
    the EU the louder series reach, so the absolute test misses it. Its neighbourhood's EU over its slice's 90%
    quantile stands out as on no calibration pixel, so the local test flags it (and half a box around it); a level
    shared by the whole slice divides out, and familiar slices of either level are flagged on a few pixels in a
    thousand."""
    from hyper_dm.calibration import fit_calibration, slice_samples

    rng = torch.Generator().manual_seed(2)
    gain = torch.ones(3)  # EU already in model units
    eu_of = lambda level: torch.rand(1, 64, 64, 3, generator=rng) ** 4 * level  # noqa: E731 [1, X, Y, Z]
    cases = [eu_of(1e-4 if i % 2 else 1e-3) for i in range(20)]
    samples = [slice_samples(e) for e in cases]
    local = [slice_samples(local_eu_contrast(e)) for e in cases]
    absolute = fit_calibration([torch.ones(3, 10)] * 20, eu=samples)
    both = fit_calibration([torch.ones(3, 10)] * 20, eu=samples, local_eu=local)
    assert both.eu_threshold == absolute.eu_threshold and both.local_eu_window == 1 / 16
    assert 0.5 < both.local_eu_threshold < 1.5  # a 5 x 5 mean of U^4 over its slice's 90% quantile (0.66)
    quiet = eu_of(1e-4)
    familiar = [float(both.unfamiliar(quiet * k, gain).double().mean()) for k in (1, 10)]
    assert all(f < 0.005 for f in familiar)  # each test at about 0.1%, neighbours correlate
    assert torch.allclose(local_eu_contrast(quiet * 10), local_eu_contrast(quiet), rtol=1e-5)  # a shared level
    assert absolute.eu_flagged_max <= both.eu_flagged_max < 0.01
    quiet[:, 20:30, 20:30] = 5e-4  # 7.6x the slice's 90% quantile, half the loud series' 99.9% quantile
    assert not absolute.unfamiliar(quiet, gain)[:, 20:30, 20:30].any()
    loaded = Calibration.load(both.save(tmp_path / "c.json"))
    flagged = loaded.unfamiliar(quiet, gain)
    assert flagged[:, 20:30, 20:30].all() and not flagged[:, 33:, 33:].any()  # the object and two pixels around
    content = json.loads((tmp_path / "c.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**content, "local_eu_window": 0.0}))
    with pytest.raises(ValueError, match="local_eu_window 0.0 is not a fraction of the slice's side"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="local EU contrast samples of 60 slices need EU samples"):
        fit_calibration([torch.ones(3, 10)] * 20, local_eu=local)


def test_input_departure_passes_noise_sees_a_shift_and_gets_a_conformal_p_value(tmp_path):
    """The input check's statistic: white noise and a finer input grid leave it near zero, a level shift in a quarter
    of the image shows in model units; its p-value against the calibration slices is exact and survives a save."""
    from hyper_dm.calibration import fit_calibration, input_departure

    rng = torch.Generator().manual_seed(0)
    gain = torch.full((4,), 1000.0)  # HU per model unit
    mean = F.interpolate(torch.randn(4, 1, 8, 8, generator=rng), size=(64, 64), mode="bilinear")[:, 0] * 300
    mean = mean.permute(1, 2, 0)[None]  # [1, 64, 64, 4] HU
    fine = mean.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # the same image on a 128 x 128 grid
    noisy = fine + 300 * torch.randn(fine.shape, generator=rng)
    assert input_departure(noisy, mean, gain).max() < 0.02  # the noise of a 32 x 32 block mean: 300 / 32 HU
    shifted = noisy.clone()
    shifted[:, :64, :64, 2:] += 200.0  # 0.2 model units in one of the four quadrants of slices 2 and 3
    departure = input_departure(shifted, mean, gain)
    assert departure[:2].max() < 0.02 and departure[2:] == pytest.approx([0.1, 0.1], abs=0.01)

    calibration = fit_calibration([torch.ones(2, 10)] * 2, departures=[torch.tensor([0.04, 0.01]),
                                                                        torch.tensor([0.03, 0.02])])
    assert calibration.departures == [0.01, 0.02, 0.03, 0.04]
    probe = torch.tensor([0.0, 0.02, 0.035, 0.5])
    assert calibration.departure_p(probe).tolist() == pytest.approx([5 / 5, 4 / 5, 2 / 5, 1 / 5])
    path = calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(path).departure_p(probe).tolist() == calibration.departure_p(probe).tolist()
    older = fit_calibration([torch.ones(2, 10)])  # a calibration file written before the input check
    with pytest.raises(ValueError, match="holds no input departures; refit it"):
        older.departure_p(probe)


def test_input_check_compares_a_slice_with_the_calibration_slices_of_its_noise_bin(tmp_path):
    """Noisy slices legitimately move their input further: a quiet slice that moves as far as a noisy one is
    flagged against the quiet bin's departures, though the pooled departures would pass it."""
    from hyper_dm.calibration import fit_calibration

    noise = torch.tensor([0.01] * 20 + [0.1] * 20)  # model units: 20 quiet, 20 noisy calibration slices
    departures = torch.cat([torch.linspace(0.01, 0.05, 20), torch.linspace(0.1, 0.5, 20)])
    calibration = fit_calibration([torch.ones(40, 10)], [noise], bins=2, departures=[departures])
    assert len(calibration.noise_departures) == 2 and calibration.noise_departures[0][-1] == 0.05
    quiet, moved = torch.tensor([0.01, 0.01, 0.01]), torch.tensor([0.03, 0.3, 0.3])
    pooled = calibration.input_check(moved)
    assert pooled["slices_unlike_calibration"] == 0 and pooled["alpha"] == pytest.approx(1 / 41)
    binned = Calibration.load(calibration.save(tmp_path / "c.json")).input_check(moved, quiet)
    assert binned["flagged_slices"] == [1, 2] and binned["input_unlike_calibration"]
    assert binned["alpha"] == pytest.approx(1 / 21)
    noisy = calibration.input_check(moved, torch.full((3,), 0.1))  # in the noisy bin 0.3 is ordinary
    assert noisy["slices_unlike_calibration"] == 0 and noisy["input_departure_p"] > 0.5
    assert calibration.departure_p(moved, quiet).tolist() == pytest.approx([11 / 21, 1 / 21, 1 / 21])


def test_a_calibration_per_mri_acceleration_gives_each_mask_its_own_scale_and_input_check(tmp_path):
    """4x and 8x masks leave different amounts open: calibrated together, each case takes the calibration of the
    acceleration nearest its mask's (measured, so 4.4x counts as 4x), with its own scales and input-check slices."""
    from hyper_dm.calibration import fit_calibration

    rng = torch.Generator().manual_seed(0)
    spread = {4: 3.0, 8: 1.5}  # true error std per unit of predicted std at each acceleration
    measured = [4.4, 3.8, 8.6, 7.5]  # a random mask's acceleration scatters around its nominal one
    residuals = [(torch.randn(4, 4096, generator=rng) * spread[4 if a < 6 else 8]).abs() for a in measured]
    noise = [torch.full((4,), 0.02), torch.full((4,), 0.05)] * 2
    departures = [torch.full((4,), 0.01), torch.full((4,), 0.012), torch.full((4,), 0.2), torch.full((4,), 0.25)]
    calibration = fit_calibration(residuals, noise, bins=2, departures=departures, accelerations=measured,
                                  acceleration_groups=[4, 8])
    loaded = Calibration.load(calibration.save(tmp_path / "calibration.json"))
    assert sorted(loaded.accelerations) == ["4", "8"] and loaded.accelerations["4"].n_cases == 2
    assert loaded.at_acceleration(None) is loaded and loaded.at_acceleration(5.2) is loaded.accelerations["4"]
    four, eight = loaded.at_acceleration(4.1), loaded.at_acceleration(9.0)
    assert (four.acceleration, eight.acceleration, loaded.acceleration) == (4.0, 8.0, None)
    assert four.scale == pytest.approx(3.0, rel=0.05) and eight.scale == pytest.approx(1.5, rel=0.05)
    assert eight.scale < loaded.scale < four.scale  # pooled: too wide for 8x, too narrow for 4x
    assert "at 4x acceleration" in loaded.describe() and "at 8x acceleration" in loaded.describe()
    moved = torch.tensor([0.1, 0.1])  # ordinary at 8x, far beyond every 4x calibration slice
    assert four.input_check(moved, torch.tensor([0.02, 0.05]))["slices_unlike_calibration"] == 2
    assert eight.input_check(moved, torch.tensor([0.02, 0.05]))["slices_unlike_calibration"] == 0
    with pytest.raises(ValueError, match="no calibration case has a mask near 8x"):
        fit_calibration(residuals[:2], noise[:2], departures=departures[:2], accelerations=measured[:2],
                        acceleration_groups=[4, 8])
    with pytest.raises(ValueError, match="one measured acceleration per case"):
        fit_calibration(residuals, noise, accelerations=measured[:3], acceleration_groups=[4, 8])


def test_noise_binned_calibration_covers_every_noise_level_where_one_scale_cannot(tmp_path):
    """Slices at three noise levels whose true error is 2x, 4x and 8x the predicted std: one global scale
    over-covers the quiet slices and under-covers the noisy ones; one scale per noise bin reaches 90% at each."""
    from hyper_dm.calibration import fit_calibration, standardised_residuals
    from hyper_dm.uncertainty import gaussian_coverage

    rng = torch.Generator().manual_seed(0)
    noise = torch.tensor([0.01, 0.03, 0.1]).repeat_interleave(8)  # model units, 8 slices per level [Z]
    factor = torch.tensor([2.0, 4.0, 8.0]).repeat_interleave(8)
    label, var = torch.zeros(1, 32, 32, 24), torch.ones(1, 32, 32, 24)

    def draw() -> torch.Tensor:
        return torch.randn(1, 32, 32, 24, generator=rng) * factor

    cases = [draw() for _ in range(3)]
    residuals = [standardised_residuals(mean, var, label) for mean in cases]
    assert residuals[0].shape == (24, 1024)
    binned = fit_calibration(residuals, [noise * 1.05] * 3, bins=3)
    assert len(binned.noise_edges) == 2 and binned.noise_range == pytest.approx([0.0105, 0.105])
    assert [s["0.9"] for s in binned.noise_scales] == pytest.approx([2.0, 4.0, 8.0], rel=0.05)
    single = fit_calibration(residuals)
    fresh = draw()
    for calibration, spread in ((binned, 0.02), (single, None)):
        scale = calibration.scale_at(noise)
        assert scale.shape == ((24,) if calibration is binned else ())
        calibrated = var * scale.float() ** 2
        per_level = [gaussian_coverage(fresh[..., k], calibrated[..., k], label[..., k], [0.9])[0.9]
                     for k in (slice(0, 8), slice(8, 16), slice(16, 24))]
        if spread:
            assert all(abs(c - 0.9) < spread for c in per_level), per_level
        else:
            assert per_level[0] > 0.99 and per_level[2] < 0.8, per_level
    line = binned.describe()  # what the logs and the evaluation report say about it
    assert "per noise bin" in line and all(f"{s['0.9']:.2f} (" in line for s in binned.noise_scales)
    assert f"one 90% std scale {single.scale:.2f} for every slice" in single.describe()
    path = binned.save(tmp_path / "calibration.json")
    assert Calibration.load(path).scale_at(torch.tensor([0.001, 1.0])).tolist() == pytest.approx(
        [binned.noise_scales[0]["0.9"], binned.noise_scales[2]["0.9"]])  # outside the range: the outer bins
    path.write_text(path.read_text().replace('"noise_edges": [', '"noise_edges": [0.5, '))
    with pytest.raises(ValueError, match="3 noise bins but 3 edges"):
        Calibration.load(path)
    with pytest.raises(ValueError, match="3 noise bins need one noise-level tensor per case"):
        fit_calibration(residuals, bins=3)
    from hyper_dm.inference import calibration_dataset
    with pytest.raises(ValueError, match=r"calibration_noise_levels: give at least one i0 value"):
        calibration_dataset({"task": "ct"}, [])


def test_eu_binned_calibration_covers_the_uncertain_pixels_where_one_scale_per_noise_bin_cannot(tmp_path):
    """Pixels whose true error outgrows the predicted std with their EU (error std 1 + 6 EU against a predicted std
    of 1): one scale over-covers the quiet half and under-covers the most uncertain pixels; a scale per EU bin
    (cut at the 0.5 and 0.9 quantiles of EU over its slice's 90% quantile) reaches 90% in each bin, and
    ``scale_map`` gives each pixel its bin's, the same in a case whose EU runs ten times higher throughout."""
    from hyper_dm.calibration import fit_calibration, relative_eu, slice_samples, standardised_residuals
    from hyper_dm.uncertainty import gaussian_coverage

    rng = torch.Generator().manual_seed(0)
    label, var = torch.zeros(1, 32, 32, 8), torch.ones(1, 32, 32, 8)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:  # a case's mean and EU (model units)
        eu = torch.rand(1, 32, 32, 8, generator=rng) ** 2
        return torch.randn(1, 32, 32, 8, generator=rng) * (1 + 6 * eu), eu

    cases = [draw() for _ in range(3)]
    residuals = [standardised_residuals(mean, var, label) for mean, _ in cases]
    eu_samples = [slice_samples(eu) for _, eu in cases]
    binned = fit_calibration(residuals, eu=eu_samples, eu_bin_levels=(0.5, 0.9))
    single = fit_calibration(residuals, eu=eu_samples)
    (fitted,) = binned.eu_bins
    assert binned.eu_bin_reference == 0.9
    assert fitted["edges"] == pytest.approx([0.25 / 0.81, 1.0], abs=0.03)  # U(0, 1)^2: quantiles 0.5, 0.9 over 0.9's
    fresh, eu = draw()
    which = torch.bucketize(relative_eu(eu), torch.tensor(fitted["edges"]))
    for calibration, spread in ((binned, 0.02), (single, None)):
        scale = calibration.scale_map(None, eu)
        assert scale.shape == ((1, 32, 32, 8) if calibration is binned else ())
        covered = (fresh.abs() <= 1.6449 * scale.float()).float()
        per_bin = [float(covered[which == b].mean()) for b in range(3)]
        if spread:
            assert all(abs(c - 0.9) < spread for c in per_bin), per_bin
            assert torch.equal(scale, torch.tensor([s["0.9"] for s in fitted["scales"]], dtype=torch.float64)[which])
        else:
            assert per_bin[0] > 0.97 and per_bin[2] < 0.8, per_bin
    assert gaussian_coverage(fresh, var * binned.scale_map(None, eu).float() ** 2, label, [0.9])[0.9] == \
        pytest.approx(0.9, abs=0.02)
    assert "per EU bin (cut at its 0.5, 0.9 quantiles of EU / slice's 0.9 EU quantile)" in binned.describe()
    # a patient (or draw of weight sets) whose EU runs ten times higher: the same scales, not the widest bins'
    same = binned.scale_map(None, 10 * eu) == binned.scale_map(None, eu)
    assert float(same.double().mean()) > 0.999
    path = binned.save(tmp_path / "calibration.json")
    assert torch.equal(Calibration.load(path).scale_map(None, eu), binned.scale_map(None, eu))
    # a calibration from before metadata 0.14.0 (absolute edges, no eu_bin_reference) bins EU as it is
    legacy = json.loads(path.read_text())
    del legacy["eu_bin_reference"]
    legacy["eu_bins"][0]["edges"] = [0.25, 0.81]
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    absolute = torch.bucketize(eu, torch.tensor([0.25, 0.81]))
    assert torch.equal(Calibration.load(tmp_path / "legacy.json").scale_map(None, eu),
                       torch.tensor([s["0.9"] for s in fitted["scales"]], dtype=torch.float64)[absolute])
    path.write_text(path.read_text().replace('"eu_bin_reference": 0.9', '"eu_bin_reference": 90'))
    with pytest.raises(ValueError, match="eu_bin_reference 90 is not a quantile level between 0 and 1"):
        Calibration.load(path)
    binned.save(path)
    path.write_text(path.read_text().replace('"edges": [', '"edges": [0.1, '))
    with pytest.raises(ValueError, match="3 EU bins but 3 edges"):
        Calibration.load(path)
    with pytest.raises(ValueError, match=r"eu_bin_levels \[0.9, 0.5\] must be ascending quantile levels"):
        fit_calibration(residuals, eu=eu_samples, eu_bin_levels=(0.9, 0.5))


def holdout_script_row(samples: dict, tmp_path: Path, heading: str, measurement: str) -> list[str]:
    """The figures scripts/calibration_holdout.py ``--bins 2 --eu_bins 0.5 0.9`` prints for ``measurement`` under
    ``heading``, from ``samples`` saved as a calibrate run saves them."""
    torch.save(samples, tmp_path / "samples.pt")
    run = subprocess.run([sys.executable, "scripts/calibration_holdout.py", str(tmp_path / "samples.pt"), "--bins",
                          "2", "--eu_bins", "0.5", "0.9"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    return next(line.split() for line in lines[lines.index(heading):] if line.strip().startswith(measurement))[1:]


def test_holdout_coverage_shows_eu_bins_carry_to_a_patient_whose_eu_runs_ten_times_higher(tmp_path, caplog):
    """Three patients whose EU level differs tenfold (their error grows with EU relative to their own slices): held
    out, each is covered near 90% overall and in its highest-EU tenth with EU bins, where one scale per noise bin
    leaves that tenth far below; the script prints the same per measurement from a calibrate run's samples, and the
    calibrate run's fitter logs their range and keeps its samples where asked."""
    from hyper_dm.calibration import holdout_coverage, slice_samples, standardised_residuals
    from hyper_dm.inference import CalibrationFitter, calibration_holdout

    rng = torch.Generator().manual_seed(0)
    label, var = torch.zeros(1, 32, 32, 8), torch.ones(1, 32, 32, 8)
    samples = {"case_ids": [], "residuals": [], "noise_levels": [], "eu": []}
    for patient, level in (("a", 1.0), ("b", 10.0), ("c", 0.1)):
        for noise in (0.05, 0.2):
            shape = torch.rand(1, 32, 32, 8, generator=rng) ** 2
            mean = torch.randn(1, 32, 32, 8, generator=rng) * (1 + 6 * shape) * (1 + 10 * noise)
            samples["case_ids"].append(f"{patient}_i0{1e4 if noise < 0.1 else 1e3:g}_model_pitch")
            samples["residuals"].append(standardised_residuals(mean, var, label))
            samples["noise_levels"].append(torch.full((8,), noise))
            samples["eu"].append(slice_samples(level * shape))
    patients = [i.split("_")[0] for i in samples["case_ids"]]
    args = samples["residuals"], samples["noise_levels"], samples["eu"], patients, 2
    binned, single = holdout_coverage(*args, eu_bin_levels=(0.5, 0.9)), holdout_coverage(*args)
    assert all(abs(c - 0.9) < 0.03 and abs(top - 0.9) < 0.05 for c, top, _ in binned), binned
    assert all(top < 0.8 for _, top, _ in single), single
    assert all(math.isnan(tissue) for *_, tissue in binned)  # no means: no tissue
    with pytest.raises(ValueError, match="two patients or more, got 2 cases, 1 patient"):
        holdout_coverage(*[x[:2] for x in args[:3]], ["a", "a"])
    row = holdout_script_row(samples, tmp_path, "2 noise bins, EU bins at [0.5, 0.9]: held-out 90% coverage per "
                             "patient (its highest-EU tenth)", "i01000_model_pitch")
    assert row == [f for c, top, _ in binned[1::2] for f in (f"{c:.3f}", f"({top:.3f})")]  # a, b, c at i0 1e3
    (tmp_path / "calibration.json").write_text("{}")  # not a samples file: one line naming it, exit 2
    run = subprocess.run([sys.executable, "scripts/calibration_holdout.py", str(tmp_path / "calibration.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and f"{tmp_path / 'calibration.json'}: not a calibrate run's samples file" in run.stderr
    fitter = CalibrationFitter(str(tmp_path / "fitted.json"), bins=2, eu_bin_levels=(0.5, 0.9),
                               samples=str(tmp_path / "kept.pt"))
    for key in ("case_ids", "residuals", "noise_levels", "eu"):
        setattr(fitter, key, samples[key])
    fitter.local_eu = [e / e.max() for e in samples["eu"]]
    fitter.departures = [torch.ones(8) for _ in samples["eu"]]
    fitter.accelerations = [None] * len(samples["eu"])
    with caplog.at_level(logging.INFO, logger="hyper_dm.inference"):
        fitter.fit()
    low, high = min(c for c, *_ in binned), max(c for c, *_ in binned)
    assert (f"calibration held out one validation patient at a time (scripts/calibration_holdout.py): 90% coverage "
            f"{low:.3f}-{high:.3f} over patients and measurements") in caplog.text
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    assert kept["case_ids"] == samples["case_ids"] and torch.equal(kept["eu"][1], samples["eu"][1])
    with pytest.raises(ValueError, match=re.escape("case id 'a_scan3' is not <patient>_<i0|kspace_noise><level>")):
        calibration_holdout(["a_scan3"], *[x[:1] for x in args[:3]])


def test_intensity_classes_cover_the_tissue_where_scales_pooled_with_the_air_leave_it_short(tmp_path, caplog):
    """Three patients, 40-60% air, whose tissue (mean above -0.9 model units) errs three times as far as its air
    against the same predicted std: pooled scales cover the air beyond 90% and the tissue well short of it, held out;
    a class each for air and tissue brings the tissue to 90% for a patient the fit never saw. ``scale_map``
    gives each pixel its class's scale, read from the mean in model units (:meth:`Calibration.scales_for` from
    physical units), the file round-trips, a calibration without classes applies as before, and malformed classes
    are refused; the script prints the tissue's coverage from samples that hold the means."""
    from hyper_dm.calibration import fit_calibration, holdout_coverage, slice_samples, standardised_residuals
    from hyper_dm.inference import CalibrationFitter

    rng = torch.Generator().manual_seed(0)
    shape, label, var = (1, 32, 32, 8), torch.zeros(1, 32, 32, 8), torch.ones(1, 32, 32, 8)
    samples = {"case_ids": [], "residuals": [], "noise_levels": [], "eu": [], "means": []}
    for patient, air in (("a", 0.4), ("b", 0.5), ("c", 0.6)):  # patients differ in how much air they hold
        for noise in (0.05, 0.2):
            tissue = torch.rand(shape, generator=rng) > air
            intensity = torch.where(tissue, torch.rand(shape, generator=rng) - 0.5, -0.98)
            error = torch.randn(shape, generator=rng) * torch.where(tissue, 1.5, 0.5) * (1 + 5 * noise)
            samples["case_ids"].append(f"{patient}_i0{1e4 if noise < 0.1 else 1e3:g}_model_pitch")
            samples["residuals"].append(standardised_residuals(error, var, label))
            samples["noise_levels"].append(torch.full((8,), noise))
            samples["eu"].append(slice_samples(torch.rand(shape, generator=rng)))
            samples["means"].append(slice_samples(intensity))
    patients = [i.split("_")[0] for i in samples["case_ids"]]
    args = samples["residuals"], samples["noise_levels"], samples["eu"], patients, 2, (0.5, 0.9), 0.9, \
        samples["means"]
    classes, pooled = holdout_coverage(*args, intensity_edges=(-0.9,)), holdout_coverage(*args)
    assert all(abs(tissue - 0.9) < 0.03 for *_, tissue in classes), classes
    assert all(tissue < 0.83 for *_, tissue in pooled), pooled
    fitted = fit_calibration(samples["residuals"], samples["noise_levels"], 2, eu=samples["eu"],
                             eu_bin_levels=(0.5, 0.9), means=samples["means"], intensity_edges=(-0.9,))
    assert fitted.intensity_edges == [-0.9] and len(fitted.eu_bins) == 4  # 2 noise bins x 2 classes
    assert "per intensity class (the mean cut at -0.9 model units; classes apart by |) and EU bin" in fitted.describe()
    intensity = torch.where(torch.arange(32).view(1, 32, 1, 1) < 16, -0.98, 0.2).expand(shape)
    noise, eu = torch.full((8,), 0.2), torch.rand(shape, generator=rng)
    scale = fitted.scale_map(noise, eu, intensity=intensity)
    assert float(scale[0, 16:].min()) > 2.5 * float(scale[0, :16].max())  # tissue's scales against the air's
    gain, offset = torch.full((8,), 1000.0), torch.zeros(8)  # CT's [-1000, 1000] HU window
    physical = {"mean": intensity * gain.view(1, 1, 1, -1), "eu": eu * 1000.0**2}
    assert torch.equal(fitted.scales_for(physical, noise, gain, offset), scale)
    assert fitted.scale_map(noise, eu).shape == (8,)  # no mean: each slice its noise bin's scale
    path = fitted.save(tmp_path / "calibration.json")
    assert torch.equal(Calibration.load(path).scale_map(noise, eu, intensity=intensity), scale)
    without = fit_calibration(samples["residuals"], samples["noise_levels"], 2, eu=samples["eu"],
                              eu_bin_levels=(0.5, 0.9))
    assert without.intensity_edges == [] and torch.equal(without.scale_map(noise, eu, intensity=intensity),
                                                         without.scale_map(noise, eu))
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "eu_bins": content["eu_bins"][:3]}))
    with pytest.raises(ValueError, match="3 EU-binned cells but 4 noise bins x intensity classes"):
        Calibration.load(path)
    path.write_text(json.dumps({**content, "intensity_edges": [-900.0]}))  # HU, not model units
    with pytest.raises(ValueError, match=r"intensity_edges \[-900.0\] must be ascending values in \(-1, 1\)"):
        Calibration.load(path)
    with pytest.raises(ValueError, match=r"intensity_edges \[-0.9\] must be ascending values of the mean in \(-1, 1\) "
                                         r"\(model units\), with the cases' mean samples"):
        fit_calibration(samples["residuals"], intensity_edges=(-0.9,))
    row = holdout_script_row(samples, tmp_path, "2 noise bins, intensity classes cut at [-0.9], EU bins at [0.5, "
                             "0.9]: held-out 90% coverage per patient (its highest-EU tenth, its tissue)",
                             "i010000_model_pitch")
    assert row == [f for c, top, tissue in classes[::2] for f in (f"{c:.3f}", f"({top:.3f},", f"{tissue:.3f})")]
    with pytest.raises(ValueError, match=re.escape("inference_cfg#calibration_intensity_edges [-900.0] must be "
                                                   "ascending values of the mean in the model's range (-1, 1)")):
        CalibrationFitter(str(tmp_path / "fitted.json"), intensity_edges=(-900.0,))  # HU: refused before the run
    fitter = CalibrationFitter(str(tmp_path / "fitted.json"), bins=2, eu_bin_levels=(0.5, 0.9),
                               intensity_edges=(-0.9,), samples=str(tmp_path / "kept.pt"))
    for key in samples:
        setattr(fitter, key, samples[key])
    fitter.local_eu, fitter.departures = samples["eu"], [torch.ones(8) for _ in samples["eu"]]
    fitter.accelerations = [None] * len(samples["eu"])
    with caplog.at_level(logging.INFO, logger="hyper_dm.inference"):
        assert fitter.fit().intensity_edges == fitted.intensity_edges
    low, high = min(b for *_, b in classes), max(b for *_, b in classes)
    assert f"{low:.3f}-{high:.3f} of their tissue" in caplog.text
    assert torch.equal(torch.load(tmp_path / "kept.pt", weights_only=True)["means"][2], samples["means"][2])


def test_scales_following_the_eu_level_cover_a_patient_whose_weight_sets_agree_closely(tmp_path, caplog):
    """Three patients whose EU level differs ninefold while their error does not (the predicted variance follows EU,
    the true error has std 1 + 5 noise everywhere): held out, scales fitted without the EU level under-cover the
    patient whose EU runs low and over-cover the one whose EU runs high; with ``eu_level`` each cell fits an exponent
    near :data:`EU_LEVEL_EXPONENT_MAX` and covers all three near 90%. ``scale_map`` divides by the slice's level
    (clipped to the calibrated range: a slice far beyond it is not narrowed further), the file round-trips, a
    malformed exponent is refused, and the calibrate run's fitter and the script take the option."""
    from hyper_dm.calibration import (
        EU_LEVEL_EXPONENT_MAX,
        fit_calibration,
        holdout_coverage,
        slice_samples,
        standardised_residuals,
    )
    from hyper_dm.inference import CalibrationFitter

    rng = torch.Generator().manual_seed(0)
    shape, label = (1, 32, 32, 8), torch.zeros(1, 32, 32, 8)
    samples = {"case_ids": [], "residuals": [], "noise_levels": [], "eu": [], "means": []}
    for patient, level in (("a", 1.0), ("b", 3.0), ("c", 1 / 3)):
        for noise in (0.05, 0.2):
            slice_level = level * torch.exp(torch.empty(8).uniform_(-2, 2, generator=rng))  # overlapping ranges
            eu = torch.rand(shape, generator=rng) * slice_level
            error = torch.randn(shape, generator=rng) * (1 + 5 * noise)
            samples["case_ids"].append(f"{patient}_i0{1e4 if noise < 0.1 else 1e3:g}_model_pitch")
            samples["residuals"].append(standardised_residuals(error, eu, label))
            samples["noise_levels"].append(torch.full((8,), noise))
            samples["eu"].append(slice_samples(eu))
            samples["means"].append(slice_samples(torch.full(shape, 0.2)))
    patients = [i.split("_")[0] for i in samples["case_ids"]]
    args = samples["residuals"], samples["noise_levels"], samples["eu"], patients, 2, (0.5, 0.9), 0.9, \
        samples["means"], (-0.9,)
    fixed, following = holdout_coverage(*args), holdout_coverage(*args, eu_level=True)
    assert max(c for c, *_ in fixed[4:]) < 0.85 < 0.95 < min(c for c, *_ in fixed[2:4]), fixed  # c short, b beyond
    assert all(abs(c - 0.9) < 0.04 for c, *_ in following), following
    fitted = fit_calibration(samples["residuals"], samples["noise_levels"], 2, eu=samples["eu"],
                             eu_bin_levels=(0.5, 0.9), means=samples["means"], intensity_edges=(-0.9,), eu_level=True)
    tissue_cells = fitted.eu_bins[1::2]
    assert fitted.adapts_to_eu_level and all(EU_LEVEL_EXPONENT_MAX - 0.05 < c["eu_level_exponent"] <=
                                             EU_LEVEL_EXPONENT_MAX for c in tissue_cells), tissue_cells
    assert "each cell's scales divided by (slice's EU level / its reference) ** exponent" in fitted.describe()
    # an error that grows faster than the EU level (residuals rising with it) keeps fixed scales: exponent 0
    rising = [r * e.median(dim=1, keepdim=True).values.double()
              for r, e in zip(samples["residuals"], samples["eu"], strict=True)]
    steep = fit_calibration(rising, samples["noise_levels"], 2, eu=samples["eu"], means=samples["means"],
                            intensity_edges=(-0.9,), eu_level=True)
    assert [c["eu_level_exponent"] for c in steep.eu_bins[1::2]] == [0.0, 0.0]
    noise, intensity = torch.full((8,), 0.2), torch.full(shape, 0.2)
    eu = torch.rand(shape, generator=rng)
    low, high = tissue_cells[1]["eu_level_range"]
    ratio = fitted.scale_map(noise, eu, intensity=intensity) / fitted.scale_map(noise, 4 * eu, intensity=intensity)
    assert torch.allclose(ratio, torch.tensor(4.0**0.5, dtype=torch.float64), rtol=0.1)  # 4x the EU: half the scale
    beyond = fitted.scale_map(noise, 1e3 * high * eu, intensity=intensity)
    assert torch.equal(beyond, fitted.scale_map(noise, 1e4 * high * eu, intensity=intensity))  # clipped at the top
    path = fitted.save(tmp_path / "calibration.json")
    assert torch.equal(Calibration.load(path).scale_map(noise, eu, intensity=intensity),
                       fitted.scale_map(noise, eu, intensity=intensity))
    assert fitted.scale_map(noise, None, intensity=intensity).shape == (8,)  # no EU: each slice its noise bin's scale
    content = json.loads(path.read_text())
    content["eu_bins"][1]["eu_level_exponent"] = 0.8
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"EU-level exponent 0.8 \(at most 0.5\)"):
        Calibration.load(path)
    with pytest.raises(ValueError, match="eu_level needs the cases' EU samples"):
        fit_calibration(samples["residuals"], eu_level=True)
    row = holdout_script_row(samples, tmp_path, "2 noise bins, intensity classes cut at [-0.9], EU bins at [0.5, 0.9], "
                             "scales following the EU level: held-out 90% coverage per patient (its highest-EU "
                             "tenth, its tissue)", "i01000_model_pitch")
    assert row[::3] == [f"{c:.3f}" for c, *_ in following[1::2]]
    # the calibrate run's fitter, joining two machines' samples files (run id 'recalibrate'); not files of other
    # weight sets
    made_with = {"M": 4, "N": 4, "steps": 10, "seed": 0, "weight_draws": "balanced"}
    complete = {**samples, "local_eu": samples["eu"], "departures": [torch.ones(8)] * 6, "accelerations": [None] * 6,
                "sampling": made_with}
    for name, cases, sampling in (("a", slice(0, 4), made_with), ("b", slice(4, 6), made_with),
                                  ("other", slice(4, 6), {**made_with, "M": 2})):
        torch.save({k: v if k == "sampling" else v[cases] for k, v in {**complete, "sampling": sampling}.items()},
                   tmp_path / f"{name}.pt")
    fitter = lambda: CalibrationFitter(str(tmp_path / "fitted.json"), bins=2, eu_bin_levels=(0.5, 0.9),  # noqa: E731
                                       intensity_edges=(-0.9,), eu_level=True)
    with caplog.at_level(logging.INFO, logger="hyper_dm.inference"):
        assert fitter().refit([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")], "iid").eu_bins == fitted.eu_bins
    assert Calibration.load(tmp_path / "fitted.json").sampling == made_with
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'other.pt'} was reconstructed with {{'M': 2,")):
        fitter().refit([str(tmp_path / "a.pt"), str(tmp_path / "other.pt")], "balanced")
    span = f"{min(c for c, *_ in following):.3f}-{max(c for c, *_ in following):.3f}"
    assert f"90% coverage {span} over patients and measurements" in caplog.text


def test_bundle_calibrate_run_id_then_calibrated_maps_at_inference(tmp_path, luna, checkpoint):
    common = ["--inference_cfg#ckpt", str(checkpoint), "--data#dataset_dir", str(luna), "--data#img_size", "32",
              "--inference_cfg#calibration", str(tmp_path / "calibration.json")]
    eu_bins = ["--inference_cfg#calibration_eu_bins", "[0.5, 0.9]"]
    run = bundle_inference(*common, *eu_bins, "--inference_cfg#calibration_samples", str(tmp_path / "kept.pt"),
                           run_id="calibrate")
    assert run.returncode == 0, run.stderr[-3000:]
    fitted = json.loads((tmp_path / "calibration.json").read_text())
    # run id 'recalibrate': the kept samples, split in two files as two machines would write them, fit the same
    # calibration without reconstructing; a case in both files is refused, naming it
    kept = torch.load(tmp_path / "kept.pt", weights_only=True)
    assert kept["sampling"] == {"M": 2, "N": 2, "steps": 2, "seed": 0, "weight_draws": "balanced"}
    parts = [{k: v if k == "sampling" else v[i:j] for k, v in kept.items()} for i, j in ((0, 1), (1, None))]
    for i, part in enumerate(parts):
        torch.save(part, tmp_path / f"part{i}.pt")
    del parts[0]["sampling"]  # a file from before metadata 0.17.0: made with this configuration's weight sets
    torch.save(parts[0], tmp_path / "part0.pt")
    joined = ["--inference_cfg#calibration", str(tmp_path / "joined.json"), "--inference_cfg#calibration_from_samples"]
    run = bundle_inference(*common, *eu_bins, *joined, f"['{tmp_path / 'part0.pt'}', '{tmp_path / 'part1.pt'}']",
                           run_id="recalibrate")
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "joined.json").read_text()) == fitted
    run = bundle_inference(*common, *eu_bins, *joined, f"['{tmp_path / 'part1.pt'}', '{tmp_path / 'kept.pt'}']",
                           run_id="recalibrate")
    assert run.returncode != 0 and f"appear more than once in ['{tmp_path / 'part1.pt'}'" in run.stderr
    # the one validation case at the three photon counts, one noise bin per count, each split into air and tissue
    # (the mean at -900 HU) and each of those into three EU bins
    assert fitted["n_cases"] == 3 and fitted["scales"]["0.9"] > 0 and len(fitted["noise_scales"]) == 3
    assert fitted["eu_bin_levels"] == [0.5, 0.9] and fitted["intensity_edges"] == [-0.9]
    assert len(fitted["eu_bins"]) == 6
    assert all(len(b["scales"]) == len(b["edges"]) + 1 == 3 and b["edges"] == sorted(b["edges"])
               for b in fitted["eu_bins"])
    low, high = fitted["noise_range"]
    assert 0 < low < fitted["noise_edges"][0] < fitted["noise_edges"][1] < high
    run = bundle_inference(*common, "--inference_cfg#outdir", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    (case,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    metrics = json.loads((case / f"{case.name}_metrics.json").read_text())
    assert metrics["coverage_90_calibrated"] > metrics["coverage_90"]
    total = nib.load(case / f"{case.name}_total.nii.gz").get_fdata()
    calibrated = nib.load(case / f"{case.name}_total_std_calibrated.nii.gz").get_fdata()
    body = total > 1.0  # HU^2: where the ratio is well defined
    # each pixel: its EU bin's 90% scale in its class and noise bin over the cell's factor for the slice's EU level
    # (its median EU in model units, 1000 HU, clipped to the cell's range, over its reference, ** its exponent)
    assert all(b["eu_level_exponent"] <= 0.5 and b["eu_level_range"][0] <= b["eu_level_reference"]
               <= b["eu_level_range"][1] for b in fitted["eu_bins"])  # calibration_eu_level: true by default
    eu_level = np.quantile(nib.load(case / f"{case.name}_eu.nii.gz").get_fdata() / 1000.0**2, 0.5, axis=(0, 1))
    tissue = nib.load(case / f"{case.name}_mean.nii.gz").get_fdata() > -900.0
    for z, level in enumerate(eu_level):
        for c, in_class in enumerate((~tissue[..., z], tissue[..., z])):
            cells = fitted["eu_bins"][c::2]  # this class in each noise bin
            expected = np.array([s["0.9"] / (np.clip(level, *b["eu_level_range"]) / b["eu_level_reference"])
                                 ** b["eu_level_exponent"] for b in cells for s in b["scales"]])
            ratio = calibrated[..., z][body[..., z] & in_class] / np.sqrt(total[..., z][body[..., z] & in_class])
            assert ratio.size == 0 or np.abs(ratio[:, None] - expected[None]).min(axis=1).max() < 1e-3 * expected.max()
    # the input check: the calibration keeps every slice's departure; the benchmark's own input passes it
    departures = fitted["departures"]
    assert len(departures) > 3 and len(departures) % 3 == 0 and departures == sorted(departures) and departures[0] > 0
    by_bin = fitted["noise_departures"]  # the same slices, per noise bin
    assert len(by_bin) == 3 and sorted(sum(by_bin, [])) == departures
    manifest = json.loads((case / f"{case.name}_manifest.json").read_text())
    assert metrics["input_unlike_calibration"] is False and metrics["input_departure_p"] > 0.01
    assert manifest["input_check"]["slices_unlike_calibration"] == len(manifest["input_check"]["flagged_slices"])
    # a calibration whose inputs the model followed ten times closer: every slice of the same input departs further;
    # written before 0.9.8 (no EU threshold, so no unfamiliar map; weight sets from iid latents)
    assert fitted["sampling"] == {"M": 2, "N": 2, "steps": 2, "seed": 0, "weight_draws": "balanced"}  # how it was made
    threshold, bin_thresholds = fitted.pop("eu_threshold"), fitted.pop("noise_eu_thresholds")
    del fitted["sampling"]["weight_draws"]
    fitted["departures"] = [d / 10 for d in departures]
    fitted["noise_departures"] = [[d / 10 for d in b] for b in by_bin]
    (tmp_path / "calibration.json").write_text(json.dumps(fitted))
    run = bundle_inference(*common, "--inference_cfg#outdir", str(tmp_path / "again"), "--inference_cfg#seed", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    check = json.loads((tmp_path / "again" / case.name / f"{case.name}_manifest.json").read_text())["input_check"]
    assert check["input_unlike_calibration"] is True
    assert check["input_departure_p"] in {1 / (len(b) + 1) for b in by_bin}
    assert check["flagged_slices"] == list(range(total.shape[-1]))
    assert f"case {case.name}: the reconstruction moved its input's coarse content further" in run.stdout + run.stderr
    assert "unfamiliar_fraction" not in check and not list((tmp_path / "again").rglob("*_unfamiliar.nii.gz"))
    assert "the calibration holds no EU threshold, so no unfamiliar-pixel map is written" in run.stdout + run.stderr
    assert "WARNING - case " + case.name + ": reconstructed with {'M': 2, 'N': 2, 'steps': 2, 'seed': 1, " \
        "'weight_draws': 'balanced'}, the calibration with {'M': 2, 'N': 2, 'steps': 2, 'seed': 0, 'weight_draws': " \
        "'iid'}" in run.stdout + run.stderr  # other weight sets
    # the unfamiliar map: EU in model units (CT: 1000 HU) above the threshold of each slice's noise bin (the bin
    # whose 90% scale the slice's calibrated std took), or its local EU contrast above that bin's, a uint8 mask
    assert threshold > 0 and len(bin_thresholds) == 3 and min(bin_thresholds) > 0
    local_thresholds = fitted["noise_local_eu_thresholds"]
    assert fitted["local_eu_window"] == 1 / 16 and len(local_thresholds) == 3 and min(local_thresholds) > 1
    image = nib.load(case / f"{case.name}_unfamiliar.nii.gz")
    flagged = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.uint8 and set(np.unique(flagged)) <= {0, 1}
    eu = nib.load(case / f"{case.name}_eu.nii.gz")
    assert np.allclose(image.affine, eu.affine) and flagged.shape == total.shape
    per_noise_bin = [np.array([s["0.9"] for b in fitted["eu_bins"][2 * n:2 * n + 2] for s in b["scales"]])
                     for n in range(3)]  # its two classes' EU bins
    slice_bin = [int(np.argmin([np.abs(ratio_z[:, None] - scales[None]).min(axis=1).max()
                                for scales in per_noise_bin]))  # the noise bin whose EU-bin scales it took
                 for ratio_z in (calibrated[..., z][body[..., z]] / np.sqrt(total[..., z][body[..., z]])
                                 for z in range(total.shape[-1]))]
    expected = eu.get_fdata() / 1000.0**2 > np.array(bin_thresholds)[slice_bin]
    contrast = local_eu_contrast(torch.from_numpy(eu.get_fdata())[None])[0].numpy()
    expected_local = contrast > np.array(local_thresholds)[slice_bin]
    assert expected.sum() > 0 and (expected_local & ~expected).any()  # the local test adds pixels
    assert (flagged.astype(bool) != (expected | expected_local)).sum() <= 2
    assert metrics["unfamiliar_fraction"] == pytest.approx(flagged.mean(), abs=1e-3)
    assert metrics["unfamiliar_fraction"] < 0.05  # a benchmark case like the calibration's


def test_script_names_a_missing_input_in_one_line(tmp_path, checkpoint):
    run = subprocess.run([sys.executable, "scripts/infer.py", "--ckpt", str(checkpoint), "--input",
                          str(tmp_path / "nope.nii.gz"), "--outdir", str(tmp_path / "out"),
                          *[f"{k.replace('#', '.')}={json.dumps(v)}" for k, v in SMALL_MODEL.items()]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"hyper-dm infer: error: {tmp_path / 'nope.nii.gz'}: inference input does not exist; give a volume file, "
        "a folder of volumes, a DICOM series folder or a datalist JSON (inference_cfg#input)")
    assert "Traceback" not in run.stderr


def test_script_exits_3_when_cases_were_skipped(tmp_path, luna, checkpoint):
    series = sorted(luna.rglob("*.mhd"))
    (tmp_path / "list.json").write_text(json.dumps({"testing": [{"image": str(series[0])},
                                                                {"image": str(tmp_path / "gone.mhd")}]}))
    run = subprocess.run([sys.executable, "scripts/infer.py", "--ckpt", str(checkpoint), "--input",
                          str(tmp_path / "list.json"), "--outdir", str(tmp_path / "out"), "--M", "2", "--N", "2",
                          "diffusion.ddim_steps=2", "data.img_size=32", "data.on_bad_file=skip",
                          *[f"{k.replace('#', '.')}={json.dumps(v)}" for k, v in SMALL_MODEL.items()]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, run.stderr[-2000:]
    assert "1 case(s) skipped" in run.stderr.splitlines()[-1]
    assert (tmp_path / "out" / series[0].stem / f"{series[0].stem}_mean.nii.gz").is_file()


def test_script_overrides_may_come_before_and_after_the_flags():
    from hyper_dm.cli import command_overrides, parse_args

    args = parse_args(["infer", "model.z_dim=4", "--input", "scan.nii.gz", "--mode", "measured",
                       "inference.skip_existing=true"])
    assert command_overrides(args) == {"model#z_dim": 4, "inference_cfg#skip_existing": True,
                                       "inference_cfg#input": "scan.nii.gz", "inference_cfg#input_mode": "measured"}
    with pytest.raises(SystemExit):
        parse_args(["infer", "--input", "a.nii.gz", "--bogus"])


def test_knee_draws_are_made_consistent_with_the_measured_kspace(tmp_path):
    """Each draw is moved towards the measured k-space columns before the statistics are taken: the mean of an
    untrained model moves towards the reference, and the measurement pins much of the draws' spread."""
    from monai.bundle import ConfigParser

    h5 = write_fastmri_knee_like(tmp_path / "knee", n_files=1, seed=4, n_slices=(2, 2))[0]
    configs = REPO / "bundle" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / n) for n in ("common.yaml", "inference.yaml", "knee_singlecoil.yaml")])
    parser.update({**SMALL_MODEL, "device": "$torch.device('cpu')"})
    torch.save({"hypernet": parser.get_parsed_content("network").state_dict()}, tmp_path / "knee.pt")
    model = HyperDM.from_bundle(tmp_path / "knee.pt", config=str(configs / "knee_singlecoil.yaml"), device="cpu",
                                **SMALL_MODEL)
    case = load_case({"image": str(h5), "case_id": "k"}, {**model.data, "accelerations": [4],
                                                          "center_fractions": [0.08]}, "simulate", 32)
    recon = model.reconstructor(M=2, N=3, steps=2, seed=1)
    consistent = recon.reconstruct_case(case)
    plain = recon(case["cond"], case["gain"], case["offset"], out_size=(320, 320))
    rmse = lambda out: float((out["mean"] - case["label"]).pow(2).mean().sqrt())  # noqa: E731
    assert consistent["mean"].shape == case["label"].shape
    assert rmse(consistent) < 0.85 * rmse(plain)  # the measured columns put back (the rest is the model's)
    assert float(consistent["total"].mean()) < 0.5 * float(plain["total"].mean())  # and no longer in question
    assert float(consistent["eu"].min()) >= 0 and float(consistent["au"].min()) >= 0
    torch.testing.assert_close(consistent["total"], consistent["eu"] + consistent["au"])


def test_the_shipped_ct_model_tells_the_truth_on_a_scanners_photon_starved_fbp(tmp_path, caplog):
    """The trained model and calibration of bundle/models through the Python API, on a series it never saw (512 x
    512 at 0.74 mm): the FBP a scanner makes at that pitch with 1e3 photons per bin (where the model before 0.9.0
    fell to 15 dB and its calibrated intervals covered 2%, docs/recipes.md) gets a mean far closer to the truth than
    the FBP, calibrated intervals that cover the truth, and passes the input check, as the model-grid FBP does; at
    1e2 photons per bin, below anything trained or calibrated on, every slice is flagged, and so is the quiet
    model-grid FBP 300 HU too bright (a level the pooled calibration slices would have accepted, p 0.13)."""
    (mhd,) = write_luna16_like(tmp_path, n_series=1, seed=11, size_xy=512, n_slices=(3, 3),
                               spacing_xy_mm=(0.74, 0.74), n_subsets=1)
    model = HyperDM.from_bundle(REPO / "bundle" / "models" / "model.pt")  # calibration.json beside it
    assert model.calibration is not None and model.calibration.departures

    def reconstruct(i0: float, pitch: str, offset_hu: float = 0.0, weight_sets: int = 2) -> tuple[dict, dict]:
        """The FBP made at ``pitch`` (plus ``offset_hu``), given to the Python API as a measured HU volume, with
        ``M = N = weight_sets``, and its case."""
        case = load_case({"image": str(mhd), "case_id": "s"},
                         {**model.data, "i0": i0, "noise": "poisson", "fbp_pitch": pitch}, "simulate", 64)
        cond = MetaTensor(case["cond"] + offset_hu, affine=case["volume"].affine)
        return model.reconstruct(cond, M=weight_sets, N=weight_sets, steps=10), case

    with caplog.at_level(logging.WARNING, logger="hyper_dm.inference"):
        assert not reconstruct(1e5, "model")[0]["input_check"]["flagged_slices"]
    assert "scales for M = 2, N = 2 come from the 'calibrate' run id with --inference_cfg#M 2 --inference_cfg#N 2" \
        in caplog.text  # fewer weight sets than the calibration's four
    assert reconstruct(1e5, "model", 300.0)[0]["input_check"]["flagged_slices"] == [0, 1, 2]
    starved, case = reconstruct(1e3, "source", weight_sets=4)  # the calibration's M = N = 4
    assert not starved["input_check"]["input_unlike_calibration"], starved["input_check"]
    assert starved["input_check"]["alpha"] == INPUT_CHECK_ALPHA  # at least 99 calibration slices in its noise bin
    rmse = lambda x: float((x - case["label"]).pow(2).mean().sqrt())  # noqa: E731  HU
    assert rmse(starved["mean"]) < 0.4 * rmse(case["cond"]), (rmse(starved["mean"]), rmse(case["cond"]))
    calibrated, total = starved["total_std_calibrated"], starved["total"]
    assert calibrated.shape == (1, 512, 512, 3) and torch.allclose(calibrated.affine, starved["mean"].affine)
    covered = (starved["mean"] - case["label"]).abs() <= 1.645 * calibrated
    tissue = case["label"] > -900.0  # HU: the calibration's air | tissue edge
    assert float(covered.float().mean()) > 0.85 and float(covered[tissue].float().mean()) > 0.85, \
        (float(covered.float().mean()), float(covered[tissue].float().mean()))
    # measured: 0.921, the tissue 0.917 (0.16.0's calibration, without the EU level: 0.943, 0.945; 0.14.0's without
    # classes: 0.916, 0.852); at M = N = 2, fewer weight sets than calibrated (the log warns), 0.725, 0.923 (0.655,
    # 0.844); before 0.9.0: 0.02
    ratio = calibrated[total > 0] / total[total > 0].sqrt()
    scales = [s["0.9"] / (level / b["eu_level_reference"]) ** b["eu_level_exponent"]  # each pixel its EU bin's, over
              for b in model.calibration.eu_bins for s in b["scales"] for level in b["eu_level_range"]]  # its factor
    assert float(ratio.min()) >= min(scales) - 1e-3 and float(ratio.max()) <= max(scales) + 1e-3
    beyond = reconstruct(1e2, "source")[0]["input_check"]
    assert beyond["input_unlike_calibration"] and beyond["flagged_slices"] == [0, 1, 2], beyond


def test_from_bundle_names_a_missing_calibration(checkpoint, tmp_path):
    with pytest.raises(BadInputError, match="nowhere.json: does not exist"):
        HyperDM.from_bundle(checkpoint, device="cpu", calibration=tmp_path / "nowhere.json", **SMALL_MODEL)
    model = HyperDM.from_bundle(checkpoint, device="cpu", **SMALL_MODEL)  # none beside it: raw maps only
    assert model.calibration is None


def test_the_shipped_knee_models_eu_rises_inside_an_object_it_never_saw(tmp_path):
    """bundle/models/knee as a user runs it, on a challenge-style 4x file whose anatomy has a 12 mm square of 4 mm
    bright / signal-void checkers painted in (no training input had one): the EU map it writes is at least 3x higher
    inside the square than in the rest of the knee (median over slices; the model shipped before metadata 0.9.6,
    trained without the KL term on the unmeasured columns, gave about 1x)."""
    full = write_fastmri_knee_like(tmp_path / "full", n_files=1, seed=31, n_slices=(3, 3))[0]
    square = insert_checkered_knee_square(full, tmp_path / "square.h5")  # [320, 320, Z] bool
    scan = write_challenge_like(tmp_path / "square.h5", tmp_path / "in" / "square.h5", acceleration=4, seed=2)
    run = subprocess.run([sys.executable, "scripts/infer.py", "--config", "bundle/configs/knee_singlecoil.yaml",
                          "--ckpt", "bundle/models/knee/model.pt", "--input", str(scan), "--mode", "measured",
                          "--outdir", str(tmp_path / "out"), "--M", "4", "--N", "2", "diffusion.ddim_steps=10"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    eu = nib.load(tmp_path / "out" / "square" / "square_eu.nii.gz").get_fdata()
    data = resolve_data_config({"task": "mri", "img_size": 64, "mri_norm": "volume_max", "split_seed": 0})
    truth = load_case({"image": str(tmp_path / "square.h5"), "case_id": "t"}, data, "simulate", 64)["label"][0]
    body = truth.numpy() > 0.1 * float(truth.max())
    assert eu.shape == square.shape == body.shape
    ratios = [eu[..., z][square[..., z]].mean() / eu[..., z][body[..., z] & ~square[..., z]].mean()
              for z in range(eu.shape[-1])]
    assert np.median(ratios) >= 3, ratios  # measured: 13.7 (iid latents: 17.4; 7.0 at the plain zero-filled max)
    # the unfamiliar map (the shipped 4x calibration's EU thresholds and local EU thresholds, per noise bin) flags
    # much of the square and little of the rest
    flagged = nib.load(tmp_path / "out" / "square" / "square_unfamiliar.nii.gz").get_fdata() > 0.5
    inside, elsewhere = flagged[square].mean(), flagged[body & ~square].mean()
    assert inside > 0.2 and inside > 15 * elsewhere, (inside, elsewhere)  # measured: 0.67 and 0.038 (the absolute
    # test alone, metadata 0.12.0: 0.47 and 0.019; iid latents: 0.39 and 0.013; one pooled threshold: 0.26, 0.0024)


def test_the_shipped_knee_model_reconstructs_a_challenge_file_after_a_clone(tmp_path):
    """bundle/models/knee: the trained knee model and its calibration (found beside it) on a challenge-style 4x file
    it never saw, as a user runs it: calibrated maps on the 320 x 320 grid, closer to the truth than zero-filled,
    the 4x calibration and an input check that passes; a 6x file beside it, an acceleration never calibrated, takes
    the nearest calibrated one with a warning naming it. Neither has a fully sampled max (challenge files do not): the
    scale is the zero-filled max times the calibration's ratio, and EU reads as for the same file with its max."""
    full = write_fastmri_knee_like(tmp_path / "full", n_files=1, seed=31, n_slices=(3, 3))[0]
    scan = write_challenge_like(full, tmp_path / "in" / "knee scan.h5", acceleration=4, seed=2)
    write_challenge_like(full, tmp_path / "in" / "six.h5", acceleration=6, center_fraction=0.06, seed=2)
    with_max = write_challenge_like(full, tmp_path / "in" / "with_max.h5", acceleration=4, seed=2)
    with h5py.File(full) as hf, h5py.File(with_max, "a") as out:
        out.attrs["max"] = hf.attrs["max"]
    run = subprocess.run([sys.executable, "scripts/infer.py", "--config", "bundle/configs/knee_singlecoil.yaml",
                          "--ckpt", "bundle/models/knee/model.pt", "--input", str(scan.parent), "--mode", "measured",
                          "--outdir", str(tmp_path / "out"), "--M", "2", "--N", "2", "diffusion.ddim_steps=10"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    case = tmp_path / "out" / "knee_scan"
    mean = nib.load(case / "knee_scan_mean.nii.gz").get_fdata()
    calibrated = nib.load(case / "knee_scan_total_std_calibrated.nii.gz").get_fdata()
    assert mean.shape == calibrated.shape == (320, 320, 3) and (calibrated >= 0).all()
    check = json.loads((case / "knee_scan_manifest.json").read_text())["input_check"]
    assert check["input_unlike_calibration"] is False, check
    assert check["calibration_acceleration"] == 4.0 and 3.5 < check["mask_acceleration"] < 4.6, check  # its mask's
    six = json.loads((tmp_path / "out" / "six" / "six_manifest.json").read_text())["input_check"]
    nearest = min((4.0, 8.0), key=lambda a: abs(math.log(a / six["mask_acceleration"])))  # ~5.7x: either side
    assert six["calibration_acceleration"] == nearest and 5.0 < six["mask_acceleration"] < 7.0, six
    warned = [line for line in run.stdout.splitlines() if "far from every calibrated acceleration" in line]
    assert len(warned) == 1 and "case six:" in warned[0] and "(4x, 8x)" in warned[0], warned
    assert "read high" not in run.stdout + run.stderr  # the shipped calibration records the scale ratio
    ratio = Calibration.load("bundle/models/knee/calibration.json").accelerations["4"].scale_ratio
    assert check["zero_filled_scale_ratio"] == pytest.approx(ratio) and 1.05 < ratio < 1.4, (check, ratio)
    assert "zero_filled_scale_ratio" not in json.loads((tmp_path / "out" / "with_max" / "with_max_manifest.json")
                                                       .read_text())["input_check"]
    data = resolve_data_config({"task": "mri", "img_size": 64, "mri_norm": "volume_max", "mask_type": "random",
                                "center_fractions": [0.08], "accelerations": [4], "split_seed": 0})
    truth = load_case({"image": str(full), "case_id": "f"}, data, "simulate", 64)["label"][0].numpy()
    measured = load_case({"image": str(scan), "case_id": "s"}, data, "measured", 64)["cond"][0].numpy()
    error = lambda x: np.sqrt(np.mean((x - truth) ** 2))  # noqa: E731
    assert error(mean) < 0.8 * error(measured), (error(mean), error(measured))
    knee = truth > 0.1 * truth.max()  # EU there: with the ratio as with the file's own max (5x without the ratio)
    eu = {name: nib.load(tmp_path / "out" / name / f"{name}_eu.nii.gz").get_fdata()[knee] for name in ("knee_scan",
                                                                                                     "with_max")}
    assert 0.67 < eu["knee_scan"].mean() / eu["with_max"].mean() < 1.5, {k: v.mean() for k, v in eu.items()}


def test_a_deep_ensemble_of_models_trained_apart_runs_as_one_model(tmp_path, luna, checkpoint):
    """scripts/ensemble.py combines K members' checkpoints into one; the Python API and the bundle load it with
    ``model#ensemble_members`` K (forgetting it is an error naming the key), with each member's weights as trained
    (which weight set comes from which member: tests/test_hypernet.py)."""
    from monai.bundle import ConfigParser

    from hyper_dm.networks import DeepEnsemble

    sys.path.insert(0, str(REPO / "scripts"))
    import ensemble  # noqa: E402  (scripts/ensemble.py)

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml")])
    parser.update({**SMALL_MODEL, "device": "$torch.device('cpu')"})
    record = parser.get_parsed_content("checkpoint_config")
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # each member from its own initial weights, as training with its own seed
        members.append(tmp_path / f"member{seed}.pt")
        torch.save({"hypernet": parser.get_parsed_content("network", lazy=False).state_dict(), "config": record},
                   members[-1])
    path = tmp_path / "ensemble" / "model.pt"
    assert ensemble.main(["--members", *map(str, members), "--to", str(path)]) == 0
    with pytest.raises(BadInputError, match="model#ensemble_members is 2 in the checkpoint but 1 in this config"):
        HyperDM.from_bundle(path, device="cpu", **SMALL_MODEL)
    model = HyperDM.from_bundle(path, device="cpu", **SMALL_MODEL, **{"model#ensemble_members": 2})
    assert isinstance(model.network, DeepEnsemble)
    loaded = model.network.members[1].state_dict()
    for name, tensor in torch.load(members[1], weights_only=True)["hypernet"].items():
        torch.testing.assert_close(loaded[name], tensor)  # member 1's template and HyperNetwork, as trained
    cond = torch.linspace(-800, 800, 32 * 32 * 2).reshape(1, 32, 32, 2)
    gain, offset = torch.full((2,), 1000.0), torch.zeros(2)
    out = model.reconstructor(M=2, N=2, steps=2)(cond, gain, offset)
    torch.testing.assert_close(out["total"], out["eu"] + out["au"])
    assert float(out["eu"].min()) >= 0 and (out["eu"] > 0).float().mean() > 0.5  # the two members disagree
    with pytest.raises(ValueError, match="M=3: a deep ensemble of 2 members needs M a multiple of 2"):
        model.reconstructor(M=3, N=2)
    from hyper_dm.evaluation import evaluate, write_report

    results = evaluate(model.reconstructor(M=2, N=2, steps=2), {**model.data, "dataset_dir": str(luna)}, cases=1,
                       repeats=1)
    report = write_report(tmp_path / "report", results, {**model.data, "dataset_dir": str(luna)}, "a command")
    assert "| deep ensemble (2 models) mean |" in report.read_text()  # the report names what it measured
    with pytest.raises(BadInputError, match="already a deep ensemble"):
        ensemble.main(["--members", str(path), str(members[0]), "--to", str(tmp_path / "twice.pt")])
    with pytest.raises(BadInputError, match="config record"):
        ensemble.main(["--members", str(members[0]), str(checkpoint), "--to", str(tmp_path / "bare.pt")])
    torch.save({"hypernet": torch.load(members[1], weights_only=True)["hypernet"],
                "config": {**record, "model": {**record["model"], "rank": 8}}}, tmp_path / "other.pt")
    with pytest.raises(BadInputError, match=r"other\.pt.*model#rank is 8 in the checkpoint but 4"):
        ensemble.main(["--members", str(members[0]), str(tmp_path / "other.pt"), "--to", str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()
    nifti = oblique_nifti(sorted(luna.rglob("*.mhd"))[0], tmp_path / "study.nii.gz")
    run = bundle_inference("--inference_cfg#ckpt", str(path), "--model#ensemble_members", "2", "--inference_cfg#input",
                           str(tmp_path / "study.nii.gz"), "--inference_cfg#input_mode", "measured",
                           "--inference_cfg#outdir", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    eu = nib.load(tmp_path / "out" / "study" / "study_eu.nii.gz")
    assert eu.shape == nifti.shape and float(eu.get_fdata().mean()) > 0
