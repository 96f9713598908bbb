"""Unlabeled patches where the small structures are: the teacher's rare-class voxels become crop centres.

A random unlabeled patch seldom holds a lesion, so the consistency and pseudo-label losses are
spent on background and large organs. :class:`TeacherFocus` refreshes, every
``data.unlabeled_focus_every_fraction`` of the run (or ``data.unlabeled_focus_every_steps``
optimizer steps where given; :func:`medeman.schedules.run_schedule`), the crop centres of
:class:`medeman.data.sampling.RandFocusCropd`: the teacher segments every cached unlabeled volume
(sliding window without overlap, at the training resolution the network was trained at), and on
a grid of stride ``data.unlabeled_focus_stride`` the voxels it assigns to the focus classes
(``data.unlabeled_focus_classes``, default every foreground class) are kept; per scan, up to
:attr:`FocusCentres.capacity` centres are drawn with the class uniform among the focus classes
the teacher predicts there, then a voxel of that class uniformly. So a class predicted in 0.1 %
of a scan gets the same share of focused patches as a large one.

The same pass measures the teacher's mean probability per class over the whole unlabeled scans,
which a method that asks for it (:meth:`medeman.methods.base.Method.uses_unlabeled_frequencies`:
FixMatch's distribution alignment) receives with the labeled scans' class frequencies; for such
a method the pass runs even without focused crops.

Cost: no per-step work beyond one random draw in the loader; every N steps one teacher pass over
the unlabeled volumes (about ``volume / patch`` windows per scan) in the training process, logged
as ``focus/refresh_seconds``; divided by N it is the amortized cost per step. Before the first
refresh, or for a scan with no focus class predicted, the patch is random.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medeman.labels import argmax_labels
from medeman.nets import main_output
from medeman.schedules import run_schedule
from medeman.typed_config import Config, as_config


def focus_centres(
    labels: torch.Tensor, classes: list[int], count: int, stride: int, rand: np.random.RandomState
) -> np.ndarray:
    """Up to ``count`` voxel coordinates on the predicted ``classes`` of one label map, on a ``stride`` grid.

    The class of each centre is uniform among the ``classes`` present on the grid, then the voxel
    is uniform among that class's grid voxels.

    Args:
        labels: ``(X, Y, Z)`` integer class map.
        classes: the focus classes.
        count: centres to draw.
        stride: grid stride in voxels (the map is read at ``labels[::s, ::s, ::s]``).
        rand: random state.

    Returns:
        ``(N, 3)`` int array in ``labels``' coordinates, ``N = count``, or 0 when no focus class is predicted.
    """
    grid = labels[::stride, ::stride, ::stride]
    locations = [torch.nonzero(grid == c) for c in classes]
    locations = [loc for loc in locations if len(loc)]
    if not locations:
        return np.zeros((0, 3), dtype=np.int64)
    picks = rand.randint(len(locations), size=count)
    rows = [locations[p][rand.randint(len(locations[p]))] for p in picks]
    return (torch.stack(rows) * stride).cpu().numpy()


class TeacherFocus(pl.Callback):
    """Every ``RunSchedule.focus_every_steps`` steps, segment the unlabeled scans with the teacher: new crop centres
    and the class frequencies a method asks for.

    Needs the Trainer's DataModule to be an :class:`~medeman.data.SSLDataModule`; built with
    ``data.unlabeled_focus_fraction`` > 0 it holds ``focus``, the shared centres. Added by
    ``SSLSegModule.configure_callbacks``. Under DDP every rank refreshes its own copy. The centres,
    the step of the last refresh and the draw state are saved in checkpoints (:meth:`state_dict`),
    so a resumed run focuses from its first step instead of cropping at random until the next refresh.

    Args:
        cfg: resolved medeman config.
        seed: seed of the centre draws (default: ``train.seed``).
    """

    def __init__(self, cfg: Config | dict[str, Any], seed: int | None = None) -> None:
        self.cfg = cfg = as_config(cfg)
        data = cfg.data
        self.every = run_schedule(cfg).focus_every_steps
        self.stride = data.unlabeled_focus_stride
        self.classes = (
            list(data.unlabeled_focus_classes) if data.unlabeled_focus_classes else list(range(1, data.num_classes))
        )
        self.rand = np.random.RandomState(cfg.train.seed if seed is None else seed)
        self.last_refresh: int | None = None
        self.focus: Any = None  # the DataModule's shared centres, found at setup
        self.labeled_frequencies: torch.Tensor | None = None  # the labeled scans' class shares, measured once
        self._restored: dict[str, Any] | None = None  # a checkpoint's state, applied when training starts

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.focus = getattr(trainer.datamodule, "focus", None)

    def state_dict(self) -> dict[str, Any]:
        """The centres of the last refresh, its step and the draw state: a resumed run focuses from its first step."""
        _, keys, pos, has_gauss, gauss = self.rand.get_state()
        state: dict[str, Any] = {
            "last_refresh": self.last_refresh,
            "rand": torch.from_numpy(keys.astype(np.int64)),
            "rand_pos": int(pos),
            "rand_gauss": (int(has_gauss), float(gauss)),
        }
        if self.focus is not None:
            state.update(centres=self.focus.centres.clone(), counts=self.focus.counts.clone())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._restored = self._restored, None
        if state is None:
            return
        self.last_refresh = state.get("last_refresh")
        if "rand" in state:
            self.rand.set_state(
                ("MT19937", state["rand"].numpy().astype(np.uint32), state["rand_pos"], *state["rand_gauss"])
            )
        if self.focus is not None and "centres" in state and state["centres"].shape == self.focus.centres.shape:
            self.focus.centres.copy_(state["centres"])  # in place: loader workers share these tensors
            self.focus.counts.copy_(state["counts"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step != self.last_refresh:
            self.last_refresh = step  # with gradient accumulation several batches end on one step
            seconds, focused = self.refresh(trainer.datamodule, pl_module.teacher, pl_module.device, pl_module.method)
            pl_module.log_dict(
                {"focus/refresh_seconds": seconds, "focus/scans_with_centres": float(focused)},
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    @torch.no_grad()
    def refresh(
        self, datamodule: Any, teacher: torch.nn.Module, device: torch.device, method: Any = None
    ) -> tuple[float, int]:
        """Re-segment every unlabeled scan with ``teacher``: store new centres and, for a ``method`` that uses them, pass
        it the class frequencies; return (seconds, scans with centres)."""
        focus = getattr(datamodule, "focus", None)
        frequencies = method is not None and method.uses_unlabeled_frequencies()
        if focus is None and not frequencies:
            return 0.0, 0
        start, focused = time.perf_counter(), 0
        roi = [int(s) for s in self.cfg.data.patch_size]
        # summed on the device: one copy to the host after the pass, not one per scan (MPS has no float64: float32 there)
        sum_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        probability_sum, voxels = torch.zeros(self.cfg.data.num_classes, dtype=sum_dtype, device=device), 0
        was_training = teacher.training
        teacher.eval()  # deep-supervision heads off, dropout off; EMAN layers use their statistics anyway
        try:
            for index in range(datamodule.num_unlabeled):
                image = datamodule.preprocessed_unlabeled(index).to(device)[None].float()
                logits = sliding_window_inference(
                    image, roi, self.cfg.infer.sw_batch_size, lambda x: main_output(teacher(x)), overlap=0.0
                )
                if frequencies:
                    probability_sum += torch.softmax(logits.float(), dim=1)[0].flatten(1).sum(1).to(sum_dtype)
                    voxels += logits[0, 0].numel()
                if focus is not None:
                    labels = argmax_labels(logits, dim=1, dtype=torch.long)[0]
                    centres = focus_centres(labels, self.classes, focus.capacity, self.stride, self.rand)
                    focus.set(index, centres)
                    focused += int(len(centres) > 0)
        finally:
            teacher.train(was_training)
        if frequencies and voxels:
            if self.labeled_frequencies is None:
                self.labeled_frequencies = datamodule.labeled_class_frequencies()
            method.set_unlabeled_frequencies(self.labeled_frequencies.to(device), (probability_sum / voxels).float())
        return time.perf_counter() - start, focused
