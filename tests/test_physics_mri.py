"""Single-coil MRI physics against fastMRI's own FFT and mask conventions."""

import fastmri
import numpy as np
import pytest
import torch
from fastmri.data import transforms as T

from hyper_dm.physics.mri import center_crop, fft2c, ifft2c, make_mask_func, undersample, zero_filled


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
