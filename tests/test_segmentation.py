"""Nodule segmentation workflow (segmentation.yaml): masks in each series' geometry, the variants' inputs, the
bundle's train / evaluate run ids (TensorBoard, checkpoint), learning, and bad input.

The series are stored RAS-first (direction diag(-1, -1, 1), not LUNA16's identity), so an LPS/RAS mix-up moves the
masks off the nodules.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SMALL_MODEL
from monai.bundle import ConfigParser
from monai.transforms import LoadImage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hyper_dm.data.luna16 import read_annotations
from hyper_dm.data.synthetic import write_luna16_like
from hyper_dm.data.validation import BadInputError
from hyper_dm.segmentation import LPS_TO_RAS, Variant, prepare_segmentation, sphere_mask

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SEGMENTATION = [str(CONFIGS / "common.yaml"), str(CONFIGS / "segmentation.yaml")]
TINY_SEG = {"segmentation_cfg#roi_size": [16, 16, 4], "segmentation_cfg#features": [8, 16],
            "segmentation_cfg#pixdim": [3.5, 3.5, 3.0], "segmentation_cfg#num_samples": 2}


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    """4 series (2 training, 1 validation, 1 test), 64 x 64 x 6-7 at ~3.5 mm, stored with RAS-first directions."""
    root = tmp_path_factory.mktemp("luna16")
    write_luna16_like(root, n_series=4, seed=3, size_xy=64, n_slices=(6, 7), spacing_xy_mm=(3.4, 3.6),
                      spacing_z_mm=(3.0,), direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return root


@pytest.fixture(scope="module")
def recon(tmp_path_factory, luna, checkpoint) -> Path:
    """The bundle's inference run id over every series (untrained small model, simulate mode, FBP written)."""
    out = tmp_path_factory.mktemp("recon")
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml")])
    parser.update({**SMALL_MODEL, "device": "$torch.device('cpu')", "data#img_size": 32,
                   "data#dataset_dir": str(luna), "inference_cfg#input": str(luna), "inference_cfg#outdir": str(out),
                   "inference_cfg#ckpt": str(checkpoint), "inference_cfg#calibration": None, "inference_cfg#M": 2,
                   "inference_cfg#N": 2, "diffusion#ddim_steps": 2, "inference_cfg#write_cond": True})
    parser.get_parsed_content("inference")
    return out


def world_centre_of_mass_lps(mask: np.ndarray, index_to_lps: np.ndarray) -> np.ndarray:
    com = np.argwhere(mask).mean(axis=0)
    return (index_to_lps @ np.append(com, 1.0))[:3]


def test_sphere_mask_centre_and_volume_in_an_oblique_frame():
    theta = np.deg2rad(30)
    rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    spacing = np.array([0.7, 0.8, 1.25])
    frame = np.eye(4)
    frame[:3, :3] = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(spacing)
    frame[:3, 3] = [40.0, -120.0, -300.0]
    shape = (96, 96, 48)
    centre = (frame @ np.array([40.3, 51.7, 22.4, 1.0]))[:3]
    nodule = {"coord_mm": centre.tolist(), "diameter_mm": 18.0}
    mask = sphere_mask([nodule], frame, shape)
    assert np.linalg.norm(world_centre_of_mass_lps(mask, frame) - centre) < spacing.min()
    volume_mm3 = mask.sum() * np.prod(spacing)
    assert volume_mm3 == pytest.approx(4 / 3 * np.pi * 9.0**3, rel=0.03)
    tiny = sphere_mask([{"coord_mm": centre.tolist(), "diameter_mm": 0.2}], frame, shape)
    assert tiny.sum() == 1 and tuple(np.argwhere(tiny)[0]) == (40, 52, 22)
    with pytest.raises(ValueError, match="outside the grid"):
        sphere_mask([{"coord_mm": (frame @ np.array([-3.0, 5, 5, 1]))[:3].tolist(), "diameter_mm": 5.0}], frame,
                    shape)


def test_masks_sit_on_the_annotations_as_monai_loads_them(luna, tmp_path):
    path = prepare_segmentation({"dataset_dir": str(luna)}, "reference", None, None, tmp_path)
    datalist = json.loads(path.read_text())
    nodules = read_annotations(luna / "annotations.csv")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    for item in datalist["training"] + datalist["validation"]:
        image, mask = load(str(tmp_path / item["image"])), load(str(tmp_path / item["label"]))
        assert image.shape == mask.shape and torch.allclose(image.affine, mask.affine, atol=1e-4)
        lps = LPS_TO_RAS @ mask.affine.numpy()  # index -> world LPS mm, from MONAI's RAS affine
        found = nodules[item["case_id"]]
        if len(found) == 1:  # one nodule: the mask's centre of mass is its centre
            assert np.linalg.norm(world_centre_of_mass_lps(mask[0].numpy() > 0, lps) - found[0]["coord_mm"]) \
                < np.abs(lps[:3, :3]).sum(axis=0).max()
        for nodule in (n for n in found if n["diameter_mm"] > 12):  # centre voxel: in the mask, nodule HU (80)
            index = np.rint(np.linalg.solve(lps, np.append(nodule["coord_mm"], 1.0))[:3]).astype(int)
            assert mask[(0, *index)] == 1
            assert image[(0, *index)] > 0


