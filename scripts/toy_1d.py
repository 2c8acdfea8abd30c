"""Train Hyper-DM on the 1-D toy and save the picture a user checks first.

    python scripts/toy_1d.py --seeds 0 1 2 3 4 5            # the recipe (ToyConfig defaults), figures per seed
    python scripts/toy_1d.py --mode standard --timestep-sampling uniform --steps 3000 --out old.png  # old default
    python scripts/toy_1d.py --eu-term l1 --lambda-eu 0.01 --no-probe   # the seed's eu mode: L1 on the batch

Prints, per seed, the figures of ``hyper_dm.toy.toy_figures`` (EU in the gap against both training sides, AU on
the noise-free side, AU rank correlation and magnitude on the noisy side); plots the training data, the mean
prediction, and +-2 std bands of EU and AU for the first seed.
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hyper_dm.diffusion.losses import EU_TERMS, TIMESTEP_SAMPLINGS  # noqa: E402
from hyper_dm.toy import X_SCALE, Y_SCALE, ToyConfig, predict_toy, sample_toy, toy_figures, train_toy  # noqa: E402


def plot(path: str, x: torch.Tensor, stats, seed: int, mode: str) -> None:
    data_x, data_y = sample_toy(2000, torch.Generator().manual_seed(seed))
    mean, eu_std, au_std = stats.mean.flatten(), stats.eu.flatten().sqrt(), stats.au.flatten().sqrt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.scatter(data_x * X_SCALE, data_y * Y_SCALE, s=2, c="0.6", label="training data")
    ax.fill_between(x, mean - 2 * au_std, mean + 2 * au_std, color="tab:orange", alpha=0.35, label="±2 sd aleatoric")
    ax.fill_between(x, mean - 2 * eu_std, mean + 2 * eu_std, color="tab:blue", alpha=0.35, label="±2 sd epistemic")
    ax.plot(x, mean, c="k", lw=1.5, label="mean prediction")
    ax.plot(x, torch.sin(x), c="tab:green", ls="--", lw=1, label="sin(x)")
    ax.axvspan(-1, 1, color="tab:red", alpha=0.06, label="gap (no training data)")
    ax.set(xlabel="x", ylabel="y", title=f"Hyper-DM 1-D toy, mode={mode}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = ToyConfig()
    parser.add_argument("--mode", default=default.mode, choices=["standard", "eu"])  # ToyConfig has no au keys
    parser.add_argument("--eu-term", default=default.eu_term, choices=list(EU_TERMS))
    parser.add_argument("--lambda-eu", type=float, default=default.lambda_eu)
    parser.add_argument("--no-probe", action="store_true", help="diversity term at the batch's x, not x ~ U(-pi, pi)")
    parser.add_argument("--timestep-sampling", default=default.timestep_sampling, choices=list(TIMESTEP_SAMPLINGS))
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[default.seed])
    parser.add_argument("--out", default="toy_1d.png", help="PNG path for the first seed's plot")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = torch.linspace(-math.pi, math.pi, 241)
    settings = {"mode": args.mode, "eu_term": args.eu_term, "lambda_eu": args.lambda_eu, "probe": not args.no_probe,
                "timestep_sampling": args.timestep_sampling, "steps": args.steps}
    for i, seed in enumerate(args.seeds):
        hyper, backbone, _ = train_toy(ToyConfig(seed=seed, **settings))
        stats = predict_toy(hyper, backbone, x)
        figures = {k: float(f"{v:.3g}") for k, v in toy_figures(stats, x).items()}
        print(json.dumps({**settings, "seed": seed, **figures}), flush=True)
        if i == 0:
            plot(args.out, x, stats, seed, args.mode)
            print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
