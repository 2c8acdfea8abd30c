"""How EU moves from one draw of weight sets to the next: the table of docs/recipes.md, "Balanced weight sets".

    python scripts/weight_draws_study.py data.dataset_dir=study/luna16_32 --ckpt bundle/models/model.pt \
        --budgets 4x4 16x2
    python scripts/weight_draws_study.py --ckpt bundle/models/knee/model.pt \
        --config bundle/configs/knee_singlecoil.yaml data.dataset_dir=study/knee_24

The first test case (every ``--every``-th slice; CT: the benchmark's measurement, MRI: a 4x mask) and the same case
with each unfamiliar object of the evaluation (:data:`hyper_dm.evaluation.OBJECTS`), reconstructed with the weight sets
of seeds ``0 .. seeds - 1`` for each budget (``M x N``) and each way of drawing the latents (``iid``: ``z ~ N(0, I)``;
``balanced``: :func:`hyper_dm.networks.balance_latents`, what inference does). Per row: the mean EU over the body (model
units, EU over the squared magnitude scale) of each seed, their max / min and coefficient of variation, the AUSE of
the total variance against the mean's error on the case without an object, and for each object its EU over the rest
of the body's (median over slices) of each seed; the seconds the row took.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hyper_dm.config import parse_overrides
from hyper_dm.data import resolve_data_config, split_cases
from hyper_dm.evaluation import MRI_ACCELERATIONS, OBJECTS, inside_over_body
from hyper_dm.inference import HyperDM, load_case
from hyper_dm.networks.hypernet import LATENT_DRAWS
from hyper_dm.uncertainty import ause


def every(case: dict, step: int) -> dict:
    """``case`` with every ``step``-th slice (its ``[.., Z]`` tensors and per-slice ``gain`` / ``offset``)."""
    keep = list(range(0, case["cond"].shape[-1], step))
    sliced = {key: case[key][..., keep] for key in ("cond", "label", "volume")}
    return {**case, **sliced, "gain": case["gain"][keep], "offset": case["offset"][keep]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--config", help="a task overlay (e.g. bundle/configs/knee_singlecoil.yaml)")
    parser.add_argument("--budgets", nargs="+", default=["4x4"], help="M x N, e.g. 4x4 16x2")
    parser.add_argument("--draws", nargs="+", default=list(LATENT_DRAWS), choices=LATENT_DRAWS)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--every", type=int, default=4, help="keep every k-th slice (CT; MRI files are short: 1)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("overrides", nargs="*", help="key.subkey=value, e.g. data.dataset_dir=study/luna16_32 (before "
                        "--budgets and --draws, which take every value after them)")
    args = parser.parse_args(argv)
    budgets = []
    for budget in args.budgets:
        m, _, n = budget.partition("x")
        if not (m.isdigit() and n.isdigit() and int(m) >= 2 and int(n) >= 1):
            parser.error(f"--budgets: {budget!r} is not M x N with M >= 2 and N >= 1 (e.g. 4x4)")
        budgets.append((int(m), int(n)))
    model = HyperDM.from_bundle(args.ckpt, config=args.config, **parse_overrides(args.overrides))
    ct = model.data["task"] == "ct"
    data = model.data if ct else {**model.data, **MRI_ACCELERATIONS["4x"]}
    size, step = int(model.data["img_size"]), args.every if ct else 1
    entry = split_cases(resolve_data_config(model.data), "test")[0]
    with tempfile.TemporaryDirectory() as tmp:
        cases, masks = {"clean": every(load_case(entry, data, "simulate", size), step)}, {}
        for name, (insert, suffix, _) in OBJECTS[model.data["task"]].items():
            path = Path(tmp) / f"{name}{suffix}"
            masks[name] = np.asarray(insert(entry["image"], path))[..., ::step]
            cases[name] = every(load_case({"image": str(path), "case_id": name}, data, "simulate", size), step)
    label = cases["clean"]["label"][0].numpy()
    body = label > -990 if ct else label > 0.1 * label.max()
    gain = cases["clean"]["gain"].numpy()
    print(f"{args.ckpt}, test case {entry['case_id']}, {label.shape[-1]} slices, {args.steps} DDIM steps")
    print(f"| M x N | latents | mean body EU (model units) per seed | max / min | cv | "
          f"AUSE per seed | {' | '.join(f'{name} EU ratio per seed' for name in masks)} | seconds |")
    print(f"| --- | --- | --- | --- | --- | --- | {' | '.join('---' for _ in masks)} | --- |")
    for m, n in budgets:
        for draws in args.draws:
            levels, sparsity, ratios, start = [], [], {name: [] for name in masks}, time.perf_counter()
            for seed in range(args.seeds):
                recon = model.reconstructor(m, n, args.steps, seed=seed, weight_draws=draws)
                outputs = {name: recon.reconstruct_case(case) for name, case in cases.items()}
                eu = {name: out["eu"][0].numpy() for name, out in outputs.items()}
                levels.append(float((eu["clean"] / gain**2)[body].mean()))
                error = (outputs["clean"]["mean"] - cases["clean"]["label"]).abs()
                sparsity.append(ause(outputs["clean"]["total"].flatten(), error.flatten()))
                for name, mask in masks.items():
                    ratios[name].append(inside_over_body(eu[name], mask, body))
            print(f"| {m} x {n} | {draws} | {' / '.join(f'{x:.3g}' for x in levels)} | "
                  f"{max(levels) / min(levels):.1f} | {np.std(levels) / np.mean(levels):.2f} | "
                  f"{' / '.join(f'{x:.3f}' for x in sparsity)} | "
                  + " | ".join(f"{' / '.join(f'{x:.2f}' for x in r)} (min {min(r):.2f}, median {np.median(r):.2f})"
                               for r in ratios.values())
                  + f" | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
