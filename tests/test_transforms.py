"""Geometry and intensity transforms: exact round trips."""

import numpy as np
import pytest
import torch

from jetfast.data.transforms import IntensityTransform, crop_to_image, pad_to_model
from tests.jetfiles import jet_images


def test_pad_and_crop_are_inverse_and_lossless():
    images = torch.rand(3, 125, 125, 3)
    padded = pad_to_model(images)
    assert padded.shape == (3, 3, 128, 128)
    assert torch.equal(crop_to_image(padded), images)
    assert torch.count_nonzero(padded) == torch.count_nonzero(images)  # padding adds zeros only
    assert torch.equal(padded[:, :, 63, 63], images[:, 62, 62, :])  # the jet axis stays central


def test_intensity_round_trip_including_zeros_and_huge_values():
    images, _ = jet_images(16, seed=1)
    images[0, 62, 62, 0] = 757.0  # a Tracks deposit as large as the real file's maximum
    transform = IntensityTransform.fit(images)
    x = torch.from_numpy(images)
    back = transform.to_images(transform.to_model(x))
    np.testing.assert_allclose(back.numpy(), images, rtol=2e-6, atol=1e-7)
    assert (back[x == 0] == 0).all()
    again = IntensityTransform.from_dict(transform.to_dict())
    assert again == transform


def test_fit_statistics_and_old_checkpoints():
    images, _ = jet_images(8, seed=2)
    transform = IntensityTransform.fit(images)
    for c in range(3):
        lit = images[..., c][images[..., c] > 0]
        assert transform.scale[c] == pytest.approx(np.median(lit))
    model = transform.to_model(torch.from_numpy(images))
    assert abs(float(model.mean())) < 0.05 and abs(float(model.std()) - 1) < 0.05
    older = {"scale": [2, 1, 1], "mean": [0, 0, 0], "std": [1, 1, 1], "floor": [0.5, 0.1, 0.01]}  # a field no longer used
    assert IntensityTransform.from_dict(older).scale == (2.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        IntensityTransform(scale=(1.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="NaN"):
        IntensityTransform.fit(np.full((1, 125, 125, 3), np.nan, np.float32))
