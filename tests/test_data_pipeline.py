"""Datalists, cached per-slice datasets and geometry, on small synthetic sets in the real formats."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hyper_dm.data import (
    BadInputError,
    build_datalist,
    build_dataset,
    physical_map,
    resolve_data_config,
    split_cases,
    to_hu,
    to_magnitude,
)
from hyper_dm.data.datalist import read_datalist, split_of
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


def test_synthetic_set_uses_its_datalist(ct_data):
    lists = build_datalist(ct_data)
    ids = {s: [c["case_id"] for c in v] for s, v in lists.items()}
    assert [len(v) for v in ids.values()] == [3, 1, 1]
    assert len(set(sum(ids.values(), []))) == 5  # every case in exactly one split
    listed = read_datalist(Path(ct_data["dataset_dir"]) / "datalist.json")
    assert [str(p) for p in listed["test"]] == [c["image"] for c in lists["test"]]


def test_hash_split_is_stable_when_files_come_and_go(tmp_path):
    """Without a datalist a case's split depends on its patient id only: removing a file moves nothing else."""
    paths = write_luna16_like(tmp_path, n_series=12, seed=2, size_xy=16, n_slices=(1, 1))
    (tmp_path / "datalist.json").unlink()
    data = {"task": "ct", "dataset_dir": str(tmp_path), "img_size": 16}
    split = lambda d: {c["case_id"]: s for s, cases in build_datalist(d).items() for c in cases}  # noqa: E731
    before = split(data)
    assert set(before.values()) == {"training", "validation", "test"}
    assert all(split_of(uid, 0, 0.7, 0.15) == s for uid, s in before.items())
    paths[3].unlink()
    after = split(data)
    assert len(after) == 11 and all(before[uid] == s for uid, s in after.items())
    assert split({**data, "split_seed": 1}) != before
    written = tmp_path / "lists" / "mine.json"
    build_datalist(data, write_to=written)
    assert sum(len(v) for v in read_datalist(written).values()) == 11


def test_an_empty_split_is_refused_naming_the_key(tmp_path):
    """One series, all of it for training: asking for validation or test cases names the folder and the key."""
    write_luna16_like(tmp_path, n_series=1, seed=3, size_xy=16, n_slices=(1, 1))
    (tmp_path / "datalist.json").unlink()
    data = {"task": "ct", "dataset_dir": str(tmp_path), "img_size": 16, "train_frac": 1.0, "val_frac": 0.0}
    assert len(split_cases(data, "training")) == 1
    with pytest.raises(BadInputError, match=r"no validation cases \(1 training, 0 validation, 0 test\).*data#val_frac"):
        build_dataset(data, "validation")
    with pytest.raises(BadInputError, match=r"no test cases.*data#train_frac \+ data#val_frac") as error:
        split_cases(data, "test")
    assert error.value.path == tmp_path
    with pytest.raises(BadInputError, match="no test cases"):  # several splits: each must have cases
        split_cases(data, "training", "test")
    build_datalist(data, write_to=tmp_path / "datalist.json")  # a datalist with an empty split: its own advice
    with pytest.raises(BadInputError, match="datalist.json lists none there"):
        split_cases(data, "validation")


def test_ct_samples(ct_data):
    dataset = build_dataset(ct_data, "training")
    cases = build_datalist(ct_data)["training"]
    assert len(dataset) == sum(c["n_slices"] for c in cases)
    sample = dataset[0]
    for key in ("target", "cond"):
        x = sample[key]
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, 32, 32)
        assert -1.0 <= x.min() and x.max() <= 1.0
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


def test_training_photon_count_drawn_from_i0_range(ct_data):
    """With ``i0_range`` the training noise level varies from draw to draw (AU can learn it); without, it does not.
    Validation keeps the configured ``i0``."""
    def noise_levels(data: dict) -> torch.Tensor:
        train = build_dataset(data, "training")
        train.transform.set_random_state(seed=0)  # fixed draws: the test cannot flake
        return torch.stack([(train[0]["cond"] - train[0]["target"]).std() for _ in range(24)])

    fixed = noise_levels({**ct_data, "noise": "poisson", "i0": 3e3, "i0_range": None})
    ranged = noise_levels({**ct_data, "noise": "poisson", "i0": 3e3, "i0_range": [3e2, 3e5]})
    assert fixed.max() / fixed.min() < 1.3
    assert ranged.max() / ranged.min() > 2.0
    val = [build_dataset({**ct_data, "i0_range": r}, "validation")[0]["cond"] for r in (None, [3e2, 3e5])]
    torch.testing.assert_close(val[0], val[1])
    with pytest.raises(ValueError, match="i0_range must be null or"):
        resolve_data_config({**ct_data, "i0_range": [1e5, 1e3]})


