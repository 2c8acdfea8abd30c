"""Compare training recipes for CT by the posterior they give, at one stated budget (docs/recipes.md).

Three steps; the last two run on a GPU where one is available (they need torch and monai only)::

    python scripts/compare_recipes.py prepare --out study/data.pt --series 16       # synthetic LUNA16 -> tensors
    python scripts/compare_recipes.py train --data study/data.pt --recipe v_quadratic --minutes 5 --out study/
    python scripts/compare_recipes.py report --runs study/ --out docs/recipes.md

``prepare`` writes, on the model grid (model units, HU / 1000; stored in float16): training slices with
``--realisations`` noisy FBP conditions each (photon count drawn in ``data#i0_range`` as the bundle trains) and
``--source_pitch`` more made at each series' own pitch (``data#fbp_pitch: source``, as a scanner reconstructs),
validation slices (for the conformal scale), test slices at the three photon counts of ``hyper_dm.evaluation``,
and the test slices with an unfamiliar object (``hyper_dm.data.synthetic.insert_dense_disc``) with its mask.

``train`` trains one recipe (:data:`RECIPES`) for a wall-clock budget (or ``--max_steps``, which makes runs sharing
the cores comparable) under a cosine learning-rate schedule over that budget, records EU on the unfamiliar object
at five points of the run, and writes ``<recipe>.json`` (figures) and ``<recipe>.pt`` (HyperNetwork state).
``report`` tabulates every run and the deep-ensemble baseline (the members ``v_quadratic``, ``v_quadratic_s1``,
... : EU is the spread across members, one weight set each).
``ablation`` evaluates one trained recipe over M and N in {2, 4, 8, 16}; ``estimator`` measures how the draw noise
enters EU (common against independent noise per weight set). The recipe ``regression`` is the
deterministic baseline: the same backbone and HyperNetwork (one weight set) trained by plain MSE from the FBP
condition alone (``x_t = 0``, ``t = 0``); it has no uncertainty, only quality figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyper_dm.data.config import FASTMRI_CENTER_FRACTIONS  # noqa: E402
from hyper_dm.diffusion import HyperDDIMSampler, LossConfig, make_ddim, make_ddpm, training_loss  # noqa: E402
from hyper_dm.diffusion.probes import random_columns, random_objects  # noqa: E402
from hyper_dm.io import atomic_write  # noqa: E402
from hyper_dm.networks import ConditionalUNet, HyperNetwork, apply_weight_sets  # noqa: E402
from hyper_dm.uncertainty import ause, central_z, decompose, gaussian_coverage, psnr  # noqa: E402

HU = 1000.0  # HU per model unit (hu_window [-1000, 1000])
_BASE = {"prediction_type": "sample", "timestep_sampling": "uniform", "mode": "standard", "seed": 0}
_V = {**_BASE, "prediction_type": "v_prediction"}
_NL_EU_KL = {**_V, "timestep_sampling": "quadratic", "noise_level_input": True, "mode": "eu", "m_weights": 4,
             "lambda_eu": 0.003, "eu_term": "kl", "prior_std": 0.3, "probe": True}
RECIPES = {
    "x0": _BASE,
    "eps": {**_BASE, "prediction_type": "epsilon"},
    "v": _V,
    "v_quadratic": {**_V, "timestep_sampling": "quadratic"},
    "v_quadratic_nl": {**_V, "timestep_sampling": "quadratic", "noise_level_input": True},
    "v_edm": {**_V, "timestep_sampling": "lognormal"},
    "x0_eu_l1": {**_BASE, "mode": "eu", "m_weights": 2, "lambda_eu": 0.01},
    "v_eu_kl": {**_V, "timestep_sampling": "quadratic", "mode": "eu", "m_weights": 4, "lambda_eu": 0.03,
                "eu_term": "kl", "prior_std": 0.3, "probe": True},
    "v_eu_kl_low": {**_V, "timestep_sampling": "quadratic", "mode": "eu", "m_weights": 4, "lambda_eu": 0.003,
                    "eu_term": "kl", "prior_std": 0.3, "probe": True},
    # fine-tuning the shipped CT model (noise-level input) with the KL term on the whole probe or inside its objects
    "v_nl_eu_kl": _NL_EU_KL,
    "v_nl_eu_kl_inside": {**_NL_EU_KL, "probe_mask": True},
    "v_nl_eu_kl_inside_x10": {**_NL_EU_KL, "probe_mask": True, "lambda_eu": 0.03},
    # the same two legs with each step's weight sets drawn as inference draws them (balanced latents)
    "v_nl_eu_kl_inside_balanced": {**_NL_EU_KL, "probe_mask": True, "latent_draws": "balanced"},
    "v_nl_eu_kl_inside_x10_balanced": {**_NL_EU_KL, "probe_mask": True, "lambda_eu": 0.03, "latent_draws": "balanced"},
    "v_nl_eu_kl_inside_x10_noisy": {**_NL_EU_KL, "probe_mask": True, "lambda_eu": 0.03, "probe_noise": True},
    # knee: the KL on the part of the objects' spread in k-space columns a random 4x / 8x mask leaves unmeasured
    "v_nl_eu_kl_inside_unmeasured": {**_NL_EU_KL, "probe_mask": True, "probe_columns": True},
    "v_nl_eu_kl_inside_x10_unmeasured": {**_NL_EU_KL, "probe_mask": True, "lambda_eu": 0.03, "probe_columns": True},
    "v_nl_eu_kl_inside_x30_unmeasured": {**_NL_EU_KL, "probe_mask": True, "lambda_eu": 0.09, "probe_columns": True},
    "v_au": {**_V, "timestep_sampling": "quadratic", "mode": "au", "n_noisy": 2, "sigma_noise": 0.05},
    "regression": {**_BASE, "regression": True},
    "knee_v_quadratic": {**_V, "timestep_sampling": "quadratic"},  # with a knee study (prepare --task mri)
    "knee_v_quadratic_nl": {**_V, "timestep_sampling": "quadratic", "noise_level_input": True},
    # knee deep-ensemble members: the shipped knee model's first recipe with other seeds
    **{f"knee_v_quadratic_nl_s{k}": {**_V, "timestep_sampling": "quadratic", "noise_level_input": True, "seed": k}
       for k in (1, 2)},
    **{f"v_quadratic_s{k}": {**_V, "timestep_sampling": "quadratic", "seed": k} for k in (1, 2, 3)},
    "v_quadratic_offset2": {**_V, "timestep_sampling": "quadratic", "model": {"offset_scale": 2.0}},  # weight spread
}
# the unfamiliar objects of the test slices (study keys): the evaluation's dense disc, whose stripes the probes of
# the eu recipes resemble, and a checkered square of another shape and texture that no probe resembles
OBJECTS = {"ood": "insert_dense_disc", "ood_square": "insert_checkered_square"}
ABLATION = (2, 4, 8, 16)
ENSEMBLE = ("v_quadratic", "v_quadratic_s1", "v_quadratic_s2", "v_quadratic_s3")


# ----------------------------------------------------------------------------------------------- prepare (CPU)
def prepare(args: argparse.Namespace) -> None:
    (prepare_mri if args.task == "mri" else prepare_ct)(args)


def prepare_mri(args: argparse.Namespace) -> None:
    """Knee MRI training slices only (the model is evaluated by ``scripts/evaluate.py``): synthetic fastMRI files
    ``<out dir>/knee_<series>``, masks drawn at 4x and 8x, k-space noise drawn in ``data#kspace_noise_range``."""
    from hyper_dm.config import bundle_section
    from hyper_dm.data import build_dataset
    from hyper_dm.data.synthetic import write_fastmri_knee_like

    out = Path(args.out)
    root = out.parent / f"knee_{args.series}"
    if not (root / "datalist.json").exists():
        write_fastmri_knee_like(root, n_files=args.series, seed=args.seed, n_slices=(8, 12))
    data = {**bundle_section("data"), "task": "mri", "dataset_dir": str(root), "cache_dir": None,
            "accelerations": list(FASTMRI_CENTER_FRACTIONS),
            "center_fractions": list(FASTMRI_CENTER_FRACTIONS.values())}
    if args.kspace_noise_range is not None:
        data["kspace_noise_range"] = args.kspace_noise_range
    train = build_dataset(data, "training")
    targets = torch.stack([item["target"] for item in train])
    conds = torch.stack([torch.stack([item["cond"] for item in train]) for _ in range(args.realisations)])
    torch.save({"task": "mri", "train": {"target": targets.half(), "cond": conds.half()},
                "model": bundle_section("model")}, out)
    print(f"wrote {out}: {targets.shape[0]} training slices x {args.realisations} conditions ({root})")


