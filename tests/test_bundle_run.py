"""The bundle run from a subprocess exactly as a user types it, at the default 64 x 64 size but few iterations.

Reads back what a user looks at: the console, TensorBoard events (TensorBoard's own reader), NIfTI volumes
(nibabel) placed where the source series is (SimpleITK), checkpoints (``torch.load(weights_only=True)``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hyper_dm.io import lock_folder

REPO = Path(__file__).resolve().parents[1]
TRAIN = "['bundle/configs/common.yaml','bundle/configs/train.yaml']"
INFER = "['bundle/configs/common.yaml','bundle/configs/inference.yaml']"
SMALL_RUN = [  # few iterations and cheap validation; the model and image size stay the defaults
    "--training_cfg#epoch_length", "2", "--training_cfg#batch_size", "4", "--training_cfg#val_M", "2",
    "--training_cfg#val_N", "2", "--training_cfg#val_ddim_steps", "3", "--training_cfg#val_epoch_length", "1",
]


def bundle(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def training_run(tmp_path_factory, synthetic_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ct_run")
    result = bundle("training", "--config_file", TRAIN, "--output_dir", str(out), "--data#synthetic_dir",
                    synthetic_dir, "--training_cfg#epochs", "2", *SMALL_RUN)
    check(result)
    return out, result


@pytest.fixture(scope="module")
def trained(training_run) -> Path:
    return training_run[0]


def test_console_shows_the_training_loss(training_run):
    console = training_run[1].stdout + training_run[1].stderr
    assert console.count("Epoch: 2/2, Iter: 2/2 -- loss: ") == 1, console[-3000:]
    assert "ignoring non-scalar output in StatsHandler" not in console


def test_training_writes_checkpoints_that_load_with_weights_only(trained):
    paths = sorted(trained.rglob("*.pt"))
    names = {p.name for p in paths}
    assert {"model.pt", "checkpoint_final.pt", "checkpoint_epoch=2.pt"} <= names, names
    for path in paths:
        torch.load(path, map_location="cpu", weights_only=True)
    final = torch.load(trained / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 and final["trainer"]["max_epochs"] == 2
    assert not any(k.startswith("target.") and v.requires_grad for k, v in final["hypernet"].items())


def test_tensorboard_has_loss_curves_validation_metrics_and_panels(trained):
    events = EventAccumulator(str(trained / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/mse", "train/lr", "val_psnr", "val_ssim", "val_crps", "val_eu", "val_au",
            "val_coverage_90", "val_uce", "val_ause"} <= scalars
    assert all(0 <= e.value <= 1 for e in events.Scalars("val_coverage_90"))
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_psnr")] == [1, 2]
    assert all(np.isfinite(e.value) for e in events.Scalars("train/loss"))
    panels = events.Images("validation/cond_mean_eu_au_error_target")
    assert len(panels) == 2 and panels[0].width == 6 * panels[0].height
    assert len(list((trained / "logs").glob("events.out.tfevents.*"))) == 1  # one writer for the run


def test_the_bundle_copied_alone_trains_from_its_own_folder(tmp_path, synthetic_dir):
    """As ``monai.bundle download`` delivers it: outputs land in ./models of the bundle, not in a nested ./bundle."""
    shutil.copytree(REPO / "bundle", tmp_path / "hyper_dm_bundle", ignore=shutil.ignore_patterns("models", "data"))
    here = tmp_path / "hyper_dm_bundle"
    check(bundle("training", "--config_file", "['configs/common.yaml','configs/train.yaml']", "--data#synthetic_dir",
                 synthetic_dir, "--training_cfg#epochs", "1", "--training_cfg#val_interval", "100", *SMALL_RUN,
                 cwd=here))
    assert (here / "models" / "checkpoints" / "checkpoint_final.pt").is_file()
    assert len(list((here / "models" / "logs").glob("events.out.tfevents.*"))) == 1
    assert not (here / "bundle").exists()


def test_inference_writes_nifti_volumes_on_the_source_series_grid(trained, synthetic_dir):
    results = trained / "results"
    args = ["inference", "--config_file", INFER, "--output_dir", str(trained),
            "--data#synthetic_dir", synthetic_dir, "--inference_cfg#M", "2", "--inference_cfg#N", "2",
            "--diffusion#ddim_steps", "3"]
    check(bundle(*args))
    means = sorted(results.glob("*/*_mean.nii.gz"))
    assert len(means) >= 1
    for mean_path in means:
        stem = mean_path.parent.name
        mhd = next(Path(synthetic_dir).rglob(f"{stem}.mhd"))
        source = sitk.ReadImage(str(mhd))
        mean = nib.load(mean_path)
        assert mean.shape == source.GetSize()  # the source's own matrix (512 x 512), not the 64 x 64 model grid
        # the same voxel grid in the world: LPS (SimpleITK) -> RAS (NIfTI)
        for index in [(0, 0, 0), (511, 3, 1), (17, 400, source.GetSize()[2] - 1)]:
            lps = np.array(source.TransformIndexToPhysicalPoint(index))
            np.testing.assert_allclose(mean.affine @ np.append(index, 1.0), [*(lps * [-1, -1, 1]), 1.0], atol=1e-3)
        hu = mean.get_fdata()
        # HU inside the window [-1000, 1000]; model units would span at most 2 (the model is barely trained)
        assert -1000.5 <= hu.min() and hu.max() <= 1000.5 and hu.max() - hu.min() > 10, "mean is not in HU"
        folder = mean_path.parent
        eu, au, total = (nib.load(folder / f"{stem}_{k}.nii.gz").get_fdata() for k in ("eu", "au", "total"))
        np.testing.assert_allclose(eu + au, total, rtol=1e-5, atol=1e-3)
        assert (eu >= 0).all() and (au >= 0).all() and total.max() > 0
        metrics = json.loads((folder / f"{stem}_metrics.json").read_text())
        assert np.isfinite(metrics["psnr_db"]) and metrics["psnr_db"] > 5
        assert 0 < metrics["crps"] < 2000  # HU
        assert (folder / f"{stem}_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run never silently replaces results
    before = means[0].stat().st_mtime_ns
    again = bundle(*args)
    assert again.returncode != 0 and "overwrite" in again.stdout + again.stderr
    assert means[0].stat().st_mtime_ns == before


def test_killed_training_resumes_to_the_same_iteration(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    common = ["--config_file", TRAIN, "--output_dir", str(out), "--data#synthetic_dir",
              synthetic_dir, "--training_cfg#epochs", "3", "--training_cfg#val_interval", "100", *SMALL_RUN]
    first = subprocess.Popen([sys.executable, "-m", "monai.bundle", "run", *common], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    epoch1 = out / "checkpoints" / "checkpoint_epoch=1.pt"
    deadline = time.monotonic() + 300
    while not epoch1.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # plain `run` (no run id) was killed mid-training
    first.wait()
    assert epoch1.exists() and not (out / "checkpoints" / "checkpoint_final.pt").exists()
    time.sleep(0.5)  # let the kill land before reading what it left
    check(bundle("training", *common, "--training_cfg#resume", str(epoch1)))
    final = torch.load(out / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 6  # 3 epochs x 2 iterations, as an uninterrupted run
    # AdamW counted every step, the 2 before the kill included: its state was restored, not restarted
    steps = {int(s["step"]) for s in final["optimizer"]["state"].values()}
    assert steps == {6}
    assert final["lr_scheduler"]["last_epoch"] == 6


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, synthetic_dir) -> SimpleNamespace:
    """A 3-epoch run, and the same run stopped after epoch 2's validation and resumed in a new process.

    lr 0.003: validation PSNR peaks before epoch 3 (measured 12.0, 14.5, 14.0 dB with v prediction and the
    noise-level input), so the resumed epoch validates a model worse than the best one (the test checks that this
    still holds).
    """
    whole, parts = tmp_path_factory.mktemp("whole"), tmp_path_factory.mktemp("parts")
    common = ["--config_file", TRAIN, "--data#synthetic_dir", synthetic_dir, *SMALL_RUN, "--training_cfg#lr", "0.003"]
    check(bundle("training", *common, "--output_dir", str(whole), "--training_cfg#epochs", "3"))
    # 2 of the 3 epochs, with the 3-epoch LR schedule (T_max = 3 epochs x 2 iterations)
    check(bundle("training", *common, "--output_dir", str(parts), "--training_cfg#epochs", "2",
                 "--train#lr_scheduler#T_max", "6"))
    before = {"model_mtime": (parts / "model.pt").stat().st_mtime_ns,
              "checkpoints": sorted(p.name for p in (parts / "checkpoints").glob("checkpoint_epoch=*.pt"))}
    time.sleep(0.05)  # a rewrite of model.pt would get a later mtime
    result = bundle("training", *common, "--output_dir", str(parts), "--training_cfg#epochs", "3",
                    "--training_cfg#resume", str(parts / "checkpoints" / "checkpoint_epoch=2.pt"))
    check(result)
    return SimpleNamespace(whole=whole, parts=parts, console=result.stdout + result.stderr, **before)


def scalars(logs: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of ``tag`` from every event file in ``logs`` (a resumed run adds a file)."""
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def final_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "checkpoint_final.pt", weights_only=True)


