"""Train Hyper-DM on the 1-D toy and save the picture a user checks first.

    python scripts/toy_1d.py --mode standard --out toy_standard.png
    python scripts/toy_1d.py --mode eu --seeds 0 1 2 3      # figures over several seeds

Prints, per seed, the EU gap ratio, the AU rank correlation and magnitude (see ``hyper_dm.toy.toy_figures``);
plots the training data, the mean prediction, and +-2 std bands of EU and AU for the first seed.
"""

from __future__ import annotations

import argparse
import json
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

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
    parser.add_argument("--mode", default="standard", choices=["standard", "eu"])  # ToyConfig has no au keys
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="toy_1d.png", help="PNG path for the first seed's plot")
    args = parser.parse_args()
    torch.set_num_threads(2)
    x = torch.linspace(-math.pi, math.pi, 241)
    for i, seed in enumerate(args.seeds):
        hyper, backbone, _ = train_toy(ToyConfig(mode=args.mode, steps=args.steps, seed=seed))
        stats = predict_toy(hyper, backbone, x)
        figures = {k: round(v, 3) for k, v in toy_figures(stats, x).items()}
        print(json.dumps({"mode": args.mode, "seed": seed, **figures}), flush=True)
        if i == 0:
            plot(args.out, x, stats, seed, args.mode)
            print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
