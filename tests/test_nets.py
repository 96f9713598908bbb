"""Tests for medeman.nets: every student network builds with BatchNorm and maps patches to class logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medeman.config import default_config
from medeman.eman import make_teacher, tracked_batchnorms
from medeman.nets import NETWORKS, build_network, size_divisor

SMALL = [4, 8, 16, 32]


def config(
    name: str, channels=SMALL, in_channels: int = 2, num_classes: int = 3, dropout: float = 0.0, **model
) -> dict:
    cfg = default_config()
    cfg["model"].update(name=name, channels=list(channels), num_res_units=1, dropout=dropout, **model)
    cfg["data"].update(in_channels=in_channels, num_classes=num_classes)
    return cfg


# name, channels, expected size_divisor
NET_CASES = [
    ["unet", SMALL, 8],
    ["unet", [4, 8, 16], 4],
    ["unet", [16, 32, 64, 128, 256], 16],
    ["basicunet", SMALL, 16],
    ["basicunet", [4, 4, 8, 16, 32, 4], 16],
    ["vnet", SMALL, 16],
    ["segresnet", SMALL, 8],
    ["dynunet", SMALL, 8],
    ["dynunet", [4, 8, 16], 4],
]
IDS = [f"{c[0]}-{len(c[1])}" for c in NET_CASES]


def test_every_network_has_a_case():
    assert {c[0] for c in NET_CASES} == set(NETWORKS)


@pytest.mark.parametrize("name, channels, divisor", NET_CASES, ids=IDS)
def test_builds_with_batchnorm(name, channels, divisor):
    net = build_network(config(name, channels))
    norms = [m for m in net.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))]
    assert norms, f"{name} has no normalization layers"
    assert all(isinstance(m, _BatchNorm) for m in norms), f"{name}: {sorted({type(m).__name__ for m in norms})}"
    assert len(tracked_batchnorms(net)) == len(norms)
    make_teacher(net, norm="eman")  # EMAN accepts it


@pytest.mark.parametrize("name, channels, divisor", NET_CASES, ids=IDS)
def test_output_shape(name, channels, divisor):
    torch.manual_seed(0)
    cfg = config(name, channels, in_channels=2, num_classes=3)
    net = build_network(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 2, 32, 32, 32))
    assert out.shape == (2, 3, 32, 32, 32)


@pytest.mark.parametrize("name, channels, divisor", NET_CASES, ids=IDS)
def test_size_divisor(name, channels, divisor):
    cfg = config(name, channels, in_channels=1, num_classes=2)
    assert size_divisor(cfg) == divisor
    net = build_network(cfg).eval()
    shape = (divisor, 2 * divisor, divisor)  # every side a multiple of the divisor, not cubic
    with torch.no_grad():
        out = net(torch.randn(1, 1, *shape))
    assert out.shape == (1, 2, *shape)


@pytest.mark.parametrize("name", ["unet", "basicunet", "segresnet", "dynunet"])
def test_train_step_updates_running_stats(name):
    torch.manual_seed(0)
    net = build_network(config(name, in_channels=1, num_classes=2)).train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    out.mean().backward()
    assert all(int(bn.num_batches_tracked) == 1 for bn in tracked_batchnorms(net))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_vnet_dropout_follows_config(dropout):
    """MONAI's VNet hard-codes Dropout3d(0.5) in two up-blocks; model.dropout must govern every dropout layer."""
    net = build_network(config("vnet", dropout=dropout, in_channels=1))
    drops = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert drops and all(m.p == dropout for m in drops)


@pytest.mark.parametrize("name", ["unet", "basicunet", "segresnet", "dynunet"])
def test_zero_dropout_is_deterministic_in_train_mode(name):
    """With model.dropout 0 the only train-mode randomness left is none: the same batch gives the same output."""
    net = build_network(config(name, in_channels=1, num_classes=2, dropout=0.0)).train()
    for bn in tracked_batchnorms(net):
        bn.momentum = 0.0  # keep running stats fixed between the two calls
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))


ERROR_CASES = [
    ["unknown-name", config("resnet"), "model.name: .resnet. is not one of unet, basicunet"],  # refused by as_config
    ["unet-one-level", config("unet", [16]), "at least two levels"],
    ["basicunet-three", config("basicunet", [4, 8, 16]), "basicunet"],
]


@pytest.mark.parametrize("name, cfg, fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors(name, cfg, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_network(cfg)
