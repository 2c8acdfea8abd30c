"""The bundle's configs: MONAI's own checks (properties, metadata schema, network shapes), one definition of
each shared section, bundle_root from both places, configs in the wheel, checked overrides."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

from hyper_dm.config import (
    BUNDLE_CONFIGS,
    ConfigError,
    bundle_section,
    config_files_for,
    parse_overrides,
    translate_key,
    validate_overrides,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
COMMON = str(CONFIGS / "common.yaml")
SHARED_SECTIONS = ("imports", "bundle_root", "output_dir", "device", "dataset_dir", "data", "model", "diffusion",
                   "checkpoint_config", "backbone", "network_def", "network")
LOCAL_SCHEMA = Path(__file__).parent / "data" / "meta_schema.json"  # offline stand-in, see its $comment


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_shared_sections_are_written_once_in_common_yaml():
    common = raw("common.yaml")
    assert set(SHARED_SECTIONS) <= set(common)
    for workflow, run_id in (("train.yaml", "training"), ("inference.yaml", "inference")):
        config = raw(workflow)
        assert not set(config) & set(common), f"{workflow} repeats {set(config) & set(common)} of common.yaml"
        assert {run_id, "run", "initialize"} <= set(config)
    assert config_files_for("train", None) == [COMMON, str(CONFIGS / "train.yaml")]
    assert BUNDLE_CONFIGS == CONFIGS


@pytest.mark.parametrize("overlay, task", [("ct_luna16.yaml", "ct"), ("knee_singlecoil.yaml", "mri")])
def test_overlays_update_sections_without_replacing_them(overlay, task):
    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / "train.yaml"), str(CONFIGS / overlay)])
    assert parser["data"]["task"] == task
    assert parser["data"]["img_size"] == raw("common.yaml")["data"]["img_size"]


def test_python_defaults_come_from_the_bundle_config():
    from hyper_dm.data import resolve_data_config

    assert resolve_data_config({})["n_views"] == raw("common.yaml")["data"]["n_views"]
    assert bundle_section("training_cfg", "train")["lambda_eu"] == raw("train.yaml")["training_cfg"]["lambda_eu"]
    with pytest.raises(ConfigError, match="no section 'trainng'"):
        bundle_section("trainng", "train")


@pytest.mark.parametrize("cwd, bundle_root", [("repo", "bundle"), ("bundle copy", ".")])
def test_bundle_root_from_the_repository_root_and_from_the_bundle_folder(cwd, bundle_root, tmp_path, monkeypatch):
    if cwd == "repo":
        monkeypatch.chdir(REPO)
        files = [COMMON, str(CONFIGS / "train.yaml")]
    else:
        shutil.copytree(REPO / "bundle" / "configs", tmp_path / "my_bundle" / "configs")
        monkeypatch.chdir(tmp_path / "my_bundle")
        files = ["configs/common.yaml", "configs/train.yaml"]
    parser = ConfigParser()
    parser.read_config(files)
    assert parser.get_parsed_content("bundle_root") == bundle_root
    assert parser.get_parsed_content("log_dir") == f"{bundle_root}/models/logs"
    assert parser.get_parsed_content("data#synthetic_dir") == f"{bundle_root}/data/synthetic"


def test_metadata_names_the_input_image_and_keeps_mri_packages_optional():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"image"} and set(fmt["outputs"]) == {"pred", "eu", "au", "total"}
    for spec in [*fmt["inputs"].values(), *fmt["outputs"].values()]:
        assert spec["spatial_shape"] == [raw("common.yaml")["data"]["img_size"]] * 2
    mri_only = {"fastmri", "torchvision", "requests"}
    assert mri_only <= set(meta["mri_packages_version"])
    # MONAI 1.6 parses "optional_packages_version" as a deprecated name of "required_packages_version" (it would
    # replace the required list), so the knee task's packages live under a key of their own
    parser = ConfigParser()
    parser.read_meta(str(CONFIGS / "metadata.json"))
    required = parser.get_parsed_content("_meta_#required_packages_version")
    assert "pytorch-ignite" in required and not mri_only & set(required)


def test_metadata_passes_monai_verify_metadata_against_the_local_schema(tmp_path):
    verify_metadata(meta_file=str(CONFIGS / "metadata.json"), filepath=str(LOCAL_SCHEMA))
    broken = json.loads((CONFIGS / "metadata.json").read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(LOCAL_SCHEMA))


def test_monai_verify_net_in_out_on_the_backbone():
    """The metadata's ``image``/``pred`` formats fit the denoiser that turns them into reconstructions.

    ``network_def`` (the HyperNetwork) maps latents ``z [M, z_dim]`` to weight sets, not images to images, so
    MONAI's check cannot apply to it (bundle/docs/README.md); the backbone ``f(x_t, t, cond)`` takes ``x_t`` and
    ``cond`` in the ``image`` format and returns the ``pred`` format.
    """
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    shape = meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    forward_args = {"t": torch.tensor([500]), "cond": torch.rand(1, 1, *shape)}
    verify_net_in_out(net_id="backbone", meta_file=str(CONFIGS / "metadata.json"), config_file=[COMMON],
                      device="cpu", extra_forward_args=forward_args)
    with pytest.raises(ValueError, match=r"z must have shape \[M, 8\]"):
        verify_net_in_out(net_id="network_def", meta_file=str(CONFIGS / "metadata.json"), config_file=[COMMON],
                          device="cpu")


def test_the_wheel_carries_the_bundle_and_the_installed_package_finds_it(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO / "hyper_dm", source / "hyper_dm", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "bundle", source / "bundle", ignore=shutil.ignore_patterns("models", "data"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("hyper_dm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("common.yaml", "train.yaml", "inference.yaml", "ct_luna16.yaml", "knee_singlecoil.yaml",
                 "metadata.json", "logging.conf"):
        assert f"hyper_dm/bundle/configs/{name}" in names, name
    assert {"hyper_dm/bundle/LICENSE", "hyper_dm/bundle/docs/data_license.txt"} <= names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    found = subprocess.run(
        [sys.executable, "-c", "from hyper_dm.config import config_files_for as f; print(f('train', None)[0])"],
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == str(tmp_path / "site" / "hyper_dm" / "bundle" / "configs" / "common.yaml")


@pytest.mark.parametrize("config, workflow_type", [("train.yaml", "train"), ("inference.yaml", "infer")])
def test_monai_property_checks_pass(config, workflow_type, tmp_path):
    workflow = ConfigWorkflow(
        config_file=[COMMON, str(CONFIGS / config)], workflow_type=workflow_type, logging_file=False,
        **{"bundle_root": str(REPO / "bundle"), "output_dir": str(tmp_path / "out"),
           "data#synthetic_dir": str(tmp_path / "synthetic"), "data#img_size": 32},
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


def test_seed_style_keys_translate_to_bundle_ids():
    assert translate_key("training.lr") == "training_cfg#lr"
    assert translate_key("inference.M") == "inference_cfg#M"
    assert translate_key("model.z_dim") == "model#z_dim"
    assert parse_overrides(["training.lr=1e-4", "model.channels=[16, 32]", "data.dataset_dir="]) == {
        "training_cfg#lr": 1e-4, "model#channels": [16, 32], "data#dataset_dir": None}
    with pytest.raises(ConfigError, match="key.subkey=value"):
        parse_overrides(["training.lr"])


def test_unknown_keys_list_close_matches_and_types_are_checked():
    files = config_files_for("train", str(CONFIGS / "knee_singlecoil.yaml"))
    with pytest.raises(ConfigError, match=r"training\.lrr.*close matches: training\.lr"):
        validate_overrides(files, parse_overrides(["training.lrr=1e-4"]))
    with pytest.raises(ConfigError, match=r"training\.lr expects a float.*'abc'"):
        validate_overrides(files, parse_overrides(["training.lr=abc"]))
    with pytest.raises(ConfigError, match=r"training\.epochs expects a int"):
        validate_overrides(files, parse_overrides(["training.epochs=2.5"]))
    parser = validate_overrides(files, parse_overrides(["training.lr=1", "training.mode=eu", "data.dataset_dir=/x",
                                                        "train.dataloader.pin_memory=true"]))
    assert parser["training_cfg"]["lr"] == 1 and parser["data"]["task"] == "mri"
    assert parser["train"]["dataloader"]["pin_memory"] is True  # a new argument of a component is allowed


def test_the_trainer_gets_the_probe_options_of_training_cfg():
    files = config_files_for("train", "bundle/configs/knee_singlecoil.yaml")
    parser = validate_overrides(files, parse_overrides(["training.mode=eu", "training.probes=objects_inside",
                                                        "training.probe_columns=true", "training.init=/m.pt"]))
    assert parser.get_parsed_content("train#trainer#probes") == "objects_inside"
    assert parser.get_parsed_content("train#trainer#probe_columns") is True
    steps = parser["training"]
    assert "refuse_ensemble(@network_def)" in steps[0]  # an ensemble is refused before the folder is touched
    assert "claim_training_folder(@output_dir" in steps[1]  # nothing is loaded into a refused folder
    assert "load_hypernet_state(@training_cfg::init" in steps[2]  # the run's next step loads it


@pytest.mark.parametrize("pitches, bins", [(None, 3), (["model", "source"], 6)])
def test_calibrate_fits_a_noise_bin_per_measurement_and_keeps_its_samples_where_asked(pitches, bins):
    """Three photon counts at each FBP pitch calibrated on: as many noise bins as measurements (three equal-count
    bins would mix the model grid's starved FBPs with the scanner's); ``calibration_samples`` reaches the fitter, and
    the mean splits air from tissue at -900 HU."""
    parser = ConfigParser()
    parser.read_config([COMMON, str(CONFIGS / "inference.yaml")])
    parser["inference_cfg"]["calibration_fbp_pitches"] = pitches
    parser["inference_cfg"]["calibration_samples"] = "/tmp/samples.pt"
    assert parser.get_parsed_content("calibrator#val_handlers#1#bins") == bins
    assert parser.get_parsed_content("calibrator#val_handlers#1#samples") == "/tmp/samples.pt"
    assert parser.get_parsed_content("calibrator#val_handlers#1#intensity_edges") == [-0.9]  # air | tissue


def test_the_script_reports_a_misspelt_override_and_exits_2():
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "bundle/configs/ct_luna16.yaml", "model.z_dimm=16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "model.z_dimm" in result.stderr and "model.z_dim" in result.stderr


@pytest.mark.parametrize("override, message", [
    ("training.probes=ellipses", "unknown probes 'ellipses' (training_cfg#probes)"),
    ("training.mode=foo", "unknown training mode 'foo'"),
])
def test_the_script_reports_a_bad_training_value_in_one_line_and_exits_2(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "training.mode=eu", override, f"output_dir={tmp_path}",
         f"data.synthetic_dir={tmp_path / 'synthetic'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"hyper-dm train: error: {message}" in result.stderr and "Traceback" not in result.stderr


def test_infer_flags_become_inference_overrides():
    from hyper_dm.cli import command_overrides, parser

    args = parser().parse_args(["infer", "--config", "bundle/configs/ct_luna16.yaml", "--ckpt", "m.pt", "--M", "10",
                                "--N", "10", "--outdir", "results/ct/", "inference.write_std=true"])
    assert command_overrides(args) == {"inference_cfg#ckpt": "m.pt", "inference_cfg#M": 10, "inference_cfg#N": 10,
                                       "inference_cfg#outdir": "results/ct/", "inference_cfg#write_std": True}
    validate_overrides(config_files_for("infer", args.config), command_overrides(args))


def test_command_line_values_are_literals_unless_expressions_are_allowed():
    from hyper_dm.cli import command_overrides, parser

    with pytest.raises(ConfigError, match=r"data\.dataset_dir='\$HOME/LUNA16'.*runs Python.*--allow-expressions"):
        parse_overrides(["data.dataset_dir=$HOME/LUNA16"])
    with pytest.raises(ConfigError, match=r"model\.channels='@model#hidden'"):
        parse_overrides(["model.channels=[16, '@model#hidden']"])
    assert parse_overrides(["training.epochs=$2 + 1"], allow_expressions=True) == {"training_cfg#epochs": "$2 + 1"}
    args = parser().parse_args(["infer", "--outdir", "$__import__('os').getcwd()"])
    with pytest.raises(ConfigError, match=r"inference\.outdir="):
        command_overrides(args)
    args = parser().parse_args(["infer", "--allow-expressions", "--outdir", "$'x' + 'y'"])
    assert command_overrides(args) == {"inference_cfg#outdir": "$'x' + 'y'"}


def test_every_shipped_large_file_is_present_with_the_listed_md5():
    """What the model zoo's CI checks after downloading: each ``large_files.yml`` entry exists in the bundle with its
    md5 (a refitted calibration or retrained model without its new digest fails here)."""
    import hashlib

    entries = yaml.safe_load((REPO / "bundle" / "large_files.yml").read_text())["large_files"]
    assert {"models/model.pt", "models/calibration.json", "models/knee/model.pt", "models/knee/calibration.json"} <= {
        e["path"] for e in entries}
    for entry in entries:
        path = REPO / "bundle" / entry["path"]
        assert path.is_file(), entry["path"]
        assert entry["hash_type"] == "md5" and hashlib.md5(path.read_bytes()).hexdigest() == entry["hash_val"], path