def test_bundle_trains_and_evaluates_the_uncertainty_variant(luna, recon, tmp_path):
    workdir = tmp_path / "seg"
    overrides = {**TINY_SEG, "data#dataset_dir": str(luna), "segmentation_cfg#variant": "hyperdm_eu_au",
                 "segmentation_cfg#reconstructions": str(recon), "segmentation_cfg#workdir": str(workdir),
                 "segmentation_cfg#epochs": 2, "segmentation_cfg#val_interval": 1, "device": "$torch.device('cpu')"}
    args = [x for k, v in overrides.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "segmentation_train", "--config_file",
                          str(SEGMENTATION), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run_dir = workdir / "hyperdm_eu_au"
    events = EventAccumulator(str(run_dir / "logs"))
    events.Reload()
    assert len(events.Scalars("train_loss")) == 2 and len(events.Scalars("val_mean_dice")) == 2  # 1 step per epoch

    parser = ConfigParser()
    parser.read_config(SEGMENTATION)
    parser.update(overrides)
    parser.get_parsed_content("seg_network").load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    item = parser.get_parsed_content("seg_validate#dataset")[0]
    assert item["image"].shape[0] == Variant.HYPERDM_EU_AU.in_channels == 3
    assert item["image"].shape[1:] == item["label"].shape[1:]
    metrics = parser.get_parsed_content("segmentation_evaluate")[-1]
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    assert (run_dir / "eval" / "val_mean_dice_raw.csv").read_text().count("\n") == 3  # header + 2 series


def test_fbp_variant_reads_the_written_input(luna, recon, tmp_path):
    datalist = json.loads(prepare_segmentation({"dataset_dir": str(luna)}, "fbp", recon, None, tmp_path).read_text())
    item = datalist["validation"][0]
    fbp = nib.load(tmp_path / item["image"])
    mean = nib.load(Path(str(tmp_path / item["image"]).replace("_cond.nii.gz", "_mean.nii.gz")))
    assert item["image"].endswith("_cond.nii.gz") and fbp.shape == mean.shape
    assert np.allclose(fbp.affine, mean.affine)
    assert -1000 <= np.asarray(fbp.dataobj).min() < np.asarray(fbp.dataobj).max() <= 1000  # HU, clipped window


def test_bad_input_names_the_item_and_writes_nothing(luna, recon, tmp_path):
    data = {"dataset_dir": str(luna)}
    csv = tmp_path / "annotations.csv"
    csv.write_text((luna / "annotations.csv").read_text() + "1.2.3.absent,0,0,-200,10\n")
    with pytest.raises(BadInputError, match=r"annotations.csv.*1\.2\.3\.absent.*absent_series=ignore"):
        prepare_segmentation(data, "reference", None, csv, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert prepare_segmentation(data, "reference", None, csv, tmp_path / "b", absent_series="ignore").is_file()

    broken = tmp_path / "recon"
    shutil.copytree(recon, broken)
    eu = next(broken.glob("*/*_eu.nii.gz"))
    eu.unlink()
    with pytest.raises(BadInputError, match=rf"{eu.name}.*'hyperdm_eu_au' needs the eu volume"):
        prepare_segmentation(data, "hyperdm_eu_au", broken, None, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert prepare_segmentation(data, "hyperdm", broken, None, tmp_path / "d").is_file()  # EU not needed there

    mean = next(broken.glob("*/*_mean.nii.gz"))
    image = nib.load(mean)
    shifted = image.affine.copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), mean)
    with pytest.raises(BadInputError, match=rf"{mean.name}.*is not that of the series"):
        prepare_segmentation(data, "hyperdm", broken, None, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    with pytest.raises(Exception, match=r"segmentation_cfg#variant must be one of \['reference', 'fbp'"):
        prepare_segmentation(data, "mean", broken, None, tmp_path / "f")


def test_reference_dice_rises_above_the_untrained_network(tmp_path):
    """Fixed seeds: 120 steps on 4 training series (96 x 96 x 8, 3.5 mm) lift validation Dice from the untrained
    network's (~0.01) to ~0.25."""
    write_luna16_like(tmp_path / "luna", n_series=6, seed=3, size_xy=96, n_slices=(8, 8), spacing_xy_mm=(3.4, 3.6),
                      spacing_z_mm=(2.5,))
    dice = {}
    for epochs in (0, 60):
        parser = ConfigParser()
        parser.read_config(SEGMENTATION)
        parser.update({**TINY_SEG, "segmentation_cfg#roi_size": [32, 32, 8], "segmentation_cfg#pixdim": [3.5, 3.5, 2.5],
                       "data#dataset_dir": str(tmp_path / "luna"), "segmentation_cfg#workdir": str(tmp_path / "seg"),
                       "segmentation_cfg#epochs": max(epochs, 1), "segmentation_cfg#val_interval": 1000,
                       "device": "$torch.device('cpu')"})
        if epochs:
            parser.get_parsed_content("segmentation_train")
        else:
            monai.utils.set_determinism(seed=0)
        evaluator = parser.get_parsed_content("seg_validate#evaluator")
        evaluator.run()
        dice[epochs] = evaluator.state.metrics["val_mean_dice"]
    assert dice[0] < 0.05 and dice[60] > dice[0] + 0.1, dice