def prepare_ct(args: argparse.Namespace) -> None:
    from hyper_dm.config import bundle_section
    from hyper_dm.data import build_datalist, build_dataset
    from hyper_dm.data.config import MEASUREMENT_NOISE
    from hyper_dm.data.synthetic import write_luna16_like
    from hyper_dm.inference import load_case

    out = Path(args.out)
    root = out.parent / f"luna16_{args.series}"
    if not (root / "datalist.json").exists():
        write_luna16_like(root, n_series=args.series, seed=args.seed)
    data = {**bundle_section("data"), "dataset_dir": str(root), "cache_dir": None}
    size = int(data["img_size"])
    photon_counts = MEASUREMENT_NOISE["ct"][1]

    train = build_dataset(data, "training")
    targets = torch.stack([item["target"] for item in train])
    conds = torch.stack([torch.stack([item["cond"] for item in train]) for _ in range(args.realisations)])
    if args.source_pitch:  # FBPs as a scanner makes them: the same slices and order, another measurement
        train = build_dataset({**data, "fbp_pitch": "source"}, "training")
        conds = torch.cat([conds, torch.stack([torch.stack([item["cond"] for item in train])
                                               for _ in range(args.source_pitch)])])

    def cases(split: str, i0: float = photon_counts[0], limit: int | None = None) -> dict:
        rows = {"target": [], "cond": []}
        for entry in build_datalist(data)[split][:limit]:
            case = load_case({"image": entry["image"], "case_id": entry["case_id"]}, {**data, "i0": i0},
                             "simulate", size)
            rows["target"].append(_model_grid(case["label"], size) / HU)
            rows["cond"].append(case["cond"][0].permute(2, 0, 1)[:, None] / HU)
        return {k: torch.cat(v) for k, v in rows.items()}

    test = {f"cond_{int(i0)}": cases("test", i0)["cond"] for i0 in photon_counts}
    test["target"] = cases("test")["target"]
    half = lambda split: {k: v.half() if v.is_floating_point() else v for k, v in split.items()}  # noqa: E731
    torch.save({"train": half({"target": targets, "cond": conds}), "val": half(cases("validation")),
                "test": half(test), **{key: half(object_cases(data, insert)) for key, insert in OBJECTS.items()},
                "model": bundle_section("model"), "photon_counts": list(photon_counts)}, out)
    print(f"wrote {out}: {targets.shape[0]} training slices x {args.realisations} conditions, "
          f"{test['target'].shape[0]} test slices")


