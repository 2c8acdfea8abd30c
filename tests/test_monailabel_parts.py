"""The MONAI Label app's parts that run without MONAI Label: settings and request limits, the body summary, the
loopback rule, the launcher's command, the reconstruction service's lock and kept result, and the active-learning
score of the trained model that ships.

The server itself is tested in test_monailabel.py (``make test-label``).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import SMALL_MODEL
from filelock import FileLock
from monai.bundle import ConfigParser

from hyper_dm.data.synthetic import insert_dense_disc, write_luna16_like
from hyper_dm.integrations.monailabel.conf import LabelConf, RequestError, Sampling
from hyper_dm.integrations.monailabel.safety import check_bind, server_host
from hyper_dm.integrations.monailabel.service import ReconstructionService
from hyper_dm.integrations.monailabel.summary import body_mask, uncertainty_summary

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
OVERLAY = yaml.safe_dump({**SMALL_MODEL, "data#img_size": 32, "diffusion#ddim_steps": 2})  # a small, fast model


def test_settings_parse_conf_strings_and_name_the_key_at_fault():
    conf = LabelConf.parse({"ckpt": "m.pt", "M": "3", "max_N": "8", "auto_score": "false", "models": "hyperdm"})
    assert (conf.M, conf.N, conf.max_N, conf.auto_score, conf.expose) == (3, 4, 8, False, False)
    with pytest.raises(ValueError, match="--conf ckpt"):
        LabelConf.parse({"M": "3"})
    with pytest.raises(ValueError, match="--conf max_M 'many': expected int"):
        LabelConf.parse({"ckpt": "m.pt", "max_M": "many"})
    with pytest.raises(ValueError, match="--conf expose 'maybe'"):
        LabelConf.parse({"ckpt": "m.pt", "expose": "maybe"})
    with pytest.raises(ValueError, match="--conf M 20: must be within 2..max_M"):
        LabelConf.parse({"ckpt": "m.pt", "M": "20"})
    with pytest.raises(ValueError, match="input_mode"):
        LabelConf.parse({"ckpt": "m.pt", "input_mode": "guess"})


def test_request_sampling_takes_defaults_and_refuses_what_is_beyond_the_limits():
    conf = LabelConf.parse({"ckpt": "m.pt", "max_M": "8"})
    assert conf.sampling({}, default_steps=20) == Sampling(M=4, N=4, steps=20)
    assert conf.sampling({"M": 8, "N": "2", "steps": 1}, default_steps=20) == Sampling(M=8, N=2, steps=1)
    for params, name in [({"M": 9}, "M"), ({"M": 1}, "M"), ({"N": 0}, "N"), ({"N": True}, "N"),
                         ({"steps": 101}, "steps"), ({"steps": "ten"}, "steps"), ({"M": 2.5}, "M")]:
        with pytest.raises(RequestError, match=f"^{name}=") as error:
            conf.sampling(params, default_steps=20)
        assert error.value.status == 422


def test_only_loopback_is_served_unless_exposed():
    assert server_host(["start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"  # MONAI Label's default
    assert server_host(["start_server", "-i", "127.0.0.1", "--port", "9"]) == "127.0.0.1"
    assert server_host(["-m", "scoring"]) is None
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        check_bind(host, expose=False)
    for host in ("0.0.0.0", "192.168.1.7", "::", "myhost.example.org"):
        with pytest.raises(PermissionError, match="--host 127.0.0.1"):
            check_bind(host, expose=False)
        check_bind(host, expose=True)


def test_launcher_serves_on_loopback_by_default(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "hyper_dm.integrations.monailabel", "--studies", str(tmp_path), "--ckpt",
         str(tmp_path / "model.pt"), "--dry-run", *extra], capture_output=True, text=True, check=True).stdout
    command = run("--conf", "max_M", "8")
    assert "-m monailabel.main start_server" in command and "--host 127.0.0.1" in command
    assert "--conf max_M 8" in command and f"--conf ckpt {tmp_path / 'model.pt'}" in command
    assert "--host 0.0.0.0" in run("--host", "0.0.0.0")


def test_body_mask_keeps_the_lungs_and_leaves_out_the_air_around_the_patient(tmp_path):
    mhd = write_luna16_like(tmp_path, n_series=1, seed=2, size_xy=96, n_slices=(4, 4), spacing_xy_mm=(4.0, 4.0))[0]
    hu = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(mhd))).transpose(2, 1, 0).astype(np.float32))
    body = body_mask(hu[None], "ct")
    lungs = (hu > -900) & (hu < -800)
    outside = hu <= -1000
    assert body[lungs.numpy()].mean() > 0.95 and not body[outside.numpy()].any()
    eu = torch.where(torch.from_numpy(body), 4.0, 100.0)[None]  # 100 outside the body must not count
    summary = uncertainty_summary({"mean": hu[None], "eu": eu, "au": eu / 4}, "ct")
    assert summary["mean_eu_body"] == pytest.approx(4.0) and summary["mean_au_body"] == pytest.approx(1.0)
    assert summary["body_fraction"] == pytest.approx(body.mean())


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> ReconstructionService:
    root = tmp_path_factory.mktemp("service")
    (root / "small.yaml").write_text(OVERLAY)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml"), str(root / "small.yaml")])
    parser["device"] = "$torch.device('cpu')"
    torch.save({"hypernet": parser.get_parsed_content("network").state_dict()}, root / "model.pt")
    conf = LabelConf.parse({"ckpt": str(root / "model.pt"), "config": str(root / "small.yaml"), "device": "cpu"})
    return ReconstructionService(conf, lock_file=root / "service.lock")


def test_service_keeps_the_last_result_and_refuses_while_the_lock_is_held(service, tmp_path):
    mhd = write_luna16_like(tmp_path, n_series=1, seed=4, size_xy=48, n_slices=(3, 3), spacing_xy_mm=(6.0, 6.0))[0]
    study = tmp_path / "study.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(mhd)), str(study))
    sampling = Sampling(M=2, N=2, steps=1)
    with FileLock(service.lock.lock_file).acquire(timeout=10):  # another process reconstructing
        with pytest.raises(RequestError, match="another reconstruction is running") as busy:
            service.reconstruct(str(study), sampling)
    assert busy.value.status == 429 and busy.value.headers["Retry-After"]
    out, cached = service.reconstruct(str(study), sampling)
    assert not cached and out["eu"].shape == (1, 48, 48, 3)
    assert out["input_check"] is None and "total_std_calibrated" not in out  # no calibration beside the checkpoint
    assert "total_std_calibrated" not in service.model_names and "unfamiliar" not in service.model_names
    again, cached = service.reconstruct(str(study), sampling)
    assert cached and again["eu"] is out["eu"]
    _, cached = service.reconstruct(str(study), Sampling(M=3, N=2, steps=1))
    assert not cached
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(RequestError, match="notes.txt: cannot be read as an image volume") as bad:
        service.reconstruct(str(tmp_path / "notes.txt"), sampling)
    assert bad.value.status == 422


def test_the_shipped_model_scores_the_study_with_an_unfamiliar_object_highest(tmp_path):
    """What active learning rests on, with the trained model in bundle/models: the score MONAI Label's Epistemic
    strategy ranks by (mean EU over the body, as EpistemicScoring stores it) is highest for the study holding an
    object no training image had (the same patient with a dense striped disc), above the normal studies."""
    series = write_luna16_like(tmp_path / "luna", n_series=2, seed=5, size_xy=128, n_slices=(2, 2),
                               spacing_xy_mm=(2.8, 2.8))
    studies = {f"normal_{k}": str(mhd) for k, mhd in enumerate(series)}
    insert_dense_disc(series[0], tmp_path / "object.nii.gz", radius_mm=30.0)
    studies["object"] = str(tmp_path / "object.nii.gz")
    conf = LabelConf.parse({"ckpt": str(REPO / "bundle" / "models" / "model.pt"), "input_mode": "simulate",
                            "device": "cpu"})
    service = ReconstructionService(conf, lock_file=tmp_path / "service.lock")
    scores = {name: uncertainty_summary(service.reconstruct(path, Sampling(4, 4, 10), wait=True)[0], "ct")
              ["mean_eu_body"] for name, path in studies.items()}
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert ranked[0] == "object", scores
    assert scores["object"] > 1.05 * scores[ranked[1]], scores  # measured: 130x; the two normal studies 11% apart
