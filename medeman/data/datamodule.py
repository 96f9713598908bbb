"""The Lightning DataModule of semi-supervised training: labeled patches, unlabeled view pairs, whole validation volumes."""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate
from monai.transforms import Compose, RandomizableTrait, Transform
from torch.utils.data import RandomSampler

from medeman.data import transforms as tfm
from medeman.data.batches import StepLoader, StepSampler, stream_seed
from medeman.data.checks import Cohort, gather_cohort, raise_problems
from medeman.data.discovery import has_unlabeled_list, split_cases, write_split
from medeman.data.sampling import FocusCentres
from medeman.pseudo_labels import class_shares
from medeman.typed_config import Config, Section, as_config


class CohortCache:
    """Cohorts prepared by one data module, taken by the next one built on the same folders, ``data:`` config and method.

    For tuning: :func:`medeman.tune.run_study` makes one per worker and hands it to every trial's
    data module, which would otherwise re-read and re-check every scan and rebuild its
    ``CacheDataset``. What is shared holds no training state (crop centres of the teacher focus
    are reset for each module), and the loaders are still made per module, seeded as in a fresh
    run. It lives as long as its owner holds it: nothing is kept process-wide.

    Examples:
        >>> cohorts = CohortCache()
        >>> first = SSLDataModule(cfg, "labeled", "unlabeled", run_dir="t0", cohorts=cohorts)
        >>> first.setup("fit")   # discovers, checks and preprocesses
        >>> second = SSLDataModule(cfg, "labeled", "unlabeled", run_dir="t1", cohorts=cohorts)
        >>> second.setup("fit")  # takes first's datasets
    """

    def __init__(self) -> None:
        self._cohorts: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._cohorts)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cohort prepared under ``key``, or None."""
        return self._cohorts.get(key)

    def put(self, key: str, cohort: dict[str, Any]) -> None:
        self._cohorts[key] = cohort


def preprocessing_digest(data: Section | Mapping[str, Any]) -> str:
    """Short hash of the ``data:`` config (less ``cache_dir``): names a disk cache, so a changed config never reads a stale one."""
    data = data.to_dict() if isinstance(data, Section) else data  # plain values: the same hash as the saved config's
    text = json.dumps({k: v for k, v in data.items() if k != "cache_dir"}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _method_views(cfg: Config) -> tuple[str, ...]:
    """The unlabeled views ``ssl.method`` trains on (the method object knows; see medeman.methods)."""
    from medeman.methods import build_method  # imported late: methods import the training stack

    return tuple(build_method(cfg).unlabeled_views)


def deterministic_view(dataset: Dataset) -> Dataset:
    """``dataset`` with its chain cut before the first random transform: items as its cache holds them.

    The cut is MONAI's own (a random transform, or a callable that is no ``Transform``), so a
    ``CacheDataset`` hands out its cached item and a ``PersistentDataset`` reads (or writes) its
    cached file, through their public ``__getitem__``: no scan is read again, no private cache is touched.
    A plain ``Dataset`` runs the deterministic part.
    """
    chain = dataset.transform
    first_random = chain.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    view = copy.copy(dataset)  # the cache is shared, the chain is not
    view.transform = Compose(chain.transforms[:first_random])
    return view


class SSLDataModule(pl.LightningDataModule):
    """Labeled and unlabeled training batches and whole validation volumes, from folders of scans.

    ``setup("fit")`` discovers and checks every case before any training step and raises one
    :class:`~medeman.data.DataError` listing every problem. Without a ``val`` folder the labeled
    cases are split deterministically (``data.val_fraction``, ``data.split_seed``) and the split is
    written to ``run_dir/split.json``.

    Training batches come as ``{"labeled": {"image", "label"}, "unlabeled": {"weak", "strong"}}``
    (only ``"labeled"`` for ``ssl.method: supervised`` or without unlabeled scans) from one loader
    whose workers make both halves of a step (:class:`~medeman.data.batches.StepLoader`; so
    ``data.num_workers`` processes in all). The patches of a step and their augmentations are a
    function of ``train.seed`` and the step only (:class:`~medeman.data.batches.StepSampler`), so
    validation, BatchNorm re-estimation, the number of workers and a resume never change them.
    An epoch is ``train.val_every_steps * train.accumulate_grad_batches`` batches, one validation
    interval. Under DDP, run the Trainer with ``use_distributed_sampler=False``: each rank then
    draws its own stream (seeded with ``train.seed`` and the rank).

    Args:
        cfg: resolved medeman config.
        labeled: labeled folder (``images/`` + ``labels/``) or Decathlon/nnU-Net dataset root.
        unlabeled: folder of unlabeled scans (searched recursively) or dataset root; ``None`` uses a
            dataset root's ``unlabeled`` list (or ``imagesTs`` with ``data.unlabeled_from_imagesTs``), if any.
        val: labeled validation folder; ``None`` splits ``labeled``.
        run_dir: where ``split.json`` (and the default disk cache) go.
        test: test cohort (labeled layout or a folder of images), never used as unlabeled scans
            (nor are copies of it, of the labeled and validation cases, and label maps; see
            :func:`medeman.data.checks.gather_cohort`). ``self.cohort.flagged`` lists what was left out.
        cohorts: a :class:`CohortCache` shared with other data modules (the trials of a tuning
            worker): a cohort another one prepared is taken from it, and the one prepared here is put in it.
        views: the unlabeled views the method trains on (``Method.unlabeled_views``, from the method
            object ``medeman train`` built); ``None`` asks ``ssl.method``'s.

    Examples:
        >>> dm = SSLDataModule(cfg, "sample_data/labeled", "sample_data/unlabeled", run_dir="runs/demo")
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["labeled"]["image"].shape, batch["unlabeled"]["weak"].shape
    """

    def __init__(
        self,
        cfg: Config | dict[str, Any],
        labeled: str | Path,
        unlabeled: str | Path | None = None,
        val: str | Path | None = None,
        run_dir: str | Path | None = None,
        test: str | Path | None = None,
        cohorts: CohortCache | None = None,
        views: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg = as_config(cfg)
        self.cohorts = cohorts
        self.views: tuple[str, ...] = tuple(views) if views is not None else _method_views(cfg)
        self.labeled = Path(labeled)
        self.unlabeled = Path(unlabeled) if unlabeled is not None else None
        self.val = Path(val) if val is not None else None
        self.test = Path(test) if test is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.cohort: Cohort | None = None  # every case found, what was left out of the unlabeled scans and why
        self.train_cases: list[dict] = []
        self.val_cases: list[dict] = []
        self.unlabeled_cases: list[dict] = []
        self._datasets: dict[str, Any] = {}
        self._loader: StepLoader | None = None
        self.focus: FocusCentres | None = None  # teacher-focused unlabeled crop centres (data.unlabeled_focus_fraction)

    @property
    def use_unlabeled(self) -> bool:
        """Whether training draws unlabeled batches: the method asks for unlabeled views and there are unlabeled scans."""
        return bool(self.views) and bool(self.unlabeled_cases)

    def discover(self) -> None:
        """Find and check every case; raise one DataError listing all problems."""
        cfg, data = self.cfg, self.cfg.data
        unlabeled = (
            self.unlabeled if self.unlabeled is not None or not has_unlabeled_list(self.labeled, cfg) else self.labeled
        )
        self.cohort = gather_cohort(cfg, self.labeled, unlabeled, self.val, self.test, check_unlabeled=bool(self.views))
        problems = self.cohort.problems
        raise_problems(problems, f"{len(problems)} problem(s) in the input data, found before training:")
        labeled, val, unlabeled = self.cohort.labeled, self.cohort.val, self.cohort.unlabeled
        if val is None:
            self.train_cases, self.val_cases = split_cases(labeled, data.val_fraction, data.split_seed)
            self._write_split()
        else:
            self.train_cases, self.val_cases = labeled, val
        self.unlabeled_cases = unlabeled

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        key = json.dumps(
            [
                str(self.labeled),
                str(self.unlabeled),
                str(self.val),
                str(self.test),
                self.cfg.ssl.method,
                self.cfg.data.to_dict(),
            ],
            sort_keys=True,
            default=str,
        )
        shared = self.cohorts.get(key) if self.cohorts is not None else None
        if shared is not None:
            self._share(shared)
            return
        self._setup()
        if self.cohorts is not None:
            self.cohorts.put(
                key,
                {
                    "train": self.train_cases,
                    "val": self.val_cases,
                    "unlabeled": self.unlabeled_cases,
                    "datasets": dict(self._datasets),
                    "focus": self.focus,
                    "cohort": getattr(self, "cohort", None),
                },
            )

    def _share(self, cohort: dict[str, Any]) -> None:
        """Take a cohort prepared by another module of :attr:`cohorts` (and write this run's split.json)."""
        self.train_cases, self.val_cases, self.unlabeled_cases = cohort["train"], cohort["val"], cohort["unlabeled"]
        self._datasets, self.focus = dict(cohort["datasets"]), cohort["focus"]
        if cohort["cohort"] is not None:
            self.cohort = cohort["cohort"]
        if self.focus is not None:
            self.focus.counts.zero_()  # the previous run's teacher chose those centres
        if self.val is None:
            self._write_split()

    def _write_split(self) -> None:
        """``run_dir/split.json``: the deterministic train/validation split of the labeled cases (no ``--val``)."""
        if self.run_dir is None:
            return
        data = self.cfg.data
        write_split(self.run_dir / "split.json", self.train_cases, self.val_cases, data.val_fraction, data.split_seed)

    def _setup(self) -> None:
        self.discover()
        self._datasets["labeled"] = self._dataset(self.train_cases, tfm.labeled_transforms(self.cfg), "labeled")
        if self.use_unlabeled:
            cases = self.unlabeled_cases
            if self.cfg.data.unlabeled_focus_fraction > 0:  # shared before any loader worker starts
                self.focus = FocusCentres(len(cases))
                cases = [{**case, "case_index": i} for i, case in enumerate(cases)]
            self._datasets["unlabeled"] = self._dataset(
                cases, tfm.unlabeled_transforms(self.cfg, self.focus, self.views), "unlabeled"
            )
        if self.val_cases:
            self._datasets["val"] = self._dataset(self.val_cases, tfm.validation_transforms(self.cfg), "val")

    def _dataset(self, cases: list[dict], transform, name: str):
        data = self.cfg.data
        if data.cache == "memory":
            workers = max(1, data.num_workers)
            return CacheDataset(cases, transform, cache_rate=1.0, num_workers=workers, progress=False)
        if data.cache == "disk":
            root = data.cache_dir or (
                self.run_dir / "cache" if self.run_dir is not None else tempfile.mkdtemp(prefix="medeman-cache-")
            )
            # keyed by the data config: runs (and tuning workers) with one preprocessing share a cache, others never read it
            return PersistentDataset(cases, transform, cache_dir=Path(root) / f"{name}-{preprocessing_digest(data)}")
        return Dataset(cases, transform)

    def preprocessed_unlabeled(self, index: int) -> torch.Tensor:
        """Unlabeled scan ``index`` as the training chain caches it (preprocessed, cropped, padded): ``(C, X, Y, Z)``.

        Read from the dataset's cache where there is one (no file is read again); the frame is the
        one :class:`~medeman.data.sampling.RandFocusCropd` crops in.
        """
        return torch.as_tensor(deterministic_view(self._datasets["unlabeled"])[index]["image"])

    @property
    def num_unlabeled(self) -> int:
        """How many unlabeled scans training draws from (0 when it uses none)."""
        return len(self._datasets["unlabeled"]) if "unlabeled" in self._datasets else 0

    def labeled_class_frequencies(self) -> torch.Tensor:
        """Share of each class among the labeled training scans' voxels, as the training chain caches them: ``(C,)`` float32.

        Whole volumes at the training resolution (the frame :meth:`preprocessed_unlabeled` gives),
        not the crops, whose centres are chosen by class (``data.class_ratios``).
        """
        labeled = deterministic_view(self._datasets["labeled"])
        return class_shares((labeled[i]["label"] for i in range(len(labeled))), self.cfg.data.num_classes)

    def _seed(self) -> int:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return self.cfg.train.seed + 1000 * rank

    def _first_batch(self) -> int:
        """The batch a new pass of the training loader starts at: the trainer's step (times the accumulated batches)."""
        step = int(self.trainer.global_step) if self.trainer is not None else 0
        return step * self.cfg.train.accumulate_grad_batches

    def _train_loader(self) -> StepLoader:
        """The training loader: every step (``labeled``, and ``unlabeled`` when used) drawn from its own seed,
        both batches of a step made by one worker and handed over as one tensor (:mod:`medeman.data.batches`)."""
        train, data = self.cfg.train, self.cfg.data
        n_batches = train.val_every_steps * train.accumulate_grad_batches
        sizes = {"labeled": data.batch_size_labeled}
        if self.use_unlabeled:
            sizes["unlabeled"] = data.batch_size_unlabeled
        sampler = StepSampler(
            {name: len(self._datasets[name]) for name in sizes},
            sizes,
            seed=stream_seed(self._seed(), 0),
            steps=n_batches,
            start=self._first_batch,
        )
        workers = data.num_workers
        return StepLoader(
            {name: self._datasets[name] for name in sizes},
            sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            # MONAI's loader seeds from this generator (its own, so the global RNG is never read); the steps re-seed every patch
            generator=torch.Generator().manual_seed(self._seed()),
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> StepLoader:
        """One loader of whole steps, ``{"labeled": {"image", "label"}, "unlabeled": {"weak", "strong"}}``, one validation interval long."""
        if self._loader is None:  # built once so persistent workers survive across epochs
            self._loader = self._train_loader()
        return self._loader

    def recalibration_dataloader(self, n_batches: int) -> DataLoader:
        """``n_batches`` training batches for re-estimating the teacher's BatchNorm statistics.

        Weak views of unlabeled patches (``{"weak", "strong"}``), or labeled patches
        (``{"image", "label"}``) without unlabeled scans; the same patches at every call (fixed
        seed), drawn in the main process. The loader has its own view of the dataset (same cache,
        a copy of the transform chain) and its own generators: MONAI's loader re-seeds the
        transforms of the dataset it is given, and the training stream must not depend on when
        re-estimation runs.
        """
        name = "unlabeled" if "unlabeled" in self._datasets else "labeled"
        data = self.cfg.data
        size = data.batch_size_unlabeled if name == "unlabeled" else data.batch_size_labeled
        seed = stream_seed(self._seed(), 4)
        sampler = RandomSampler(
            self._datasets[name],
            replacement=True,
            num_samples=n_batches * size,
            generator=torch.Generator().manual_seed(seed),
        )
        return DataLoader(
            self._own_view(self._datasets[name]),
            batch_size=size,
            sampler=sampler,
            num_workers=0,
            collate_fn=list_data_collate,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed + 1),
        )

    def _own_view(self, dataset):
        """The dataset with its own copy of the transform chain (the cache, and the teacher focus's centres, shared)."""
        view = copy.copy(dataset)
        memo = {id(self.focus): self.focus} if self.focus is not None else {}
        view.transform = copy.deepcopy(dataset.transform, memo)
        return view

    def val_dataloader(self) -> DataLoader | list:
        """Whole preprocessed validation volumes, one at a time: ``{"image": (1, C, ...), "label": (1, 1, ...)}``."""
        if "val" not in self._datasets:
            return []
        # its own generator: without one, MONAI's loader reads and then resets the global torch RNG
        return DataLoader(
            self._datasets["val"],
            batch_size=1,
            shuffle=False,
            num_workers=0,
            generator=torch.Generator().manual_seed(stream_seed(self._seed(), 5)),
        )
