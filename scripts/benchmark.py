"""Speed and memory of the M x N sampler and of training on this machine (prints and writes JSON, asserts nothing).

    python scripts/benchmark.py --quick --json bench.json          # CPU, a few minutes on 2 cores
    python scripts/benchmark.py --device cuda --json bench_cuda.json
    python scripts/benchmark.py --sizes 64 --sweep                 # images per network call x layout x precision

Model: the bundle's default U-Net (``model`` section of common.yaml; from 256 its attention through SDPA, see
:data:`ATTENTION_SDPA_FROM`) under a HyperNetwork, trained (``--ckpt``) or untrained with perturbed mean weights
(the cost does not depend on the weights). Per in-plane size, for M x N draws and ``steps`` DDIM steps:

- seconds per slice of the product's sampler (:class:`HyperDDIMSampler` with its defaults), float32 and each
  reduced precision (CPU: bfloat16 where oneDNN has native kernels; CUDA: float16 and bfloat16), with the max
  deviation of the mean / EU / AU maps from float32 (``max |map - map_fp32| / max |map_fp32|``, same draws);
- achieved GFLOP/s: PyTorch's FLOP counter on one U-Net evaluation x the number of evaluations (M N steps),
  and as a fraction of a float32 (and bfloat16) matmul rate measured in the same run next to it;
- the speed-up over a reference loop that runs one DDIM chain per draw at batch size one (the original Hyper-DM
  code: for each of M weight sets, for each of N draws, a batch-1 chain);
- peak memory at 256 x 256 for N and 4N draws in a child process (CPU: peak RSS; CUDA: max allocated);
- training images per second per mode (standard, eu, au) and the eu / standard cost ratio against ``m_weights``.

Timings that would take long run a part of the work and are projected linearly in the number of network calls
(``M_run x steps_run`` of ``M x steps``; each call is the same size): the JSON records the part run and the
projection factor. On the CPU (unless ``--full``; always with ``--quick``) each timing is the fastest of 3 runs
of 1 weight set x 2 steps (the reference: 1 step), projected: short repeated runs resist other jobs' load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hyper_dm.config import bundle_section
from hyper_dm.diffusion import HyperDDIMSampler, LossConfig, make_ddim, make_ddpm, training_loss
from hyper_dm.diffusion.losses import MODE_KEYS
from hyper_dm.diffusion.sampler import Precision
from hyper_dm.networks import ConditionalUNet, HyperNetwork

ATTENTION_SDPA_FROM = 256
"""In-plane size from which the U-Net's attention runs through SDPA (``model#use_flash_attention``; same weights):
on 2 CPU threads 0.4x the time per 256^2 image (the plain path holds 4096^2 attention matrices), 1.2x at 128^2;
needed at 512^2, where the plain matrices do not fit."""


def build(size: int, device: torch.device, ckpt: str | None = None, sdpa: bool | None = None) -> HyperNetwork:
    """The bundle's default U-Net under a HyperNetwork on ``device``: trained from ``ckpt`` (a model.pt of the
    default model), else untrained with perturbed mean weights; attention through SDPA from
    :data:`ATTENTION_SDPA_FROM` unless ``sdpa`` says otherwise."""
    torch.manual_seed(0)
    model = bundle_section("model", "infer")
    backbone = ConditionalUNet(channels=model["channels"], attention_levels=model["attention_levels"],
                               num_res_blocks=model["num_res_blocks"], norm_num_groups=model["norm_num_groups"],
                               num_head_channels=model["num_head_channels"],
                               noise_level_input=model["noise_level_input"],
                               use_flash_attention=size >= ATTENTION_SDPA_FROM if sdpa is None else sdpa)
    hyper = HyperNetwork(backbone, z_dim=model["z_dim"], hidden=model["hidden"], rank=model["rank"],
                         offset_scale=model["offset_scale"])
    if ckpt:  # read directly: hyper_dm.inference needs the I/O stack (SimpleITK, Ignite) a GPU box may not have
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        hyper.load_state_dict(state.get("hypernet", state))
    else:
        with torch.no_grad():
            for p in hyper.base:  # MONAI zero-initialises the output convolution: give the maps something to show
                p.add_(0.05 * torch.randn_like(p))
    return hyper.to(device)


def scheduler():
    """The bundle's DDIM scheduler (prediction type and betas of the ``diffusion`` section)."""
    diffusion = bundle_section("diffusion")
    return make_ddim(diffusion["num_train_timesteps"], diffusion["beta_start"], diffusion["beta_end"],
                     diffusion["prediction_type"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best-of-3 rate of square matmuls (``2 n^3`` FLOP each) in ``dtype``."""
    n, reps = (8192, 10) if device.type == "cuda" else (1024, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best / 1e9


def unet_gflop(size: int, device: torch.device) -> float:
    """GFLOP of one U-Net evaluation on one ``size x size`` image (PyTorch's FLOP counter), counted with plain
    attention: the counter does not see the CPU's SDPA kernel, which does the same products."""
    backbone = build(size, device, sdpa=False).target
    x = torch.zeros(1, 1, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone(x, torch.zeros(1, dtype=torch.long, device=device), x)
    return counter.get_total_flops() / 1e9


def time_sampler(hyper: HyperNetwork, size: int, m: int, n: int, steps: int, device: torch.device,
                 slices: int = 1, repeats: int = 1, **sampler_args) -> tuple[float, object]:
    """Seconds per ``size x size`` slice with ``m`` weight sets x ``n`` draws when ``slices`` slices are sampled
    in one call (as the reconstructor hands them over; the fastest of ``repeats`` runs), and the statistics."""
    sampler = HyperDDIMSampler(scheduler(), steps=steps, **sampler_args)
    cond = torch.rand(slices, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = cond.to(device)
    with torch.inference_mode():
        weights = hyper(hyper.sample_z(m, torch.Generator().manual_seed(0)))
    warm = HyperDDIMSampler(scheduler(), steps=1, **sampler_args)  # kernels, allocator, compilation
    warm.sample(hyper.target, {k: w[:1] for k, w in weights.items()}, cond, n, torch.Generator().manual_seed(1))
    best = math.inf
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        stats = sampler.sample(hyper.target, weights, cond, n, torch.Generator().manual_seed(0)).stats
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best / slices, stats


def low_precisions(device: torch.device) -> list[Precision]:
    """The reduced precisions worth timing here: CUDA float16 and bfloat16; CPU bfloat16 with native kernels."""
    if device.type == "cuda":
        return [Precision.FLOAT16, Precision.BFLOAT16]
    return [Precision.BFLOAT16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else []


def accuracy(args: argparse.Namespace, device: torch.device) -> dict:
    """Deviation of the 64 x 64 maps at reduced precision from float32 for the same draws (all ``steps``; M = N = 4
    with ``--quick``): ``max |map - ref| / max |ref|`` and ``||map - ref|| / ||ref||`` per map."""
    m, n = (4, 4) if args.quick else (args.m, args.n)
    hyper = build(64, device, args.ckpt)
    reference = time_sampler(hyper, 64, m, n, args.steps, device)[1]
    figures = {"M": m, "N": n, "steps": args.steps, "model": args.ckpt or "untrained"}
    for precision in low_precisions(device):
        stats = time_sampler(hyper, 64, m, n, args.steps, device, precision=precision)[1]
        diff = {k: (getattr(stats, k) - getattr(reference, k), getattr(reference, k)) for k in ("mean", "eu", "au")}
        figures[precision.value] = {
            "max_rel": {k: round(float(d.abs().max() / r.abs().max()), 5) for k, (d, r) in diff.items()},
            "rel_l2": {k: round(float(d.norm() / r.norm()), 5) for k, (d, r) in diff.items()}}
    return figures


def size_figures(args: argparse.Namespace, size: int, device: torch.device) -> dict:
    """All sampler figures for one in-plane size (see the module docstring)."""
    hyper = build(size, device, args.ckpt)
    gflop = unet_gflop(size, device)
    quick = args.quick or (device.type == "cpu" and not args.full)
    m_run, steps_run, repeats = (1, 2, 3) if quick else (args.m, args.steps, 1)
    scale = args.m * args.steps / (m_run * steps_run)
    evaluations = args.m * args.n * args.steps
    # slices per sampler call: as many as fill one network call, at most the bundle's slice_batch
    draws, slices = HyperDDIMSampler(scheduler()).call_shape(args.n, args.slice_batch, size * size, device)
    fp32_rate = matmul_gflops(device)
    seconds = time_sampler(hyper, size, m_run, args.n, steps_run, device, slices, repeats)[0]
    fp32_rate = max(fp32_rate, matmul_gflops(device))
    per_slice = seconds * scale
    row = {"size": size, "unet_gflop_per_image": round(gflop, 3), "m_run": m_run, "steps_run": steps_run,
           "projection_factor": scale, "images_per_call": draws * slices, "slices_per_call": slices,
           "matmul_fp32_gflops": round(fp32_rate, 1),
           "float32": {"s_per_slice": round(per_slice, 3), "gflops": round(gflop * evaluations / per_slice, 1)}}
    row["float32"]["fraction_of_matmul_fp32"] = round(row["float32"]["gflops"] / fp32_rate, 3)
    for precision in low_precisions(device):
        rate = matmul_gflops(device, precision.dtype)
        per_slice_low = time_sampler(hyper, size, m_run, args.n, steps_run, device, slices, repeats,
                                     precision=precision)[0] * scale
        low_draws, low_slices = HyperDDIMSampler(scheduler(), precision=precision).call_shape(
            args.n, slices, size * size, device)
        row[precision.value] = {
            "images_per_call": low_draws * low_slices, "s_per_slice": round(per_slice_low, 3),
            "gflops": round(gflop * evaluations / per_slice_low, 1),
            f"matmul_{precision.value}_gflops": round(rate, 1), "fraction_of_matmul_fp32":
            round(gflop * evaluations / per_slice_low / fp32_rate, 3), "time_vs_float32":
            round(per_slice_low / per_slice, 3)}
    if size in args.compile:
        per_slice_compiled = time_sampler(hyper, size, m_run, args.n, steps_run, device, slices, repeats,
                                          compile=True)[0] * scale
        row["float32_compiled"] = {"s_per_slice": round(per_slice_compiled, 3),
                                   "time_vs_float32": round(per_slice_compiled / per_slice, 3)}
    ref_m, ref_steps = (1, 1) if quick or device.type == "cuda" else (m_run, steps_run)
    seconds, _ = time_sampler(hyper, size, ref_m, args.n, ref_steps, device, repeats=repeats, call_batch=1,
                              channels_last=False)
    reference_per_slice = seconds * args.m * args.steps / (ref_m * ref_steps)
    row["reference_batch1"] = {"s_per_slice": round(reference_per_slice, 3), "m_run": ref_m, "steps_run": ref_steps,
                               "speedup_float32": round(reference_per_slice / per_slice, 2)}
    return row


def peak_memory_mib(args: argparse.Namespace, device: torch.device, n: int) -> dict:
    """Peak memory of a fresh process sampling a 256 x 256 slice with M weight sets x ``n`` draws (CPU: M = 2, for
    time; M changes only the statistics held, 2 x M x 256^2 float64 = 10 MiB at M = 10)."""
    m = 2 if device.type == "cpu" else args.m
    cmd = [sys.executable, __file__, "--device", device.type, "--m", str(m), "--memory-probe", str(n)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def memory_probe(args: argparse.Namespace, device: torch.device) -> None:
    """Child process of :func:`peak_memory_mib`: one DDIM step (memory does not depend on the step count)."""
    hyper = build(256, device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_sampler(hyper, 256, args.m, args.memory_probe, 1, device)
    peak = {"rss_before_sampling_mib": round(baseline, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    print(json.dumps(peak))


def training_images_per_second(mode: str, device: torch.device, size: int = 64, batch: int = 8,
                               iterations: int = 6) -> float:
    """Training throughput of ``mode`` with the bundle's loss settings (batch of ``batch`` ``size`` images): the
    fastest of ``iterations`` timed iterations after two warm-up ones."""
    hyper = build(size, device)
    optimizer = torch.optim.AdamW(hyper.trainable_parameters(), lr=1e-4)
    target = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    cond = torch.rand(batch, 1, size, size, device=device) * 2 - 1
    training_cfg = bundle_section("training_cfg", "train")
    config = LossConfig(mode=mode, **{k: training_cfg[k] for k in MODE_KEYS[mode]})
    scheduler = make_ddpm()
    best = math.inf
    for i in range(iterations + 2):
        sync(device)
        start = time.perf_counter()
        loss = training_loss(hyper, hyper.target, scheduler, target, cond, config)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - start)
    return batch / best


def sweep(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Seconds per U-Net image by images per call, layout and precision (2 weight sets x 1 step per point)."""
    rows = []
    precisions = [Precision.FLOAT32, Precision.BFLOAT16 if device.type == "cpu" else Precision.FLOAT16]
    for size in args.sizes:
        hyper = build(size, device)
        gflop = unet_gflop(size, device)
        for call_batch in args.sweep_batches:
            for precision in precisions:
                for channels_last in (False, True):
                    best = min(time_sampler(hyper, size, 2, call_batch, 1, device, call_batch=call_batch,
                                            precision=precision, channels_last=channels_last)[0] for _ in range(2))
                    rate = matmul_gflops(device)
                    ms = best / (2 * call_batch) * 1e3
                    rows.append({"size": size, "call_batch": call_batch, "precision": precision.value,
                                 "channels_last": channels_last, "ms_per_image": round(ms, 2),
                                 "fraction_of_matmul_fp32": round(gflop / ms * 1e3 / rate, 3)})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", help="in-plane sizes (default 64 128 256, and 512 on CUDA)")
    parser.add_argument("--m", type=int, default=10)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--slice-batch", type=int, default=bundle_section("inference_cfg", "infer")["slice_batch"],
                        help="most slices per sampler call (default: the bundle's inference_cfg#slice_batch)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="1 weight set x 2 steps per size, projected; "
                        "accuracy at M = N = 4")
    parser.add_argument("--full", action="store_true", help="CPU: run every size in full (else projected)")
    parser.add_argument("--sweep", action="store_true", help="only the images-per-call x layout x precision sweep")
    parser.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 2, 5, 10, 20, 40])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--compile", type=int, nargs="*", default=[], metavar="SIZE",
                        help="also time the float32 sampler under torch.compile at these sizes")
    parser.add_argument("--ckpt", help="a trained model.pt of the default model (accuracy figures on real maps)")
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)  # child: peak memory for this N
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args, device)
        return
    args.sizes = args.sizes or ([64, 128, 256] + ([512] if device.type == "cuda" else []))
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
               platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "M": args.m, "N": args.n, "steps": args.steps}
    if device.type == "cpu":
        figures["load_average"] = list(os.getloadavg())
    if args.sweep:
        figures["sweep"] = sweep(args, device)
    else:
        figures["sizes"] = []
        for size in args.sizes:
            figures["sizes"].append(size_figures(args, size, device))
            print(json.dumps(figures["sizes"][-1]), flush=True)
        if device.type == "cuda" and 512 in args.sizes:
            row = figures["sizes"][-1]
            figures["projection_512x512x300_h"] = {
                k: round(row[k]["s_per_slice"] * 300 / 3600, 3) for k in ("float32", "float16", "bfloat16")}
        figures["accuracy_vs_float32"] = accuracy(args, device)
        print(json.dumps(figures["accuracy_vs_float32"]), flush=True)
        figures["peak_memory_256"] = {f"N={n}": peak_memory_mib(args, device, n) for n in (args.n, 4 * args.n)}
        print(json.dumps(figures["peak_memory_256"]), flush=True)
        train = {mode: round(training_images_per_second(mode, device), 2) for mode in ("standard", "eu", "au")}
        m_weights = bundle_section("training_cfg", "train")["m_weights"]
        train["eu_cost_over_standard"] = round(train["standard"] / train["eu"], 2)
        train["eu_budget"] = round(1.2 * m_weights, 2)  # m_weights x standard + 20%
        train["eu_within_budget"] = train["eu_cost_over_standard"] <= train["eu_budget"]
        figures["training_images_per_s"] = train
    if device.type == "cpu":
        figures["load_average_end"] = list(os.getloadavg())
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
