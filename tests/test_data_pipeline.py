"""Datalists, cached per-slice datasets and geometry, on small synthetic sets in the real formats."""

import nibabel as nib
import numpy as np
import pytest
import torch

from hyper_dm.data import (
    build_datalist,
    build_dataset,
    case_slices,
    physical_map,
    resolve_data_config,
    to_hu,
    to_magnitude,
)
from hyper_dm.data.datasets import physics_key
from hyper_dm.data.synthetic import write_fastmri_knee_like, write_luna16_like

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("luna16")
    write_luna16_like(root, n_series=5, seed=1, size_xy=128, n_slices=(4, 6), spacing_xy_mm=(2.6, 2.9),
                      direction=ROTATED)
    return {"task": "ct", "dataset_dir": str(root), "img_size": 32, "train_frac": 0.6, "val_frac": 0.2}


@pytest.fixture(scope="module")
def mri_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("knee")
    write_fastmri_knee_like(root, n_files=3, seed=1, n_slices=(2, 3))
    return {"task": "mri", "dataset_dir": str(root), "img_size": 32, "train_frac": 0.34, "val_frac": 0.33}


def test_split_by_case_reproducible(ct_data):
    lists = build_datalist(ct_data)
    ids = {s: [c["case_id"] for c in v] for s, v in lists.items()}
    assert [len(v) for v in ids.values()] == [3, 1, 1]
    assert len(set(sum(ids.values(), []))) == 5  # every case in exactly one split
    assert build_datalist(ct_data) == lists
    other = [build_datalist({**ct_data, "split_seed": s})["validation"][0]["case_id"] for s in range(1, 6)]
    assert any(o != ids["validation"][0] for o in other)


def test_ct_samples(ct_data):
    dataset = build_dataset(ct_data, "training")
    cases = build_datalist(ct_data)["training"]
    assert len(dataset) == sum(c["n_slices"] for c in cases)
    sample = dataset[0]
    for key in ("target", "cond"):
        x = sample[key]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, 32, 32)
        assert -1.0 <= x.min() and x.max() <= 1.0
    assert sample["affine"].shape == (4, 4) and sample["affine"].dtype == torch.float64
    assert "/" not in sample["case_id"] and sample["slice_index"] == 0 and sample["n_slices"] == cases[0]["n_slices"]
    assert float(to_hu(sample["target"], (-1000, 1000)).min()) == pytest.approx(-1000.0, abs=1)  # air
    mse_cond = float(((sample["cond"] - sample["target"]) ** 2).mean())
    mse_flat = float(((sample["target"].mean() - sample["target"]) ** 2).mean())
    assert mse_cond < mse_flat / 3


def test_validation_physics_deterministic_training_random(ct_data):
    val_a, val_b = build_dataset(ct_data, "validation"), build_dataset(ct_data, "validation")
    torch.testing.assert_close(val_a[1]["cond"], val_b[1]["cond"])
    assert not torch.equal(val_a[0]["cond"], val_a[1]["cond"])
    train = build_dataset(ct_data, "training")
    first, second = train[0], train[0]
    torch.testing.assert_close(first["target"], second["target"])
    assert not torch.equal(first["cond"], second["cond"])  # new noise every draw


def test_affine_places_nodules(ct_data):
    """Restacked target volume + affine: each annotated nodule (LPS world mm) lands on dense tissue."""
    cases = {c["case_id"]: c for split in build_datalist(ct_data).values() for c in split}
    checked = 0
    for case_id, samples in case_slices(ct_data, "training"):
        assert [s["slice_index"] for s in samples] == list(range(cases[case_id]["n_slices"]))
        volume = torch.stack([s["target"][0] for s in samples], dim=-1).numpy()  # [S, S, n]
        nifti = nib.Nifti1Image(volume, samples[0]["affine"].numpy())
        for nodule in cases[case_id]["nodules"]:
            ras = np.asarray(nodule["coord_mm"]) * [-1, -1, 1]
            ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(nifti.affine), ras)).astype(int)
            if nodule["diameter_mm"] >= 12 and all(0 <= v < n for v, n in zip(ijk, volume.shape, strict=True)):
                assert to_hu(volume[tuple(ijk)], (-1000, 1000)) > -300, f"{case_id}: nodule {nodule} not found"
                checked += 1
    assert checked >= 1


def test_persistent_cache_keyed_on_physics(ct_data, tmp_path):
    data = {**ct_data, "cache_dir": str(tmp_path)}
    fresh = build_dataset(data, "validation")[0]
    assert len(list(tmp_path.glob("ct-validation-*/*.pt"))) == 1
    cached = build_dataset(data, "validation")[0]
    torch.testing.assert_close(fresh["cond"], cached["cond"])
    build_dataset({**data, "n_views": 10}, "validation")[0]
    assert len(list(tmp_path.glob("ct-validation-*"))) == 2
    assert physics_key(resolve_data_config(data)) != physics_key(resolve_data_config({**data, "i0": 1e4}))


def test_mri_samples_and_intensity_map(mri_data):
    val = build_dataset(mri_data, "validation")
    sample = val[0]
    assert sample["target"].shape == sample["cond"].shape == (1, 32, 32)
    assert -1.0 <= sample["target"].min() and sample["target"].max() <= 1.0
    magnitude = sample["intensity_scale"] * sample["target"] + sample["intensity_offset"]
    assert 0 <= float(magnitude.min()) and float(magnitude.max()) <= sample["scale"] * (1 + 1e-6)
    torch.testing.assert_close(magnitude, to_magnitude(sample["target"], sample["scale"]))
    assert physical_map("mri", (0, 1), 2 * sample["scale"]) == (sample["scale"], sample["scale"])
    assert physical_map("ct", (-1000.0, 1000.0)) == (1000.0, 0.0)
    torch.testing.assert_close(build_dataset(mri_data, "validation")[0]["cond"], sample["cond"])
    train = build_dataset(mri_data, "training")
    assert not torch.equal(train[0]["cond"], train[0]["cond"])  # a new mask every draw


def test_mri_mask_fixed_per_file(mri_data):
    """Validation slices of one file share one mask: the same k-space gives the same zero-filled image."""
    from hyper_dm.data.datasets import slice_entries

    cases = build_datalist(mri_data)["validation"]
    seeds = {item["seed"] for item in slice_entries(cases, resolve_data_config(mri_data))}
    assert len(seeds) == len(cases)


def test_unknown_config_key_lists_close_match():
    with pytest.raises(KeyError, match="n_views"):
        resolve_data_config({"n_view": 30})
