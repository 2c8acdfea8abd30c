"""Write the synthetic LUNA16-format and fastMRI-knee-format datasets.

    python scripts/make_synthetic.py                              # both, into data/synthetic/{luna16,fastmri_knee}
    python scripts/make_synthetic.py --task ct --out /tmp/luna16 --n 10 --seed 3

The default set is what ``data.dataset_dir: null`` generates on first use.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hyper_dm.data.synthetic import write_fastmri_knee_like, write_luna16_like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["ct", "mri", "both"], default="both")
    parser.add_argument("--out", type=Path, default=Path("data/synthetic"),
                        help="folder (for --task both: parent of luna16_seed<k>/ and fastmri_knee_seed<k>/)")
    parser.add_argument("--n", type=int, default=None, help="series (CT) or files (MRI); default 6 / 4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    jobs = {"ct": ("luna16", write_luna16_like, 6), "mri": ("fastmri_knee", write_fastmri_knee_like, 4)}
    for task in (["ct", "mri"] if args.task == "both" else [args.task]):
        name, writer, default_n = jobs[task]
        out = args.out / f"{name}_seed{args.seed}" if args.task == "both" else args.out
        start = time.perf_counter()
        paths = writer(out, args.n or default_n, args.seed)
        print(f"{name}: {len(paths)} files in {out} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
