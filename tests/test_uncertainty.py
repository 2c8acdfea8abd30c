import math

import pytest
import torch

from hyper_dm.uncertainty import UncertaintyAccumulator, ause, coverage, crps, decompose, psnr, ssim, uce


def grouped_gaussian(m=400, n=400, between=0.3, within=0.1, shape=(2, 1, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 + between * torch.randn((m, 1, *shape), generator=g, dtype=torch.float64)
    return centres + within * torch.randn((m, n, *shape), generator=g, dtype=torch.float64)


def test_small_m_and_n_are_unbiased():
    """With M = 3, N = 2 the plain spread of the set means would report EU = (2/3)(0.09 + 0.01 / 2) = 0.063 and AU
    = 0.005; the estimates must find the true 0.09 and 0.01 (averaged over many pixels) and total their sum."""
    d = decompose(grouped_gaussian(m=3, n=2, shape=(64, 1, 32, 32)))
    assert d.eu.mean().item() == pytest.approx(0.09, rel=0.05)
    assert d.au.mean().item() == pytest.approx(0.01, rel=0.05)
    assert d.total.mean().item() == pytest.approx(0.10, rel=0.05)
    assert (d.eu >= 0).all()


def test_single_set_or_single_draw():
    samples = grouped_gaussian(m=5, n=1, shape=(64, 1, 16, 16))
    one_draw = decompose(samples)
    assert (one_draw.au == 0).all() and one_draw.total.mean().item() == pytest.approx(0.10, rel=0.1)
    one_set = decompose(grouped_gaussian(m=1, n=6))
    assert (one_set.eu == 0).all() and one_set.au.mean().item() == pytest.approx(0.01, rel=0.2)
    torch.testing.assert_close(one_set.mean, grouped_gaussian(m=1, n=6).mean(dim=(0, 1)))


def test_decompose_recovers_known_between_and_within_variance():
    d = decompose(grouped_gaussian(between=0.3, within=0.1))
    # sampling error of a variance from 400 groups is ~7%; stated tolerance 20%
    assert d.eu.mean().item() == pytest.approx(0.09, rel=0.2)
    assert d.au.mean().item() == pytest.approx(0.01, rel=0.05)


def test_streaming_matches_decompose_for_any_chunking():
    samples = grouped_gaussian(m=4, n=13)
    acc = UncertaintyAccumulator()
    for chunk in samples.split([5, 1, 7], dim=1):
        acc.update(chunk)
    streamed, direct = acc.result(torch.float64), decompose(samples)
    for key in ("mean", "eu", "au"):
        assert torch.allclose(getattr(streamed, key), getattr(direct, key), atol=1e-10)
    assert acc.count == 13


def test_streaming_rejects_mismatched_chunks():
    acc = UncertaintyAccumulator()
    acc.update(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="does not match"):
        acc.update(torch.zeros(2, 2, 4))


def test_psnr_and_ssim_known_values():
    target = torch.zeros(1, 1, 32, 32)
    noisy = target + 0.1  # MSE 0.01, range 2 -> 10 log10(4 / 0.01)
    assert psnr(noisy, target).item() == pytest.approx(10 * math.log10(400), abs=1e-4)
    img = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-5)
    other = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert ssim(img, other).item() < 0.5


def test_crps_matches_gaussian_closed_form():
    sigma, y = 0.5, 0.3
    samples = sigma * torch.randn(20000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.tensor(y / sigma, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = sigma * (z * (2 * normal.cdf(z) - 1) + 2 * normal.log_prob(z).exp() - 1 / math.sqrt(math.pi))
    assert crps(samples, torch.full((8,), y, dtype=torch.float64)).mean().item() == pytest.approx(
        expected.item(), rel=0.02
    )
    assert crps(torch.full((5, 3), 0.2), torch.full((3,), 0.7)).allclose(torch.full((3,), 0.5))


def test_ause_zero_for_oracle_and_positive_for_noise():
    g = torch.Generator().manual_seed(0)
    error = torch.rand(10000, generator=g)
    assert ause(error, error) == pytest.approx(0.0, abs=1e-12)
    assert ause(torch.rand(10000, generator=g), error) > 0.3


def test_uce_small_when_calibrated_large_when_not():
    g = torch.Generator().manual_seed(0)
    var = torch.rand(50000, generator=g) * 0.1 + 0.01
    sq_err = (var.sqrt() * torch.randn(50000, generator=g)) ** 2
    assert uce(var, sq_err) < 0.1 * var.mean().item()
    assert uce(var, 4 * sq_err) == pytest.approx(3 * var.mean().item(), rel=0.1)


def test_coverage_of_central_intervals():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(2000, 5000, generator=g)
    target = torch.randn(5000, generator=g)
    cov = coverage(samples, target, levels=(0.5, 0.9))
    assert cov[0.5] == pytest.approx(0.5, abs=0.03)
    assert cov[0.9] == pytest.approx(0.9, abs=0.02)
    assert coverage(0.2 * samples, target, levels=(0.9,))[0.9] < 0.4
    with pytest.raises(ValueError, match="level"):
        coverage(samples, target, levels=(1.5,))


def test_shared_draw_noise_lets_a_small_eu_show_under_a_large_au():
    """The sampler's common random numbers: draw j of every weight set starts from the same noise. With AU = 0.49
    and EU = 0.004 at M = N = 4, EU comes out right per pixel; with independent noise per set the clamp at zero
    turns the Monte Carlo noise into EU that follows AU."""
    g = torch.Generator().manual_seed(3)
    shape = (64, 1, 32, 32)
    randn = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    answers = 0.5 + math.sqrt(0.004) * randn(4, 1, *shape)  # one answer per weight set: EU 0.004
    own = 0.02 * randn(4, 4, *shape)  # how each set's draw differs from the others' for the same noise
    shared = decompose(answers + 0.7 * randn(1, 4, *shape) + own)
    independent = decompose(answers + 0.7 * randn(4, 4, *shape) + own)
    assert shared.au.mean().item() == pytest.approx(0.49 + 0.0004, rel=0.03)
    assert shared.eu.mean().item() == pytest.approx(0.004, rel=0.1)
    assert independent.eu.mean().item() > 5 * 0.004
    assert (shared.eu - 0.004).abs().mean() < 0.1 * (independent.eu - 0.004).abs().mean()
