"""medeman.labels.argmax_labels equals torch.argmax, ties included."""

import pytest
import torch

from medeman.labels import argmax_labels, label_dtype


@pytest.mark.parametrize("shape, dim", [((3, 5, 6, 7), 0), ((2, 4, 3, 3, 3), 1), ((1, 4, 4, 4), 0)])
def test_argmax_labels_matches_torch_argmax(shape, dim):
    scores = torch.randn(shape)
    torch.testing.assert_close(argmax_labels(scores, dim=dim, dtype=torch.long), scores.argmax(dim))


def test_ties_go_to_the_lower_class():
    scores = torch.tensor([[0.5, 0.2], [0.5, 0.7], [0.1, 0.7]]).reshape(3, 2, 1, 1)
    assert argmax_labels(scores).flatten().tolist() == [0, 1]
    assert argmax_labels(scores).dtype == torch.uint8


@pytest.mark.parametrize(
    "num_classes, dtype",
    [(2, torch.uint8), (256, torch.uint8), (257, torch.int16), (2**15, torch.int16), (2**15 + 1, torch.int32)],
)
def test_label_dtype_is_the_smallest_that_holds_every_class(num_classes, dtype):
    assert label_dtype(num_classes) == dtype
    assert torch.iinfo(dtype).max >= num_classes - 1
