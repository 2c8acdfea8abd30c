"""The bundle's configs: MONAI's own property checks, one set of shared sections, checked overrides."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser, ConfigWorkflow

from hyper_dm.config import ConfigError, config_files_for, parse_overrides, translate_key, validate_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
SHARED_SECTIONS = ("data", "model", "diffusion", "backbone", "network_def", "network", "device", "bundle_root")


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_train_and_inference_share_one_definition_of_data_model_and_diffusion():
    train, infer = raw("train.yaml"), raw("inference.yaml")
    for section in SHARED_SECTIONS:
        assert train[section] == infer[section], f"{section} differs between train.yaml and inference.yaml"
    for run_id in ("training", "run", "initialize"):
        assert run_id in train
    for run_id in ("inference", "run", "initialize"):
        assert run_id in infer


@pytest.mark.parametrize("overlay, task", [("ct_luna16.yaml", "ct"), ("knee_singlecoil.yaml", "mri")])
def test_overlays_update_sections_without_replacing_them(overlay, task):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / overlay)])
    assert parser["data"]["task"] == task
    assert parser["data"]["img_size"] == raw("train.yaml")["data"]["img_size"]


def test_metadata_has_the_mandatory_keys():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    fmt = meta["network_data_format"]
    assert set(fmt["inputs"]) == {"cond"} and set(fmt["outputs"]) == {"pred", "eu", "au", "total"}
    for spec in [*fmt["inputs"].values(), *fmt["outputs"].values()]:
        assert spec["spatial_shape"] == [raw("train.yaml")["data"]["img_size"]] * 2


@pytest.mark.parametrize("config, workflow_type", [("train.yaml", "train"), ("inference.yaml", "infer")])
def test_monai_property_checks_pass(config, workflow_type, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / config), workflow_type=workflow_type, logging_file=False,
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


def test_the_script_reports_a_misspelt_override_and_exits_2():
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "bundle/configs/ct_luna16.yaml", "model.z_dimm=16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "model.z_dimm" in result.stderr and "model.z_dim" in result.stderr


def test_infer_flags_become_inference_overrides():
    from hyper_dm.cli import command_overrides, parser

    args = parser().parse_args(["infer", "--config", "bundle/configs/ct_luna16.yaml", "--ckpt", "m.pt", "--M", "10",
                                "--N", "10", "--outdir", "results/ct/", "inference.write_std=true"])
    assert command_overrides(args) == {"inference_cfg#ckpt": "m.pt", "inference_cfg#M": 10, "inference_cfg#N": 10,
                                       "inference_cfg#outdir": "results/ct/", "inference_cfg#write_std": True}
    validate_overrides(config_files_for("infer", args.config), command_overrides(args))
