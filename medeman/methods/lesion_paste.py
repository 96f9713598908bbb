"""Object copy-paste of labeled lesions into unlabeled patches, where the teacher sees their host organ.

TumorCP (Yang, Zhang, Liu et al., "TumorCP: A Simple but Effective Object-Level Data Augmentation for
Tumor Segmentation", MICCAI 2021) and Simple Copy-Paste (Ghiasi et al., CVPR 2021) paste annotated
objects into other images. Here the object is a lesion of a labeled patch (its ground-truth voxels
of ``data.lesion_classes``), the image an unlabeled patch's strong view, and the place a voxel the
EMAN teacher confidently calls the lesion's host organ (e.g. the liver) on the aligned weak view:

    source   a labeled patch holding a lesion; the lesion's voxels, their bounding-box centre
    place    a confident host voxel of the unlabeled patch (of a few drawn, the one keeping most of the
             lesion); the lesion is moved so its centre lands there, and keeps only the voxels that land
             inside the patch on host voxels
    look     each pasted voxel = the destination host's mean + (lesion voxel - the source host's
             mean): the lesion keeps its contrast to its organ and its texture, at the new organ's level
    target   the lesion's ground-truth class on the pasted voxels (the teacher's pseudo-label elsewhere)

Few labeled scans show few lesions; pasting shows each of them in many unlabeled livers, next to the
lesions the teacher already pseudo-labels. Where medeman differs from TumorCP: no blending or
per-object augmentation beyond the labeled path's own; one lesion set (all lesion voxels of one
labeled patch) per unlabeled patch; the host comes from the teacher, not from labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NOT_PASTED = -1


@dataclass
class PastedBatch:
    """Unlabeled patches with lesions pasted in, and what was pasted where."""

    image: torch.Tensor  # (B, C, *spatial) the strong views, lesions pasted into the chosen ones
    label: torch.Tensor  # (B, *spatial) int64: the pasted lesion class, NOT_PASTED (-1) where nothing was pasted


def _host_mean(image: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``(C,)`` mean intensity of ``image`` ``(C, *spatial)`` over ``where`` ``(*spatial)`` (all voxels if empty)."""
    if not bool(where.any()):
        where = torch.ones_like(where)
    return image[:, where].mean(dim=1)


def paste_lesions(
    image: torch.Tensor,
    host: torch.Tensor,
    source_image: torch.Tensor,
    source_label: torch.Tensor,
    lesion_classes: Sequence[int],
    source_host_classes: Sequence[int],
    chosen: torch.Tensor,
    generator: torch.Generator | None = None,
    tries: int = 4,
) -> PastedBatch:
    """Paste a labeled patch's lesions into each chosen unlabeled patch, on its host voxels (see the module docstring).

    Args:
        image: ``(B, C, *spatial)`` unlabeled patches (the strong views), not modified.
        host: bool ``(B, *spatial)``, where a lesion may land (the teacher's confident host-organ voxels).
        source_image: ``(L, C, *spatial)`` labeled patches.
        source_label: ``(L, *spatial)`` or ``(L, 1, *spatial)`` their ground-truth classes.
        lesion_classes: the classes pasted (``data.lesion_classes``).
        source_host_classes: the classes of the source's host organ, whose mean intensity the lesion's
            contrast is measured against (the whole patch when the source holds none of them).
        chosen: bool ``(B,)``, which unlabeled patches receive a lesion.
        generator: CPU generator for the source and place draws (the global one if ``None``).
        tries: places drawn per patch; the lesion goes to the one where most of its voxels land on host voxels.

    Returns:
        A :class:`PastedBatch`. A chosen patch is left as it is when no labeled patch holds a lesion
        or it has no host voxel.
    """
    if source_label.dim() == source_image.dim():
        source_label = source_label[:, 0]
    source_label = source_label.long()  # label patches arrive as floats from the transforms
    if image.shape[2:] != source_image.shape[2:] or host.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(
            f"lesion paste needs patches of one size: unlabeled {tuple(image.shape)}, host {tuple(host.shape)}, "
            f"labeled {tuple(source_image.shape)}"
        )
    lesion_classes_t = torch.as_tensor(list(lesion_classes), device=source_label.device)
    host_classes_t = torch.as_tensor(list(source_host_classes), device=source_label.device)
    is_lesion = torch.isin(source_label, lesion_classes_t)
    sources = torch.nonzero(is_lesion.flatten(1).any(dim=1)).flatten().tolist()
    out = image.clone()
    pasted = torch.full(host.shape, NOT_PASTED, dtype=torch.long, device=image.device)
    spatial = torch.as_tensor(image.shape[2:], device=image.device)
    for i in torch.nonzero(chosen).flatten().tolist():
        places = torch.nonzero(host[i])
        if not sources or len(places) == 0:
            continue
        j = sources[int(torch.randint(len(sources), (1,), generator=generator))]
        lesion_voxels = torch.nonzero(is_lesion[j])  # (N, D) the source's lesion voxels
        centre = (lesion_voxels.min(dim=0).values + lesion_voxels.max(dim=0).values) // 2
        voxels, target = lesion_voxels[:0], lesion_voxels[:0]
        for k in torch.randint(len(places), (tries,), generator=generator).tolist():  # the place keeping most of it
            moved = lesion_voxels + (places[k] - centre)
            kept = ((moved >= 0) & (moved < spatial)).all(dim=1)
            kept[kept.clone()] = host[i][tuple(moved[kept].T)]
            if int(kept.sum()) > len(voxels):
                voxels, target = lesion_voxels[kept], moved[kept]
        if len(voxels) == 0:
            continue
        source_mean = _host_mean(source_image[j], torch.isin(source_label[j], host_classes_t))
        destination_mean = _host_mean(image[i], host[i])
        lesion = source_image[j][(slice(None), *voxels.T)]  # (C, N)
        out[i][(slice(None), *target.T)] = destination_mean[:, None] + (lesion - source_mean[:, None])
        pasted[i][tuple(target.T)] = source_label[j][tuple(voxels.T)]
    return PastedBatch(image=out, label=pasted)


def paste_into_labeled(
    image: torch.Tensor,
    label: torch.Tensor,
    lesion_classes: Sequence[int],
    host_classes: Sequence[int],
    chosen: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labeled patches with the lesions of a labeled patch of the batch pasted on their ground-truth host organ.

    ``data.labeled_lesion_paste``: the same paste as :func:`paste_lesions`, the host read from each
    patch's own labels, the pasted voxels relabelled as the lesion (existing lesions are not host voxels,
    so they stay as they are).

    Args:
        image: ``(B, C, *spatial)`` labeled patches.
        label: ``(B, 1, *spatial)`` their classes.
        lesion_classes, host_classes: as for :func:`paste_lesions`.
        chosen: bool ``(B,)``, which patches receive a lesion.
        generator: CPU generator for the draws (the global one if ``None``).

    Returns:
        ``(image, label)`` of the same shapes and dtypes.
    """
    classes = label[:, 0].long()
    host = torch.isin(classes, torch.as_tensor(list(host_classes), device=classes.device))
    pasted = paste_lesions(image, host, image, classes, lesion_classes, host_classes, chosen, generator)
    classes = torch.where(pasted.label != NOT_PASTED, pasted.label, classes)
    return pasted.image, classes.unsqueeze(1).to(label.dtype)
