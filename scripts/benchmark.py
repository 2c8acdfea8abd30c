"""Speed and memory figures for the core engine on this machine (prints, asserts nothing).

    python scripts/benchmark.py                       # default CT model, 64x64, M=10, N=10, 20 DDIM steps
    python scripts/benchmark.py --size 64 --m 10 --n 10 --steps 20 --threads 2

Reports: parameter counts and checkpoint size; seconds per slice for the loop and vmap evaluation
paths; peak resident memory of the sampler for N and 4N draws (streamed in chunks of N); training images
per second for each mode; AU calibration of the sampler against ddim_steps (std of DDIM samples over the true
std, with the exact denoiser for Gaussian data).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from hyper_dm.config import bundle_section
from hyper_dm.diffusion import HyperDDIMSampler, LossConfig, make_ddim, make_ddpm, training_loss
from hyper_dm.diffusion.gaussian import spread_ratio
from hyper_dm.diffusion.losses import MODE_KEYS
from hyper_dm.networks import ConditionalUNet, HyperNetwork


def build(z_dim: int = 8, rank: int = 4) -> tuple[ConditionalUNet, HyperNetwork]:
    torch.manual_seed(0)
    backbone = ConditionalUNet()
    return backbone, HyperNetwork(backbone, z_dim=z_dim, rank=rank)


def time_sampler(args: argparse.Namespace, method: str, n: int, chunk: int | None) -> float:
    backbone, hyper = build()
    cond = torch.zeros(1, 1, args.size, args.size)
    with torch.no_grad():
        weights = hyper(hyper.sample_z(args.m))
    sampler = HyperDDIMSampler(make_ddim(), steps=args.steps, method=method, chunk=chunk)
    start = time.perf_counter()
    sampler.sample(backbone, weights, cond, n, torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def training_images_per_second(args: argparse.Namespace, mode: str, batch: int = 8, iterations: int = 5) -> float:
    backbone, hyper = build()
    optimizer = torch.optim.AdamW(hyper.trainable_parameters(), lr=1e-4)
    target = torch.rand(batch, 1, args.size, args.size) * 2 - 1
    cond = torch.rand(batch, 1, args.size, args.size) * 2 - 1
    training_cfg = bundle_section("training_cfg", "train")  # the bundle's values for the mode's keys
    config = LossConfig(mode=mode, **{k: training_cfg[k] for k in MODE_KEYS[mode]})
    scheduler = make_ddpm()
    for i in range(iterations + 1):  # the first iteration warms up
        if i == 1:
            start = time.perf_counter()
        loss = training_loss(hyper, backbone, scheduler, target, cond, config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * iterations / (time.perf_counter() - start)


def peak_rss_mib(args: argparse.Namespace, n: int) -> float:
    """Peak RSS (MiB) of a fresh process that samples ``n`` draws per weight set in chunks of ``args.n``."""
    cmd = [sys.executable, __file__, "--size", str(args.size), "--m", str(args.m), "--n", str(args.n),
           "--steps", "2", "--threads", str(args.threads), "--child-draws", str(n)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child-draws", type=int, help=argparse.SUPPRESS)  # internal: one memory probe
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_draws:
        time_sampler(args, "loop", args.child_draws, args.n)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return

    backbone, hyper = build()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hypernet.pt")
        torch.save(hyper.state_dict(), path)
        ckpt_mib = os.path.getsize(path) / 2**20
    figures = {"parameters": hyper.count_parameters(), "checkpoint_MiB": round(ckpt_mib, 2)}
    for method in ("loop", "vmap"):
        seconds = time_sampler(args, method, args.n, None)
        figures[f"seconds_per_slice_{method}"] = round(seconds, 2)
        print(f"{method}: {seconds:.2f} s per {args.size}x{args.size} slice (M={args.m}, N={args.n}, "
              f"{args.steps} steps)", flush=True)
    for n in (args.n, 4 * args.n):
        figures[f"peak_rss_MiB_N{n}"] = round(peak_rss_mib(args, n), 1)
    for mode in ("standard", "eu", "au"):
        figures[f"train_images_per_s_{mode}"] = round(training_images_per_second(args, mode), 2)
    figures["au_calibration_std_ratio"] = {
        f"{spacing}_eta{eta:g}": {steps: round(spread_ratio(steps, spacing, eta)[1], 3) for steps in (10, 20, 50, 100)}
        for spacing in ("linear", "quadratic") for eta in (0.0, 1.0)
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
