"""scripts/compare_recipes.py: a training run cut in the middle resumes where its last state left it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hyper_dm.diffusion.probes import random_columns, random_objects

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipes():
    spec = importlib.util.spec_from_file_location("compare_recipes", ROOT / "scripts" / "compare_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_study(path: Path) -> None:
    """A study file as ``prepare`` writes it, 16 x 16 slices and a two-level backbone."""
    g = torch.Generator().manual_seed(0)
    image = lambda *shape: torch.rand(*shape, 1, 16, 16, generator=g) * 2 - 1  # noqa: E731
    split = {"target": image(6), "cond": image(6)}
    torch.save({"train": {"target": image(12), "cond": image(2, 12)}, "val": split,
                "test": {"target": split["target"], "cond_100000": image(6), "cond_1000": image(6)},
                "ood": {**split, "mask": torch.rand(6, 1, 16, 16, generator=g) > 0.7},
                "ood_square": {**split, "mask": torch.rand(6, 1, 16, 16, generator=g) > 0.8},
                "photon_counts": [100000.0, 1000.0],
                "model": {"z_dim": 4, "hidden": 16, "rank": 2, "offset_scale": 0.5, "channels": [8, 8],
                          "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 4,
                          "num_head_channels": 8}}, path)


def test_cut_training_run_resumes_from_its_state(recipes, tmp_path, monkeypatch, capsys):
    tiny_study(tmp_path / "data.pt")
    argv = ["train", "--data", str(tmp_path / "data.pt"), "--recipe", "v_quadratic", "--minutes", "5",
            "--max_steps", "6", "--batch", "2", "--M", "2", "--N", "2", "--steps", "2", "--track_slices", "2",
            "--track_points", "2", "--save_minutes", "0", "--skip_eval", "--out", str(tmp_path / "runs")]
    real_step, calls = torch.optim.AdamW.step, []

    def cut_after_three(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt  # the kill in the middle of the run
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", cut_after_three)
    with pytest.raises(KeyboardInterrupt):
        recipes.main(argv)
    state_path = tmp_path / "runs" / "v_quadratic.state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 3 and len(state["curve"]) == 3
    assert not (tmp_path / "runs" / "v_quadratic.pt").exists()

    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    recipes.main(argv)
    assert "resumed" in capsys.readouterr().out
    run = json.loads((tmp_path / "runs" / "v_quadratic.run.json").read_text())
    assert run["steps"] > 3 and len(run["mse_per_100_steps"]) >= 1
    assert not state_path.exists()  # a finished run leaves only its results
    saved = torch.load(tmp_path / "runs" / "v_quadratic.pt", weights_only=True)
    assert any(not torch.equal(saved[k], state["hypernet"][k]) for k in saved)  # it kept training after the cut
    assert {"ood_eu_ratio", "i0_100000", "i0_1000"} <= set(run["track"][-1])
    assert run["track"][-1]["i0_1000"]["mean_au_hu2"] >= 0


def test_estimator_study_compares_common_and_independent_draw_noise(recipes, tmp_path):
    tiny_study(tmp_path / "data.pt")
    common = ["--data", str(tmp_path / "data.pt"), "--recipe", "v_quadratic", "--M", "2", "--steps", "2"]
    recipes.main(["train", *common, "--minutes", "0.02", "--batch", "2", "--N", "2", "--track_points", "1",
                  "--track_slices", "1", "--skip_eval", "--out", str(tmp_path / "runs")])
    recipes.main(["estimator", *common, "--N", "6", "--eval_slices", "2", "--runs", str(tmp_path / "runs")])
    rows = json.loads((tmp_path / "runs" / "v_quadratic.estimator.json").read_text())
    inputs, noises = ("i0 1e+05", "i0 1e+03", "object"), ("common", "independent")
    expected = {(i, d, n) for i in inputs for d in noises for n in (4, 6)}
    assert {(r["input"], r["noise"], r["N"]) for r in rows} == expected
    assert all(r["mean_au_hu2"] > 0 and r["mean_eu_hu2"] >= 0 for r in rows)
    assert all("eu_object_over_body" in r for r in rows if r["input"] == "object")
    au = {(r["input"], r["noise"], r["N"]): r["mean_au_hu2"] for r in rows}
    assert au[("object", "common", 6)] != au[("object", "independent", 6)]  # other noise, other draws


def test_a_step_budget_stops_at_its_step_and_tracks_at_its_fractions(recipes, tmp_path):
    """Runs sharing the cores train the same number of steps with ``--max_steps`` (the minutes only cap it)."""
    tiny_study(tmp_path / "data.pt")
    recipes.main(["train", "--data", str(tmp_path / "data.pt"), "--recipe", "v_quadratic_s1", "--minutes", "5",
                  "--max_steps", "4", "--batch", "2", "--M", "2", "--N", "2", "--steps", "2", "--track_slices", "1",
                  "--track_points", "2", "--skip_eval", "--out", str(tmp_path / "runs")])
    run = json.loads((tmp_path / "runs" / "v_quadratic_s1.run.json").read_text())
    assert run["steps"] == 4 and [t["step"] for t in run["track"]] == [2, 4]
    assert run["minutes"] < 5


def test_probes_mark_their_objects_and_each_object_is_evaluated(recipes, tmp_path):
    """The eu recipes' probes say where they paste; an evaluation reports every unfamiliar object of the study."""
    cond = torch.zeros(4, 1, 32, 32)
    probe, pasted = random_objects(cond, torch.Generator().manual_seed(0))
    assert pasted.dtype == torch.bool and pasted.shape == cond.shape
    assert ((probe != cond) <= pasted).all() and pasted.flatten(1).any(1).all()
    assert (probe[~pasted] == 0).all()
    # noisy probes (probe_noise): inside an object, noise of the input's level; the stripes run along the first
    # axis, so a clean object's neighbours there are equal and a noisy one's differ by sqrt(2) sigma
    noisy = 0.1 * torch.randn(4, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    for flag, expected in ((False, 0.0), (True, 0.6745 * 2**0.5 * 0.1)):  # the median |difference| of N(0, 2 s^2)
        probe, pasted = random_objects(noisy, torch.Generator().manual_seed(0), noisy=flag)
        both = pasted[:, :, 1:] & pasted[:, :, :-1]
        step = (probe[:, :, 1:] - probe[:, :, :-1]).abs()[both].median().item()
        assert step == pytest.approx(expected, abs=0.02), (flag, step)

    tiny_study(tmp_path / "data.pt")
    recipes.main(["train", "--data", str(tmp_path / "data.pt"), "--recipe", "v_nl_eu_kl_inside", "--max_steps", "2",
                  "--batch", "2", "--M", "2", "--N", "2", "--steps", "2", "--track_points", "1", "--track_slices",
                  "1", "--eval_slices", "3", "--out", str(tmp_path / "runs")])
    figures = json.loads((tmp_path / "runs" / "v_nl_eu_kl_inside.json").read_text())
    for key in ("ood", "ood_square"):
        assert 0 <= figures[f"{key}_coverage_90_calibrated"] <= 1
        assert figures[f"{key}_eu_ratio"] > 0 and figures[f"{key}_error_ratio"] > 0
    assert figures["ood_error_ratio"] != figures["ood_square_error_ratio"]  # each object its own mask


def test_knee_probe_columns_follow_the_studys_masks_on_the_model_grid(recipes, tmp_path, monkeypatch):
    """The measured columns of recipe ``*_unmeasured``: a fully sampled centre band of the 4x or 8x mask (27 or 13
    of the 320-pixel image's frequencies) and, outside it, the share that keeps each acceleration; they reach the
    loss, one row per slice of the batch."""
    columns = random_columns(4000, 64, torch.Generator().manual_seed(0))
    assert columns.dtype == torch.bool and columns.shape == (4000, 64)
    distance = (torch.arange(64) - 32).abs()
    eight = ~columns[:, (distance > 6) & (distance <= 13)].all(1)  # outside the 8x band, inside the 4x one
    assert 0.4 < eight.float().mean().item() < 0.6  # both accelerations, about half each
    for rows, band, acceleration, fraction in ((~eight, 13, 4, 0.08), (eight, 6, 8, 0.04)):
        assert columns[rows][:, distance <= band].all()
        outside = columns[rows][:, distance > band + 1].float().mean().item()
        assert outside == pytest.approx((1 / acceleration - fraction) / (1 - fraction), abs=0.01)
    tiny_study(tmp_path / "data.pt")
    seen, loss = [], recipes.training_loss
    monkeypatch.setattr(recipes, "training_loss", lambda *a: seen.append(a[-1]) or loss(*a))
    recipes.main(["train", "--data", str(tmp_path / "data.pt"), "--recipe", "v_nl_eu_kl_inside_x10_unmeasured",
                  "--max_steps", "2", "--batch", "2", "--track_points", "0", "--skip_eval",
                  "--out", str(tmp_path / "runs")])
    run = json.loads((tmp_path / "runs" / "v_nl_eu_kl_inside_x10_unmeasured.run.json").read_text())
    assert run["steps"] == 2 and run["settings"]["probe_columns"]
    assert len(seen) == 2 and all(c.dtype == torch.bool and c.shape == (2, 16) and c[:, 8].all() for c in seen)
