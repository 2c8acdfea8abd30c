"""Export for MONAI's lung nodule detection bundle, and uncertainty per finding.

The export is read back with the transforms of the detection bundle's ``configs/inference.json`` (LoadImaged,
EnsureChannelFirstd, Orientationd RAS, Spacingd, ScaleIntensityRanged -1024..300) and its box transforms
(``ConvertBoxToStandardModed`` + ``AffineBoxToImageCoordinated(affine_lps_to_ras=True)``, as its ``train.json``
maps the datalist's world boxes). The model here is untrained (fast): where image content matters, the source
HU volume goes through the same export layout (:class:`DetectionLayout` + the case writer + the datalist) and the
model's export is checked to share its grid.
"""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import SMALL_MODEL
from monai.apps.detection.transforms.dictionary import AffineBoxToImageCoordinated, ConvertBoxToStandardModed
from monai.data import load_decathlon_datalist
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    LoadImaged,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from hyper_dm.config import ConfigError
from hyper_dm.data.luna16 import read_annotations
from hyper_dm.data.synthetic import insert_dense_disc, write_luna16_like
from hyper_dm.data.validation import BadInputError
from hyper_dm.engines.writer import CaseWriter
from hyper_dm.export import DetectionDatalist, DetectionLayout, nodule_box
from hyper_dm.findings import box_voxels, run_findings
from hyper_dm.inference.inputs import case_id_of

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
EXPORT = f"['{CONFIGS / 'common.yaml'}','{CONFIGS / 'inference.yaml'}','{CONFIGS / 'export.yaml'}']"
PIXDIM = [0.703125, 0.703125, 1.25]  # the detection bundle's resampled LUNA16 grid
CT = {"task": "ct", "img_size": 32, "hu_window": [-1000.0, 1000.0], "dataset_dir": None}


def bundle_transforms(spacing: bool = False) -> Compose:
    """The preprocessing of lung_nodule_ct_detection's configs/inference.json (Spacingd: its raw-LUNA16 path)."""
    return Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        *([Spacingd(keys="image", pixdim=PIXDIM)] if spacing else []),
        ScaleIntensityRanged(keys="image", a_min=-1024.0, a_max=300.0, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys="image"),
    ])


def boxes_in_voxels(item: dict) -> dict:
    """The bundle's train.json mapping of a datalist entry's world boxes onto its loaded, RAS-oriented image."""
    return Compose([
        LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), EnsureTyped(keys=["image", "box"]),
        Orientationd(keys="image", axcodes="RAS"), ConvertBoxToStandardModed(box_keys="box", mode="cccwhd"),
        AffineBoxToImageCoordinated(box_keys="box", box_ref_image_keys="image", affine_lps_to_ras=True),
    ])(item)


@pytest.fixture(scope="module")
def luna(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("luna16")
    write_luna16_like(root, n_series=2, seed=5, size_xy=96, n_slices=(4, 5), spacing_xy_mm=(3.4, 3.6))
    return root


def bundle_export(*args: str) -> subprocess.CompletedProcess:
    small = [x for k, v in SMALL_MODEL.items() for x in (f"--{k}", json.dumps(v).replace("false", "False"))]
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "export", "--config_file", EXPORT, *small,
                           "--inference_cfg#M", "2", "--inference_cfg#N", "2", "--diffusion#ddim_steps", "2",
                           "--data#img_size", "32", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, luna, checkpoint) -> Path:
    """The bundle's 'export' run id on the synthetic LUNA16 folder, with its annotations (a training export)."""
    out = tmp_path_factory.mktemp("export") / "recon_ct"
    run = bundle_export("--inference_cfg#ckpt", str(checkpoint), "--inference_cfg#input", str(luna),
                        "--inference_cfg#outdir", str(out), "--export_cfg#annotations", str(luna / "annotations.csv"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "s per series" in run.stdout + run.stderr
    return out


def source_layout_export(mhd: Path, out: Path, eu=None) -> CaseWriter:
    """``mhd`` clipped to the model's HU window, written through the export layout as if it were the
    reconstruction (``eu``: a function of the source-grid HU volume giving the EU map; AU 1 HU^2)."""
    volume = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(mhd)).clamp(-1000, 1000)
    eu_map = volume * 0 if eu is None else eu(volume)
    volumes = {"mean": volume, "eu": eu_map, "au": volume * 0 + 1.0, "total": eu_map + 1.0}
    writer = CaseWriter(out, previews=False, suffixes={"mean": ""})
    output = DetectionLayout(PIXDIM)({"case_id": case_id_of(mhd), "volumes": volumes})
    writer.write(case_id_of(mhd), output["volumes"])
    return writer


def series_extent_lps(mhd: Path, centres: bool = False) -> np.ndarray:
    """World (LPS) extent of a series, of its voxels or (``centres``) of their centres: [[min xyz], [max xyz]] mm."""
    image = sitk.ReadImage(str(mhd))
    size = np.array(image.GetSize())
    edge = 0.0 if centres else 0.5
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
                        for corner in np.array(np.meshgrid(*[[-edge, s - 1 + edge] for s in size])).T.reshape(-1, 3)])
    return np.stack([corners.min(axis=0), corners.max(axis=0)])