def test_resume_never_replaces_the_best_model_with_a_worse_one(resumed):
    psnr = scalars(resumed.whole / "logs", "val_psnr")
    best_epoch, best = max(psnr, key=lambda e: e[1])
    assert best_epoch in (1, 2), f"the setting no longer validates worse after epoch 2: {psnr}"
    assert (resumed.parts / "model.pt").stat().st_mtime_ns == resumed.model_mtime  # not rewritten by the resume
    assert "Got new best metric" not in resumed.console
    model, expected = (torch.load(run / "model.pt", weights_only=True)["hypernet"] for run in (resumed.parts,
                                                                                                 resumed.whole))
    assert all(torch.equal(model[k], expected[k]) for k in expected)  # the best epoch's weights, as in the whole run
    parts, whole = final_checkpoint(resumed.parts), final_checkpoint(resumed.whole)
    assert parts["validator"] == pytest.approx({"best_metric": best, "best_metric_epoch": best_epoch}, rel=1e-6)
    assert parts["best_model"] == whole["best_model"]  # the key-metric record of model.pt


def test_amp_loss_scale_travels_in_the_checkpoint():
    """The AMP GradScaler (created by MONAI's Trainer.run) is saved and restored through ``GradScalerState``; without
    AMP the entry is empty."""
    from hyper_dm.engines import GradScalerState

    class Run:
        scaler = None

    assert GradScalerState(Run()).state_dict() == {}
    first, resumed = Run(), Run()
    first.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    first.scaler.scale(torch.ones(1))  # the first step creates the scale
    first.scaler.update(new_scale=2.0**7)  # as after a few overflowing steps
    resumed.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    GradScalerState(resumed).load_state_dict(GradScalerState(first).state_dict())
    assert resumed.scaler.get_scale() == 2.0**7