def object_cases(data: dict, insert: str) -> dict[str, torch.Tensor]:
    """The test slices with an unfamiliar object painted in by ``hyper_dm.data.synthetic.<insert>`` (``(mhd, out)
    -> mask [X, Y, Z]``), simulated as inference does: ``target``, ``cond`` and the object's ``mask`` on the model
    grid."""
    from hyper_dm.data import build_datalist, synthetic
    from hyper_dm.inference import load_case

    size, rows = int(data["img_size"]), {"target": [], "cond": [], "mask": []}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in build_datalist(data)["test"]:
            mask = getattr(synthetic, insert)(entry["image"], Path(tmp) / "object.nii.gz")
            case = load_case({"image": str(Path(tmp) / "object.nii.gz"), "case_id": entry["case_id"]}, data,
                             "simulate", size)
            rows["target"].append(_model_grid(case["label"], size) / HU)
            rows["cond"].append(case["cond"][0].permute(2, 0, 1)[:, None] / HU)
            rows["mask"].append(_model_grid(torch.from_numpy(mask[None]).float(), size) > 0.5)
    return {k: torch.cat(v) for k, v in rows.items()}


def _model_grid(volume: torch.Tensor, size: int) -> torch.Tensor:
    """``[1, X, Y, Z]`` -> ``[Z, 1, size, size]`` by area averaging (as the training slices are made)."""
    return F.interpolate(volume[0].permute(2, 0, 1)[:, None].float(), size=(size, size), mode="area")


# ------------------------------------------------------------------------------------------------------ train
def load_study(path: str) -> dict:
    """The tensors of ``prepare`` (stored in float16 to travel light) as float32."""
    study = torch.load(path, weights_only=True)
    for split in ("train", "val", "test", *OBJECTS) if "test" in study else ("train",):
        if split not in study:  # a study prepared before its second object
            continue
        study[split] = {k: v.float() if v.is_floating_point() else v for k, v in study[split].items()}
    return study


def model_config(study: dict, recipe: dict) -> dict:
    """The study's model section with the recipe's ``model`` overrides (e.g. the HyperNetwork's ``offset_scale``)."""
    return {**study["model"], **recipe.get("model", {})}


def build(study: dict, recipe: dict, device: torch.device) -> HyperNetwork:
    model = model_config(study, recipe)
    backbone = ConditionalUNet(model["channels"], model["attention_levels"], model["num_res_blocks"],
                               model["norm_num_groups"], model["num_head_channels"],
                               noise_level_input=recipe.get("noise_level_input", False))
    return HyperNetwork(backbone, z_dim=model["z_dim"], hidden=model["hidden"], rank=model["rank"],
                        offset_scale=model["offset_scale"]).to(device)