def test_detection_bundle_transforms_read_the_export(exported, luna):
    items = load_decathlon_datalist(exported / "datalist.json", is_segmentation=True, data_list_key="validation",
                                    base_dir=exported)
    series = sorted(luna.rglob("*.mhd"), key=lambda p: p.stem)
    assert [Path(i["image"]).name for i in items] == [f"{p.stem}.nii.gz" for p in series]
    for item, mhd in zip(items, series, strict=True):
        loaded = bundle_transforms()(dict(item))
        image = loaded["image"]
        assert image.shape[0] == 1 and torch.allclose(image.pixdim.float(), torch.tensor(PIXDIM))
        assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        # the exported voxel centres span the series' (LPS -> RAS: x, y negated): the first centres coincide, the
        # last exported one lies less than an exported voxel before the last source centre
        lo_lps, hi_lps = series_extent_lps(mhd, centres=True)
        first = image.affine.numpy() @ [0.0, 0.0, 0.0, 1.0]
        last = image.affine.numpy() @ [*(np.array(image.shape[1:]) - 1.0), 1.0]
        np.testing.assert_allclose(first[:3], [-hi_lps[0], -hi_lps[1], lo_lps[2]], atol=1e-3)
        short = np.array([-lo_lps[0], -lo_lps[1], hi_lps[2]]) - last[:3]
        assert np.all(short > -1e-3) and np.all(short < np.array(PIXDIM)), short
        # the raw-LUNA16 path of the bundle (Spacingd to the same pixdim) does not resample the export again
        assert bundle_transforms(spacing=True)(dict(item))["image"].shape == image.shape
        hu = nib.load(item["image"]).get_fdata()
        # HU in the model's window; model units would lie within [-1, 1]
        assert -1000.5 <= hu.min() and hu.max() <= 1000.5 and np.abs(hu).max() > 2, "mean not in HU"
        np.testing.assert_allclose(image[0].numpy(), np.clip((np.flip(hu, (0, 1)) + 1024) / 1324, 0, 1)
                                   if nib.aff2axcodes(nib.load(item["image"]).affine) == ("L", "P", "S")
                                   else np.clip((hu + 1024) / 1324, 0, 1), atol=1e-5)
        eu, au, total = (nib.load(item[k]) for k in ("eu", "au", "total"))
        for volume in (eu, au, total):
            assert volume.shape == hu.shape
            np.testing.assert_allclose(volume.affine, nib.load(item["image"]).affine, atol=1e-5)
        assert (eu.get_fdata() >= 0).all() and (au.get_fdata() >= 0).all() and eu.get_fdata().max() > 0
        np.testing.assert_allclose(total.get_fdata(), eu.get_fdata() + au.get_fdata(), rtol=1e-5, atol=1e-4)
        # a training export: LUNA16's annotations as cccwhd world (LPS) boxes, class 0
        nodules = read_annotations(luna)[mhd.stem]
        assert item["box"] == [nodule_box(n["coord_mm"], n["diameter_mm"]) for n in nodules]
        assert item["label"] == [0] * len(nodules)


def test_the_unfamiliar_mask_stays_a_mask_on_the_export_grid(tmp_path, luna):
    """The export resamples the maps bilinear and the unfamiliar mask nearest: the written file holds 0 and 1 only
    (uint8), flagging about the share of the volume the source-grid mask did."""
    mhd = sorted(luna.rglob("*.mhd"))[0]
    volume = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(mhd)).clamp(-1000, 1000)
    mask = volume * 0
    mask[:, ::3, ::2] = 1.0  # a fine pattern: interpolation would make fractions of it
    volumes = {"mean": volume, "eu": volume * 0, "au": volume * 0 + 1.0, "total": volume * 0 + 1.0, "unfamiliar": mask}
    output = DetectionLayout(PIXDIM)({"case_id": "c", "volumes": volumes})
    folder = CaseWriter(tmp_path, previews=False, suffixes={"mean": ""}).write("c", output["volumes"])
    written = nib.load(folder / "c_unfamiliar.nii.gz")
    values = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(values)) == {0, 1}
    assert abs(values.mean() - float(mask.mean())) < 0.05, (values.mean(), float(mask.mean()))


