"""Lesion copy-paste into unlabeled patches: where it lands, how it looks, what target it gets; FixMatch's use of it."""

import math

import pytest
import torch

from medeman.config import ConfigError, load_config
from medeman.methods import build_method
from medeman.methods.lesion_paste import NOT_PASTED, paste_lesions
from stand_in_module import FixedTeacherModule as _Teacher

LESION, LIVER = 3, 1


def _source():
    """One labeled 8^3 patch: liver (intensity 0.6) with a two-voxel lesion (0.1 and 0.3) at (3..4, 3, 3)."""
    image = torch.zeros(1, 1, 8, 8, 8)
    label = torch.zeros(1, 1, 8, 8, 8)
    image[0, 0, 1:7, 1:7, 1:7], label[0, 0, 1:7, 1:7, 1:7] = 0.6, LIVER
    image[0, 0, 3, 3, 3], image[0, 0, 4, 3, 3] = 0.1, 0.3
    label[0, 0, 3:5, 3, 3] = LESION
    return image, label


def _unlabeled(batch=2):
    """Unlabeled patches whose host (the teacher's liver) is the cube 2..5 at intensity 1.0, 0 elsewhere."""
    image = torch.zeros(batch, 1, 8, 8, 8)
    image[:, :, 2:6, 2:6, 2:6] = 1.0
    host = torch.zeros(batch, 8, 8, 8, dtype=torch.bool)
    host[:, 2:6, 2:6, 2:6] = True
    return image, host


def _paste_into_one(image, host, seed=None):
    """:func:`paste_lesions` of :func:`_source`'s lesion into the one patch ``image`` (chosen)."""
    source_image, source_label = _source()
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return paste_lesions(image, host, source_image, source_label, [LESION], [LIVER], torch.tensor([True]), generator)


def test_a_pasted_lesion_keeps_its_contrast_to_its_organ_at_the_new_organs_level():
    image, host = _unlabeled()
    source_image, source_label = _source()
    before = image.clone(), source_image.clone()
    out = paste_lesions(
        image, host, source_image, source_label, [LESION], [LIVER], torch.tensor([True, False]), torch.Generator()
    )
    pasted = out.label[0] != NOT_PASTED
    assert int(pasted.sum()) == 2 and bool(host[0][pasted].all())  # both voxels, on the host
    # destination host mean 1.0 + (lesion - source liver mean); the source liver mean is over its liver label (0.6)
    assert sorted(out.image[0, 0][pasted].tolist()) == pytest.approx([1.0 + 0.1 - 0.6, 1.0 + 0.3 - 0.6])
    assert bool((out.label[0][pasted] == LESION).all())
    assert torch.equal(out.image[0, 0][~pasted], image[0, 0][~pasted])  # nothing else changes
    assert torch.equal(out.image[1], image[1]) and bool((out.label[1] == NOT_PASTED).all())  # not chosen
    assert torch.equal(image, before[0]) and torch.equal(source_image, before[1])  # inputs untouched


def test_a_lesion_lands_only_on_host_voxels():
    image, _ = _unlabeled(1)
    host = torch.zeros(1, 8, 8, 8, dtype=torch.bool)
    host[0, 5, 5, 5] = True  # one host voxel: the lesion's centre lands on it, its other voxel does not
    out = _paste_into_one(image, host)
    assert torch.nonzero(out.label[0] != NOT_PASTED).tolist() == [[5, 5, 5]]


@pytest.mark.parametrize("case", ["no lesion in the labeled patches", "no host voxel"])
def test_nothing_is_pasted_without_a_lesion_or_a_host(case):
    image, host = _unlabeled(1)
    source_image, source_label = _source()
    if case == "no host voxel":
        host[:] = False
    else:
        source_label[source_label == LESION] = LIVER
    out = paste_lesions(image, host, source_image, source_label, [LESION], [LIVER], torch.tensor([True]))
    assert torch.equal(out.image, image) and bool((out.label == NOT_PASTED).all())


def test_the_place_follows_the_generator():
    image, host = _unlabeled(1)
    places = {
        tuple(torch.nonzero(_paste_into_one(image, host, seed).label[0] != NOT_PASTED).flatten().tolist())
        for seed in range(6)
    }
    assert len(places) > 1 and torch.equal(_paste_into_one(image, host, 0).label, _paste_into_one(image, host, 0).label)


