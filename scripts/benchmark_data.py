"""Speed and quality figures for the data pipelines on this machine (prints, asserts nothing).

    python scripts/benchmark_data.py                  # default synthetic sets, default data config
    python scripts/benchmark_data.py --threads 2 --n-views 24

Reports: synthetic set generation time; slices/s through the full CT and MRI pipelines (load -> physics -> cached)
cold (building the cache, then one pass) and warm (a pass over the filled cache), for the training split (random
physics recomputed each pass) and the validation split (fully cached), in memory and on disk
(``PersistentDataset``); PSNR of ``cond`` (FBP / zero-filled) against ``target`` in the model range.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hyper_dm.data import build_dataset
from hyper_dm.data.synthetic import write_fastmri_knee_like, write_luna16_like


def one_pass(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def psnr(samples: list[dict], key: str) -> float:
    """PSNR (dB) of ``key`` against ``target`` over all samples, data range 2 ([-1, 1])."""
    mse = np.mean([float(((s[key] - s["target"]) ** 2).mean()) for s in samples])
    return float(10 * np.log10(4.0 / mse))


def time_pipeline(data: dict, split: str) -> tuple[float, float, list[dict]]:
    """(cold slices/s, warm slices/s, samples of the warm pass)."""
    start = time.perf_counter()
    dataset = build_dataset(data, split)
    one_pass(dataset)
    cold = len(dataset) / (time.perf_counter() - start)
    start = time.perf_counter()
    samples = one_pass(dataset)
    return cold, len(dataset) / (time.perf_counter() - start), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-views", type=int, default=None, help="CT views (default: the config default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, writer in (("luna16", write_luna16_like), ("fastmri_knee", write_fastmri_knee_like)):
            start = time.perf_counter()
            paths = writer(root / name)
            print(f"synthetic {name:12s}: {len(paths)} files in {time.perf_counter() - start:.1f} s")
        for task, name in (("ct", "luna16"), ("mri", "fastmri_knee")):
            data = {"task": task, "dataset_dir": str(root / name)}
            if task == "ct" and args.n_views:
                data["n_views"] = args.n_views
            for cache in ("memory", "disk"):
                cfg = {**data, "cache_dir": str(root / f"cache-{task}") if cache == "disk" else None}
                for split in ("training", "validation"):
                    cold, warm, samples = time_pipeline(cfg, split)
                    print(f"{task:3s} {split:10s} cache={cache:6s}: {len(samples):4d} slices, cold {cold:7.1f} "
                          f"slices/s, warm {warm:8.1f} slices/s")
            _, _, samples = time_pipeline(data, "validation")
            test = one_pass(build_dataset(data, "test"))
            flat = [{"target": s["target"], "mean": s["target"].mean().expand_as(s["target"])} for s in samples + test]
            what = "FBP" if task == "ct" else "zero-filled"
            print(f"{task:3s} PSNR {what} vs target (validation + test, {len(flat)} slices): "
                  f"{psnr(samples + test, 'cond'):.2f} dB; constant-image baseline {psnr(flat, 'mean'):.2f} dB")


if __name__ == "__main__":
    main()
