"""Two-process CPU DDP (gloo): the EMAN teacher is identical on every rank."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch


def test_teacher_identical_across_ranks(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    # its own session: on a timeout the whole group goes, rank 1 (which Lightning starts) included, so no orphan
    # keeps the output pipes open
    proc = subprocess.Popen(
        [sys.executable, str(worker), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise AssertionError(f"two-rank DDP did not finish in 300 s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    rank0 = torch.load(tmp_path / "teacher_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "teacher_rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    stats = [k for k in rank0 if k.endswith(("running_mean", "running_var"))]
    assert stats
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    # the teacher has moved away from a fresh initialization's statistics (so the check is not vacuous)
    assert any(not torch.allclose(rank0[k], torch.zeros_like(rank0[k])) for k in stats if k.endswith("running_mean"))