def test_fixmatch_trains_pasted_voxels_on_their_ground_truth():
    sets = ["ssl.method=fixmatch", "ssl.fixmatch_threshold=0.9", "data.num_classes=4", "data.lesion_classes=[3]"]
    method = build_method(load_config(sets=sets + ["ssl.fixmatch_paste_probability=1"]))
    # two voxels: voxel 0 a confident liver pseudo-label; voxel 1 unsure (dropped) unless a lesion is pasted there
    probs = torch.tensor([[0.0, 0.4], [1.0, 0.3], [0.0, 0.3], [0.0, 0.0]]).reshape(1, 4, 2, 1, 1)
    logits = torch.zeros(1, 4, 2, 1, 1)  # the student: uniform, p = 1/4 everywhere
    pasted = torch.tensor([NOT_PASTED, LESION]).reshape(1, 2, 1, 1)
    logs = {}
    loss = method.unsupervised_loss(_Teacher(probs), logits, None, logs, teacher_probs=probs, pasted=pasted)
    # both voxels kept now (liver, lesion): CE log 4 each, averaged over the 2 voxels; Dice over classes 1 and 3,
    # each with target 1 on one voxel and prediction 1/4 on both: 1 - (2 * 1/4) / (2/4 + 1)
    eps = 1e-5
    dice = 1 - (2 * 0.25 + eps) / (0.5 + 1 + eps)
    assert float(loss) == pytest.approx(math.log(4) + dice, rel=1e-4)
    assert float(logs["ssl/pasted_fraction"]) == pytest.approx(0.5)
    plain = float(method.unsupervised_loss(_Teacher(probs), logits, None, {}))
    # without the paste voxel 0 alone: its CE over 2 voxels, Dice of class 1 on it: 1 - (2 * 1/4) / (1/4 + 1)
    assert plain == pytest.approx(math.log(4) / 2 + 1 - (2 * 0.25 + eps) / (0.25 + 1 + eps), rel=1e-4)


def test_fixmatch_strong_view_pastes_into_the_teachers_confident_host():
    sets = [
        "ssl.method=fixmatch",
        "data.num_classes=4",
        "data.lesion_classes=[lesion]",
        "data.labels={1: liver, 2: kidney, 3: lesion}",
    ]
    method = build_method(
        load_config(sets=sets + ["ssl.fixmatch_paste_probability=1", "data.lesion_host_classes=[liver]"])
    )
    assert (method.pasted, method.hosts) == ([LESION], [LIVER])
    image, host = _unlabeled(1)
    probs = torch.zeros(1, 4, 8, 8, 8)
    probs[:, 0] = 1.0
    probs[:, 0][host], probs[:, 1][host] = 0.0, 1.0  # the teacher: liver on the cube, sure
    source_image, source_label = _source()
    strong, extra = method.strong_view(
        _Teacher(probs), {"image": source_image, "label": source_label}, {"weak": image, "strong": image}
    )
    pasted = extra["pasted"][0] != NOT_PASTED
    assert int(pasted.sum()) == 2 and bool(host[0][pasted].all()) and torch.equal(extra["teacher_probs"], probs)
    assert not torch.equal(strong, image)
    off = build_method(load_config(sets=sets))
    assert off.strong_view(None, {}, {"strong": image}) == (image, {})


@pytest.mark.parametrize(
    "sets, message",
    [
        ([], "pastes the classes of data.lesion_classes, which is empty"),
        (["data.lesion_classes=[3]", "data.lesion_host_classes=[3]"], "none of them a lesion class"),
        (["data.lesion_classes=[3]", "data.lesion_host_classes=[spleen]"], "spleen"),
        (["data.lesion_classes=[3]", "ssl.fixmatch_paste_probability=2"], "a probability in"),
    ],
)
def test_paste_settings_are_checked_at_load(sets, message):
    base = ["ssl.method=fixmatch", "data.num_classes=4", "ssl.fixmatch_paste_probability=0.5"]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(sets=base + sets)


def test_labeled_paste_relabels_the_pasted_voxels_and_keeps_existing_lesions():
    from medeman.methods.lesion_paste import paste_into_labeled

    source_image, source_label = _source()
    image = torch.cat([source_image, torch.zeros(1, 1, 8, 8, 8)])
    label = torch.cat([source_label, torch.zeros(1, 1, 8, 8, 8)])
    image[1, 0, 2:6, 2:6, 2:6], label[1, 0, 2:6, 2:6, 2:6] = 1.0, LIVER  # patch 1: liver at 1.0, no lesion
    out_image, out_label = paste_into_labeled(image, label, [LESION], [LIVER], torch.tensor([False, True]))
    assert out_label.shape == label.shape and out_label.dtype == label.dtype
    new = (out_label[1, 0] == LESION) & (label[1, 0] != LESION)
    assert int(new.sum()) == 2 and bool((label[1, 0][new] == LIVER).all())  # the two lesion voxels, on liver
    assert sorted(out_image[1, 0][new].tolist()) == pytest.approx([0.5, 0.7])  # 1.0 + (0.1 | 0.3) - 0.6
    assert torch.equal(out_image[0], image[0]) and torch.equal(out_label[0], label[0])  # not chosen


def test_labeled_paste_needs_lesion_classes():
    with pytest.raises(ConfigError, match="data.labeled_lesion_paste pastes the classes of data.lesion_classes"):
        load_config(sets=["data.labeled_lesion_paste=0.5"])
    with pytest.raises(ConfigError, match=r"data.labeled_lesion_paste: 1.5 must be a probability in \[0, 1\]"):
        load_config(sets=["data.labeled_lesion_paste=1.5", "data.num_classes=4", "data.lesion_classes=[3]"])