def test_annotated_nodule_box_lands_on_the_nodule(tmp_path, exported, luna):
    annotations = read_annotations(luna)
    uid, nodules = max(annotations.items(), key=lambda kv: max(n["diameter_mm"] for n in kv[1]))
    mhd = next(luna.rglob(f"{uid}.mhd"))
    writer = source_layout_export(mhd, tmp_path)
    datalist = DetectionDatalist(writer, key="validation", annotations=luna / "annotations.csv",
                                 absent_series="ignore")
    datalist.cases(CT, str(mhd), skip_existing=True)  # written above
    datalist.write()
    (item,) = load_decathlon_datalist(tmp_path / "datalist.json", True, "validation", base_dir=tmp_path)
    # the model's export of the same series lies on the same grid, so its boxes land where these do
    model_export = nib.load(exported / uid / f"{uid}.nii.gz")
    reference = nib.load(item["image"])
    assert model_export.shape == reference.shape
    np.testing.assert_allclose(model_export.affine, reference.affine, atol=1e-4)

    mapped = boxes_in_voxels(dict(item))
    hu = mapped["image"][0].numpy()
    k = int(np.argmax([n["diameter_mm"] for n in nodules]))
    box = mapped["box"][k].numpy()  # xyzxyz voxels
    centre, half = (box[:3] + box[3:]) / 2, (box[3:] - box[:3]) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), axis=-1)
    distance_mm = np.linalg.norm((grid[..., :2] - centre[:2]) * PIXDIM[:2], axis=-1)
    radius_mm = nodules[k]["diameter_mm"] / 2
    near_centre = np.abs(grid[..., 2] - centre[2]) <= 1.5
    inner = np.all(np.abs(grid - centre) <= np.maximum(half / 2, 0.5), axis=-1)
    ring = near_centre & (distance_mm > radius_mm + 3) & (distance_mm < radius_mm + 9)
    assert inner.sum() > 50 and ring.sum() > 50
    assert hu[inner].mean() > -200, f"box {box} does not cover the nodule (mean {hu[inner].mean():.0f} HU)"
    assert np.median(hu[ring]) < -500, "the box's surroundings are not lung"
    # the inverse: findings' own box -> voxel mapping finds the same voxels
    region = box_voxels(nodule_box(nodules[k]["coord_mm"], nodules[k]["diameter_mm"]), reference.affine,
                        reference.shape)
    np.testing.assert_allclose([(s.start + s.stop - 1) / 2 for s in region], centre, atol=1.0)


def test_findings_flag_the_box_over_an_unfamiliar_object_not_a_normal_region(tmp_path, luna):
    mhd = sorted(luna.rglob("*.mhd"))[0]
    lo, hi = series_extent_lps(mhd)
    middle = (lo + hi) / 2
    target, mirror = middle + [-75.0, -5.0, 0.0], middle + [75.0, -5.0, 0.0]  # right and left lung (LPS)
    source = tmp_path / f"{mhd.stem}.nii.gz"
    disc = insert_dense_disc(mhd, source, target)
    # EU as a model that has not seen the object gives it: 400 HU^2 inside, 10 (air, lung) or 15 (tissue) elsewhere
    export = tmp_path / "export"
    writer = source_layout_export(source, export, eu=lambda hu: 10.0 + 5.0 * (hu > -500).float()
                                  + 385.0 * torch.from_numpy(disc)[None].float())
    datalist = DetectionDatalist(writer)
    datalist.cases(CT, str(source), skip_existing=True)
    datalist.write()
    image = next(export.rglob(f"{mhd.stem}.nii.gz"))
    thickness = (hi[2] - lo[2]) / 2
    detections = [{"image": str(image), "label": [0, 0], "label_scores": [0.9, 0.4],
                   "box": [[*target, 12.0, 12.0, thickness], [*mirror, 12.0, 12.0, thickness]]}]
    (tmp_path / "result.json").write_text(json.dumps(detections))
    path = run_findings(export, detections=tmp_path / "result.json", eu_quantile=0.95)
    report = json.loads(path.read_text())
    assert "quantile 0.95" in report["eu_threshold"]["rule"]
    assert report["eu_threshold"]["value_hu2"] == pytest.approx(15.0, abs=1e-3)  # body tissue: > 5% of voxels
    on_object, normal = report["findings"]
    assert on_object["eu_mean"] == pytest.approx(400.0, rel=1e-4) and on_object["eu_max"] == pytest.approx(400.0)
    assert on_object["au_mean"] == pytest.approx(1.0) and on_object["total_mean"] == pytest.approx(401.0, rel=1e-4)
    assert 10.0 - 1e-3 <= normal["eu_mean"] < 14.0 and normal["eu_max"] <= 15.0 + 1e-3  # lung, a vessel or two
    assert on_object["eu_high"] and not normal["eu_high"]
    assert on_object["score"] == 0.9 and on_object["n_voxels"] > 100 and normal["n_voxels"] > 100
    rows = (export / "findings.csv").read_text().splitlines()
    assert rows[0].startswith("image,case_id,finding,source,label,score,box_x") and len(rows) == 3
    assert rows[1].split(",")[-2:] == ["True", str(report["eu_threshold"]["value_hu2"])]
    # the same object as a label volume on the exported grid (a binary mask: one connected component)
    exported_eu = nib.load(next(export.rglob(f"{mhd.stem}_eu.nii.gz")))
    mask = (exported_eu.get_fdata() >= 200).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, exported_eu.affine), tmp_path / "mask.nii.gz")
    path = run_findings(export, labels=tmp_path / "mask.nii.gz", eu_threshold_hu2=50.0, overwrite=True)
    (region,) = json.loads(path.read_text())["findings"]
    assert region["source"] == "label" and region["eu_high"] and region["eu_mean"] > 300
    assert region["n_voxels"] == int(mask.sum())
    np.testing.assert_allclose(region["box"][:2], target[:2], atol=2.0)  # its bounding box, back in LPS mm


