"""medeman.labels.argmax_labels equals torch.argmax, ties included."""

import pytest
import torch

from medeman.labels import argmax_labels


@pytest.mark.parametrize("shape, dim", [((3, 5, 6, 7), 0), ((2, 4, 3, 3, 3), 1), ((1, 4, 4, 4), 0)])
def test_argmax_labels_matches_torch_argmax(shape, dim):
    scores = torch.randn(shape)
    torch.testing.assert_close(argmax_labels(scores, dim=dim, dtype=torch.long), scores.argmax(dim))


def test_ties_go_to_the_lower_class():
    scores = torch.tensor([[0.5, 0.2], [0.5, 0.7], [0.1, 0.7]]).reshape(3, 2, 1, 1)
    assert argmax_labels(scores).flatten().tolist() == [0, 1]
    assert argmax_labels(scores).dtype == torch.uint8
