"""Class maps from per-class scores, fast on CPU.

``torch.argmax`` over the class axis of a ``(C, X, Y, Z)`` tensor is a strided reduction that runs
about 9x slower on CPU than comparing whole class volumes one after another (0.43 s vs 0.05 s for
3 x 160³ on one thread); the result is identical, ties going to the lower class as with argmax.
"""

from __future__ import annotations

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
    return torch.int16 if num_classes <= 2 ** 15 else torch.int32