def train(args: argparse.Namespace) -> None:
    recipe = RECIPES[args.recipe]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    study = load_study(args.data)
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator(device).manual_seed(recipe["seed"])
    hyper = build(study, recipe, device)
    if args.init:  # a second leg: the weights of a finished run, a fresh optimiser and learning-rate schedule
        hyper.load_state_dict(torch.load(args.init, map_location=device, weights_only=True))
    scheduler = make_ddpm(prediction_type=recipe["prediction_type"])
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    loss_config = LossConfig(**{k: v for k, v in recipe.items() if k in LossConfig.__dataclass_fields__})
    optimizer = torch.optim.AdamW(hyper.trainable_parameters(), lr=args.lr)
    targets, conds = study["train"]["target"].to(device), study["train"]["cond"].to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / f"{args.recipe}.state.pt"
    budget = args.minutes * 60.0
    step, elapsed, curve, track = 0, 0.0, [], []
    if state_path.exists():  # resume a run that was cut: same budget, schedule and random streams
        state = torch.load(state_path, map_location=device, weights_only=True)
        hyper.load_state_dict(state["hypernet"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu())
        step, elapsed, curve, track = state["step"], state["elapsed"], state["curve"], state["track"]
        print(f"{args.recipe}: resumed {state_path} at step {step} ({elapsed / 60:.1f} of {args.minutes} min)")
    start = time.perf_counter() - elapsed
    # the fraction of the budget spent: of the steps where --max_steps is given, else of the minutes
    spent = (lambda: step / args.max_steps) if args.max_steps else (lambda: (time.perf_counter() - start) / budget)
    checkpoints = [f for k in range(1, args.track_points + 1) if (f := k / args.track_points) > spent()]
    saved = time.perf_counter()
    while time.perf_counter() - start < budget and spent() < 1:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * spent()))
        idx = torch.randint(0, targets.shape[0], (args.batch,), generator=generator, device=device)
        real = torch.randint(0, conds.shape[0], (args.batch,), generator=generator, device=device)
        target, cond = targets[idx], conds[real, idx]
        if recipe.get("regression"):
            terms = {"mse": F.mse_loss(regression(hyper, cond, hyper(hyper.sample_z(1, generator))), target)}
            terms["loss"] = terms["mse"]
        else:
            probe, pasted = (random_objects(cond, generator, recipe.get("probe_noise", False)) if recipe.get("probe")
                             else (None, None))
            columns = random_columns(args.batch, cond.shape[-1], generator).to(device) if recipe.get(
                "probe_columns") else None
            terms = training_loss(hyper, hyper.target, scheduler, target, cond, loss_config, generator, probe,
                                  pasted if recipe.get("probe_mask") else None, columns)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        curve.append(terms["mse"].item())
        step += 1
        if checkpoints and spent() >= checkpoints[0]:
            checkpoints.pop(0)
            if not recipe.get("regression") and "ood" in study:
                track.append({"minutes": round((time.perf_counter() - start) / 60, 2), "step": step,
                              **tracked_figures(hyper, study, recipe, args, device)})
                print(f"{args.recipe}: step {step}, mse {sum(curve[-100:]) / len(curve[-100:]):.4g}, {track[-1]}",
                      flush=True)
        if time.perf_counter() - saved >= args.save_minutes * 60:
            saved = time.perf_counter()
            with atomic_write(state_path) as tmp:
                torch.save({"hypernet": hyper.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "elapsed": time.perf_counter() - start, "curve": curve, "track": track,
                            "generator": generator.get_state()}, tmp)
    with atomic_write(out / f"{args.recipe}.pt") as tmp:
        torch.save(hyper.state_dict(), tmp)
    mse = [sum(curve[i:i + 100]) / len(curve[i:i + 100]) for i in range(0, len(curve), 100)]
    minutes = round((time.perf_counter() - start) / 60, 1)
    run = {"recipe": args.recipe, "settings": recipe, "steps": step, "batch": args.batch, "minutes": minutes,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "mse_per_100_steps": mse,
           "track": track}
    (out / f"{args.recipe}.run.json").write_text(json.dumps(run, indent=1))  # survives a cut evaluation
    state_path.unlink(missing_ok=True)
    if "test" in study and not args.skip_eval:
        evaluate_run(args.recipe, out, study, args, device)


def variance_figures(res: dict) -> dict[str, float]:
    """Mean EU, mean AU and the squared error of the mean (HU^2) of :func:`evaluate_set`'s result."""
    return {"mean_eu_hu2": float(res["eu"].mean()) * HU**2, "mean_au_hu2": float(res["au"].mean()) * HU**2,
            "mse_hu2": float((res["mean"] - res["target"]).pow(2).mean()) * HU**2}


def tracked_figures(hyper: HyperNetwork, study: dict, recipe: dict, args: argparse.Namespace,
                    device: torch.device) -> dict:
    """Figures followed along a run on ``--track_slices`` test slices (2 draws per weight set): EU on the
    unfamiliar object against the body, and mean AU / EU / squared error (HU^2) at each test photon count."""
    weights = [hyper_weights(hyper, args.M, device)]
    figures = {"ood_eu_ratio": ood_ratio(evaluate_set(weights, hyper.target, study["ood"], recipe, args,
                                                      n_draws=2, limit=args.track_slices))}
    for i0 in study["photon_counts"]:
        res = evaluate_set(weights, hyper.target, study["test"], recipe, args, cond_key=f"cond_{int(i0)}",
                           n_draws=2, limit=args.track_slices)
        figures[f"i0_{int(i0)}"] = variance_figures(res)
    return figures


