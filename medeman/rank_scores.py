"""Per-scan scores of a model's doubt, and the strategies that turn them into an annotation order.

Every score is computed from class probabilities and class maps on one scan's voxel grid:

- **predictive entropy** of the teacher, ``H(p) = -Σ_c p_c log p_c`` divided by ``log C`` so that it
  lies in ``[0, 1]`` whatever the number of classes (Shannon 1948; as an acquisition score,
  Settles 2009, "Active Learning Literature Survey", §3.1), averaged over the teacher's predicted
  foreground (``entropy_fg``: doubt about the organs, not diluted by easy air) and over the whole scan;
- **flip variance**: the variance of each class probability across the 8 test-time mirrorings,
  averaged over classes (a cheap stand-in for MC-dropout variance; Gal & Ghahramani, ICML 2016);
- **teacher-student disagreement**: ``1 - Dice`` of their masks per foreground class and the
  fraction of voxels whose argmax differs (query by committee with a committee of two, Seung et al.,
  COLT 1992; the mean teacher's two networks disagree exactly where training has not settled);
- **predicted volume** per class in millilitres, so empty or implausible predictions stand out.

A strategy maps the score rows of a pool to one number per scan, higher = label first
(:data:`STRATEGIES`); :func:`diverse_order` re-orders the top of a ranking so that it does not
hold near-copies (a greedy form of core-set selection, Sener & Savarese, ICLR 2018).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import rankdata


def normalized_entropy(probs: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Shannon entropy of class probabilities along ``dim``, divided by ``log C`` (so in ``[0, 1]``).

    Args:
        probs: probabilities that sum to 1 along ``dim`` (e.g. ``(C, X, Y, Z)`` softmax).
        dim: the class axis.

    Returns:
        The entropy map, ``probs`` without ``dim``; ``0 log 0`` counts as 0.
    """
    num_classes = probs.shape[dim]
    p = probs.float().clamp_min(0)
    terms = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros((), dtype=p.dtype))
    return -terms.sum(dim) / math.log(num_classes)


