"""Class maps from per-class scores, fast on CPU.

``torch.argmax`` over the class axis of a ``(C, X, Y, Z)`` tensor is a strided reduction that runs
about 9x slower on CPU than comparing whole class volumes one after another (0.43 s vs 0.05 s for
3 x 160³ on one thread); the result is identical, ties going to the lower class as with argmax.
"""

from __future__ import annotations

import numpy as np
import torch


def argmax_labels(scores: torch.Tensor, dim: int = 0, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Index of the highest-scoring class along ``dim`` (first one on ties), as ``dtype``.

    Args:
        scores: probabilities or logits with classes along ``dim``.
        dim: the class axis.
        dtype: integer dtype of the result (uint8 holds up to 256 classes).
    """
    classes = scores.unbind(dim)
    best = classes[0].clone()
    labels = torch.zeros(best.shape, dtype=dtype, device=scores.device)
    for index, score in enumerate(classes[1:], start=1):
        better = score > best
        labels.masked_fill_(better, index)
        torch.maximum(best, score, out=best)
    return labels


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds class indices ``0..num_classes-1`` and NIfTI stores.

    ``uint8`` up to 256 classes (a quarter of the bytes of ``int32`` to write and compress),
    then ``int16``, then ``int32``.
    """
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 2**15 else torch.int32


def keep_largest_components(labels: torch.Tensor, keep: dict[int, int]) -> torch.Tensor:
    """``labels`` (one label map, any spatial rank) with each class ``c`` cut to its ``keep[c]`` largest components.

    Voxels of dropped components become background (0). Components are face-connected
    (``scipy.ndimage.label``'s default structure); ties in size keep the component found first.
    A class with ``keep[c] <= 0`` or absent from ``keep`` is left as it is.
    """
    from scipy import ndimage  # a runtime dependency; imported here to keep this module light

    array = labels.detach().cpu().numpy()
    out = array.copy()
    for cls, k in keep.items():
        if k <= 0:
            continue
        components, count = ndimage.label(array == cls)
        if count <= k:
            continue
        sizes = np.bincount(components.ravel())[1:]
        kept = np.zeros(count + 1, dtype=bool)
        kept[1 + np.argsort(-sizes, kind="stable")[:k]] = True
        out[(components > 0) & ~kept[components]] = 0
    return torch.from_numpy(out).to(labels.device)