def export(args: argparse.Namespace) -> None:
    """A trained recipe as a bundle checkpoint (``{"hypernet", "config"}``, as training writes ``model.pt``)."""
    from hyper_dm.config import bundle_section

    study = torch.load(args.data, weights_only=True)
    recipe = RECIPES[args.recipe]
    model_keys = ("z_dim", "hidden", "rank", "offset_scale", "channels", "attention_levels", "num_res_blocks",
                  "norm_num_groups", "num_head_channels")
    diffusion = bundle_section("diffusion")
    model = model_config(study, recipe)
    config = {"data": {"task": study.get("task", "ct"), "img_size": int(study["train"]["target"].shape[-1])},
              "model": {**{k: model[k] for k in model_keys},
                        "noise_level_input": recipe.get("noise_level_input", False)},
              "diffusion": {**{k: diffusion[k] for k in ("num_train_timesteps", "beta_start", "beta_end")},
                            "prediction_type": recipe["prediction_type"]}}
    state = torch.load(Path(args.runs) / f"{args.recipe}.pt", map_location="cpu", weights_only=True)
    Path(args.to).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hypernet": state, "config": config}, args.to)
    print(f"wrote {args.to}: {config}")


def evaluate(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluate_run(args.recipe, Path(args.runs), load_study(args.data), args, device)


def evaluate_run(name: str, runs: Path, study: dict, args: argparse.Namespace, device: torch.device) -> None:
    """Posterior figures of the trained ``<runs>/<name>.pt`` into ``<name>.json`` (with its ``.run.json``)."""
    hyper = build(study, RECIPES[name], device)
    hyper.load_state_dict(torch.load(runs / f"{name}.pt", map_location=device, weights_only=True))
    run_file = runs / f"{name}.run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {"recipe": name, "settings": RECIPES[name]}
    start = time.perf_counter()
    if RECIPES[name].get("regression"):
        figures = regression_figures(hyper, study, args)
    else:
        figures = posterior_figures([hyper_weights(hyper, args.M, device)], hyper.target, study, RECIPES[name], args)
    result = {**run, "evaluation": {"M": args.M, "N": args.N, "ddim_steps": args.steps,
                                    "seconds": round(time.perf_counter() - start, 1)}, **figures}
    (runs / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "mse_per_100_steps"}, indent=1))


@torch.no_grad()
def hyper_weights(hyper: HyperNetwork, m: int, device: torch.device) -> dict[str, torch.Tensor]:
    return hyper(hyper.sample_z(m, torch.Generator(device).manual_seed(1234)))


