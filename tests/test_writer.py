"""CaseWriter on real engines: a MONAI Evaluator (decollated) and a plain Ignite Engine (batch-first dicts)."""

import csv
import json
import logging
import math
import zlib

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents

from hyper_dm.engines.writer import METRIC_FIELDS, CaseWriter

S = 64
HU_SCALE = 1000.0  # HU window -1000..1000: hu = 1000 * x + 0
CASES = {
    "subset0_1.3.6.1.4": {
        "affine": np.array([[-0.703125, 0, 0, 180.0], [0, -0.703125, 0, 170.5], [0, 0, 2.5, -310.0], [0, 0, 0, 1]]),
        "scale": [HU_SCALE] * 3, "offset": [0.0] * 3,
    },
    # MRI-like: per-slice magnitude scale, physical = (x + 1) * scale / 2
    "file1000001": {
        "affine": np.diag([0.4375, 0.4375, 3.0, 1.0]), "scale": [2e-4, 3e-4, 4e-4], "offset": [2e-4, 3e-4, 4e-4],
    },
}
ORDER = [("subset0_1.3.6.1.4", 2), ("file1000001", 1), ("subset0_1.3.6.1.4", 0), ("subset0_1.3.6.1.4", 1),
         ("file1000001", 0), ("file1000001", 2)]  # batch size 2: CT case complete at iteration 2, MRI at 3


def make_slice(case_id, k, seed=0, label=True):
    g = torch.Generator().manual_seed(zlib.crc32(f"{case_id}/{k}/{seed}".encode()))
    pred = torch.rand(1, S, S, generator=g) * 1.6 - 0.8
    item = {
        "case_id": case_id, "slice_index": k, "n_slices": 3,
        "affine": torch.as_tensor(CASES[case_id]["affine"]),
        "intensity_scale": CASES[case_id]["scale"][k], "intensity_offset": CASES[case_id]["offset"][k],
        "pred": pred, "eu": torch.rand(1, S, S, generator=g) * 1e-3, "au": torch.rand(1, S, S, generator=g) * 2e-3,
        "cond": pred + 0.2 * torch.randn(1, S, S, generator=g),
    }
    if label:
        item["label"] = pred + 0.05 * torch.randn(1, S, S, generator=g)
        item["crps"] = torch.tensor(0.01 * (k + 1))
    return item


class ReplayEvaluator(Evaluator):
    """A real MONAI Evaluator whose 'model' returns the precomputed maps carried by the batch.

    ``return_decollated=False`` returns the batch-first dict after MONAI decollated ``state.output`` (as
    ``HyperDiffusionEvaluator`` does): Ignite then stores that dict while ``state.batch`` stays decollated.
    """

    return_decollated = True

    def _iteration(self, engine, batchdata):
        keys = ("pred", "eu", "au", "label", "cond", "crps")
        output = {k: batchdata[k] for k in keys if k in batchdata}
        engine.state.output = output
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates batch and output here
        return engine.state.output if self.return_decollated else output


def run_evaluator(writer, seed=0, order=ORDER, label=True, return_decollated=True, counts=None):
    """Run a ReplayEvaluator over ``order``; ``counts`` receives ``len(writer.written)`` after each iteration."""
    items = [make_slice(c, k, seed, label) for c, k in order]
    evaluator = ReplayEvaluator(device="cpu", val_data_loader=DataLoader(items, batch_size=2, shuffle=False))
    evaluator.return_decollated = return_decollated
    writer.attach(evaluator)
    counts = [] if counts is None else counts
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: counts.append(len(writer.written)))
    evaluator.run()
    return items, counts


def expected_volumes(items, case_id):
    slices = sorted((i for i in items if i["case_id"] == case_id), key=lambda i: i["slice_index"])
    scale = np.array([i["intensity_scale"] for i in slices])
    offset = np.array([i["intensity_offset"] for i in slices])
    stack = lambda key: np.stack([i[key][0].numpy().astype(np.float64) for i in slices], axis=-1)  # noqa: E731
    crps = [float(i["crps"]) * s for i, s in zip(slices, scale, strict=True)]
    return {"mean": stack("pred") * scale + offset, "eu": stack("eu") * scale**2, "au": stack("au") * scale**2,
            "label": stack("label"), "pred": stack("pred"), "crps": crps}