def entropy_scores(entropy: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Mean entropy over the predicted foreground (``labels > 0``) and over the whole scan.

    ``entropy_fg`` is NaN when nothing is predicted as foreground: there is no organ to be unsure
    about, which :func:`strategy_scores` treats as the strongest reason to look at the scan.
    """
    foreground = labels > 0
    fg = float(entropy[foreground].mean()) if bool(foreground.any()) else math.nan
    return {"entropy_fg": fg, "entropy_mean": float(entropy.mean())}


def flip_variance(flip_probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel variance across mirrorings, averaged over classes.

    Args:
        flip_probs: ``(F, C, X, Y, Z)`` probabilities of the same scan under ``F`` mirrorings, each
            flipped back to the scan's orientation.

    Returns:
        ``(X, Y, Z)``: ``mean_c Var_f p_{f,c}`` (population variance, divides by ``F``).
    """
    return flip_probs.float().var(dim=0, unbiased=False).mean(dim=0)


def disagreement_scores(teacher: torch.Tensor, student: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``1 - Dice`` of the teacher's and the student's mask for each foreground class, and the argmax-differs fraction.

    Two empty masks of a class agree (``1 - Dice = 0``): neither network sees that organ.

    Returns:
        ``{"disagree_c1": ..., ..., "argmax_differs": ...}``.
    """
    if teacher.shape != student.shape:
        raise ValueError(f"teacher mask {tuple(teacher.shape)} and student mask {tuple(student.shape)} differ in shape")
    out = {}
    for c in range(1, num_classes):
        t, s = teacher == c, student == c
        total = int(t.sum()) + int(s.sum())
        out[f"disagree_c{c}"] = 0.0 if total == 0 else 1.0 - 2.0 * int((t & s).sum()) / total
    out["argmax_differs"] = float((teacher != student).float().mean())
    return out


def volume_scores(labels: torch.Tensor, spacing: Sequence[float], num_classes: int) -> dict[str, float]:
    """Predicted volume of each foreground class in millilitres (``voxels × voxel volume in mm³ / 1000``)."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return {f"volume_ml_c{c}": int((labels == c).sum()) * voxel_ml for c in range(1, num_classes)}


# --------------------------------------------------------------------------- strategies


def rank_fraction(values: Sequence[float]) -> np.ndarray:
    """Each value's rank among ``values`` scaled to ``[0, 1]`` (ties share their mean rank; NaN counts as the largest).

    Rank scores combine scores of different scales without weights to tune (a Borda count).
    """
    v = np.asarray(values, dtype=float)
    if v.size <= 1:
        return np.ones(v.size)
    v = np.where(np.isnan(v), np.inf, v)
    return (rankdata(v, method="average") - 1.0) / (v.size - 1.0)


def _disagreement(row: Mapping[str, float]) -> float:
    values = [v for k, v in row.items() if k.startswith("disagree_c")]
    return float(np.mean(values)) if values else math.nan


def _entropy(rows: Sequence[Mapping[str, float]], rng: np.random.Generator) -> np.ndarray:
    values = np.array([r["entropy_fg"] for r in rows], dtype=float)
    return np.where(np.isnan(values), np.inf, values)  # no foreground found: look at it first


def _disagreement_strategy(rows: Sequence[Mapping[str, float]], rng: np.random.Generator) -> np.ndarray:
    values = np.array([_disagreement(r) for r in rows], dtype=float)
    if np.isnan(values).all():
        raise ValueError("strategy 'disagreement' needs the run's student (checkpoints/last.ckpt), which was not found")
    return values


def _combined(rows: Sequence[Mapping[str, float]], rng: np.random.Generator) -> np.ndarray:
    # Whole-scan entropy, not the foreground's: a teacher that is confidently wrong on an unseen
    # scanner over-segments with low entropy inside its mask but is unsure around it; in the pilot
    # (benchmarks/results/active_learning_scores.md) this pair tracked the true error best and most stably.
    entropy = rank_fraction([r["entropy_mean"] for r in rows])
    disagreement = np.array([_disagreement(r) for r in rows], dtype=float)
    if np.isnan(disagreement).all():  # no student: the entropy alone
        return entropy
    return (entropy + rank_fraction(disagreement)) / 2.0


def _random(rows: Sequence[Mapping[str, float]], rng: np.random.Generator) -> np.ndarray:
    return rng.random(len(rows))


# name -> (function(rows, rng) -> score per row, higher = label first; one-line meaning for --help and the README)
STRATEGIES: dict[str, tuple[Callable[[Sequence[Mapping[str, float]], np.random.Generator], np.ndarray], str]] = {
    "combined": (
        _combined,
        "mean of the rank fractions of entropy_mean (whole scan) and of the mean teacher-student 1-Dice",
    ),
    "entropy": (_entropy, "teacher's mean entropy over its predicted foreground (no foreground first)"),
    "disagreement": (_disagreement_strategy, "mean over classes of teacher-student 1-Dice"),
    "random": (_random, "a random order (seeded): the baseline every strategy must beat"),
}
DEFAULT_STRATEGY = "combined"


def strategy_scores(rows: Sequence[Mapping[str, float]], strategy: str = DEFAULT_STRATEGY, seed: int = 0) -> np.ndarray:
    """One score per row (higher = label first) by the named strategy of :data:`STRATEGIES`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    return np.asarray(STRATEGIES[strategy][0](rows, np.random.default_rng(seed)), dtype=float)


def diverse_order(
    scores: Sequence[float], embeddings: np.ndarray, k: int, penalty: float = 1.0
) -> tuple[list[int], list[float]]:
    """Greedy pick of ``k`` scans by score, penalising similarity to scans already picked.

    Each step takes the scan maximising ``rank_fraction(score) - penalty * max(0, max_j cos(e, e_j))``
    over the picked scans ``j``; embeddings are centred on the pool mean first, because pooled ReLU
    features of any two scans are nearly parallel (cosine ~0.9) and only their deviations from the
    pool say which scans look alike. After the first ``k`` the rest follow by score.

    Args:
        scores: one per scan, higher = label first.
        embeddings: ``(N, D)`` feature vectors, one per scan.
        k: how many to pick greedily.
        penalty: weight of the similarity (0: plain ranking by score).

    Returns:
        ``(order, similarity)``: scan indices in pick order, and for each scan its highest cosine
        similarity to a scan picked before it (NaN for the first and for those after ``k``).
    """
    s = rank_fraction(scores)
    n = len(s)
    e = np.asarray(embeddings, dtype=float)
    if e.shape[0] != n:
        raise ValueError(f"{e.shape[0]} embeddings for {n} scores")
    e = e - e.mean(axis=0, keepdims=True)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    cos = e @ e.T
    order: list[int] = []
    similarity = [math.nan] * n
    closest = np.full(n, -np.inf)  # each scan's highest similarity to a picked one
    for _ in range(min(k, n)):
        gain = s - penalty * np.clip(closest, 0.0, None)  # only likeness costs; unlike scans compete on score
        gain[order] = -np.inf
        pick = int(np.argmax(gain))
        if order:
            similarity[pick] = float(closest[pick])
        order.append(pick)
        closest = np.maximum(closest, cos[pick])
    rest = [i for i in np.argsort(-s, kind="stable") if i not in set(order)]
    return order + [int(i) for i in rest], similarity
