"""A tiny trained teacher and smooth test scans, shared by the export, bundle and DICOM tests.

The teacher (a 2-level UNet, 16³ windows, CT window 0..100 HU) learns "brighter than 50 HU" on
smooth random patches in 60 steps (about 2 s on one core, 95 % of voxels right), so its masks
have real structure: boundaries run through the scans where a near-tie would show any
difference between two pipelines.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from medeman.config import default_config, validate
from medeman.nets import build_network


def teacher_config(spacing=(1.5, 1.5, 1.5)) -> dict:
    cfg = default_config()
    cfg["model"].update(channels=[4, 8], num_res_units=0)
    cfg["data"].update(
        patch_size=[16, 16, 16],
        spacing=list(spacing),
        intensity_window=[0.0, 100.0],
        labels={1: "bright"},
        num_classes=2,
    )
    cfg["infer"].update(overlap=0.5, sw_batch_size=2)
    return validate(cfg)


@functools.lru_cache(maxsize=None)
def _trained_state() -> dict:
    torch.manual_seed(0)
    net = build_network(teacher_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):
        x = F.interpolate(torch.rand(4, 1, 8, 8, 8), size=(16, 16, 16), mode="trilinear")
        loss = F.cross_entropy(net(x), (x[:, 0] > 0.5).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def trained_teacher(cfg: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """``(network in eval mode, config)``: a fresh copy each call, weights trained once per session."""
    cfg = teacher_config() if cfg is None else cfg
    net = build_network(cfg)
    net.load_state_dict(_trained_state())
    return net.eval(), cfg


def smooth_scan(shape, seed: int = 0) -> np.ndarray:
    """Smooth random HU values spanning 0..100 (int16): blobs above and below the teacher's 50 HU."""
    field = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma=2.0)
    field = (field - field.min()) / (field.max() - field.min())
    return np.round(field * 100).astype(np.int16)
