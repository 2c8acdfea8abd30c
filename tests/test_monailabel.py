"""The MONAI Label app through a real ``monailabel start_server`` on 127.0.0.1, as a viewer or script talks to it.

Needs the ``label`` extra (``make test-label``); skipped otherwise, unless HYPER_DM_REQUIRE_LABEL=1 (CI) makes a
missing MONAI Label an error. Studies: synthetic LUNA16-like chests (64 x 64 x 8) written as NIfTI, plus one with a
dense striped disc; the model is an untrained small HyperNetwork on a 32-pixel grid with 2 DDIM steps (cheap).

What the active-learning test can and cannot show: an untrained model's EU barely depends on the study (the four
scores differ by ~0.1%), so it does not show that EU ranks the unfamiliar disc study first; that needs a trained
model (docs/report.md: EU inside the disc 3.15 x the rest of the body after 12 CPU minutes of training). It shows
that the score stored per study is the mean over the body of the very EU map ``/infer/hyperdm_eu`` serves, that
``/activelearning/hyperdm_eu`` serves studies in descending order of that score, and that rescoring keeps scores.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from conftest import SMALL_MODEL
from monai.bundle import ConfigParser

if os.environ.get("HYPER_DM_REQUIRE_LABEL") != "1":
    pytest.importorskip("monailabel", reason="MONAI Label is not installed: `make test-label` installs the "
                                             "'label' extra in .venv-label and runs this file")
import psutil  # noqa: E402  (MONAI Label's dependencies)
import requests  # noqa: E402
from filelock import FileLock  # noqa: E402

from hyper_dm.calibration import Calibration  # noqa: E402
from hyper_dm.data.synthetic import write_luna16_like  # noqa: E402
from hyper_dm.integrations.monailabel.service import lock_path  # noqa: E402
from hyper_dm.integrations.monailabel.summary import body_mask  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundle" / "configs"
APP = REPO / "hyper_dm" / "integrations" / "monailabel" / "app_folder"
OVERLAY = yaml.safe_dump({**SMALL_MODEL, "data#img_size": 32, "diffusion#ddim_steps": 2})  # a small, fast model
MAPS = ("mean", "eu", "au", "total", "total_std_calibrated", "unfamiliar")
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def insert_disc(source: Path, out: Path, radius_mm: float = 40.0, hu: float = 900.0) -> None:
    """``source`` with a dense striped disc (``hu`` / ``hu`` - 600 stripes, every slice) in the right lung, as NIfTI
    (as scripts/evaluate.py's unfamiliar object)."""
    image = sitk.ReadImage(str(source))
    volume = sitk.GetArrayFromImage(image).astype(np.float32)  # [z, y, x]
    sx, sy = image.GetSpacing()[:2]
    y, x = np.meshgrid(np.arange(volume.shape[1]) * sy, np.arange(volume.shape[2]) * sx, indexing="ij")
    cx, cy = 0.32 * volume.shape[2] * sx, 0.45 * volume.shape[1] * sy
    disc = (x - cx) ** 2 + (y - cy) ** 2 <= radius_mm**2
    volume[:, disc] = hu - 600.0 * (np.floor((x[disc] - cx) / 3.0) % 2)
    result = sitk.GetImageFromArray(volume)
    result.CopyInformation(image)
    sitk.WriteImage(result, str(out))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Studies (3 plain + 1 with the disc), the small checkpoint and its overlay."""
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    series = write_luna16_like(root / "luna", n_series=3, seed=3, size_xy=64, n_slices=(8, 8),
                               spacing_xy_mm=(5.0, 5.5))
    for i, mhd in enumerate(series):
        sitk.WriteImage(sitk.ReadImage(str(mhd)), str(studies / f"chest{i}.nii.gz"))
    insert_disc(series[0], studies / "disc.nii.gz")
    (root / "small.yaml").write_text(OVERLAY)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "common.yaml"), str(CONFIGS / "inference.yaml"), str(root / "small.yaml")])
    parser["device"] = "$torch.device('cpu')"
    torch.save({"hypernet": parser.get_parsed_content("network").state_dict()}, root / "model.pt")
    # found beside the checkpoint: std x 3 for 90% intervals; departures so small that every input is flagged
    Calibration(scales={"0.5": 1.0, "0.9": 3.0, "0.95": 4.0}, n_pixels=1, n_cases=1,
                departures=[1e-6, 1e-6, 1e-6], eu_threshold=1e-5).save(root / "calibration.json")
    return {"root": root, "studies": studies, "ckpt": root / "model.pt", "overlay": root / "small.yaml"}


def start_command(setup: dict, port: int, host: str = "127.0.0.1", *conf: str) -> list[str]:
    """The documented ``monailabel start_server`` command (``python -m monailabel.main`` is what it runs)."""
    return [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP), "--studies",
            str(setup["studies"]), "--host", host, "--port", str(port), "--conf", "models", "hyperdm",
            "--conf", "ckpt", str(setup["ckpt"]), "--conf", "config", str(setup["overlay"]),
            "--conf", "M", "2", "--conf", "N", "2", "--conf", "auto_score", "false", *conf]


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    start = time.perf_counter()
    process = subprocess.Popen(start_command(setup, port), stdout=log, stderr=subprocess.STDOUT, cwd=setup["root"])
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        log.seek(0)
        assert process.poll() is None, f"server exited:\n{log.read()[-3000:]}"
        assert time.perf_counter() - start < START_TIMEOUT_S, "server did not start in time"
        time.sleep(0.5)
    print(f"\nserver start: {time.perf_counter() - start:.1f} s")
    yield {"url": url, "process": process, "log": log, "start_s": time.perf_counter() - start, **setup}
    process.terminate()
    process.wait(timeout=60)
    log.close()


def infer(server, model: str, image: str | None = None, params: dict | None = None, upload: Path | None = None,
          output: str = "image") -> requests.Response:
    query = {"output": output, **({"image": image} if image else {})}
    files = {"params": (None, json.dumps(params or {}))}
    if upload is not None:
        files["file"] = (upload.name, upload.read_bytes())
    return requests.post(f"{server['url']}/infer/{model}", params=query, files=files, timeout=600)


def read_nifti(response: requests.Response, path: Path) -> nib.Nifti1Image:
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return nib.load(path)


def test_server_listens_on_loopback_only_and_lists_the_maps(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    assert set(info["models"]) == {f"hyperdm_{m}" for m in MAPS}
    assert info["models"]["hyperdm_eu"]["config"] == {"M": 2, "N": 2, "steps": 2}
    assert {"hyperdm_eu", "random"} <= set(info["strategies"]) and "hyperdm_eu" in info["scoring"]
    listening = {c.laddr.ip for c in psutil.Process(server["process"].pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening


def test_maps_of_a_study_lie_on_its_grid_and_add_up(server, tmp_path):
    study = server["studies"] / "chest1.nii.gz"
    source = nib.load(study)
    rss, done = [], threading.Event()
    process = psutil.Process(server["process"].pid)

    def sample_memory() -> None:
        while not done.is_set():
            rss.append(process.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    start = time.perf_counter()
    first = infer(server, "hyperdm_mean", "chest1")
    round_trip = time.perf_counter() - start
    done.set()
    sampler.join()
    print(f"\nround trip hyperdm_mean (M=2, N=2, 2 steps, 64x64x8): {round_trip:.1f} s; server RSS peak "
          f"{max(rss) / 2**20:.0f} MiB")
    maps = {"mean": read_nifti(first, tmp_path / "mean.nii.gz")}
    for name in MAPS[1:]:
        maps[name] = read_nifti(infer(server, f"hyperdm_{name}", "chest1"), tmp_path / f"{name}.nii.gz")
    for name, image in maps.items():
        assert image.shape == source.shape, name
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-4, err_msg=name)
        assert np.isfinite(image.get_fdata()).all(), name
    eu, au, total = (maps[n].get_fdata() for n in ("eu", "au", "total"))
    assert eu.min() >= 0 and au.min() >= 0 and eu.max() > 0
    np.testing.assert_allclose(total, eu + au, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(maps["total_std_calibrated"].get_fdata(), 3.0 * np.sqrt(total), rtol=1e-4, atol=1e-3)
    assert -1000 <= maps["mean"].get_fdata().min() and maps["mean"].get_fdata().max() <= 1000  # the HU window
    params = infer(server, "hyperdm_au", "chest1", output="json").json()
    assert params["cached"] is True and (params["M"], params["N"], params["steps"]) == (2, 2, 2)
    assert params["units"] == "HU^2" and params["summary"]["mean_eu_body"] > 0
    assert params["input_check"]["input_unlike_calibration"] is True, params  # the calibration's tiny departures
    assert params["input_check"]["slices_unlike_calibration"] == 8 and params["maps"]["total_std_calibrated"]
    assert infer(server, "hyperdm_total_std_calibrated", "chest1", output="json").json()["units"] == "HU"
    # the unfamiliar map: a uint8 label map of EU above 1e-5 model units (10 HU^2 in the CT window of 1000 HU)
    unfamiliar = maps["unfamiliar"]
    assert unfamiliar.get_data_dtype() == np.uint8 and set(np.unique(unfamiliar.get_fdata())) <= {0.0, 1.0}
    assert (unfamiliar.get_fdata().astype(bool) == (eu / 1000.0**2 > 1e-5)).mean() > 0.999
    assert params["input_check"]["unfamiliar_fraction"] == pytest.approx(float((eu > 10.0).mean()), abs=2e-3)
    assert infer(server, "hyperdm_unfamiliar", "chest1", output="json").json()["units"] == "label"
    assert max(rss) < 4 * 2**30


def test_an_uploaded_volume_gets_the_same_reconstruction_as_the_study(server, tmp_path):
    study = read_nifti(infer(server, "hyperdm_mean", "chest2", {"M": 3}), tmp_path / "a.nii.gz").get_fdata()
    upload = infer(server, "hyperdm_mean", params={"M": 3}, upload=server["studies"] / "chest2.nii.gz")
    np.testing.assert_allclose(read_nifti(upload, tmp_path / "b.nii.gz").get_fdata(), study, atol=1e-3)


def test_bad_requests_get_clear_errors_and_the_server_stays_up(server, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.float32), np.eye(4)), tmp_path / "slice.nii.gz")
    cases = [
        (infer(server, "hyperdm_eu", "no_such_study"), 404, "no study 'no_such_study'"),
        (infer(server, "hyperdm_eu", "chest0", {"M": 17}), 422, "M must be an integer in 2..16"),
        (infer(server, "hyperdm_eu", "chest0", {"N": 1}), 422, "N must be an integer in 2..16"),
        (infer(server, "hyperdm_eu", "chest0", {"steps": 101}), 422, "steps must be an integer in 1..100"),
        (infer(server, "hyperdm_eu", upload=tmp_path / "notes.txt"), 422, "cannot be read as an image volume"),
        (infer(server, "hyperdm_eu", upload=tmp_path / "slice.nii.gz"), 422, "3-D volume"),
        (infer(server, "hyperdm_eu", str(server["studies"] / "chest0.nii.gz")), 403, "not accepted"),
        (infer(server, "segmentation", "chest0"), 404, "no model 'segmentation'"),
    ]
    for response, status, text in cases:
        assert response.status_code == status and text in response.json()["detail"], response.text
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200
    assert server["process"].poll() is None


def test_a_request_while_another_reconstruction_runs_is_refused_then_served(server, tmp_path):
    lock = FileLock(str(lock_path(server["studies"])))
    with lock.acquire(timeout=30):  # what the background scoring process or a second worker holds while it runs
        busy = infer(server, "hyperdm_eu", "chest0", {"steps": 1})
    assert busy.status_code == 429 and "another reconstruction is running" in busy.json()["detail"]
    assert int(busy.headers["Retry-After"]) > 0
    results = []
    threads = [threading.Thread(target=lambda: results.append(infer(server, "hyperdm_eu", "chest0", {"steps": 1})))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200, 200]  # MONAI Label answers them one after the other
    first, second = (read_nifti(r, tmp_path / f"{i}.nii.gz").get_fdata() for i, r in enumerate(results))
    np.testing.assert_array_equal(first, second)


def image_info(server, image_id: str) -> dict:
    return requests.get(f"{server['url']}/datastore/image/info", params={"image": image_id}, timeout=30).json()


def test_scoring_stores_mean_eu_over_the_body_and_next_sample_serves_the_highest_first(server, tmp_path):
    started = requests.post(f"{server['url']}/scoring/hyperdm_eu", json={}, timeout=30)
    assert started.status_code == 200, started.text  # MONAI Label runs it in a background process
    deadline = time.perf_counter() + 600
    # the task's own record, not check_if_running: its process is registered a moment after the request returns
    scoring = f"{server['url']}/scoring/"
    while (status := requests.get(scoring, timeout=30).json()["status"]) in ("SUBMITTED", "RUNNING"):
        assert time.perf_counter() < deadline, "scoring did not finish"
        time.sleep(1)
    assert status == "DONE", status
    ids = ["chest0", "chest1", "chest2", "disc"]
    scores = {i: image_info(server, i).get("hyperdm_eu") for i in ids}
    assert all(isinstance(s, float) and s > 0 for s in scores.values()), scores
    print(f"\nmean EU over the body (HU^2), untrained model: {scores}")
    order = sorted(ids, key=scores.get, reverse=True)
    served = [requests.post(f"{server['url']}/activelearning/hyperdm_eu", json={}, timeout=30).json()["id"]
              for _ in ids]
    assert served == order
    for image_id in (order[0], order[-1]):  # the stored score is the EU map this server returns, over the body
        mean = read_nifti(infer(server, "hyperdm_mean", image_id), tmp_path / "m.nii.gz")
        eu = read_nifti(infer(server, "hyperdm_eu", image_id), tmp_path / "e.nii.gz").get_fdata()
        body = body_mask(torch.from_numpy(mean.get_fdata())[None], "ct")
        assert scores[image_id] == pytest.approx(eu[body].mean(), rel=1e-4)
    again = requests.post(f"{server['url']}/scoring/hyperdm_eu", params={"run_sync": True}, json={}, timeout=600)
    assert again.json()["skipped"] == len(ids) and again.json()["scored"] == {}


def test_a_server_on_every_interface_is_refused_unless_exposed(setup, tmp_path):
    port = free_port()
    result = subprocess.run(start_command(setup, port, "0.0.0.0"), capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "refuses to serve on '0.0.0.0'" in output, output[-3000:]
    assert "--conf expose true" in output and "Uvicorn running" not in output
