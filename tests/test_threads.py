"""Torch's intra-op threads: explicit, OMP_NUM_THREADS, or the available cores shared among the node's processes."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from torch.utils.data import Dataset

from medeman.config import ConfigError, default_config
from medeman.threads import apply_threads, choose_threads, local_processes, set_threads_for_config

# name, explicit, environ, cores, processes, loader_workers, expected threads, words of the reason
CHOICES = [
    ("one run alone on 16 cores", None, {}, 16, 1, 0, 16, "16 cores shared by 1 process"),
    ("two DDP ranks share 16 cores", None, {}, 16, 2, 0, 8, "16 cores shared by 2 processes"),
    ("loader workers take one core each", None, {}, 16, 1, 4, 12, "with 4 loader workers each"),
    ("two ranks with 1 worker each: (16 - 2) // 2", None, {}, 16, 2, 1, 7, "2 processes with 1 loader worker each"),
    ("odd split rounds down", None, {}, 10, 3, 0, 3, "10 cores shared by 3 processes"),
    ("more workers than cores: still 1", None, {}, 2, 1, 4, 1, "2 cores"),
    ("four tune workers on 2 cores: 1", None, {}, 2, 4, 0, 1, "4 processes"),
    ("one core", None, {}, 1, 1, 0, 1, "1 core shared by 1 process"),
    ("OMP_NUM_THREADS is respected", None, {"OMP_NUM_THREADS": "3"}, 16, 2, 4, 3, "OMP_NUM_THREADS"),
    ("an explicit setting wins over OMP_NUM_THREADS", 5, {"OMP_NUM_THREADS": "3"}, 16, 2, 0, 5, "explicitly"),
    ("an empty OMP_NUM_THREADS counts as unset", None, {"OMP_NUM_THREADS": " "}, 4, 2, 0, 2, "4 cores"),
]


@pytest.mark.parametrize(
    "name, explicit, environ, cores, processes, workers, expected, reason", CHOICES, ids=[c[0] for c in CHOICES]
)
def test_thread_choice(name, explicit, environ, cores, processes, workers, expected, reason):
    choice = choose_threads(explicit, processes=processes, loader_workers=workers, cores=cores, environ=environ)
    assert choice.threads == expected
    assert reason in choice.reason


@pytest.mark.parametrize(
    "explicit, environ, message",
    [
        (0, {}, "--threads 0: must be a positive integer"),
        (-2, {}, "--threads -2: must be a positive integer"),
        (None, {"OMP_NUM_THREADS": "zero"}, "OMP_NUM_THREADS='zero': must be a positive integer"),
        (None, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0': must be a positive integer"),
    ],
)
def test_bad_thread_settings_are_refused(explicit, environ, message):
    with pytest.raises(ValueError) as err:
        choose_threads(explicit, cores=4, environ=environ)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "train, expected",
    [
        ({"devices": 1}, 1),
        ({"devices": 4}, 4),
        ({"devices": "2"}, 2),
        ({"devices": [0, 2, 3]}, 3),
        ({"devices": -1, "accelerator": "cpu"}, 1),
        ({"devices": "auto", "accelerator": "cpu"}, 1),
    ],
)
def test_local_processes_are_the_devices_per_node(train, expected):
    assert local_processes(train) == expected


def test_apply_sets_torch_threads_and_says_so_in_one_line(capsys):
    before = torch.get_num_threads()
    try:
        assert apply_threads(choose_threads(2, cores=8, environ={})) == 2
        assert torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert err == "threads: 2 torch threads per process (set explicitly; change with --threads)\n"
    finally:
        torch.set_num_threads(before)


def test_config_threads_and_a_bad_environment(monkeypatch, capsys):
    cfg = default_config()
    cfg["train"]["num_threads"] = 1
    before = torch.get_num_threads()
    try:
        assert set_threads_for_config(cfg) == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "-1")
        cfg["train"]["num_threads"] = None
        with pytest.raises(ConfigError, match="OMP_NUM_THREADS='-1'"):
            set_threads_for_config(cfg)
    finally:
        torch.set_num_threads(before)


class _Threads(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.tensor(torch.get_num_threads())


def test_loader_workers_run_one_thread_each_whatever_the_main_process_uses():
    """The rule counts each DataLoader worker as one core: PyTorch's worker loop sets one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = [int(t) for batch in DataLoader(_Threads(), batch_size=1, num_workers=1) for t in batch]
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(before)
