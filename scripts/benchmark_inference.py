"""Volume inference cost by slice size: seconds per slice and peak memory, and the projection to a LUNA16 volume.

    python scripts/benchmark_inference.py                      # 64, 256, 512 in-plane; M = N = 2, 3 DDIM steps
    python scripts/benchmark_inference.py --sizes 512 --device cuda --M 4 --N 4 --steps 20

Each size runs in its own process (peak RSS / peak CUDA memory are per process) with the native-resolution model
(``bundle/configs/native.yaml``: four levels, SDPA attention at 1/8 of the slice), an untrained HyperNetwork (the
cost does not depend on the weights), one slice per network call. The projection scales the measured time per
slice linearly in M x N x steps to a 300-slice volume at the bundle's default M, N and ``ddim_steps``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from monai.bundle import ConfigParser

from hyper_dm.config import BUNDLE_CONFIGS, config_files_for


def measure(size: int, m: int, n: int, steps: int, slices: int, device: str) -> dict:
    """Reconstruct a random ``[1, size, size, slices]`` HU volume; return seconds per slice and peak memory."""
    parser = ConfigParser()
    parser.read_config([*config_files_for("infer", None), str(BUNDLE_CONFIGS / "native.yaml")])
    parser.update({"data#img_size": size, "inference_cfg#M": m, "inference_cfg#N": n, "inference_cfg#slice_batch": 1,
                   "diffusion#ddim_steps": steps, "device": f"$torch.device('{device}')"})
    reconstructor = parser.get_parsed_content("reconstructor")
    cond = torch.rand(1, size, size, slices) * 2000 - 1000
    gain, offset = torch.full((slices,), 1000.0), torch.zeros(slices)
    reconstructor(cond[..., :1], gain[:1], offset[:1])  # warm-up (allocator, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    reconstructor(cond, gain, offset)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / slices
    return {"size": size, "s_per_slice": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024, "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--N", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: measure this size only
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.M, args.N, args.steps, args.slices, args.device)))
        return
    defaults = ConfigParser()
    defaults.read_config(config_files_for("infer", None))
    m0, n0, steps0 = (defaults.get_parsed_content(k) for k in ("inference_cfg#M", "inference_cfg#N",
                                                                 "diffusion#ddim_steps"))
    print(f"device {args.device}, M={args.M} N={args.N} steps={args.steps}, {args.slices} slices, threads "
          f"{torch.get_num_threads()}")
    projection = f"300 slices at M={m0} N={n0} {steps0} steps"
    print(f"{'size':>6} {'s/slice':>9} {'peak RSS MiB':>13} {'peak CUDA MiB':>14} {projection:>34}")
    for size in args.sizes:
        child = subprocess.run([sys.executable, __file__, "--one", str(size), "--M", str(args.M), "--N", str(args.N),
                                "--steps", str(args.steps), "--slices", str(args.slices), "--device", args.device],
                               capture_output=True, text=True, check=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        projected_h = row["s_per_slice"] * (m0 * n0 * steps0) / (args.M * args.N * args.steps) * 300 / 3600
        cuda = f"{row['peak_cuda_mib']:.0f}" if row["peak_cuda_mib"] is not None else "-"
        print(f"{size:>6} {row['s_per_slice']:>9.2f} {row['peak_rss_mib']:>13.0f} {cuda:>14} {projected_h:>31.2f} h")


if __name__ == "__main__":
    main()