def test_fbp_at_the_source_pitch_is_what_a_scanner_makes_averaged_to_the_model_grid(ct_data):
    """``fbp_pitch: source``: training, validation and simulated inference make the FBP on the series' own 128 x 128
    grid (``i0`` per bin of that pitch) and area-average it to the model grid. With plenty of photons it is another
    FBP of the same slices (its own streaks and level); with 1e3 photons per 2.8 mm bin the starved bins
    lift the whole level, the shift the input check flags and this training data teaches."""
    from hyper_dm.inference import load_case

    def conds(data: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = build_dataset(data, split)
        dataset.transform.set_random_state(seed=0)  # fixed training draws: the test cannot flake
        items = list(dataset)
        return torch.stack([x["target"] for x in items]), torch.stack([x["cond"] for x in items])

    plenty = {**ct_data, "i0": 1e7, "i0_range": None}
    target, model_grid = conds(plenty, "validation")
    same_target, source = conds({**plenty, "fbp_pitch": "source"}, "validation")
    _, starved = conds({**ct_data, "fbp_pitch": "source", "i0_range": [1e3, 1e3]}, "training")
    torch.testing.assert_close(same_target, target)  # the same slices, in the same order
    assert source.shape == model_grid.shape == (target.shape[0], 1, 32, 32) and -1 <= source.min()
    rmse = lambda cond: float((cond - target).pow(2).mean().sqrt())  # noqa: E731
    assert rmse(source) < float(target.std()) / 2 and rmse(source - model_grid + target) > 0.01, rmse(source)
    lift, bias = float((starved - conds(ct_data, "training")[0]).mean()), float((source - target).mean())
    assert lift > 0.08 and lift > 1.5 * abs(bias), (lift, bias)  # measured: 0.11 against 0.05 (model units)
    entry = build_datalist(ct_data)["validation"][0]
    case = load_case(entry, resolve_data_config({**plenty, "fbp_pitch": "source"}), "simulate", 32)
    assert case["cond"].shape[1:3] == case["label"].shape[1:3] == (128, 128)  # the scanner's grid, resized later
    with pytest.raises(ValueError, match="fbp_pitch must be one of"):
        resolve_data_config({**ct_data, "fbp_pitch": "native"})


def test_persistent_cache_keyed_on_physics(ct_data, tmp_path):
    data = {**ct_data, "cache_dir": str(tmp_path)}
    fresh = build_dataset(data, "validation")[0]
    assert len(list(tmp_path.glob("ct-validation-*/*.pt"))) == 1
    cached = build_dataset(data, "validation")[0]
    torch.testing.assert_close(fresh["cond"], cached["cond"])
    build_dataset({**data, "n_views": 10}, "validation")[0]
    assert len(list(tmp_path.glob("ct-validation-*"))) == 2
    assert physics_key(resolve_data_config(data)) != physics_key(resolve_data_config({**data, "i0": 1e4}))
    assert physics_key(resolve_data_config(data)) != physics_key(resolve_data_config({**data, "fbp_pitch": "source"}))


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


def test_kspace_noise_level_set_for_evaluation_and_drawn_for_training(mri_data):
    """``kspace_noise`` adds seeded noise of that std (relative to the magnitude scale) in validation and in
    simulated inference; ``kspace_noise_range`` makes the training noise level vary from draw to draw."""
    from hyper_dm.inference import load_case
    from hyper_dm.physics.mri import add_kspace_noise, ifft2c

    noisy = add_kspace_noise(np.zeros((640, 368), np.complex64), 0.25, np.random.default_rng(0))
    assert abs(float(ifft2c(noisy).imag.std()) - 0.25) < 0.005
    clean = {**mri_data, "kspace_noise": 0.0, "kspace_noise_range": None}
    val = [build_dataset({**clean, "kspace_noise": s}, "validation")[0]["cond"] for s in (0.0, 0.05, 0.05)]
    assert not torch.equal(val[0], val[1]) and torch.equal(val[1], val[2])  # noise added, seeded

    def train(cfg: dict) -> list[torch.Tensor]:
        dataset = build_dataset(cfg, "training")
        dataset.transform.set_random_state(seed=0)
        return [dataset[0]["cond"] for _ in range(6)]

    spread = lambda conds: torch.stack([(c - val[0]).std() for c in conds])  # noqa: E731
    fixed, ranged = spread(train(clean)), spread(train({**clean, "kspace_noise_range": [0.0, 0.3]}))
    assert float(ranged.std()) > 3 * float(fixed.std())

    entry = build_datalist(mri_data)["test"][0]
    cases = [load_case({"image": entry["image"], "case_id": "k"}, resolve_data_config({**clean, "kspace_noise": s}),
                       "simulate", 32) for s in (0.0, 0.1)]
    error = [float((c["cond"] - c["label"]).abs().mean()) for c in cases]
    assert error[1] > 1.2 * error[0]
    with pytest.raises(ValueError, match="kspace_noise"):
        resolve_data_config({**clean, "kspace_noise_range": [0.2, 0.1]})


def test_mri_mask_fixed_per_file(mri_data):
    """Validation slices of one file share one mask: the same k-space gives the same zero-filled image."""
    from hyper_dm.data.datasets import slice_entries

    cases = build_datalist(mri_data)["validation"]
    seeds = {item["seed"] for item in slice_entries(cases, resolve_data_config(mri_data))}
    assert len(seeds) == len(cases)


def test_unknown_config_key_lists_close_match():
    with pytest.raises(KeyError, match="n_views"):
        resolve_data_config({"n_view": 30})
