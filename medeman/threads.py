"""Torch's intra-op threads, fitted to the machine a command shares with its own other processes.

PyTorch starts one OpenMP thread per core in every process. Two trainings on one machine then run
twice as many spinning threads as cores, and each waits for the other's threads at every operator:
two 100-step ``medeman train`` runs started together on 2 cores took 204 s instead of 16 s with one
thread each (issue 23). Each medeman command therefore sets the thread count once, at start:

1. an explicit setting (``--threads N``, ``train.num_threads``) wins;
2. else ``OMP_NUM_THREADS``, when set, as PyTorch itself reads it;
3. else the cores this process may run on (``os.sched_getaffinity``), less one per DataLoader
   worker (PyTorch's worker loop runs each with one thread), divided among the processes this
   command starts on the node (DDP local ranks, ``medeman tune --workers``); at least 1.

Typical use::

    choice = choose_threads(explicit=None, processes=2, loader_workers=4)
    apply_threads(choice)   # torch.set_num_threads, and one line on stderr
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from medeman.typed_config import Config, Section


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads a process uses and why (``reason`` is printed as is)."""

    threads: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or ``taskset``'s limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        return os.cpu_count() or 1


def choose_threads(
    explicit: int | None = None,
    *,
    processes: int = 1,
    loader_workers: int = 0,
    cores: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """Intra-op threads of one process by the rule of the module docstring.

    Args:
        explicit: ``--threads`` or ``train.num_threads``; ``None`` when not set.
        processes: processes of this command on the node that each compute (DDP local ranks, tune workers).
        loader_workers: DataLoader worker processes of each of them (one thread each).
        cores: cores available (default: :func:`available_cores`).
        environ: the environment (default: ``os.environ``), read for ``OMP_NUM_THREADS``.

    Returns:
        The :class:`ThreadChoice`.

    Raises:
        ValueError: ``explicit`` or ``OMP_NUM_THREADS`` is not a positive integer.

    Example:
        >>> choose_threads(processes=2, loader_workers=1, cores=16, environ={}).threads  # (16 - 2 * 1) // 2
        7
    """
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 1:
            raise ValueError(f"--threads {explicit!r}: must be a positive integer")
        return ThreadChoice(explicit, "set explicitly")
    env = os.environ if environ is None else environ
    raw = env.get("OMP_NUM_THREADS", "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"OMP_NUM_THREADS={raw!r}: must be a positive integer")
        return ThreadChoice(value, "from OMP_NUM_THREADS")
    cores = available_cores() if cores is None else int(cores)
    processes, loader_workers = max(1, int(processes)), max(0, int(loader_workers))
    threads = max(1, (cores - processes * loader_workers) // processes)
    shares = f"{processes} process{'es' if processes > 1 else ''}"
    if loader_workers:
        shares += f" with {loader_workers} loader worker{'s' if loader_workers > 1 else ''} each"
    return ThreadChoice(threads, f"{cores} core{'s' if cores > 1 else ''} shared by {shares}")


def apply_threads(choice: ThreadChoice, *, announce: bool = True) -> int:
    """Set torch's intra-op threads to ``choice.threads``; print the choice as one line on stderr.

    Only the first process of a DDP node (``LOCAL_RANK`` 0 or unset) prints, so a run says it once.
    """
    import torch

    torch.set_num_threads(choice.threads)
    if announce and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"threads: {choice.threads} torch thread{'s' if choice.threads > 1 else ''} per process ({choice.reason}; "
            "change with --threads)",
            file=sys.stderr,
        )
    return choice.threads


def local_processes(train: Section | Mapping) -> int:
    """Processes a training starts on each node: the number of ``train.devices`` (DDP local ranks).

    ``train``: the ``train`` section of a :class:`~medeman.typed_config.Config`, or a mapping of its
    ``devices`` (default 1) and ``accelerator``.
    """
    train = train if isinstance(train, Mapping) else train.to_dict()
    devices = train.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, str) and devices.strip().isdigit() and int(devices) > 0:
        return int(devices)
    if train.get("accelerator") != "cpu":  # -1 or "auto": every GPU there is
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    return 1


def set_threads_for_config(cfg: Config | Mapping, explicit: int | None = None, *, processes: int | None = None) -> int:
    """Apply the rule for a training-like command (``train``, ``tune``): threads from ``explicit`` or ``train.num_threads``,
    divided among ``processes`` (default: :func:`local_processes`) and their ``data.num_workers`` loader workers."""
    from medeman.config import ConfigError
    from medeman.typed_config import as_config

    cfg = as_config(cfg)
    explicit = explicit if explicit is not None else cfg.train.num_threads
    count = local_processes(cfg.train) if processes is None else processes
    try:
        choice = choose_threads(explicit, processes=count, loader_workers=cfg.data.num_workers)
    except ValueError as err:  # a bad OMP_NUM_THREADS: one line, like any other bad setting
        raise ConfigError(str(err)) from None
    return apply_threads(choice)