def test_resumed_losses_equal_an_uninterrupted_run(resumed):
    """Same RNG states, same shuffle, same training noise: the resumed epoch's losses and validation repeat the
    uninterrupted run's (measured exactly equal on the CPU; asserted to 1e-6 relative)."""
    for tag, steps in (("train/loss", [1, 2, 3, 4, 5, 6]), ("val_psnr", [1, 2, 3])):
        parts, whole = scalars(resumed.parts / "logs", tag), scalars(resumed.whole / "logs", tag)
        assert [s for s, _ in parts] == [s for s, _ in whole] == steps, tag
        np.testing.assert_allclose([v for _, v in parts], [v for _, v in whole], rtol=1e-6, atol=0, err_msg=tag)


def test_resume_prunes_the_checkpoints_of_the_first_run(resumed):
    assert resumed.checkpoints == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt"]
    kept = sorted(p.name for p in (resumed.parts / "checkpoints").glob("checkpoint_epoch=*.pt"))
    assert kept == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]  # n_saved 2 across both processes
    for name in (kept[-1], "checkpoint_final.pt"):  # the record a further resume continues
        record = torch.load(resumed.parts / "checkpoints" / name, weights_only=True)["checkpointer"]
        assert [file for _, file in record["_saved"]] == kept, name


