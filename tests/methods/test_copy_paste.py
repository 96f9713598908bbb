"""BCP mixing (medeman.methods.copy_paste) against hand-built 3D examples."""

import pytest
import torch
import torch.nn.functional as F

from medeman.losses import masked_dice
from medeman.methods.copy_paste import bidirectional_copy_paste, copy_paste_loss, paste_box, random_boxes

BOX_CASES = [  # spatial shape, fraction, expected box sides
    ((6, 6, 6), 0.5, (3, 3, 3)),
    ((9, 6, 3), 2 / 3, (6, 4, 2)),
    ((4, 4, 4), 1.0, (4, 4, 4)),
    ((5, 5, 5), 0.01, (1, 1, 1)),
]


@pytest.mark.parametrize("shape, fraction, sides", BOX_CASES)
def test_random_boxes_are_boxes_of_the_configured_size_inside_the_patch(shape, fraction, sides):
    boxes = random_boxes(16, shape, fraction, generator=torch.Generator().manual_seed(0))
    assert boxes.shape == (16, *shape)
    for box in boxes:
        idx = box.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        assert tuple((hi - lo + 1).tolist()) == sides  # extent
        assert int(box.sum()) == sides[0] * sides[1] * sides[2]  # and filled: a box


def test_random_boxes_cover_every_position():
    boxes = random_boxes(400, (5, 1, 1), 0.4, generator=torch.Generator().manual_seed(1))
    starts = boxes[:, :, 0, 0].float().argmax(dim=1)
    assert set(starts.tolist()) == {0, 1, 2, 3}  # 5 - 2 + 1 positions, all drawn


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_random_boxes_refuse_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        random_boxes(1, (4, 4, 4), fraction)


def _box(b, x0, x1, shape=(4, 4, 4)):
    box = torch.zeros((b, *shape), dtype=torch.bool)
    box[:, x0:x1, x0:x1, x0:x1] = True
    return box


def test_bidirectional_mix_by_hand():
    # labeled images are constant 1 and 2 with labels 1 and 2; unlabeled are 10 and 20 with pseudo-labels 3 and 4
    lab = torch.stack([torch.full((1, 4, 4, 4), 1.0), torch.full((1, 4, 4, 4), 2.0)])
    lab_y = torch.stack([torch.full((1, 4, 4, 4), 1), torch.full((1, 4, 4, 4), 2)])
    unl = torch.stack([torch.full((1, 4, 4, 4), 10.0), torch.full((1, 4, 4, 4), 20.0)])
    pseudo = torch.stack([torch.full((4, 4, 4), 3), torch.full((4, 4, 4), 4)])
    box = _box(2, 1, 3)  # the 2x2x2 centre
    mixed = bidirectional_copy_paste(lab, lab_y, unl, pseudo, box)
    assert mixed.image.shape == (4, 1, 4, 4, 4) and mixed.target.shape == (4, 4, 4, 4)
    centre, corner = (slice(None), 1, 1, 1), (slice(None), 0, 0, 0)
    # inward: labeled outside, unlabeled inside; outward: unlabeled outside, the *next* labeled sample inside
    assert mixed.image[:, 0][centre].tolist() == [10.0, 20.0, 2.0, 1.0]
    assert mixed.image[:, 0][corner].tolist() == [1.0, 2.0, 10.0, 20.0]
    assert mixed.target[centre].tolist() == [3, 4, 2, 1]
    assert mixed.target[corner].tolist() == [1, 2, 3, 4]
    assert mixed.from_labeled[centre].tolist() == [False, False, True, True]
    assert mixed.from_labeled[corner].tolist() == [True, True, False, False]
    assert int(mixed.from_labeled.sum()) == 2 * (64 - 8) + 2 * 8


def test_mix_refuses_unpaired_batches():
    with pytest.raises(ValueError, match="batch_size_unlabeled"):
        bidirectional_copy_paste(
            torch.zeros(2, 1, 4, 4, 4),
            torch.zeros(2, 4, 4, 4),
            torch.zeros(1, 1, 4, 4, 4),
            torch.zeros(1, 4, 4, 4),
            _box(2, 0, 2),
        )


def test_paste_box_label_maps_and_images():
    base, patch = torch.zeros(1, 2, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, 2, dtype=torch.long)
    box = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    box[0, 0, 0, 0] = True
    assert int(paste_box(base, patch, box).sum()) == 1
    assert paste_box(base[:, None].float(), patch[:, None].float(), box).shape == (1, 1, 2, 2, 2)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
def test_copy_paste_loss_weights_regions(alpha):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4, 4))
    from_labeled = _box(2, 0, 2)
    mixed = type("M", (), {})()
    mixed.target, mixed.from_labeled = target, from_labeled
    ce = F.cross_entropy(logits, target, reduction="none")
    gt, pl = from_labeled, ~from_labeled
    expected = (ce[gt].mean() + masked_dice(logits, target, gt)) + alpha * (
        ce[pl].mean() + masked_dice(logits, target, pl)
    )
    assert copy_paste_loss(logits, mixed, alpha).item() == pytest.approx(expected.item(), rel=1e-5)
