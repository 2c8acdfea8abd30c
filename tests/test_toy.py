"""Scientific check on the 1-D toy: the uncertainty comes out where the method promises.

The recipe is ``ToyConfig()``: v prediction, quadratic timestep sampling, mode eu with the KL term (lambda 0.03)
at probe inputs ``x ~ U(-pi, pi)``, 6000 steps; M=16, N=32, 50 DDIM steps. Measured with
``python scripts/toy_1d.py --seeds 0 1 2 3 4 5``:

    seed  EU gap/noisy  EU gap/max on support  EU gap/clean  AU clean/noisy  AU rank corr  AU magnitude  RMSE
    0     4.84          1.90                   592           0.0047          0.975         0.98          0.0083
    1     4.97          1.54                   565           0.0048          0.959         0.91          0.0058
    2     7.32          3.50                   970           0.0049          0.981         0.88          0.0074
    3     9.31          3.57                   693           0.0061          0.926         0.89          0.0073
    4     6.22          2.50                   672           0.0053          0.975         0.93          0.0068
    5     5.04          2.43                   411           0.0077          0.971         0.91          0.0099

The old default (mode standard, uniform t, 3000 steps) on the same seeds: EU gap/noisy 0.26-0.68, gap/max on
support 0.10-0.29, AU clean/noisy 0.10-0.18. The thresholds below hold for every seed measured; seed 0 runs here.
"""

import math

import pytest
import torch

from hyper_dm.toy import ToyConfig, noise_variance, predict_toy, toy_figures, train_toy
from hyper_dm.uncertainty import Decomposition


@pytest.mark.slow
def test_toy_uncertainty_where_the_method_promises():
    hyper, backbone, losses = train_toy(ToyConfig(seed=0))
    first, last = sum(losses[:100]) / 100, sum(losses[-100:]) / 100
    assert math.isfinite(last) and last < 0.25 * first, "the denoiser did not learn"
    x = torch.linspace(-math.pi, math.pi, 241)
    figures = toy_figures(predict_toy(hyper, backbone, x), x)
    assert figures["mean_rmse"] < 0.02, figures
    assert figures["eu_gap_over_support_max"] > 1.0, figures  # EU in the gap above EU at every training x
    assert figures["eu_gap_over_noisy"] > 2.0, figures  # ... the noisy side included
    assert figures["eu_gap_ratio"] > 100.0, figures  # ... and far above the noise-free side
    assert figures["au_clean_ratio"] < 0.05, figures  # AU near 0 where the data is noise-free
    assert figures["au_rank_corr"] > 0.8, figures  # AU follows the noise variance on x > 1
    assert 0.5 < figures["au_magnitude"] < 2.0, figures  # ... within a factor of two


def test_toy_figures_read_the_regions_they_name():
    x = torch.linspace(-math.pi, math.pi, 241)
    gap, clean, noisy = x.abs() < 1, x < -1, x > 1
    eu = torch.where(gap, 4.0, torch.where(noisy, 1.0, 0.5))
    eu[-1] = 2.0  # one training x with larger EU: the support maximum
    au = 2 * noise_variance(x) + 0.001 * clean
    stats = Decomposition(mean=torch.sin(x) + 0.01, eu=eu.unsqueeze(1), au=au.unsqueeze(1))
    figures = toy_figures(stats, x)
    assert figures["eu_gap_ratio"] == pytest.approx(8.0)
    assert figures["eu_gap_over_noisy"] == pytest.approx(4.0 / eu[noisy].mean().item())
    assert figures["eu_gap_over_support_max"] == pytest.approx(2.0)
    assert figures["au_clean_ratio"] == pytest.approx(0.001 / au[noisy].mean().item())
    assert figures["au_rank_corr"] == pytest.approx(1.0)
    assert figures["au_magnitude"] == pytest.approx(2.0)
    assert figures["mean_rmse"] == pytest.approx(0.01, rel=1e-4)
