"""Network factory: the student architectures medeman trains, always built with BatchNorm.

EMAN needs BatchNorm with running statistics, and a mean-teacher ablation (``teacher_norm: bn``)
needs it too, so every network here is built with ``model.norm: batch`` (the default) whatever
MONAI's default is (InstanceNorm for UNet, GroupNorm for SegResNet). ``model.norm: instance`` exists
for supervised baselines; VNet is BatchNorm-only.

``train.deep_supervision`` builds DynUNet with its deep-supervision heads (Lee et al., "Deeply-Supervised
Nets", AISTATS 2015; as nnU-Net); :func:`deep_supervision_heads` and :func:`main_output` read its
training-mode output, and in eval mode (validation, inference, the exported teacher) it returns
only the full-resolution logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet, VNet
from torch import nn

if TYPE_CHECKING:
    from medeman.typed_config import Config

# the choices of model.name (medeman.config takes them from here)
NETWORKS = ("unet", "basicunet", "vnet", "segresnet", "dynunet")


def build_network(cfg: Config | dict[str, Any]) -> nn.Module:
    """Build the student network described by ``model`` for the ``data`` section's channels and classes.

    Args:
        cfg: a resolved medeman config (see :mod:`medeman.config`).

    Returns:
        A MONAI 3D network with BatchNorm that maps ``(B, in_channels, X, Y, Z)`` to
        ``(B, num_classes, X, Y, Z)`` logits.
    """
    from medeman.typed_config import as_config  # imported late: medeman.config imports NETWORKS

    cfg = as_config(cfg)
    definition = network_definition(cfg)
    kwargs = {k: v for k, v in definition.items() if k != "_target_"}
    net = NETWORK_CLASSES[definition["_target_"].rsplit(".", 1)[1]](**kwargs)
    if cfg.model.name == "vnet":
        # its up_tr64/up_tr32 hard-code Dropout3d(0.5) on the skips: model.dropout must govern all of them
        # (eval mode, the exported teacher, has no dropout either way)
        for module in net.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = cfg.model.dropout
    return net


NETWORK_CLASSES = {cls.__name__: cls for cls in (UNet, BasicUNet, VNet, SegResNet, DynUNet)}


def network_definition(cfg: Config | dict[str, Any]) -> dict[str, Any]:
    """The network of ``cfg`` as a MONAI bundle component: ``{"_target_": "monai.networks.nets.UNet", **kwargs}``.

    The one description of each architecture: :func:`build_network` instantiates it, and
    ``medeman export --format bundle`` writes it as the bundle's ``network_def``, so a bundle
    rebuilds the very network medeman trained with MONAI alone (plain JSON values only).
    """
    from medeman.typed_config import as_config

    cfg = as_config(cfg)
    model, data = cfg.model, cfg.data
    name = model.name
    in_ch, out_ch = data.in_channels, data.num_classes
    channels = list(model.channels)  # positive ints (config.validate); a list: the definition is plain JSON
    dropout = model.dropout
    norm = model.norm
    if name == "unet":
        if len(channels) < 2:
            raise ValueError("model.channels needs at least two levels for unet")
        return _definition(
            UNet,
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            channels=channels,
            strides=[2] * (len(channels) - 1),
            num_res_units=model.num_res_units,
            norm=norm,
            dropout=dropout,
        )
    if name == "basicunet":
        features = channels if len(channels) == 6 else _basicunet_features(channels)
        return _definition(
            BasicUNet,
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            features=features,
            norm=norm,
            dropout=dropout,
        )
    if name == "vnet":  # MONAI's VNet is BatchNorm-only with fixed widths (16, 32, 64, 128, 256)
        return _definition(
            VNet,
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            dropout_prob_down=dropout or None,
            dropout_prob_up=[dropout or None, dropout],
        )
    if name == "segresnet":
        return _definition(
            SegResNet,
            spatial_dims=3,
            init_filters=channels[0],
            in_channels=in_ch,
            out_channels=out_ch,
            norm=norm,
            dropout_prob=dropout or None,
        )
    if name == "dynunet":
        n = len(channels)
        deep = cfg.train.deep_supervision  # False in configs of older teacher.pt files (merged with the defaults)
        return _definition(
            DynUNet,
            spatial_dims=3,
            in_channels=in_ch,
            out_channels=out_ch,
            kernel_size=[3] * n,
            strides=[1] + [2] * (n - 1),
            upsample_kernel_size=[2] * (n - 1),
            filters=channels,
            norm_name=norm,
            dropout=dropout or None,
            res_block=True,
            deep_supervision=deep,
            deep_supr_num=cfg.train.deep_supervision_heads if deep else 1,
        )
    raise ValueError(f"unknown model.name {name!r}: choose one of {', '.join(NETWORKS)}")


def _definition(cls: type, **kwargs: Any) -> dict[str, Any]:
    return {"_target_": f"monai.networks.nets.{cls.__name__}", **kwargs}


def deep_supervision_heads(output: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of a forward pass as a list, full resolution first.

    A DynUNet built with ``train.deep_supervision`` returns, in training mode only, its full-resolution
    logits and its decoder's lower-resolution logits (upsampled to full size by MONAI) stacked on
    dim 1: ``(B, 1 + heads, C, X, Y, Z)``. Any other output is one ``(B, C, X, Y, Z)`` head.
    """
    return list(torch.unbind(output, dim=1)) if output.ndim == 6 else [output]


def main_output(output: torch.Tensor) -> torch.Tensor:
    """The full-resolution logits of a forward pass (see :func:`deep_supervision_heads`)."""
    return output[:, 0] if output.ndim == 6 else output


def deep_supervision_weights(heads: int) -> list[float]:
    """Loss weights of the full-resolution output and ``heads - 1`` lower ones: ``1/2^i``, summing to 1 (nnU-Net)."""
    weights = [0.5**i for i in range(heads)]
    return [w / sum(weights) for w in weights]


def _basicunet_features(channels: list[int]) -> list[int]:
    if len(channels) < 4:
        raise ValueError("model.channels for basicunet needs 6 values, or at least 4 to derive them from")
    return [channels[0], channels[0], channels[1], channels[2], channels[3], channels[0]]


def size_divisor(cfg: Config | dict[str, Any]) -> int:
    """The factor every patch side must be divisible by for the network's down-sampling."""
    from medeman.typed_config import as_config

    model = as_config(cfg).model
    name, levels = model.name, len(model.channels)
    if name == "vnet":
        return 16
    if name == "basicunet":
        return 16
    if name == "segresnet":
        return 8
    return 2 ** (levels - 1)
