"""Which scans to label next: rank unlabeled scans by the teacher's doubt and teacher-student disagreement.

For each unlabeled scan, the deployed teacher (``teacher.pt``) and the run's final student
(``student.*`` of ``checkpoints/last.ckpt``, loaded with ``weights_only=True``) segment it exactly as
``medeman infer`` does (model preprocessing, Gaussian sliding windows, inversion to the scan's grid).
On the scan's own grid, :mod:`medeman.rank_scores` computes the teacher's entropy, the flip variance
(``--tta``), the teacher-student disagreement and the predicted volumes; a strategy orders the scans.
A model without a teacher-student pair (``ssl.method: supervised``, whose ``teacher.pt`` is its
student) gets no disagreement scores: they are left out (``nan``), with a note that says so.

Outputs in ``--out``::

    ranking.csv             one row per scan, sorted, rank first, every score
    uncertainty/<case>.nii.gz   (--maps) the teacher's normalized entropy, in the scan's geometry
    png/<rank>_<case>.png   (--png) top-K: most uncertain slice per plane, teacher contours, heat map

Typical use::

    rows, failed = rank_cases("runs/demo", "sample_data/unlabeled", "runs/demo/rank", top=8, png=True)
"""

from __future__ import annotations

import argparse
import csv
import math
import pickle
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medeman.checkpoint import ModelFileError, load_error_reason, load_teacher
from medeman.classes import class_names, class_title
from medeman.data.readers import read_geometry, read_volume, voxel_spacing, write_volume
from medeman.data.transforms import preprocessing
from medeman.cases import SUFFIXES, Case, CaseError, find_cases, one_line, prepare_output_dir, preprocess_case
from medeman.labels import argmax_labels
from medeman.methods import METHODS, TeacherMethod
from medeman.outputs import uncertainty_path
from medeman.postprocess import apply_postprocessing, class_scales, scale_classes
from medeman.nets import build_network
from medeman.predict import TTA_FLIPS, invert_to_input, predict_volume
from medeman.rank_scores import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    disagreement_scores,
    diverse_order,
    entropy_scores,
    flip_variance,
    normalized_entropy,
    strategy_scores,
    volume_scores,
)
from medeman.threads import apply_threads, choose_threads
from medeman.typed_config import Config, as_config

OUTPUTS = ("ranking.csv", "uncertainty", "png")
DISAGREEMENT_COLUMNS = (
    "disagree_c*",
    "argmax_differs",
)  # need a teacher-student pair (rank_scores.disagreement_scores)


@dataclass
class ScanScores:
    """One scan's scores (``values``: column -> number) and what the pictures and ``--diverse`` need."""

    case_id: str
    file: Path
    values: dict[str, float]
    embedding: np.ndarray
    maps: Path | None = None  # npz with the entropy map and teacher mask, for the pictures
    source: str = ""  # what ranking.csv names: the file, or a DICOM series' folder and number


# --------------------------------------------------------------------------- models


def load_student(model: str | Path, cfg: Config | dict, device: str | torch.device = "cpu") -> nn.Module | None:
    """The run's final student from ``checkpoints/last.ckpt`` beside ``teacher.pt``, or None when there is none.

    Raises:
        ModelFileError: the checkpoint does not load with ``weights_only=True`` or its student does
            not fit the teacher's config.
    """
    folder = Path(model) if Path(model).is_dir() else Path(model).parent
    path = folder / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        raise ModelFileError(
            f"{path}: refused: not a checkpoint that loads safely with weights_only=True ({load_error_reason(err)})"
        ) from None
    state = payload.get("state_dict", {}) if isinstance(payload, dict) else {}
    weights = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    if not weights:
        raise ModelFileError(f"{path}: no student weights (student.*) in this checkpoint")
    net = build_network(cfg)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        raise ModelFileError(
            f"{path}: the student does not fit the teacher's config: {str(err).splitlines()[0]}"
        ) from None
    return net.to(device).eval()


class _Mirrored(nn.Module):
    """``net`` applied to a mirrored input, its output mirrored back: one test-time flip as a network."""

    def __init__(self, net: nn.Module, dims: tuple[int, ...]):
        super().__init__()
        self.net, self.dims = net, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flip(self.dims)).flip(self.dims) if self.dims else self.net(x)


