"""UA-MT's uncertainty mask (medeman.methods.uncertainty) against hand computations."""

import math

import pytest
import torch
from torch import nn

from medeman.methods.uncertainty import (
    predictive_entropy,
    stochastic_mean_probs,
    uncertainty_masked_mse,
    uncertainty_threshold,
)


def test_entropy_of_known_distributions():
    probs = torch.tensor([[0.5, 1.0, 0.25], [0.5, 0.0, 0.75]]).view(1, 2, 3, 1, 1)
    entropy = predictive_entropy(probs, eps=0.0 + 1e-12).flatten()
    expected = [math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert entropy.tolist() == pytest.approx(expected, abs=1e-6)


THRESHOLD_CASES = [  # step, rampup, classes, expected
    (0, 100, 2, (0.75 + 0.25 * math.exp(-5)) * math.log(2)),
    (50, 100, 3, (0.75 + 0.25 * math.exp(-1.25)) * math.log(3)),
    (100, 100, 4, math.log(4)),
    (5, 0, 2, math.log(2)),
]


@pytest.mark.parametrize("step, rampup, classes, expected", THRESHOLD_CASES)
def test_threshold_ramps_from_three_quarters_of_ln_c_to_ln_c(step, rampup, classes, expected):
    assert uncertainty_threshold(step, rampup, classes) == pytest.approx(expected)


def test_masked_mse_by_hand():
    logits = torch.zeros(1, 2, 2, 1, 1)  # student softmax 0.5 everywhere
    teacher = torch.tensor([[0.9, 0.5], [0.1, 0.5]]).view(1, 2, 2, 1, 1)
    certain = torch.tensor([True, False]).view(1, 2, 1, 1)
    # only voxel 0: ((0.5-0.9)^2 + (0.5-0.1)^2) / (2 classes * 1 voxel)
    assert uncertainty_masked_mse(logits, teacher, certain).item() == pytest.approx(0.16)
    assert uncertainty_masked_mse(logits, teacher, torch.zeros_like(certain)).item() == 0.0


class _Identity(nn.Module):
    def forward(self, x):
        return torch.cat([x, -x], dim=1)


def test_stochastic_passes_average_noisy_predictions():
    image = torch.zeros(2, 1, 3, 3, 3)
    gen = torch.Generator().manual_seed(0)
    mean = stochastic_mean_probs(_Identity(), image, passes=4, noise_std=0.1, noise_clip=0.2, generator=gen)
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn((8, 1, 3, 3, 3), generator=gen) * 0.1).clamp(-0.2, 0.2)
    expected = torch.softmax(torch.cat([noise, -noise], 1), 1).view(4, 2, 2, 3, 3, 3).mean(0)
    assert torch.allclose(mean, expected)
    assert mean.shape == (2, 2, 3, 3, 3)
    with pytest.raises(ValueError, match="pass"):
        stochastic_mean_probs(_Identity(), image, passes=0)