@pytest.mark.parametrize("return_decollated", [True, False])
def test_writes_restacked_volumes_metrics_and_previews(tmp_path, return_decollated):
    writer = CaseWriter(tmp_path)
    items, counts = run_evaluator(writer, return_decollated=return_decollated)
    assert counts == [0, 1, 2]  # each case written as soon as its last slice arrived
    assert [w["case_id"] for w in writer.written] == ["subset0_1.3.6.1.4", "file1000001"]
    for case_id, case in CASES.items():
        want = expected_volumes(items, case_id)
        volumes = {}
        for name in ("mean", "eu", "au", "total"):
            image = nib.load(tmp_path / f"{case_id}_{name}.nii.gz")
            assert image.shape == (S, S, 3) and image.get_data_dtype() == np.float32
            np.testing.assert_allclose(image.affine, case["affine"], atol=1e-5)
            assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1
            volumes[name] = image.get_fdata()
        np.testing.assert_allclose(volumes["mean"], want["mean"], rtol=1e-5, atol=1e-3 * max(case["scale"]))
        np.testing.assert_allclose(volumes["eu"], want["eu"], rtol=1e-5)
        np.testing.assert_allclose(volumes["au"], want["au"], rtol=1e-5)
        np.testing.assert_allclose(volumes["eu"] + volumes["au"], volumes["total"], rtol=1e-6, atol=0)

        metrics = json.loads((tmp_path / f"{case_id}_metrics.json").read_text())
        assert set(metrics) == set(METRIC_FIELDS) and metrics["n_slices"] == 3
        assert all(math.isfinite(metrics[k]) for k in ("psnr_db", "ssim", "crps", "mean_eu", "mean_au"))
        mse = np.mean((want["pred"] - want["label"]) ** 2)
        assert metrics["psnr_db"] == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-4)
        assert 0.5 < metrics["ssim"] <= 1.0
        assert metrics["mean_eu"] == pytest.approx(want["eu"].mean(), rel=1e-5)
        assert metrics["mean_au"] == pytest.approx(want["au"].mean(), rel=1e-5)
        assert metrics["crps"] == pytest.approx(np.mean(want["crps"]), rel=1e-5)

        png = tmp_path / f"{case_id}_preview.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert width > 5 * height  # six tiles: cond | mean | EU | AU | |error| | target
    ct = nib.load(tmp_path / "subset0_1.3.6.1.4_mean.nii.gz").get_fdata()
    assert -1000 <= ct.min() and ct.max() <= 1000 and ct.max() - ct.min() > 1000  # HU, not the model range
    with (tmp_path / "metrics.csv").open() as f:
        assert [r["case_id"] for r in csv.DictReader(f)] == ["subset0_1.3.6.1.4", "file1000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_refuses_to_overwrite_unless_asked(tmp_path):
    run_evaluator(CaseWriter(tmp_path))
    first = tmp_path / "subset0_1.3.6.1.4_mean.nii.gz"
    before = first.read_bytes()
    counts = []
    with pytest.raises(FileExistsError, match=r"subset0_1\.3\.6\.1\.4_mean\.nii\.gz.*overwrite=True"):
        run_evaluator(CaseWriter(tmp_path), seed=1, counts=counts)
    assert counts == []  # refused at the case's first slice, before the rest of the case was reconstructed
    assert first.read_bytes() == before

    writer = CaseWriter(tmp_path, overwrite=True)
    items, _ = run_evaluator(writer, seed=1)
    assert len(writer.written) == 2
    np.testing.assert_allclose(nib.load(first).get_fdata(), expected_volumes(items, "subset0_1.3.6.1.4")["mean"],
                               rtol=1e-5, atol=1.0)
    with (tmp_path / "metrics.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2  # rows replaced, not duplicated


def test_incomplete_case_is_reported_not_written(tmp_path, caplog):
    writer = CaseWriter(tmp_path, previews=False)
    order = ORDER[:4] + [("file1000001", 2)]  # MRI case misses slice 0
    with caplog.at_level(logging.INFO, logger="hyper_dm.writer"):
        run_evaluator(writer, order=order)
    assert [w["case_id"] for w in writer.written] == ["subset0_1.3.6.1.4"]
    assert writer.incomplete == {"file1000001": (2, 3)}
    assert "file1000001 not written: 2 of 3 slices arrived (missing slice indices [0])" in caplog.text
    assert "wrote case subset0_1.3.6.1.4" in caplog.text
    assert not list(tmp_path.glob("file1000001*"))


def test_plain_engine_batch_first_without_labels_and_with_std(tmp_path):
    """Non-decollated output and batch dicts (with raw samples to ignore), no target: no metrics, std maps."""
    items = [make_slice(c, k, label=False) for c, k in ORDER]
    batches = [DataLoader(items, batch_size=3).collate_fn(items[i:i + 3]) for i in (0, 3)]

    def step(engine, batch):
        out = {k: batch[k] for k in ("pred", "eu", "au")}
        out["samples"] = torch.zeros(4, len(batch["pred"]) + 1, 1, S, S)  # [M*N, B, ...]: not batch-first
        return out

    engine = Engine(step)
    writer = CaseWriter(tmp_path / "new" / "dir", write_std=True)
    writer.attach(engine)
    engine.run(batches)
    assert len(writer.written) == 2 and all(w["metrics"] is None for w in writer.written)
    out = tmp_path / "new" / "dir"
    assert not (out / "metrics.csv").exists() and not list(out.glob("*_metrics.json"))
    for name in ("eu", "au", "total"):
        var = nib.load(out / f"file1000001_{name}.nii.gz").get_fdata()
        std = nib.load(out / f"file1000001_{name}_std.nii.gz").get_fdata()
        np.testing.assert_allclose(std**2, var, rtol=1e-5)
    assert (out / "file1000001_preview.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_case_id_duplicate_slices_and_missing_keys_fail_clearly(tmp_path):
    writer = CaseWriter(tmp_path)
    item = make_slice("subset0_1.3.6.1.4", 0)
    with pytest.raises(ValueError, match="cannot be used as an output file name"):
        writer.add_slice({**item, "case_id": "../evil"})
    writer.add_slice(item)
    with pytest.raises(ValueError, match="arrived twice"):
        writer.add_slice(item)
    with pytest.raises(KeyError, match="no 'eu'"):
        writer.add_slice({k: v for k, v in item.items() if k != "eu"})
    assert list(tmp_path.iterdir()) == []
