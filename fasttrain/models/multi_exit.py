"""Multi-exit ResNets (SelfCon, Bae et al.; CDS, Zhang et al.): a backbone F, sub-networks G attached
after intermediate stages T, an L2-normalised projection head on every exit, and classifiers on the
backbone or on every exit when a method trains them (``ce``; ``dsn``, ``cds``).

The backbone is torchvision's ResNet (its blocks, layout and init; at the default width of 64 it
loads torchvision's weights), with the width free; the sub-networks reuse torchvision's
BasicBlock/Bottleneck. One forward runs the shared trunk once and returns every exit.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv

ARCHS = {  # name -> (block, blocks per stage)
    "resnet18": (tv.BasicBlock, (2, 2, 2, 2)),
    "resnet34": (tv.BasicBlock, (3, 4, 6, 3)),
    "resnet50": (tv.Bottleneck, (3, 4, 6, 3)),
    "resnet101": (tv.Bottleneck, (3, 4, 23, 3)),  # CDS's CIFAR-100 table
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
EXIT_POINTS = STAGES[:3]
# imagenet_no_maxpool: the official CDS ImageNet ResNet, which defines its max-pool but never calls it
# (every stage at twice the resolution, about 4x the FLOPs)
STEMS = ("imagenet", "cifar", "imagenet_no_maxpool")


class EncoderOutput(NamedTuple):
    features: list[torch.Tensor]  # pooled feature per exit, sub-networks first, backbone last
    projections: list[torch.Tensor]  # L2-normalised projection per exit, same order
    logits: Optional[torch.Tensor]  # classifier on the backbone feature, if the encoder has one
    sub_logits: list[torch.Tensor] = []  # classifier on each sub-network feature, if the encoder has them


# a projection head: (feature dim, projection dim) -> its layers; ProjectionHead L2-normalises the output
HEADS = {
    # the official SupCon/SelfCon head
    "mlp": lambda dim, proj: (nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, proj)),
    # SimCLR v2 / MoCo v3: BatchNorm keeps the hidden units centred across the batch, so projections
    # of different images do not start (and cannot end) all alike: see docs/collapse.md
    "mlp_bn": lambda dim, proj: (nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
                                 nn.Linear(dim, proj)),
    "linear": lambda dim, proj: (nn.Linear(dim, proj),),
    "none": lambda dim, proj: (),  # the exit's feature itself (the official CDS code)
}


class ProjectionHead(nn.Sequential):
    """The projection of one exit (``HEADS[kind]``), L2-normalised in forward."""

    def __init__(self, dim: int, proj_dim: int, kind: str = "mlp_bn"):
        _check("model.head", kind, HEADS)
        super().__init__(*HEADS[kind](dim, proj_dim))

    def forward(self, x):
        return F.normalize(super().forward(x), dim=1)


def _make_stage(block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage of torchvision blocks, as ResNet._make_layer builds it."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(tv.conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_like_torchvision(module: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init (kaiming fan_out convs, BatchNorm 1/0, optionally the last BN of
    each residual branch at 0), for modules built outside ``tv.ResNet``: the sub-networks, as the
    official code inits backbone and sub-networks alike."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    for m in module.modules() if zero_init_residual else ():  # after the pass above, which would undo it
        if isinstance(m, tv.Bottleneck):
            nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, tv.BasicBlock):
            nn.init.constant_(m.bn2.weight, 0)


def _pool() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def sep_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """CDS's auxiliary block: depthwise 3x3 stride 2, pointwise, BN, ReLU, depthwise 3x3, pointwise
    to ``out_channels``, BN, ReLU (no library ships this exact block: MobileNet's have one depthwise)."""
    def depthwise(stride):
        return nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False)

    return nn.Sequential(depthwise(2), tv.conv1x1(in_channels, in_channels), nn.BatchNorm2d(in_channels),
                         nn.ReLU(inplace=True), depthwise(1), tv.conv1x1(in_channels, out_channels),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _fc_exit(block, depths, start: int, width: int) -> list[nn.Module]:
    """Pool + Linear to the backbone's width."""
    channels = [width * 2 ** i * block.expansion for i in (start, len(STAGES) - 1)]
    return [*_pool(), nn.Linear(*channels)]


def _sepconv_exit(block, depths, start: int, width: int) -> list[nn.Module]:
    """One separable block per remaining stage, each halving the resolution and doubling the channels (CDS)."""
    channels = [width * 2 ** i * block.expansion for i in range(start, len(STAGES))]
    return [*(sep_conv(a, b) for a, b in zip(channels, channels[1:])), *_pool()]


def _resnet_exit(block, depths, start: int, width: int, share: float = 1.0) -> list[nn.Module]:
    """The remaining stages of the backbone with ``share`` of their blocks (at least one) (SelfCon)."""
    stages, inplanes = [], width * 2 ** start * block.expansion
    for index in range(start + 1, len(STAGES)):
        blocks = max(1, int(depths[index] * share))
        stages.append(_make_stage(block, inplanes, width * 2 ** index, blocks, stride=2))
        inplanes = width * 2 ** index * block.expansion
    return [*stages, *_pool()]


# a sub-network G: (block, blocks per stage, index of the exit's stage, width) -> its layers,
# ending in a pooled feature of the backbone's width
EXIT_KINDS = {
    "fc": _fc_exit,
    "small": functools.partial(_resnet_exit, share=0.5),
    "same": _resnet_exit,
    "sepconv": _sepconv_exit,
}


def build_subnetwork(arch: str, exit_point: str, kind: str, width: int = 64) -> nn.Sequential:
    """G of kind ``EXIT_KINDS[kind]``: maps the output of stage ``exit_point`` to a pooled feature."""
    _check("exit_kind", kind, EXIT_KINDS)
    block, depths = ARCHS[arch]
    return nn.Sequential(*EXIT_KINDS[kind](block, depths, STAGES.index(exit_point), width))


class MultiExitResNet(nn.Module):
    def __init__(self, arch: str = "resnet50", *, stem: str = "imagenet", exits: Sequence[str] = ("layer2",),
                 exit_kind: str = "fc", proj_dim: int = 128, head: str = "mlp_bn", width: int = 64,
                 num_classes: Optional[int] = None, exit_classifiers: bool = False, zero_init_residual: bool = False,
                 projection: bool = True):
        """``num_classes``: a classifier on the backbone feature; with ``exit_classifiers``, one on
        every sub-network feature as well (deep supervision). ``projection``: a projection head per
        exit (False for a method without a contrastive term: parameters that never get a gradient
        would break DistributedDataParallel's reduction). ``width``: channels of the stem and the
        first stage (torchvision's 64; stage i has width * 2**i), every layer scaled alike."""
        super().__init__()
        _check("arch", arch, ARCHS)
        _check("stem", stem, STEMS)
        _check("exit_kind", exit_kind, EXIT_KINDS)
        for point in exits:
            _check("exits", point, EXIT_POINTS)
        if len(set(exits)) != len(exits):
            raise ValueError(f"exits={list(exits)}: an exit point is listed twice")
        if proj_dim <= 0:
            raise ValueError(f"proj_dim={proj_dim} must be positive")
        if width <= 0:
            raise ValueError(f"width={width} must be positive")
        if num_classes is not None and num_classes <= 0:
            raise ValueError(f"num_classes={num_classes} must be positive")
        if exit_classifiers and not num_classes:
            raise ValueError("exit_classifiers needs num_classes")
        block, depths = ARCHS[arch]
        self.arch, self.exit_points = arch, tuple(sorted(exits, key=STAGES.index))
        # torchvision's ResNet layout (its blocks, as ResNet.__init__ assembles them) with a free width;
        # the small-image stem is a 3x3 stride-1 conv without max-pool (as the official code)
        conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False) if stem == "cifar" \
            else nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.stem = nn.Sequential(conv1, nn.BatchNorm2d(width), nn.ReLU(inplace=True), maxpool)
        inplanes = width
        for index, name in enumerate(STAGES):
            setattr(self, name, _make_stage(block, inplanes, width * 2 ** index, depths[index], 1 if index == 0 else 2))
            inplanes = width * 2 ** index * block.expansion
        self.pool = _pool()
        self.feature_dim = inplanes
        self.subnetworks = nn.ModuleDict({p: build_subnetwork(arch, p, exit_kind, width) for p in self.exit_points})
        init_like_torchvision(self, zero_init_residual)
        self.heads = nn.ModuleList(ProjectionHead(self.feature_dim, proj_dim, head) for _ in range(self.num_exits)) \
            if projection else nn.ModuleList()
        self.classifier = nn.Linear(self.feature_dim, num_classes) if num_classes else None
        self.exit_classifiers = nn.ModuleList(nn.Linear(self.feature_dim, num_classes) for _ in self.exit_points) \
            if exit_classifiers else None

    @property
    def num_exits(self) -> int:
        return len(self.exit_points) + 1

    def backbone_parameters(self):
        """F's own parameters: stem and the four stages (what torchvision's resnet has, less `fc`)."""
        for part in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            yield from part.parameters()

    def forward(self, x: torch.Tensor, project: bool = True) -> EncoderOutput:
        x = self.stem(x)
        sub_features = []
        for name in STAGES:
            x = getattr(self, name)(x)
            if name in self.subnetworks:
                sub_features.append(self.subnetworks[name](x))
        features = [*sub_features, self.pool(x)]
        projections = [head(f) for head, f in zip(self.heads, features)] if project else []
        logits = self.classifier(features[-1]) if self.classifier is not None else None
        sub_logits = [c(f) for c, f in zip(self.exit_classifiers, sub_features)] if self.exit_classifiers else []
        return EncoderOutput(features, projections, logits, sub_logits)


def exit_names(num_exits: int) -> list[str]:
    """Names of the exits in EncoderOutput order: sub0, sub1, ..., backbone."""
    return [f"sub{i}" for i in range(num_exits - 1)] + ["backbone"]


def _check(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: unknown, choose from {', '.join(allowed)}")