def regression(hyper: HyperNetwork, cond: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The deterministic baseline's image ``[B, 1, H, W]`` from ``cond [B, 1, H, W]``: one weight set, ``x_t = 0``,
    ``t = 0``."""
    t = torch.zeros(1, cond.shape[0], dtype=torch.long, device=cond.device)
    return apply_weight_sets(hyper.target, weights, torch.zeros_like(cond)[None], t, cond[None])[0]


@torch.no_grad()
def regression_figures(hyper: HyperNetwork, study: dict, args: argparse.Namespace) -> dict:
    """Quality of the deterministic baseline on the test slices (first photon count) and on the object slices."""
    device = next(hyper.parameters()).device
    weights = hyper_weights(hyper, 1, device)
    test, counts = study["test"], study["photon_counts"]
    figures = {}
    for key, split, cond_key in (("", test, f"cond_{int(counts[0])}"), ("ood_", study["ood"], "cond")):
        cond, target = split[cond_key][:args.eval_slices], split["target"][:args.eval_slices]
        mean = torch.cat([regression(hyper, b.to(device), weights).cpu().clamp(-1, 1)
                          for b in cond.split(args.eval_batch)])
        figures[f"{key}psnr"] = float(psnr(mean, target).mean())
        figures[f"{key}mse_hu2"] = float((mean - target).pow(2).mean()) * HU**2
        if key:
            mask = split["mask"][:args.eval_slices]
            figures["ood_rmse_inside_hu"] = float((mean - target)[mask].pow(2).mean().sqrt()) * HU
    figures["psnr_fbp"] = float(psnr(test[f"cond_{int(counts[0])}"][:args.eval_slices],
                                     test["target"][:args.eval_slices]).mean())
    return figures


# --------------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate_set(weight_list: list[dict], backbone: torch.nn.Module, split: dict, recipe: dict,
                 args: argparse.Namespace, cond_key: str = "cond", n_draws: int | None = None,
                 limit: int | None = None) -> dict[str, torch.Tensor]:
    """Mean, EU, AU ``[S, 1, H, W]`` over the slices of ``split`` (first ``limit``); EU is the spread across all
    weight sets of ``weight_list`` (one model's M sets, or one set per ensemble member)."""
    device = next(iter(weight_list[0].values())).device
    weights = {k: torch.cat([w[k] for w in weight_list]) for k in weight_list[0]}
    sampler = HyperDDIMSampler(make_ddim(prediction_type=recipe["prediction_type"]), steps=args.steps, eta=0.0,
                               spacing="quadratic", clip=(-1.0, 1.0))
    generator = torch.Generator(device).manual_seed(0)
    cond = split[cond_key][:limit]
    out = {"mean": [], "eu": [], "au": []}
    for batch in cond.split(args.eval_batch):
        stats = sampler.sample(backbone, weights, batch.to(device), n_draws or args.N, generator).stats
        for key in out:
            out[key].append(getattr(stats, key).float().cpu())
    result = {k: torch.cat(v) for k, v in out.items()}
    result["target"] = split["target"][:limit]
    result["mask"] = split["mask"][:limit] if "mask" in split else None
    return result


def ood_ratio(res: dict, values: torch.Tensor | None = None) -> float:
    """Median over slices of the mean of ``values`` (default: EU) inside the object over its mean in the rest of the
    body."""
    ratios = []
    for v, mask, target in zip(res["eu"] if values is None else values, res["mask"], res["target"], strict=True):
        body = (target > -0.99) & ~mask
        if mask.any() and body.any():
            ratios.append(float(v[mask].mean() / v[body].mean().clamp_min(1e-20)))
    return float(torch.tensor(ratios).median()) if ratios else float("nan")


def posterior_figures(weight_list: list[dict], backbone: torch.nn.Module, study: dict, recipe: dict,
                      args: argparse.Namespace) -> dict:
    val = evaluate_set(weight_list, backbone, study["val"], recipe, args, limit=args.eval_slices)
    residual = ((val["target"] - val["mean"]).abs() / (val["eu"] + val["au"]).clamp_min(1e-12).sqrt()).flatten()
    k = min(residual.numel(), math.ceil((residual.numel() + 1) * 0.9))
    scale = float(residual.sort().values[k - 1]) / central_z(0.9)  # split-conformal scale of the std at 90%
    figures = {"conformal_scale_90": scale, "noise": []}
    test, counts = study["test"], study["photon_counts"]
    for i0 in counts:
        key = f"cond_{int(i0)}"
        res = evaluate_set(weight_list, backbone, test, recipe, args, cond_key=key, limit=args.eval_slices)
        total = res["eu"] + res["au"]
        error = res["mean"] - res["target"]
        raw = gaussian_coverage(res["mean"], total, res["target"], (0.5, 0.9))
        calibrated = gaussian_coverage(res["mean"], total * scale**2, res["target"], (0.5, 0.9))
        row = {"i0": i0, **variance_figures(res), "coverage_90_raw": raw[0.9],
               "coverage_90_calibrated": calibrated[0.9]}
        figures["noise"].append(row)
        if i0 == counts[0]:
            cond = test[key][:args.eval_slices]
            figures.update(
                psnr=float(psnr(res["mean"], res["target"]).mean()), psnr_fbp=float(psnr(cond, res["target"]).mean()),
                coverage_raw={str(k): v for k, v in raw.items()},
                coverage_calibrated={str(k): v for k, v in calibrated.items()},
                ause=ause(total, error.abs()),
                ause_random=ause(torch.rand(total.shape, generator=torch.Generator().manual_seed(0)), error.abs()),
                variance_ratio=float(error.pow(2).mean() / total.mean().clamp_min(1e-20)),
                **{k: v for k, v in row.items() if k != "i0"})
    aus = [row["mean_au_hu2"] for row in figures["noise"]]
    eus = [row["mean_eu_hu2"] for row in figures["noise"]]
    figures["au_rises"] = all(a < b for a, b in zip(aus, aus[1:], strict=False))
    figures["au_change"] = aus[-1] / max(aus[0], 1e-20) - 1
    figures["eu_change"] = eus[-1] / max(eus[0], 1e-20) - 1
    for key in OBJECTS:
        if key in study:
            res = evaluate_set(weight_list, backbone, study[key], recipe, args, limit=args.eval_slices)
            figures.update({f"{key}_{name}": v for name, v in object_figures(res, scale).items()})
    return figures


def object_figures(res: dict, scale: float) -> dict[str, float]:
    """Inside an unfamiliar object (``res["mask"]``) against the rest of the body: the ratios of EU, predicted
    total variance and squared error, the RMSE inside (HU) and the 90% coverage of the object's pixels with the
    conformal ``scale``."""
    total, inside = res["eu"] + res["au"], res["mask"]
    error2 = (res["mean"] - res["target"]).pow(2)
    return {"eu_ratio": ood_ratio(res), "rmse_inside_hu": float(error2[inside].mean().sqrt()) * HU,
            "total_ratio": ood_ratio(res, total), "error_ratio": ood_ratio(res, error2),
            "coverage_90_calibrated": gaussian_coverage(res["mean"][inside], total[inside] * scale**2,
                                                        res["target"][inside], (0.9,))[0.9]}


def ablation(args: argparse.Namespace) -> None:
    """EU, AU, coverage, AUSE, EU on the object and PSNR of one trained recipe for M in :data:`ABLATION` at
    N = 8 and N in :data:`ABLATION` at M = 8 (test slices at the first photon count; ``<recipe>.ablation.json``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    study, runs = load_study(args.data), Path(args.runs)
    hyper = build(study, RECIPES[args.recipe], device)
    hyper.load_state_dict(torch.load(runs / f"{args.recipe}.pt", map_location=device, weights_only=True))
    recipe, cond_key = RECIPES[args.recipe], f"cond_{int(study['photon_counts'][0])}"
    rows = []
    for m, n in sorted({(m, 8) for m in ABLATION} | {(8, n) for n in ABLATION}):
        start = time.perf_counter()
        weights = [hyper_weights(hyper, m, device)]
        res = evaluate_set(weights, hyper.target, study["test"], recipe, args, cond_key, n, args.eval_slices)
        total, error = res["eu"] + res["au"], res["mean"] - res["target"]
        rows.append({"M": m, "N": n, "psnr": float(psnr(res["mean"], res["target"]).mean()), **variance_figures(res),
                     "coverage_90_raw": gaussian_coverage(res["mean"], total, res["target"], (0.9,))[0.9],
                     "ause": ause(total, error.abs()),
                     "ood_eu_ratio": ood_ratio(evaluate_set(weights, hyper.target, study["ood"], recipe, args,
                                                            n_draws=n, limit=args.eval_slices)),
                     "seconds": round(time.perf_counter() - start, 2)})
        print(json.dumps(rows[-1]), flush=True)
    (runs / f"{args.recipe}.ablation.json").write_text(json.dumps(rows, indent=1))


def estimator(args: argparse.Namespace) -> None:
    """How the draw noise enters EU (``<recipe>.estimator.json``): the same weight sets sampled with the sampler's
    common random numbers (every set's draw j from the same noise) and with independent noise per set (as before
    the change), EU estimated at N = 4 and N = --N (the reference) on the test slices at each photon count and on
    the object. ``independent`` uses the classical correction (subtract AU / N, clamp at 0)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    study, runs = load_study(args.data), Path(args.runs)
    hyper = build(study, RECIPES[args.recipe], device)
    hyper.load_state_dict(torch.load(runs / f"{args.recipe}.pt", map_location=device, weights_only=True))
    recipe = RECIPES[args.recipe]
    sampler = HyperDDIMSampler(make_ddim(prediction_type=recipe["prediction_type"]), steps=args.steps, eta=0.0,
                               spacing="quadratic", clip=(-1.0, 1.0))
    weights = hyper_weights(hyper, args.M, device)
    splits = {f"i0 {i0:.0e}": (study["test"], f"cond_{int(i0)}") for i0 in study["photon_counts"]}
    splits["object"] = (study["ood"], "cond")
    rows = []
    for name, (split, key) in splits.items():
        cond = split[key][:args.eval_slices].to(device)
        one_set = lambda i, seed, cond=cond: sampler.sample(  # noqa: E731  the draws of weight set i from seed
            hyper.target, {k: v[i:i + 1] for k, v in weights.items()}, cond, args.N,
            torch.Generator(device).manual_seed(seed), keep_samples=True).samples.cpu()
        samples = {"common": torch.cat([one_set(i, 0) for i in range(args.M)]),
                   "independent": torch.cat([one_set(i, i) for i in range(args.M)])}
        for noise, x in samples.items():
            for n in sorted({4, args.N}):
                d = decompose(x[:, :n].double())
                eu = d.eu if noise == "common" else (x[:, :n].double().mean(1).var(0) - d.au / n).clamp_min(0)
                row = {"input": name, "noise": noise, "N": n, "mean_au_hu2": float(d.au.mean()) * HU**2,
                       "mean_eu_hu2": float(eu.mean()) * HU**2}
                if "mask" in split:
                    row["eu_object_over_body"] = ood_ratio({"eu": eu.float(), "mask": split["mask"][:args.eval_slices],
                                                            "target": split["target"][:args.eval_slices]})
                rows.append(row)
                print(json.dumps(row), flush=True)
    (runs / f"{args.recipe}.estimator.json").write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))
            if not {".run", ".ablation"} & set(p.suffixes)}
    present = [name for name in ENSEMBLE if (runs / f"{name}.run.json").exists() and (runs / f"{name}.pt").exists()]
    if args.data and len(present) >= 2:
        study = load_study(args.data)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        members = []
        for name in present:
            hyper = build(study, RECIPES[name], device)
            hyper.load_state_dict(torch.load(runs / f"{name}.pt", map_location=device, weights_only=True))
            members.append(hyper_weights(hyper, 1, device))
        start = time.perf_counter()
        figures = posterior_figures(members, hyper.target, study, RECIPES[ENSEMBLE[0]], args)
        seconds = round(time.perf_counter() - start, 1)
        trained = [json.loads((runs / f"{name}.run.json").read_text()) for name in present]
        rows["ensemble"] = {"recipe": "ensemble", "settings": {"members": present},
                            "steps": sum(r["steps"] for r in trained),
                            "minutes": round(sum(r["minutes"] for r in trained), 1),
                            "evaluation": {"M": len(present), "N": args.N, "ddim_steps": args.steps,
                                           "seconds": seconds}, **figures}
        (runs / "ensemble.json").write_text(json.dumps(rows["ensemble"], indent=1))
    head = ("| recipe | steps (min) | PSNR (FBP) dB | MSE HU^2 | EU HU^2 | AU HU^2 | MSE / total var | cov90 raw | "
            "cov90 cal | AUSE (random) | EU on object x | RMSE in object HU | AU change, lowest i0 | EU change | "
            "eval s |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in rows.items():
        if name.startswith("v_quadratic_s"):
            continue
        cost = f"| {name} | {r.get('steps', '?')} ({r.get('minutes', '?')}) | {r['psnr']:.2f} ({r['psnr_fbp']:.2f}) | "
        if "mean_eu_hu2" not in r:  # the deterministic baseline: quality only
            lines.append(cost + f"{r['mse_hu2']:.0f} | - | - | - | - | - | - | - | {r['ood_rmse_inside_hu']:.0f} | - | "
                         f"- | {r.get('evaluation', {}).get('seconds', '-')} |")
            continue
        lines.append(cost + f"{r['mse_hu2']:.0f} | {r['mean_eu_hu2']:.1f} | {r['mean_au_hu2']:.1f} | "
                     f"{r['variance_ratio']:.1f} | {r['coverage_raw']['0.9']:.3f} | "
                     f"{r['coverage_calibrated']['0.9']:.3f} | {r['ause']:.3f} ({r['ause_random']:.3f}) | "
                     f"{r['ood_eu_ratio']:.2f} | {r.get('ood_rmse_inside_hu', float('nan')):.0f} | "
                     f"{r['au_change']:+.2f} | {r['eu_change']:+.2f} | {r.get('evaluation', {}).get('seconds', '-')} |")
    for path in sorted(runs.glob("*.ablation.json")):
        lines += ["", f"Ablation of {path.name.split('.')[0]} (test slices, first photon count):", "",
                  "| M | N | PSNR dB | EU HU^2 | AU HU^2 | cov90 raw | AUSE | EU on object x | s |",
                  "|" + " --- |" * 9]
        lines += [f"| {a['M']} | {a['N']} | {a['psnr']:.2f} | {a['mean_eu_hu2']:.1f} | {a['mean_au_hu2']:.1f} | "
                  f"{a['coverage_90_raw']:.3f} | {a['ause']:.3f} | {a['ood_eu_ratio']:.2f} | {a['seconds']} |"
                  for a in json.loads(path.read_text())]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", default="study/data.pt")
    p.add_argument("--series", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--realisations", type=int, default=4)
    p.add_argument("--source_pitch", type=int, default=0, metavar="R",
                   help="CT: R more conditions per training slice, FBPs made at the series' own pitch "
                        "(data#fbp_pitch source)")
    p.add_argument("--task", choices=("ct", "mri"), default="ct")
    p.add_argument("--kspace_noise_range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="MRI: the k-space noise std range drawn per slice (default: data#kspace_noise_range)")
    p = sub.add_parser("export")
    p.add_argument("--data", default="study/data.pt")
    p.add_argument("--runs", default="study")
    p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    p.add_argument("--to", required=True, help="the bundle checkpoint to write, e.g. bundle/models/model.pt")
    for name in ("train", "evaluate", "report", "ablation", "estimator"):
        p = sub.add_parser(name)
        p.add_argument("--data", default="study/data.pt")
        p.add_argument("--M", type=int, default=8)
        p.add_argument("--N", type=int, default=8)
        p.add_argument("--steps", type=int, default=20, help="DDIM steps at evaluation")
        p.add_argument("--eval_slices", type=int, default=32)
        p.add_argument("--eval_batch", type=int, default=16)
        if name != "report":
            p.add_argument("--recipe", required=True, choices=sorted(RECIPES))
        if name == "train":
            p.add_argument("--minutes", type=float, default=5.0)
            p.add_argument("--max_steps", type=int, default=0, help="a step budget (the minutes still cap the run)")
            p.add_argument("--batch", type=int, default=32)
            p.add_argument("--lr", type=float, default=1e-3)
            p.add_argument("--track_slices", type=int, default=8)
            p.add_argument("--track_points", type=int, default=5, help="evaluations along the run")
            p.add_argument("--init", help="start from a finished run's weights (its <recipe>.pt)")
            p.add_argument("--save_minutes", type=float, default=5.0, help="resumable state every so often")
            p.add_argument("--skip_eval", action="store_true", help="no evaluation after training (ensemble members)")
            p.add_argument("--out", default="study")
        else:
            p.add_argument("--runs", default="study")
        if name == "report":
            p.add_argument("--out", default="study/recipes.md")
    args = parser.parse_args(argv)
    commands = {"prepare": prepare, "train": train, "evaluate": evaluate, "report": report, "ablation": ablation,
                "estimator": estimator, "export": export}
    commands[args.command](args)


if __name__ == "__main__":
    main()
