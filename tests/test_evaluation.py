"""The evaluation workflow (scripts/evaluate.py and the bundle's ``evaluate`` run id): the unfamiliar objects it
inserts, and reports for CT and for knee MRI at 4x and 8x with their noise levels, written end to end with a small
untrained model."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SMALL_MODEL
from monai.bundle import ConfigParser

from hyper_dm.calibration import LEVELS, Calibration
from hyper_dm.data.config import MEASUREMENT_NOISE
from hyper_dm.data.synthetic import (
    insert_bright_lesion,
    insert_checkered_knee_square,
    insert_checkered_square,
    insert_dense_disc,
    write_fastmri_knee_like,
    write_luna16_like,
)
from hyper_dm.physics.mri import center_crop, ifft2c

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import evaluate  # noqa: E402  (scripts/evaluate.py)
import weight_draws_study  # noqa: E402  (scripts/weight_draws_study.py)

SMALL_OVERRIDES = ["model.channels=[16,16,16]", "model.attention_levels=[false,false,false]",
                   "model.norm_num_groups=8", "model.num_head_channels=8"]  # SMALL_MODEL as script overrides
KNEE_CONFIG = REPO / "bundle" / "configs" / "knee_singlecoil.yaml"


def small_knee_model(path: Path) -> Path:
    """An untrained :data:`SMALL_MODEL` knee HyperNetwork saved as training saves ``model.pt``, at ``path``."""
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle" / "configs" / n) for n in ("common.yaml", "inference.yaml")]
                       + [str(KNEE_CONFIG)])
    parser.update({**SMALL_MODEL, "device": "$torch.device('cpu')"})
    torch.save({"hypernet": parser.get_parsed_content("network").state_dict()}, path)
    return path


def test_unfamiliar_objects_lie_where_their_masks_say(tmp_path):
    mhd = write_luna16_like(tmp_path / "ct", n_series=1, seed=4, size_xy=96, n_slices=(3, 3),
                            spacing_xy_mm=(3.5, 3.5))[0]
    mask = insert_dense_disc(mhd, tmp_path / "disc.nii.gz")
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(mhd))).transpose(2, 1, 0)  # [X, Y, Z]
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "disc.nii.gz"))).transpose(2, 1, 0)
    assert mask.shape == before.shape and mask.any()
    assert set(np.unique(after[mask])) == {300.0, 900.0}  # the stripes
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert (before[mask] < -500).mean() > 0.5  # in the lung, as placed by default
    square = insert_checkered_square(mhd, tmp_path / "square.nii.gz")
    after = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "square.nii.gz"))).transpose(2, 1, 0)
    assert set(np.unique(after[square])) == {100.0, 700.0} and (square & mask).any()  # the same place
    assert square.sum() > mask.sum()  # a 30 mm square holds more than a 30 mm disc
    np.testing.assert_array_equal(after[~square], before[~square])

    h5 = write_fastmri_knee_like(tmp_path / "knee", n_files=1, seed=2, n_slices=(2, 2))[0]
    mask = insert_bright_lesion(h5, tmp_path / "lesion.h5")
    with h5py.File(h5) as src, h5py.File(tmp_path / "lesion.h5") as dst:
        esc, lesion_esc, kspace = src["reconstruction_esc"][()], dst["reconstruction_esc"][()], dst["kspace"][()]
        assert dst.attrs["max"] > src.attrs["max"] and dst["ismrmrd_header"][()] == src["ismrmrd_header"][()]
    z_first = lambda m: np.moveaxis(m, -1, 0)  # noqa: E731  [X, Y, Z] -> [Z, X, Y] like the file
    inside = z_first(mask)
    assert inside.any() and lesion_esc[inside].mean() > 1.5 * esc[inside].mean()
    np.testing.assert_allclose(lesion_esc[~inside], esc[~inside], rtol=1e-3, atol=1e-3 * esc.max())
    np.testing.assert_allclose(np.abs(center_crop(ifft2c(kspace), esc.shape[-2:])), lesion_esc, rtol=1e-3,
                               atol=1e-4 * lesion_esc.max())  # k-space and reconstruction agree
    square = z_first(insert_checkered_knee_square(h5, tmp_path / "square.h5"))
    with h5py.File(tmp_path / "square.h5") as dst:
        square_esc, kspace = dst["reconstruction_esc"][()], dst["kspace"][()]
    assert (square & inside).any() and square.sum() > inside.sum()  # the same place; a square holds more
    bright = square_esc[square] > 0.5 * esc.max()  # the checkers: half bright, half signal void
    assert 0.4 < bright.mean() < 0.6 and square_esc[square][~bright].max() < 0.2 * esc.max()
    np.testing.assert_allclose(square_esc[~square], esc[~square], rtol=1e-3, atol=1e-3 * esc.max())
    np.testing.assert_allclose(np.abs(center_crop(ifft2c(kspace), esc.shape[-2:])), square_esc, rtol=1e-3,
                               atol=1e-4 * square_esc.max())


def test_top_eu_coverage_judges_the_intervals_where_the_weight_sets_disagree_most():
    """A tenth of the pixels with EU 1 and an error of 3 predicted stds, the rest EU 0 and no error: the raw 90%
    intervals miss every one of those pixels, calibrated ones four times as wide cover them; among the tissue (two
    tenths, one of them that erring tenth) the raw ones cover half."""
    from hyper_dm.evaluation import top_eu_coverage

    eu, error = torch.zeros(1, 10, 10, 2), torch.zeros(1, 10, 10, 2)
    eu[:, 0], error[:, 0] = 1.0, 3.0
    raw = {"eu": eu, "mean": error, "total": torch.ones_like(eu), "total_std_calibrated": 4 * torch.ones_like(eu)}
    assert top_eu_coverage(raw, torch.zeros_like(eu)) == {"coverage_90_top_eu": 0.0,
                                                          "coverage_90_calibrated_top_eu": 1.0}
    # the tissue (reference above -900 HU in CT's window): two tenths of the pixels, one of them the erring tenth
    from hyper_dm.evaluation import tissue_coverage
    label = torch.full_like(eu, -1000.0)
    label[:, :2] = 40.0  # HU: rows 0-1 tissue, row 0 the erring one
    raw["mean"] = label + error
    gain, offset = torch.full((2,), 1000.0), torch.zeros(2)
    assert tissue_coverage(raw, label, gain, offset) == {"coverage_90_tissue": 0.5,
                                                         "coverage_90_calibrated_tissue": 1.0}
    del raw["total_std_calibrated"]
    assert top_eu_coverage(raw, label) == {"coverage_90_top_eu": 0.0}


def test_the_model_grid_keeps_an_objects_coarse_error_and_averages_out_its_sub_grid_texture():
    """The report's model-grid error ratio: an error finer than a model pixel (a 1-pixel checkerboard, 5 x 5 of them
    per pixel of a 64 grid over 320) leaves the ratio near 1; an error as coarse as the object keeps it."""
    from hyper_dm.evaluation import inside_over_body, on_model_grid

    reference = np.zeros((320, 320, 2), np.float32)
    body = np.ones_like(reference, dtype=bool)
    inside = np.zeros_like(body)
    inside[100:160, 120:180] = True
    checkers = (np.indices(reference.shape[:2]).sum(0) % 2 * 2 - 1)[..., None]  # +-1, alternating
    for error, coarse_kept in ((0.1 + inside * checkers, False), (0.1 + inside * 1.0, True)):
        mean = reference + error.astype(np.float32)
        fine = inside_over_body((mean - reference) ** 2, inside, body)
        grid = lambda x: on_model_grid(x, 64)  # noqa: E731
        coarse = inside_over_body((grid(mean) - grid(reference)) ** 2, grid(inside) > 0.5, grid(body) > 0.5)
        assert grid(mean).shape == (64, 64, 2) and fine > 50
        assert (coarse > 50) if coarse_kept else (coarse < 2), (fine, coarse)


def test_knee_report_covers_both_accelerations_and_three_noise_levels(tmp_path):
    write_fastmri_knee_like(tmp_path / "knee", n_files=3, seed=1, n_slices=(2, 2))
    ckpt = small_knee_model(tmp_path / "knee.pt")
    out = tmp_path / "report"
    # per acceleration: at 4x 99 calibration slices that never moved their input and pixels that never had EU (every
    # 4x slice and pixel with EU > 0 evaluated here is flagged), at 8x 99 that moved it and EU further than anything
    # can (none is), each with a local EU threshold as far out
    at = lambda d: Calibration(scales={str(q): 1.0 for q in LEVELS}, n_pixels=1, n_cases=1,  # noqa: E731
                               departures=[d] * 99, eu_threshold=d if d > 1 else 0.0, local_eu_window=1 / 16,
                               local_eu_threshold=d if d > 1 else 0.0)
    unmoved = Calibration(scales={str(q): 1.0 for q in LEVELS}, n_pixels=1, n_cases=1, departures=[1.0] * 99,
                          accelerations={"4": at(1e-12), "8": at(1e12)}, eu_threshold=1.0, local_eu_window=1 / 16,
                          local_eu_threshold=1.0)
    assert evaluate.main(["--ckpt", str(ckpt), "--config", str(KNEE_CONFIG),
                          "--out", str(out), "--M", "2", "--N", "2", "--steps", "2", "--repeats", "2",
                          "--calibration", str(unmoved.save(tmp_path / "calibration.json")),
                          f"data.dataset_dir={tmp_path / 'knee'}", *SMALL_OVERRIDES]) == 0
    text = (out / "report.md").read_text()
    for setting in ("4x", "8x"):
        assert f"## {setting} acceleration: quality" in text and f"## {setting} acceleration: aleatoric" in text
    assert "zero-filled (input)" in text and "NMSE" in text and text.count("times as far as AU") == 2
    report = json.loads((out / "report.json").read_text())
    assert [(n["setting"], n["level"]) for n in report["noise"]] == [
        (s, level) for s in ("4x", "8x") for level in MEASUREMENT_NOISE["mri"][1]]
    assert all(np.isfinite(n["mean_au"]) and n["mean_au"] > 0 for n in report["noise"])
    flagged = {(n["setting"], n["slices_flagged"], n["slices"]) for n in report["noise"]}  # one file of 2 slices
    assert flagged == {("4x", 2, 2), ("8x", 0, 2)}, flagged  # each mask checked against its own acceleration
    assert "| 90% calibrated | slices flagged |" in text and "The input check flags 2 of 2 slices" in text
    assert "and acceleration (4x: 99; 8x: 99)" in text
    unfamiliar = {(n["setting"], n["unfamiliar_fraction"]) for n in report["noise"]}
    assert {s for s, f in unfamiliar if f > 0.8} == {"4x"} and {s for s, f in unfamiliar if f == 0} == {"8x"}
    assert "| slices flagged | pixels flagged unfamiliar |" in text and "| 0.000% |" in text
    assert text.count("or the mean EU over a box 0.0625 of the slice's side, over the slice's 0.9 EU quantile") == 6
    assert "the local test divides another draw's level of EU out" in text  # each run's flags: both tests
    assert text.count("Among the 10% of pixels with the highest EU, 90% intervals cover") == 2
    assert all(0 <= r["coverage_90_top_eu"] <= 1 and 0 <= r["coverage_90_calibrated_top_eu"] <= 1
               for r in report["rows"])
    for r in report["ood"]:  # each run's flags: most of the 4x object and body (EU > 0), nothing at 8x
        flags = [*r["flagged_inside"], *r["flagged_body"], r["flagged_clean_body"]]
        assert len(r["flagged_inside"]) == len(r["flagged_body"]) == 2
        assert all(f > 0.5 for f in flags) if r["setting"] == "4x" else flags == [0.0] * 5, (r["setting"], flags)
        assert np.isfinite(r["same_place_ratio"]) and r["same_place_ratio"] > 0
        assert np.isfinite(r["body_error_ratio"]) and r["body_error_ratio"] > 0
        assert f"the mean's squared error is {r['body_error_ratio']:.2f} times that of the case without it" in text
        assert f"EU on the same pixels of the case without it (median over slices, against one run): " \
               f"{r['same_place_ratio']:.1f}." in text
        first, second = r["flagged_inside"]
        assert f"{100 * first:.2f}% of the object, {100 * r['flagged_body'][0]:.2f}% of the rest of the body, " \
               f"{100 * r['flagged_clean_body']:.2f}% of the body without the object; each run's weight sets: " \
               f"{first:.2%} / {second:.2%} of the object" in text
    worse = {r["setting"]: r["input"]["nmse"] for r in report["rows"]}
    assert worse["8x"] > worse["4x"]  # the 8x input lost more of k-space
    assert {(r["setting"], r["object"]) for r in report["ood"]} == {(s, o) for s in ("4x", "8x")
                                                                    for o in ("lesion", "square")}
    assert all(np.isfinite(r["median_ratio"]) and 0 <= r["coverage_90_inside"] <= 1 for r in report["ood"])
    assert all(len(r["run_ratios"]) == 2 and r["run_ratios"][0] != r["run_ratios"][1] for r in report["ood"])
    assert all(r["median_ratio"] not in r["run_ratios"] for r in report["ood"])  # the ratio of the runs' mean EU
    assert "--repeats 2" in text and "on the mean EU map of 2 runs with other weight sets" in text
    for name in ("calibration.png", "ood_object.png", "ood_object_square.png"):
        assert (out / name).stat().st_size > 0, name


def test_bundle_evaluate_run_writes_the_ct_report(tmp_path, checkpoint):
    """``python -m monai.bundle run evaluate`` as a user types it: the CT report for a checkpoint and dataset."""
    write_luna16_like(tmp_path / "ct", n_series=4, seed=3, size_xy=96, n_slices=(2, 2), spacing_xy_mm=(3.5, 3.5))
    configs = "['bundle/configs/common.yaml','bundle/configs/inference.yaml','bundle/configs/evaluate.yaml']"
    small = [a for k, v in SMALL_MODEL.items() for a in (f"--{k}", str(v).replace(" ", ""))]  # Python literals
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "evaluate", "--config_file", configs, "--device",
         "$torch.device('cpu')", "--inference_cfg#ckpt", str(checkpoint), "--inference_cfg#M", "2",
         "--inference_cfg#N", "2", "--diffusion#ddim_steps", "2", "--data#dataset_dir", str(tmp_path / "ct"),
         "--inference_cfg#calibration", str(tmp_path / "none.json"), "--evaluate_cfg#out_dir", str(out),
         "--evaluate_cfg#cases", "1", "--evaluate_cfg#repeats", "2", "--evaluate_cfg#label", "an untrained model",
         *small], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert text.startswith("# Hyper-DM evaluation: sparse-view CT") and "an untrained model" in text
    assert "FBP (input)" in text and "(no calibration file given)" in text and "| Hyper-DM mean |" in text
    assert "python -m monai.bundle run evaluate" in text and "1 test case(s)" in text
    report = json.loads((out / "report.json").read_text())
    assert [n["level"] for n in report["noise"]] == list(MEASUREMENT_NOISE["ct"][1])
    assert report["noise"][-1]["rmse"] > report["noise"][0]["rmse"]  # i0 1e3 is a noisier measurement than 1e5
    assert all(0 <= n["coverage_90"] <= 1 and n["mean_total"] > 0 for n in report["noise"])
    assert "| squared error / predicted variance | 90% raw | 90% calibrated |" in text
    assert 0 < report["ood"][0]["eu_inside"] < float("inf")
    inside = report["ood"][0]
    assert inside["error_ratio"] > 0 and inside["total_ratio"] > 0 and 0 <= inside["coverage_90_inside"] <= 1
    first, second = inside["run_ratios"]
    assert f"each run alone: {first:.2f} / {second:.2f}. The same ratio of the squared error: " \
           f"{inside['error_ratio']:.2f}, on the model grid's 64 x 64" in text
    assert f"the error the network could draw) {inside['grid_error_ratio']:.2f};" in text
    assert f"Raw 90% intervals cover {inside['coverage_90_inside']:.3f} of its pixels" in text
    assert (out / "calibration.png").stat().st_size > 0 and (out / "ood_object.png").stat().st_size > 0
    assert [o["object"] for o in report["ood"]] == ["disc", "square"]  # one case, each object
    square = report["ood"][1]
    assert f"90% intervals cover {square['coverage_90_inside']:.3f} of its pixels" in text and "checkered" in text
    assert (out / "ood_object_square.png").stat().st_size > 0 and "![square](ood_object_square.png)" in text
    assert not list(out.glob(".*"))  # no temporary files left by the atomic writes


def test_weight_draws_study_tables_each_budget_and_way_of_drawing(tmp_path, capsys):
    """scripts/weight_draws_study.py (docs/recipes.md, "Balanced weight sets") on a small untrained knee model: one
    row per budget and way of drawing the latents, each with one EU level and one ratio per object for every seed."""
    write_fastmri_knee_like(tmp_path / "knee", n_files=3, seed=1, n_slices=(2, 2))
    ckpt = small_knee_model(tmp_path / "knee.pt")
    assert weight_draws_study.main(["--ckpt", str(ckpt), "--config", str(KNEE_CONFIG), "--budgets", "3x2",
                                    "--seeds", "2", "--steps", "2", f"data.dataset_dir={tmp_path / 'knee'}",
                                    *SMALL_OVERRIDES]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 x 2 |")]
    assert [row[1] for row in rows] == ["iid", "balanced"]
    for row in rows:
        levels = [float(x) for x in row[2].split(" / ")]
        assert len(levels) == 2 and all(np.isfinite(levels)) and min(levels) > 0
        assert float(row[3]) == pytest.approx(max(levels) / min(levels), rel=0.05)
        assert all(0 <= float(x) < 1 for x in row[5].split(" / "))  # AUSE
        for ratios in row[6:8]:  # the lesion and the square
            per_seed = [float(x) for x in ratios.split(" (")[0].split(" / ")]
            assert len(per_seed) == 2 and min(per_seed) > 0
    assert rows[0][2] != rows[1][2]  # other latents, other weight sets
    with pytest.raises(SystemExit):
        weight_draws_study.main(["--ckpt", str(ckpt), "--budgets", "1x4"])
