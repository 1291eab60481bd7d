"""The reference report's ModifiedResNet and its two variants, `deep` and `light`.

A 3x3 stem at 64 channels, three stages of BasicBlocks at 64, 128 and 256 channels (the
first block of stages 2 and 3 halves the resolution and projects its shortcut with a 1x1
conv + BN), global average pooling and one linear layer. Parameter counts are fixed by
the report: deep 4,697,162, light 2,777,674.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

VARIANTS: dict[str, tuple[int, int, int]] = {"deep": (4, 4, 3), "light": (2, 2, 2)}
STAGE_WIDTHS = (64, 128, 256)
NUM_CLASSES = 10


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ModifiedResNet(nn.Module):
    def __init__(self, blocks: tuple[int, int, int], num_classes: int = NUM_CLASSES,
                 widths: tuple[int, int, int] = STAGE_WIDTHS):
        super().__init__()
        self.blocks, self.widths = tuple(blocks), tuple(widths)
        # `widths` other than the report's exist for tests: the same code path, in less time.
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for index, (width, count) in enumerate(zip(widths, self.blocks, strict=True)):
            first_stride = 1 if index == 0 else 2
            layers = []
            for block in range(count):
                layers.append(BasicBlock(in_planes, width, first_stride if block == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 32, 32)
        out = F.relu(self.bn1(self.conv1(x)))  # (N, 64, 32, 32)
        out = self.layer1(out)  # (N, 64, 32, 32)
        out = self.layer2(out)  # (N, 128, 16, 16)
        out = self.layer3(out)  # (N, 256, 8, 8)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 256)
        return self.linear(out)  # (N, 10)


def build_model(variant: str) -> ModifiedResNet:
    """A freshly initialised network for `variant` ("deep" or "light")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: valid variants are {sorted(VARIANTS)}")
    return ModifiedResNet(VARIANTS[variant])


def fuse_for_inference(model: nn.Module) -> ModifiedResNet:
    """An evaluation-mode copy of `model`, without gradients, with every batch norm folded
    into the conv before it: in evaluation mode a batch norm is a per-channel affine map, so
    this is 15 (light) or 25 (deep) fewer passes over the activations for the same logits up
    to float rounding. `model` itself is left as it is."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if not isinstance(model, ModifiedResNet):
        raise TypeError(f"fuse_for_inference() supports ModifiedResNet, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval().requires_grad_(False)
    for module in list(fused.modules()):
        if isinstance(module, (ModifiedResNet, BasicBlock)):
            module.conv1 = _fold_batch_norm(module.conv1, module.bn1)
            module.bn1 = nn.Identity()
        if isinstance(module, BasicBlock):
            module.conv2 = _fold_batch_norm(module.conv2, module.bn2)
            module.bn2 = nn.Identity()
            if isinstance(module.shortcut, nn.Sequential):  # (conv 1x1, BN)
                module.shortcut = _fold_batch_norm(*module.shortcut)
    return fused


def _fold_batch_norm(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """conv then eval-mode BN as one conv with a bias. Already folded (BN is Identity): the
    conv as it is."""
    if isinstance(bn, nn.Identity):
        return conv
    fused = copy.deepcopy(conv)
    # float64 so that the fold itself adds no rounding beyond the final cast.
    weight, bias = fuse_conv_bn_weights(
        conv.weight.double(), None if conv.bias is None else conv.bias.double(),
        bn.running_mean.double(), bn.running_var.double(), bn.eps,
        bn.weight.double(), bn.bias.double(),
    )
    fused.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
    fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    return fused


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


@dataclass(frozen=True)
class ModelSummary:
    rows: tuple[LayerRow, ...]
    params: int
    trainable_params: int
    param_mb: float  # fp32 parameter bytes in MiB, the report's "MB"
    batch_size: int
    activation_mb: float  # fp32 outputs of every leaf layer for one forward pass at batch_size
    forward_flops: int  # multiply-adds x 2 of the convolutions and the linear layer, per image

    def table(self) -> str:
        header = f"{'layer':<32} {'type':<12} {'output shape':<20} {'params':>10}"
        lines = [header, "-" * len(header)]
        for row in self.rows:
            shape = "x".join(str(d) for d in row.output_shape)
            lines.append(f"{row.name:<32} {row.kind:<12} {shape:<20} {row.params:>10,}")
        lines += [
            "-" * len(header),
            f"trainable parameters: {self.trainable_params:,} ({self.param_mb:.2f} MB fp32)",
            f"activations at batch {self.batch_size}: {self.activation_mb:.1f} MB fp32 (forward)",
            f"forward FLOPs per image: {self.forward_flops / 1e6:.1f} M",
        ]
        return "\n".join(lines)

    __str__ = table


def summary(model: nn.Module, batch_size: int = 128, input_size=(3, 32, 32)) -> ModelSummary:
    """Per-layer table, parameter count and size, activation memory and FLOPs.

    Runs one forward pass of a single image on the CPU copy's meta twin, so it costs no
    memory on the model's device and leaves the model untouched.
    """
    rows: list[LayerRow] = []
    flops = 0
    activation_elems = 0
    meta_model = _meta_copy(model)  # a throwaway copy: its hooks need no removal

    def record(name: str):
        def hook(module: nn.Module, inputs, output):
            nonlocal flops, activation_elems
            shape = tuple(output.shape[1:])
            elems = output[0].numel()
            activation_elems += elems
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                flops += 2 * elems * k * module.in_channels // module.groups
            elif isinstance(module, nn.Linear):
                flops += 2 * module.in_features * module.out_features
            own = sum(p.numel() for p in module.parameters(recurse=False))
            rows.append(LayerRow(name, type(module).__name__, shape, own))

        return hook

    for name, module in meta_model.named_modules():
        if name and not list(module.children()) and not isinstance(module, nn.Identity):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        meta_model(torch.empty((1, *input_size), device="meta"))
    trainable = count_parameters(model)
    return ModelSummary(
        rows=tuple(rows), params=count_parameters(model, trainable_only=False),
        trainable_params=trainable, param_mb=trainable * 4 / 2**20, batch_size=batch_size,
        activation_mb=activation_elems * batch_size * 4 / 2**20, forward_flops=flops)


def _meta_copy(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if not isinstance(model, ModifiedResNet):
        raise TypeError(f"summary() supports ModifiedResNet, got {type(model).__name__}")
    with torch.device("meta"):
        return ModifiedResNet(model.blocks, widths=model.widths).eval()
