"""Single-coil MRI physics against fastMRI's own FFT and mask conventions."""

import fastmri
import numpy as np
import pytest
import torch
from fastmri.data import transforms as T

from hyper_dm.physics.mri import (
    add_kspace_noise,
    center_crop,
    centre_block,
    data_consistent,
    fft2c,
    ifft2c,
    make_mask_func,
    undersample,
    zero_filled,
)


def test_fft_convention_matches_fastmri():
    x = np.random.default_rng(0).standard_normal((2, 640, 368)) + 1j * np.random.default_rng(1).standard_normal(
        (2, 640, 368))
    ours = fft2c(x)
    theirs = torch.view_as_complex(fastmri.fft2c(T.to_tensor(x.astype(np.complex64)))).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    np.testing.assert_allclose(ifft2c(ours), x, atol=1e-10)
    assert np.linalg.norm(ours) == pytest.approx(np.linalg.norm(x))  # orthonormal


@pytest.mark.parametrize("mask_type", ["random", "equispaced"])
def test_masks_seeded_accelerated_and_centred(mask_type):
    kspace = np.ones((640, 368), dtype=np.complex64)
    mask_func = make_mask_func(mask_type, [0.08], [4])
    masked, keep = undersample(kspace, mask_func, seed=(1, 2, 3))
    _, again = undersample(kspace, mask_func, seed=(1, 2, 3))
    np.testing.assert_array_equal(keep, again)
    # random: 368 / 4 columns on average; equispaced (fastMRI): every 4th column plus the whole centre
    assert 0.8 * 368 / 4 < keep.sum() < 368 / 4 + 0.08 * 368 + 2
    assert keep[184 - 10 : 184 + 10].all()  # fully sampled centre (8% of 368 ~ 29 columns)
    np.testing.assert_array_equal(masked[:, ~keep], 0)
    others = [undersample(kspace, mask_func, seed=s)[1] for s in range(5)]
    assert any((o != keep).any() for o in others)


def test_masks_seeded_from_concurrent_threads():
    """CacheDataset fills its cache from threads sharing one mask function: each seed keeps its own mask."""
    from concurrent.futures import ThreadPoolExecutor

    kspace = np.ones((4, 368), dtype=np.complex64)
    mask_func = make_mask_func("random", [0.08], [4])
    alone = [undersample(kspace, mask_func, seed=s)[1] for s in range(64)]
    with ThreadPoolExecutor(8) as pool:
        together = [list(pool.map(lambda s: undersample(kspace, mask_func, seed=s)[1], range(64))) for _ in range(5)]
    for run in together:
        for seed, keep in enumerate(run):
            np.testing.assert_array_equal(keep, alone[seed], err_msg=f"seed {seed}")


def test_zero_filled_full_sampling_is_the_cropped_magnitude():
    image = np.zeros((640, 368), dtype=np.complex64)
    image[200:440, 50:300] = 1 + 1j
    out = zero_filled(fft2c(image))
    assert out.shape == (320, 320) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.abs(center_crop(image, (320, 320))), atol=1e-5)


def test_mask_arguments_checked():
    with pytest.raises(ValueError, match="mask_type"):
        make_mask_func("magic", [0.08], [4])
    with pytest.raises(ValueError, match="same length"):
        make_mask_func("random", [0.08, 0.04], [4])


def test_centre_block_is_the_sampled_run_around_dc():
    mask = np.zeros(20, dtype=bool)
    mask[[1, 3, 8, 9, 10, 11, 15]] = True
    np.testing.assert_array_equal(np.flatnonzero(centre_block(mask)), [8, 9, 10, 11])
    mask[10] = False
    assert not centre_block(mask).any()


def _knee_like(rows=160, cols=96, crop=64):
    """A smooth-phase object on a crop x crop field inside rows x cols: (complex image, its cropped magnitude, the
    stripes of that magnitude)."""
    y, x = np.mgrid[-1 : 1 : crop * 1j, -1 : 1 : crop * 1j]
    body = (x / 0.7) ** 2 + (y / 0.5) ** 2 < 1
    stripes = body * 0.3 * np.sin(9 * y)
    magnitude = body * (1 + 0.5 * (x > 0.1)) + stripes
    image = np.zeros((rows, cols), dtype=np.complex64)
    center_crop(image, (crop, crop))[...] = magnitude * np.exp(1j * (0.8 * x + 0.4 * y))
    return image, magnitude, stripes


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_data_consistency_restores_the_measurement_and_keeps_a_better_estimate(noise):
    image, truth, stripes = _knee_like()
    mask = undersample(np.ones(image.shape), make_mask_func("random", [0.16], [4]), seed=3)[1]
    measured = add_kspace_noise(fft2c(image), noise, np.random.default_rng(1)) * mask
    rmse = lambda x: float(np.sqrt(np.mean((x - truth) ** 2)))  # noqa: E731
    zero = rmse(zero_filled(measured, truth.shape))
    fixed = data_consistent((truth - stripes)[None], measured[None], mask)[0]  # an estimate that misses the stripes
    assert fixed.shape == truth.shape and fixed.dtype == np.float32
    assert rmse(fixed) < 0.4 * min(rmse(truth - stripes), zero)  # the sampled columns put them back
    kept = data_consistent(truth[None], measured[None], mask)[0]  # an estimate better than the measurement
    hard = data_consistent(truth[None], measured[None], mask, noise=0.0)[0]  # the sampled columns replaced
    phase = np.angle(center_crop(ifft2c(measured * centre_block(mask)), truth.shape))
    replaced = np.zeros(image.shape, dtype=np.complex64)
    center_crop(replaced, truth.shape)[...] = truth * np.exp(1j * phase)
    replaced = fft2c(replaced)
    replaced[:, mask] = measured[:, mask]
    np.testing.assert_allclose(hard, zero_filled(replaced, truth.shape), atol=1e-5)
    assert rmse(kept) < (0.01 * zero if noise == 0 else 0.5 * rmse(hard))


def test_data_consistency_checks_shapes():
    with pytest.raises(ValueError, match="mask"):
        data_consistent(np.zeros((1, 64, 64)), np.zeros((1, 160, 96), np.complex64), np.ones(95, bool))
