"""The ``teacher.pt`` file: the teacher's weights plus the config that rebuilds network and preprocessing.

It holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``;
a file that needs pickled objects is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medeman.config import default_config, merge, validate
from medeman.nets import build_network
from medeman.typed_config import Config

FORMAT = "medeman-teacher-v1"


class ModelFileError(ValueError):
    """A file that is not a loadable medeman model."""


def save_teacher(path: str | Path, teacher: nn.Module, cfg: Config | dict, step: int, **extra: Any) -> None:
    """Write ``teacher.pt``: state_dict on CPU, the resolved config (a plain dict), the training step and plain extras."""
    state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
    cfg = cfg.to_dict() if isinstance(cfg, Config) else cfg  # plain values: weights_only loading
    torch.save(
        {"format": FORMAT, "config": cfg, "step": int(step), "state_dict": state, "extra": dict(extra)}, str(path)
    )


def update_teacher_extra(path: str | Path, **extra: Any) -> None:
    """Add plain values to the extras of an existing ``teacher.pt`` (e.g. post-processing learned after training)."""
    payload = read_teacher_file(path)
    payload["extra"].update(extra)
    torch.save(payload, str(path))


def read_teacher_file(path: str | Path) -> dict:
    """Load a ``teacher.pt`` safely (``weights_only=True``) and check it is a medeman model."""
    path = Path(path)
    if path.is_dir():
        path = path / "teacher.pt"
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file (give a run folder with teacher.pt, or the file itself)")
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        raise ModelFileError(
            f"{path}: refused: not a medeman model that loads safely with weights_only=True ({load_error_reason(err)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a medeman model (no '{FORMAT}' marker); pass the teacher.pt of a medeman run"
        )
    return payload


def load_error_reason(err: BaseException) -> str:
    """One line on why torch.load refused a file, without PyTorch's advice to retry unsafely."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"it holds pickled code or objects beyond tensors and plain values, or is no PyTorch file: {detail}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def load_teacher(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict, dict]:
    """Rebuild the teacher network in eval mode from a run folder or ``teacher.pt``.

    Returns:
        ``(network, config, payload)``; the config is merged onto today's defaults so that files
        written before a key was added still load.
    """
    payload = read_teacher_file(path)
    cfg = validate(merge(default_config(), payload["config"], where=str(path)))
    net = build_network(cfg)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ModelFileError(f"{path}: weights do not fit the saved model config: {str(err).splitlines()[0]}") from None
    return net.to(device).eval(), cfg, payload
