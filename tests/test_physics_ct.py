"""Sparse-view CT physics on a real synthetic chest slice (64 x 64)."""

import numpy as np
import pytest
import SimpleITK as sitk
from skimage.transform import resize

from hyper_dm.data.synthetic import write_luna16_like
from hyper_dm.physics.ct import MU_WATER_PER_MM, ParallelBeamCT, hu_to_mu, mu_to_hu


@pytest.fixture(scope="module")
def chest_mu(tmp_path_factory) -> tuple[np.ndarray, float]:
    """A 64 x 64 chest slice in 1/mm (HU windowed to [-1000, 1000]) and its pixel size in mm."""
    path = write_luna16_like(tmp_path_factory.mktemp("ct"), n_series=1, seed=3, size_xy=256, n_slices=(3, 3),
                             spacing_xy_mm=(1.4, 1.4))[0]
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[1].astype(np.float64)
    hu = resize(np.clip(hu, -1000, 1000), (64, 64), anti_aliasing=True)
    return hu_to_mu(hu), 1.4 * 256 / 64


def psnr_hu(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR over the [-1000, 1000] HU window."""
    a, b = (np.clip(mu_to_hu(x), -1000, 1000) for x in (a, b))
    return float(10 * np.log10(2000.0**2 / np.mean((a - b) ** 2)))


def test_hu_mu_round_trip_and_anchors():
    hu = np.array([-1000.0, 0.0, 400.0])
    np.testing.assert_allclose(hu_to_mu(hu), [0.0, MU_WATER_PER_MM, 1.4 * MU_WATER_PER_MM])
    np.testing.assert_allclose(mu_to_hu(hu_to_mu(hu)), hu)


def test_line_integral_units():
    """A centred water disk of radius 20 px: the central ray integrates 2 r mu (pixel size in mm)."""
    yy, xx = np.mgrid[:64, :64] - 31.5
    mu = np.where(xx**2 + yy**2 <= 20**2, MU_WATER_PER_MM, 0.0)
    sino = ParallelBeamCT(n_views=4, noise="none").project(mu, pixel_mm=2.0)
    assert sino.shape == (int(np.ceil(64 * np.sqrt(2))), 4)
    assert sino.max() == pytest.approx(2 * 20 * 2.0 * MU_WATER_PER_MM, rel=0.03)


def test_fbp_beats_trivial_baseline_and_improves_with_views(chest_mu):
    mu, pixel_mm = chest_mu
    rng = np.random.default_rng(0)
    scores = {}
    for n_views in (8, 24, 90):
        ct = ParallelBeamCT(n_views=n_views, noise="poisson", i0=1e5)
        scores[n_views] = psnr_hu(ct.fbp(ct.add_noise(ct.project(mu, pixel_mm), rng), pixel_mm, 64), mu)
    baseline = psnr_hu(np.full_like(mu, mu.mean()), mu)  # the best constant image
    assert scores[24] > baseline + 8
    assert scores[8] < scores[24] < scores[90]


def test_noise_models(chest_mu):
    mu, pixel_mm = chest_mu
    clean = ParallelBeamCT(n_views=24, noise="none").project(mu, pixel_mm)
    low, high = (ParallelBeamCT(n_views=24, noise="poisson", i0=i0) for i0 in (1e3, 1e6))
    err_low = np.std(low.add_noise(clean, np.random.default_rng(0)) - clean)
    err_high = np.std(high.add_noise(clean, np.random.default_rng(0)) - clean)
    assert err_high < err_low / 10  # Poisson: error ~ 1 / sqrt(i0)
    gauss = ParallelBeamCT(n_views=24, noise="gaussian", sigma=0.05)
    assert np.std(gauss.add_noise(clean, np.random.default_rng(1)) - clean) == pytest.approx(0.05, rel=0.05)
    np.testing.assert_array_equal(high.add_noise(clean, np.random.default_rng(7)),
                                  high.add_noise(clean, np.random.default_rng(7)))
    np.testing.assert_array_equal(ParallelBeamCT(noise="none").add_noise(clean, None), clean)


@pytest.mark.parametrize("kwargs", [{"n_views": 0}, {"noise": "salt"}, {"i0": 0}, {"noise": "gaussian", "sigma": -1}])
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        ParallelBeamCT(**kwargs)


def test_noise_level_of_the_fbp_rises_with_falling_photon_count(chest_mu):
    """The U-Net's noise-level input (``model#noise_level_input``) reads the photon count off a 24-view FBP: the
    estimate rises strictly from 1e5 to 1e4 to 1e3 photons, and is about the same for two noise draws."""
    import torch

    from hyper_dm.networks import noise_level

    mu, pixel_mm = chest_mu
    ct = ParallelBeamCT(n_views=24, noise="poisson")
    sino = ct.project(mu, pixel_mm)
    levels = {}
    for i0 in (1e5, 1e4, 1e3):
        fbps = [mu_to_hu(ct.fbp(ct.add_noise(sino, np.random.default_rng(seed), i0), pixel_mm, 64)) / 1000
                for seed in (0, 1)]
        levels[i0] = noise_level(torch.from_numpy(np.stack(fbps)[:, None]).float())[:, 0]
        assert abs(float(levels[i0][0] / levels[i0][1]) - 1) < 0.2, (i0, levels[i0])
    assert levels[1e3].mean() > 1.5 * levels[1e4].mean() > 1.5 * levels[1e5].mean(), levels