def test_export_refuses_bad_annotations_before_writing_anything(tmp_path, luna, checkpoint):
    series = sorted(luna.rglob("*.mhd"))
    out = tmp_path / "out"
    writer = CaseWriter(out, suffixes={"mean": ""})
    # annotations of a series that is not exported: named, and the run stops before any work
    with pytest.raises(BadInputError, match=f"not among the 1 series to export: {series[1].stem}"):
        DetectionDatalist(writer, annotations=luna / "annotations.csv").cases(CT, str(series[0]))
    assert not out.exists()
    kept = DetectionDatalist(writer, annotations=luna / "annotations.csv", absent_series="ignore")
    assert [e["case_id"] for e in kept.cases(CT, str(series[0]))] == [series[0].stem]
    assert set(kept.boxes) == {series[0].stem}
    # a nodule outside its series (voxel indices instead of world mm)
    bad = tmp_path / "annotations.csv"
    bad.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{series[0].stem},40,50,2,8.0\n")
    with pytest.raises(BadInputError, match=f"series {series[0].stem}: the nodule at world .* lies outside"):
        DetectionDatalist(CaseWriter(tmp_path / "out2"), annotations=bad).cases(CT, str(series[0]))
    bad.write_text(f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{series[0].stem},1,2,x,8\n")
    with pytest.raises(BadInputError, match="line 2"):
        DetectionDatalist(CaseWriter(tmp_path / "out2"), annotations=bad).cases(CT, str(series[0]))
    with pytest.raises(BadInputError, match="annotations file does not exist"):
        DetectionDatalist(writer, annotations=tmp_path / "none.csv").cases(CT, str(series[0]))
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ConfigError, match="absent_series"):
        DetectionDatalist(writer, absent_series="warn")
    with pytest.raises(ConfigError, match="pixdim"):
        DetectionLayout([0.7, 0.7])
    with pytest.raises(ValueError, match="suffix"):
        CaseWriter(out, suffixes={"mean": "/../x"})
    with pytest.raises(ValueError, match="same file name"):
        CaseWriter(out, suffixes={"mean": "_eu"})
    # the script: one line naming the file and the series, no traceback, nothing written
    out = tmp_path / "script_out"
    run = subprocess.run([sys.executable, "scripts/export.py", "--ckpt", str(checkpoint), "--input", str(series[0]),
                          "--outdir", str(out), "--annotations", str(luna / "annotations.csv"), "data.img_size=32",
                          *[f"{k.replace('#', '.')}={json.dumps(v)}" for k, v in SMALL_MODEL.items()]],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("hyper-dm export: error: ") and series[1].stem in last and "absent_series" in last
    assert not out.exists()


def test_findings_refuse_bad_input_before_writing_anything(tmp_path, exported, luna):
    items = json.loads((exported / "datalist.json").read_text())["validation"]
    image = str(exported / items[0]["image"])
    out = tmp_path / "findings"

    def findings(detections, **kwargs):
        (tmp_path / "det.json").write_text(json.dumps(detections))
        return run_findings(exported, detections=tmp_path / "det.json", output_dir=out, eu_threshold_hu2=1.0,
                            **kwargs)

    with pytest.raises(BadInputError, match="image '/elsewhere/other.nii.gz' is not in the export"):
        findings([{"image": image, "box": [], "label_scores": []},
                  {"image": "/elsewhere/other.nii.gz", "box": [[0, 0, 0, 5, 5, 5]], "label_scores": [0.5]}])
    far = [[1000.0, 1000.0, 0.0, 5.0, 5.0, 5.0]]
    with pytest.raises(BadInputError, match=r"detection 0 \(box \[1000.0, 1000.0.*lies outside the image"):
        findings([{"image": image, "box": far, "label_scores": [0.5]}])
    with pytest.raises(BadInputError, match="box 0: .* is not a cccwhd box"):
        findings([{"image": image, "box": [[1, 2, 3]], "label_scores": [0.5]}])
    with pytest.raises(ConfigError, match="exactly one"):
        run_findings(exported)
    (tmp_path / "train_only.json").write_text(json.dumps({"training": [
        {k: str(exported / v) if isinstance(v, str) else v for k, v in item.items()} for item in items]}))
    (tmp_path / "det.json").write_text(json.dumps([{"image": image, "box": [], "label_scores": []}]))
    with pytest.raises(BadInputError, match="train_only.json: has no 'validation' split"):
        run_findings(exported, detections=tmp_path / "det.json", reference=tmp_path / "train_only.json",
                     eu_quantile=0.95, output_dir=out)
    with pytest.raises(ConfigError, match="eu_threshold .* or findings_cfg#eu_quantile"):
        run_findings(exported, detections=tmp_path / "det.json", output_dir=out)
    # a label volume on another grid than the exported image
    nib.save(nib.Nifti1Image(np.ones((10, 10, 3), np.uint8), np.eye(4)), tmp_path / "mask.nii.gz")
    with pytest.raises(BadInputError, match="mask.nii.gz: its grid .* is not that of the exported image"):
        run_findings(exported, labels=tmp_path / "mask.nii.gz", image=items[0]["image"], output_dir=out)
    assert not out.exists()
    # relative names as in the export's datalist match; outputs are not replaced without overwrite
    centre = nodule_box(read_annotations(luna)[Path(image).name[:-7]][0]["coord_mm"], 6.0)
    findings([{"image": items[0]["image"], "box": [centre], "label_scores": [0.5]}])
    assert json.loads((out / "findings.json").read_text())["n_findings"] == 1
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        findings([{"image": items[0]["image"], "box": [centre], "label_scores": [0.5]}])


def test_monai_property_checks_pass_for_the_export(tmp_path, luna):
    from monai.bundle import ConfigWorkflow

    from hyper_dm.config import config_files_for

    workflow = ConfigWorkflow(config_file=config_files_for("export", None), workflow_type="infer", logging_file=False,
                              run_id="export", **{"bundle_root": str(REPO / "bundle"), "output_dir": str(tmp_path),
                                                  "inference_cfg#input": str(luna), "data#img_size": 32})
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    assert isinstance(workflow.parser.get_parsed_content("evaluator#postprocessing"), DetectionLayout)


def test_cli_flags_become_bundle_overrides():
    from hyper_dm.cli import command_overrides, parse_args

    args = parse_args(["export", "--input", "LUNA16/subset9", "--outdir", "data/recon_ct", "--annotations",
                       "LUNA16/annotations.csv", "export.absent_series=ignore", "--M", "8"])
    assert command_overrides(args) == {
        "export_cfg#absent_series": "ignore", "inference_cfg#input": "LUNA16/subset9",
        "inference_cfg#outdir": "data/recon_ct", "inference_cfg#M": 8,
        "export_cfg#annotations": "LUNA16/annotations.csv"}
    args = parse_args(["findings", "--export", "data/recon_ct", "--detections", "result.json", "--eu-quantile",
                       "0.95", "--min-score", "0.5"])
    assert command_overrides(args) == {"findings_cfg#export": "data/recon_ct", "findings_cfg#detections": "result.json",
                                       "findings_cfg#eu_quantile": 0.95, "findings_cfg#min_score": 0.5}
    with pytest.raises(ConfigError, match="findings.detections='@network'"):
        command_overrides(parse_args(["findings", "--detections", "@network"]))  # flags are literals too