def test_resume_into_another_model_config_names_the_file_the_key_and_both_values(resumed, synthetic_dir):
    ckpt = resumed.parts / "checkpoints" / "checkpoint_epoch=3.pt"
    result = bundle("training", "--config_file", TRAIN, "--output_dir", str(resumed.parts / "other"),
                    "--data#synthetic_dir", synthetic_dir, *SMALL_RUN, "--training_cfg#epochs", "4",
                    "--model#z_dim", "16", "--training_cfg#resume", str(ckpt))
    assert result.returncode != 0
    assert f"{ckpt}: was written for another configuration: model#z_dim is 8 in the checkpoint but 16 in this " \
           "config" in result.stderr, result.stderr[-3000:]
    assert not list((resumed.parts / "other").rglob("*.pt"))


def test_training_into_another_runs_folder_is_refused_unless_it_resumes_or_overwrites(resumed, synthetic_dir,
                                                                                       tmp_path):
    """A folder holding another run's model.pt (e.g. the shipped bundle/models), checkpoints and TensorBoard logs:
    a new run is refused before it writes anything, naming the files and the ways out; with overwrite it runs and
    leaves only its own checkpoints and logs."""
    out = tmp_path / "models"
    shutil.copytree(resumed.whole, out)
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".hyper_dm.lock"}  # the lock records the last run to take it
    earlier = files()
    assert Path("model.pt") in earlier and len(list((out / "logs").glob("events.*"))) == 1
    common = ["--config_file", TRAIN, "--output_dir", str(out), "--data#synthetic_dir", synthetic_dir, *SMALL_RUN,
              "--training_cfg#epochs", "1"]
    refused = bundle("training", *common)
    assert refused.returncode != 0
    assert f"refusing to train into {out}: it holds another run's {out / 'model.pt'}" in refused.stderr, \
        refused.stderr[-3000:]
    assert "--training_cfg#overwrite True" in refused.stderr and "training_cfg#resume" in refused.stderr
    script = subprocess.run([sys.executable, "scripts/train.py", "--outdir", str(out), f"data.synthetic_dir="
                             f"{synthetic_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert script.returncode == 2 and "pass --overwrite (python scripts/train.py)" in script.stderr, script.stderr
    assert files() == earlier  # untouched
    check(bundle("training", *common, "--training_cfg#overwrite", "True"))
    assert (out / "model.pt").read_bytes() != earlier[Path("model.pt")]  # this run's best model
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["checkpoint_epoch=1.pt",
                                                                         "checkpoint_final.pt"]
    assert final_checkpoint(out)["trainer"]["iteration"] == 2
    assert len(list((out / "logs").glob("events.*"))) == 1 and scalars(out / "logs", "val_psnr")[-1][0] == 1
    fresh = tmp_path / "fresh"  # an empty folder another run holds (its lock): refused too, nothing written
    fd, _ = lock_folder(fresh)
    try:
        busy = bundle("training", *common[:2], "--output_dir", str(fresh), *common[4:])
    finally:
        os.close(fd)
    assert busy.returncode != 0 and f"another run (process {os.getpid()}) is writing into {fresh}" in busy.stderr
    assert sorted(p.name for p in fresh.iterdir()) == [".hyper_dm.lock"]


def test_inference_refuses_a_checkpoint_of_another_task_or_size(resumed):
    from hyper_dm.data.validation import BadInputError
    from hyper_dm.inference import HyperDM

    model_pt = resumed.parts / "model.pt"
    with pytest.raises(BadInputError, match=r"data#task is 'ct' in the checkpoint but 'mri' in this config") as e:
        HyperDM.from_bundle(model_pt, config="bundle/configs/knee_singlecoil.yaml", device="cpu")
    assert str(model_pt) in str(e.value)
    with pytest.raises(BadInputError, match="data#img_size is 64 in the checkpoint but 32"):
        HyperDM.from_bundle(model_pt, device="cpu", **{"data#img_size": 32})
    assert HyperDM.from_bundle(model_pt, device="cpu").network is not None  # the matching config loads


def test_a_truncated_checkpoint_is_an_error_naming_it(resumed, tmp_path):
    from ignite.engine import Engine

    from hyper_dm.data.validation import BadInputError
    from hyper_dm.engines import CheckpointLoader
    from hyper_dm.inference import load_hypernet_state

    content = (resumed.parts / "checkpoints" / "checkpoint_epoch=3.pt").read_bytes()
    truncated = tmp_path / "checkpoint_epoch=3.pt"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(BadInputError, match="truncated") as e:
        load_hypernet_state(truncated)
    assert str(e.value).startswith(f"{truncated}: ")
    loader = CheckpointLoader(str(truncated), {"hypernet": torch.nn.Linear(1, 1)})
    with pytest.raises(BadInputError, match="truncated") as e:
        loader(Engine(lambda engine, batch: None))
    assert str(e.value).startswith(f"{truncated}: ")
    net = torch.nn.Linear(1, 1)
    loader = CheckpointLoader(str(resumed.parts / "model.pt"), {"hypernet": net, "optimizer": torch.optim.SGD(
        net.parameters(), lr=0.1)})  # model.pt is not a resumable checkpoint
    with pytest.raises(BadInputError, match=r"model.pt: has no 'optimizer' entries \(it holds 'hypernet', 'config'\)"):
        loader(Engine(lambda engine, batch: None))


def test_script_trains_the_knee_overlay_in_eu_mode(tmp_path, synthetic_dir):
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "bundle/configs/knee_singlecoil.yaml", "training.mode=eu",
         "training.lr=1e-4", "training.epochs=1", "training.epoch_length=2", "training.batch_size=2",
         "training.val_M=2", "training.val_N=2", "training.val_ddim_steps=2", "validate.evaluator.epoch_length=1",
         f"output_dir={tmp_path}", f"data.synthetic_dir={synthetic_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    check(result)
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert "train/diversity" in events.Tags()["scalars"]  # the eu objective ran
    assert (Path(synthetic_dir) / "fastmri_knee_seed0").is_dir()


def test_the_shipped_knee_model_fine_tunes_with_probes_through_the_script(tmp_path, synthetic_dir):
    """The fine-tuning behind the shipped knee model as a user runs it: ``training.init`` starts from its weights,
    mode ``eu`` with the KL inside pasted objects on the unmeasured columns' spread. At learning rate 0 the run
    must end on exactly the weights it started from, with the KL logged."""
    shipped = REPO / "bundle" / "models" / "knee" / "model.pt"
    result = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "bundle/configs/knee_singlecoil.yaml", "training.mode=eu",
         "training.eu_term=kl", "training.m_weights=2", "training.lambda_eu=0.03", "training.probes=objects_inside",
         "training.probe_columns=true", f"training.init={shipped}", "training.lr=0", "training.epochs=1",
         "training.epoch_length=2", "training.batch_size=2", "training.val_M=2", "training.val_N=2",
         "training.val_ddim_steps=2", "validate.evaluator.epoch_length=1", f"output_dir={tmp_path}",
         f"data.synthetic_dir={synthetic_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    check(result)
    events = EventAccumulator(str(tmp_path / "logs"))
    events.Reload()
    assert "train/kl" in events.Tags()["scalars"]
    start = torch.load(shipped, weights_only=True)["hypernet"]
    end = final_checkpoint(tmp_path)["hypernet"]
    assert start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)


def test_native_overlay_trains_and_infers_at_256_on_cpu(tmp_path, synthetic_dir):
    """The native-resolution model (four levels, SDPA attention) at 256 x 256: a few training iterations, then a
    3-slice 256 x 256 volume reconstructed on its own grid with the trained checkpoint."""
    out = tmp_path / "native"
    native = "'bundle/configs/native.yaml'"
    check(bundle("training", "--config_file", TRAIN.replace("]", f",{native}]"), "--output_dir", str(out),
                 "--data#synthetic_dir", synthetic_dir, "--data#img_size", "256", "--training_cfg#epochs", "1",
                 "--training_cfg#epoch_length", "2", "--training_cfg#batch_size", "2",
                 "--training_cfg#val_interval", "100"))
    final = out / "checkpoints" / "checkpoint_final.pt"
    assert torch.load(final, weights_only=True)["trainer"]["iteration"] == 2
    source = sitk.ReadImage(str(next(Path(synthetic_dir).rglob("*.mhd"))))[::2, ::2, :3]  # 256 x 256 x 3
    sitk.WriteImage(source, str(tmp_path / "slab.nii.gz"))
    check(bundle("inference", "--config_file", INFER.replace("]", f",{native}]"), "--output_dir", str(out),
                 "--data#img_size", "256", "--inference_cfg#ckpt", str(final), "--inference_cfg#input",
                 str(tmp_path / "slab.nii.gz"), "--inference_cfg#M", "2", "--inference_cfg#N", "2",
                 "--diffusion#ddim_steps", "2", "--inference_cfg#slice_batch", "1"))
    mean = nib.load(out / "results" / "slab" / "slab_mean.nii.gz")
    assert mean.shape == (256, 256, 3)
    np.testing.assert_allclose(mean.affine, nib.load(tmp_path / "slab.nii.gz").affine, atol=1e-4)
    assert np.isfinite(mean.get_fdata()).all()


def test_a_checkpoint_recorded_before_the_noise_level_input_is_read_as_without_it(resumed, tmp_path):
    """A config record without ``model#noise_level_input`` (written before the option) means a U-Net without the
    noise-level plane: loading it into a config with the plane names the key, instead of a tensor-shape error."""
    from hyper_dm.data.validation import BadInputError
    from hyper_dm.engines import read_checkpoint

    state = torch.load(resumed.parts / "model.pt", weights_only=True)
    state["config"]["model"].pop("noise_level_input")  # a record from before the option
    torch.save(state, tmp_path / "old.pt")
    record = state["config"]
    read_checkpoint(tmp_path / "old.pt", config={**record, "model": {**record["model"], "noise_level_input": False}})
    with pytest.raises(BadInputError, match="model#noise_level_input is False in the checkpoint but True in this"):
        read_checkpoint(tmp_path / "old.pt", config={**record, "model": {**record["model"], "noise_level_input": True}})
    # `--model#noise_level_input true` on the monai.bundle command line arrives as a string
    with pytest.raises(BadInputError, match="is True in the checkpoint but 'true' in this config; a boolean given as "
                                            "the string 'true' / 'false'.*write True / False"):
        read_checkpoint(resumed.parts / "model.pt", config={**record, "model": {**record["model"],
                                                                               "noise_level_input": "true"}})


def test_training_refuses_an_ensemble_before_it_claims_the_folder(tmp_path, synthetic_dir):
    """Members of a deep ensemble are trained apart; asking the bundle to train one is an error that leaves the
    output folder untouched, so the corrected command runs there."""
    result = bundle("training", "--config_file", TRAIN, "--output_dir", str(tmp_path / "run"), "--data#synthetic_dir",
                    synthetic_dir, "--model#ensemble_members", "2", *SMALL_RUN)
    assert result.returncode != 0 and "train each member with ensemble_members 1" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_config_error_in_the_trainer_leaves_the_folder_free_for_the_corrected_command(tmp_path, synthetic_dir):
    """The TensorBoard writer exists before the trainer is built, so a typo in a trainer option used to leave an
    event file that refused the corrected rerun; the claim now sees it holds no curves."""
    from hyper_dm.engines import claim_training_folder

    out = tmp_path / "run"
    result = bundle("training", "--config_file", TRAIN, "--output_dir", str(out), "--data#synthetic_dir",
                    synthetic_dir, "--training_cfg#probes", "objcts", *SMALL_RUN)
    assert result.returncode != 0 and "unknown probes 'objcts' (training_cfg#probes)" in result.stderr
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1  # what the failed start left
    claim_training_folder(out, out / "checkpoints", out / "logs")  # the corrected command's claim
    assert not list((out / "logs").glob("events.out.tfevents.*"))