def bottleneck_module(net: nn.Module, cfg: Config | dict) -> nn.Module:
    """The sub-module whose output has the coarsest grid (most channels on ties): the network's bottleneck.

    Found by one forward pass of a zero patch, so it works for every network of :mod:`medeman.nets`.
    """
    data = as_config(cfg).data
    patch = [int(s) for s in data.patch_size]
    found: list[tuple[int, int, int, nn.Module]] = []
    hooks = []
    for order, (_, module) in enumerate(net.named_modules()):

        def record(mod, inputs, output, order=order):
            if isinstance(output, torch.Tensor) and output.ndim == 5:
                found.append((int(np.prod(output.shape[2:])), -int(output.shape[1]), order, mod))

        hooks.append(module.register_forward_hook(record))
    try:
        device = next(net.parameters()).device
        with torch.inference_mode():
            net(torch.zeros((1, data.in_channels, *patch), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return min(found, key=lambda item: item[:3])[3]


# --------------------------------------------------------------------------- one scan


def score_case(
    case: Case,
    teacher: nn.Module,
    student: nn.Module | None,
    cfg: Config | dict,
    transform,
    *,
    tta: bool = False,
    device: torch.device | str = "cpu",
    bottleneck: nn.Module | None = None,
    postprocessing: dict | None = None,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, np.ndarray]:
    """Scores of one scan on its own grid.

    Returns:
        ``(scores, entropy map, teacher mask, embedding)``: the maps on the scan's voxel grid; the
        embedding is the bottleneck output of the teacher, averaged over space and windows.

    Raises:
        CaseError: the scan cannot be read, has the wrong channels, or does not come back on its grid.
    """
    image = preprocess_case(case, cfg, transform)

    pooled: list[torch.Tensor] = []
    hook = (
        bottleneck.register_forward_hook(lambda m, i, out: pooled.append(out.float().mean(dim=(2, 3, 4)).cpu()))
        if bottleneck
        else None
    )
    try:
        if tta:  # each mirroring separately, for the variance across them; their mean is infer --tta
            flips = torch.stack(
                [predict_volume(_Mirrored(teacher, dims), image, cfg, device=device) for dims in TTA_FLIPS]
            )
            channels = [flips.mean(dim=0), flip_variance(flips)[None]]
        else:
            channels = [predict_volume(teacher, image, cfg, device=device)]
    finally:
        if hook is not None:
            hook.remove()
    num_classes = channels[0].shape[0]
    if student is not None:
        channels.append(predict_volume(student, image, cfg, tta, device=device))
    # one inversion for all maps: linear resampling keeps probabilities summing to one
    maps = invert_to_input(torch.cat([c.cpu() for c in channels]), image, transform)
    shape, affine = read_geometry(case.files[0])
    if tuple(maps.shape[1:4]) != shape:
        raise CaseError(f"{case.source}: prediction came back as {tuple(maps.shape[1:])}, not the scan's {shape}")
    teacher_probs = maps[:num_classes]
    teacher_mask = argmax_labels(scale_classes(teacher_probs, class_scales(postprocessing)), dim=0)
    if postprocessing:  # the mask infer would write: scores measure the structures a user would get
        cleaned = apply_postprocessing(teacher_mask.numpy(), postprocessing, float(np.prod(voxel_spacing(affine))))
        teacher_mask = torch.from_numpy(cleaned)
    entropy = normalized_entropy(teacher_probs)
    scores = entropy_scores(entropy, teacher_mask)
    if tta:
        variance = maps[num_classes]
        foreground = teacher_mask > 0
        scores["tta_variance_fg"] = float(variance[foreground].mean()) if bool(foreground.any()) else math.nan
        scores["tta_variance_mean"] = float(variance.mean())
    if student is not None:
        student_mask = argmax_labels(maps[-num_classes:], dim=0)
        scores.update(disagreement_scores(teacher_mask, student_mask, num_classes))
    else:
        scores.update({f"disagree_c{c}": math.nan for c in range(1, num_classes)}, argmax_differs=math.nan)
    scores.update(volume_scores(teacher_mask, voxel_spacing(affine), num_classes))
    embedding = torch.cat(pooled).mean(dim=0).numpy() if pooled else np.zeros(0)
    return scores, entropy, teacher_mask, embedding


# --------------------------------------------------------------------------- a pool of scans


def rank_cases(
    model: str | Path | tuple[nn.Module, dict],
    unlabeled: str | Path | Sequence[str | Path],
    out_dir: str | Path | None,
    *,
    student: nn.Module | None = None,
    strategy: str = DEFAULT_STRATEGY,
    top: int = 10,
    tta: bool = False,
    maps: bool = False,
    png: bool = False,
    diverse: bool = False,
    diversity_penalty: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[str]]:
    """Score every scan of ``unlabeled``, rank them and write ``ranking.csv`` (and maps, pictures) to ``out_dir``.

    Args:
        model: a run folder or ``teacher.pt`` (the student is read from the run's
            ``checkpoints/last.ckpt``), or an already loaded ``(teacher, config)`` pair (then pass
            ``student`` yourself).
        unlabeled: a folder of scans (searched recursively), one scan, or a list of files.
        out_dir: where the outputs go; None writes nothing (``maps`` and ``png`` need a folder).
        strategy: a name of :data:`medeman.rank_scores.STRATEGIES`.
        top: how many scans get a picture (and are picked with ``diverse``).
        tta: teacher probabilities averaged over the 8 mirrorings, plus their variance.
        maps: write ``uncertainty/<case>.nii.gz`` (normalized entropy, float32, the scan's geometry).
        png: one picture per top-``top`` scan in ``png/``.
        diverse: pick the top ``top`` greedily with a penalty on feature similarity
            (:func:`medeman.rank_scores.diverse_order`).
        seed: the ``random`` strategy's seed.
        overwrite: replace earlier outputs in ``out_dir``.

    Returns:
        ``(rows, problems)``: one dict per ranked scan in rank order (``rank``, ``case``,
        ``score``, every score, ``file``), and a one-line message per scan that could not be scored.

    Raises:
        ModelFileError: ``model`` is not a medeman teacher, or its checkpoint's student does not load.
        FileNotFoundError, ValueError: bad ``unlabeled`` or options, or outputs exist without ``overwrite``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if top < 1:
        raise ValueError(f"top {top}: must be at least 1")
    if (maps or png) and out_dir is None:
        raise ValueError("maps and pictures need an output folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(model, (str, Path)):
        teacher, cfg, payload = load_teacher(model, device)
        cfg = as_config(cfg)
        rules = payload["extra"].get("postprocessing")
        method = cfg.ssl.method
        if not issubclass(METHODS.get(method, TeacherMethod), TeacherMethod):  # its teacher.pt is the student itself
            student = None
            tqdm.write(
                f"note: {model}: a {method} model has no teacher-student pair, so the disagreement scores "
                f"({', '.join(DISAGREEMENT_COLUMNS)}) need one and are left out",
                file=sys.stderr,
            )
        else:
            student = load_student(model, cfg, device)
            if student is None:
                tqdm.write(
                    f"warning: {model}: no checkpoints/last.ckpt, so no student: the disagreement scores "
                    f"({', '.join(DISAGREEMENT_COLUMNS)}) are left out",
                    file=sys.stderr,
                )
    else:
        teacher, cfg = model
        rules = None
        teacher = teacher.to(device).eval()
        student = student.to(device).eval() if student is not None else None
    if strategy == "disagreement" and student is None:
        raise ValueError(
            "strategy 'disagreement' needs the run's student (checkpoints/last.ckpt of a run with a teacher-student pair)"
        )
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        _prepare(out, overwrite)
    skipped: list[str] = []
    cfg = as_config(cfg)
    cases, problems = find_cases(unlabeled, cfg.data.in_channels, skipped=skipped)
    for message in skipped:
        tqdm.write(f"skipped: {message}", file=sys.stderr)
    for message in problems:
        tqdm.write(f"error: {message}", file=sys.stderr)
    transform = preprocessing(cfg, keys=("image",))
    bottleneck = bottleneck_module(teacher, cfg)

    scored: list[ScanScores] = []
    with tempfile.TemporaryDirectory(prefix="medeman-rank-") as scratch:
        bar = tqdm(cases, desc="rank", unit="scan", disable=not progress, file=sys.stderr)
        for case in bar:
            bar.set_postfix_str(case.case_id)
            try:
                values, entropy, mask, embedding = score_case(
                    case,
                    teacher,
                    student,
                    cfg,
                    transform,
                    tta=tta,
                    device=device,
                    bottleneck=bottleneck,
                    postprocessing=rules,
                )
            except CaseError as err:
                problems.append(str(err))
                tqdm.write(f"error: {err}", file=sys.stderr)
                continue
            except Exception as err:  # one bad scan must not stop the others
                problems.append(f"{case.source}: {one_line(err)}")
                tqdm.write(f"error: {problems[-1]}", file=sys.stderr)
                continue
            item = ScanScores(case.case_id, case.files[0], values, embedding, source=case.source)
            if maps:  # on the scan's grid, with its header when it is NIfTI
                write_volume(entropy.numpy().astype(np.float32), case.files[0], uncertainty_path(out, case.case_id))
            if png:  # kept on disk, not in memory: a pool may hold hundreds of full-size scans
                item.maps = Path(scratch) / f"{len(scored)}.npz"
                np.savez(item.maps, entropy=entropy.numpy().astype(np.float16), mask=mask.numpy())
            scored.append(item)

        rows = _order(scored, strategy, top, diverse, diversity_penalty, seed)
        if out is not None:
            write_ranking(rows, out / "ranking.csv")
        if png:
            by_case = {s.case_id: s for s in scored}
            for row in rows[:top]:
                _draw(row, by_case[row["case"]], out / "png", class_names(cfg))
    return rows, problems


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse to replace earlier outputs unless ``overwrite``; with it, remove them (never other files)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder; choose another --out")
    existing = [out / name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace the earlier ranking in {out}")
    prepare_output_dir(out)  # before anything is removed: a folder we cannot write to keeps the earlier ranking
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _order(scored: list[ScanScores], strategy: str, top: int, diverse: bool, penalty: float, seed: int) -> list[dict]:
    """Rows in rank order: by strategy score, or a diverse pick of the first ``top`` then by score."""
    if not scored:
        return []
    values = [s.values for s in scored]
    score = strategy_scores(values, strategy, seed)
    if diverse:
        order, similarity = diverse_order(score, np.stack([s.embedding for s in scored]), top, penalty)
    else:
        order, similarity = [int(i) for i in np.argsort(-score, kind="stable")], [math.nan] * len(scored)
    rows = []
    for rank, i in enumerate(order, start=1):
        row = {"rank": rank, "case": scored[i].case_id, "score": float(score[i]), **scored[i].values}
        if diverse:
            row["similarity"] = similarity[i]
        row["file"] = scored[i].source or str(scored[i].file)
        rows.append(row)
    return rows


def write_ranking(rows: list[dict], path: str | Path) -> Path:
    """Write the rows as CSV (floats with 6 significant digits, NaN as ``nan``)."""
    path = Path(path)
    columns = list(rows[0]) if rows else ["rank", "case", "score", "file"]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns])
    return path


# --------------------------------------------------------------------------- pictures


def _draw(row: dict, item: ScanScores, png_dir: Path, names: dict[int, str]) -> Path:
    saved = np.load(item.maps)
    image, affine = read_volume(item.file)
    if image.ndim == 4:
        image = image[..., 0]
    title = f"#{row['rank']} {row['case']}   score {row['score']:.3f}   entropy {row['entropy_mean']:.3f} (foreground {row['entropy_fg']:.3f})"
    if not math.isnan(row["argmax_differs"]):
        title += f"   teacher and student differ on {row['argmax_differs']:.2%} of voxels"
    return save_uncertainty_figure(
        png_dir / f"{row['rank']:03d}_{row['case']}.png",
        image,
        saved["mask"],
        saved["entropy"].astype(np.float32),
        affine,
        title,
        names,
    )


def save_uncertainty_figure(
    path: str | Path,
    image: np.ndarray,
    mask: np.ndarray,
    uncertainty: np.ndarray,
    affine: np.ndarray,
    title: str = "",
    names: dict[int, str] | None = None,
) -> Path:
    """A PNG of the most uncertain axial, coronal and sagittal slice: scan, uncertainty heat map, teacher contours.

    Each plane is cut where the summed uncertainty over that slice is highest, so the picture shows
    where the radiologist's time matters; orientation and aspect as in :mod:`medeman.visualize`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from medeman.visualize import COLOURS, _views, to_ras

    img, (sx, sy, sz) = to_ras(np.asarray(image, dtype=np.float32), affine)
    seg = to_ras(np.asarray(mask), affine)[0]
    unc = to_ras(np.asarray(uncertainty, dtype=np.float32), affine)[0]
    centre = tuple(int(np.argmax(unc.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    classes = sorted(int(c) for c in np.unique(seg) if c != 0)
    low, high = np.percentile(img, [0.5, 99.5])

    fig = Figure(figsize=(13, 5.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    aspects = (sy / sx, sz / sx, sz / sy)
    view_titles = (f"axial z={centre[2]}", f"coronal y={centre[1]}", f"sagittal x={centre[0]}")
    heat = None
    for ax, name, aspect, under, u, s in zip(
        axes, view_titles, aspects, _views(img, centre), _views(unc, centre), _views(seg, centre)
    ):
        ax.imshow(
            under, cmap="gray", vmin=low, vmax=high if high > low else low + 1, aspect=aspect, interpolation="nearest"
        )
        # near-zero doubt is left transparent so the anatomy stays readable
        heat = ax.imshow(
            np.ma.masked_less(u, 0.05),
            cmap="inferno",
            vmin=0.0,
            vmax=1.0,
            alpha=0.65,
            aspect=aspect,
            interpolation="nearest",
        )
        for i, c in enumerate(classes):
            if (s == c).any():
                ax.contour(s == c, levels=[0.5], colors=[COLOURS[i % len(COLOURS)]], linewidths=1.4)
        ax.set_title(name)
        ax.set_axis_off()
    handles = [
        Line2D([], [], color=COLOURS[i % len(COLOURS)], label=f"{class_title(c, names)} teacher")
        for i, c in enumerate(classes)
    ]
    if handles:
        fig.legend(handles=handles, loc="lower left", ncol=len(handles), frameon=False)
    bar_axes = fig.add_axes((0.55, 0.11, 0.35, 0.025))
    fig.colorbar(heat, cax=bar_axes, orientation="horizontal", label="teacher entropy / log C")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.2, wspace=0.03)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medeman rank",
        description="Rank unlabeled scans for annotation by the teacher's doubt and teacher-student disagreement.",
        epilog="strategies: " + "; ".join(f"{name}: {text}" for name, (_, text) in STRATEGIES.items()),
    )
    parser.add_argument(
        "--model", required=True, help="run folder with teacher.pt (and checkpoints/last.ckpt for the student)"
    )
    parser.add_argument("--unlabeled", required=True, help=f"folder of scans ({', '.join(SUFFIXES)}) or one scan")
    parser.add_argument("--out", required=True, help="folder for ranking.csv, uncertainty/ and png/")
    parser.add_argument("--top", type=int, default=10, help="scans to draw (and to pick with --diverse) (default: 10)")
    parser.add_argument(
        "--strategy",
        choices=tuple(STRATEGIES),
        default=DEFAULT_STRATEGY,
        help=f"ranking rule (default: {DEFAULT_STRATEGY})",
    )
    parser.add_argument(
        "--tta", action="store_true", help="teacher over the 8 mirrorings; adds the flip variance (8x slower)"
    )
    parser.add_argument("--maps", action="store_true", help="write uncertainty/<case>.nii.gz in each scan's geometry")
    parser.add_argument("--png", action="store_true", help="one picture per top-K scan in png/")
    parser.add_argument(
        "--diverse",
        action="store_true",
        help="top K without near-copies: penalise feature similarity to scans already picked",
    )
    parser.add_argument("--diversity-penalty", type=float, default=1.0, help="weight of that penalty (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --strategy random (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier ranking in --out")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: OMP_NUM_THREADS, else the available cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``medeman rank``: 0 when every scan was ranked, 1 when any failed, 2 on a bad model, input or option."""
    args = build_parser().parse_args(argv)
    try:
        apply_threads(choose_threads(args.threads))
        rows, problems = rank_cases(
            args.model,
            args.unlabeled,
            args.out,
            strategy=args.strategy,
            top=args.top,
            tta=args.tta,
            maps=args.maps,
            png=args.png,
            diverse=args.diverse,
            diversity_penalty=args.diversity_penalty,
            seed=args.seed,
            overwrite=args.overwrite,
            device=None if args.device == "auto" else args.device,
            progress=not args.no_progress,
        )
    except (ModelFileError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows and not problems:
        print(f"error: {args.unlabeled}: no scans found ({', '.join(SUFFIXES)})", file=sys.stderr)
        return 1
    print(
        f"rank: {len(rows)} scans ranked by {args.strategy}{' (diverse)' if args.diverse else ''}, {len(problems)} failed"
        f" -> {Path(args.out) / 'ranking.csv'}"
    )
    for row in rows[: args.top]:
        differs = (
            f"  argmax_differs {row['argmax_differs']:.4f}"
            if math.isfinite(row.get("argmax_differs", math.nan))
            else ""
        )
        print(
            f"  {row['rank']:>3}  {row['case']:<24} score {row['score']:.3f}  entropy_mean {row['entropy_mean']:.4f}"
            f"  entropy_fg {row['entropy_fg']:.3f}{differs}"
        )
    for message in problems:
        print(f"  failed: {message}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
