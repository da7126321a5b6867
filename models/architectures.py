"""Reference architectures from the neural-teleportation paper, in plain torch.

Every constructor returns ``(model, input_shape)``: an ``nn.Module`` in eval mode and the shape
of one example input (batch size included).  The constructors use torch's default
initialisation; :data:`ARCHITECTURES` holds small, test-sized configurations that are built
under a fixed seed and passed through :func:`randomize_`, so their BatchNorm statistics and
constant-initialised parameters are non-degenerate (DESIGN.md §9).

No torchvision: the networks are written out here (torchvision is not installable on this
project's machines, and the CIFAR variants differ from torchvision's ImageNet ones anyway).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Built = tuple[nn.Module, tuple[int, ...]]
"""What every constructor returns: the model (eval mode) and an example input shape."""

# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[int], nn.Module]] = {
    "relu": lambda _n: nn.ReLU(),
    "leakyrelu": lambda _n: nn.LeakyReLU(0.1),
    "elu": lambda _n: nn.ELU(),
    "tanh": lambda _n: nn.Tanh(),
    "sigmoid": lambda _n: nn.Sigmoid(),
    "gelu": lambda _n: nn.GELU(),
    "silu": lambda _n: nn.SiLU(),
    "relu6": lambda _n: nn.ReLU6(),
    "prelu": lambda n: nn.PReLU(n),
    "identity": lambda _n: nn.Identity(),
}
"""Activation factories by name; the argument is the layer width (used by per-channel PReLU)."""


def make_activation(name: str, width: int) -> nn.Module:
    """Return the activation called ``name`` for a layer of ``width`` units."""
    try:
        return ACTIVATIONS[name.lower()](width)
    except KeyError:
        known = ", ".join(ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; expected one of: {known}") from None


def mlp(
    depth: int = 5,
    width: int = 500,
    activation: str = "relu",
    in_features: int = 784,
    num_classes: int = 10,
) -> Built:
    """The paper's MLP: ``depth`` hidden Linear+activation layers of ``width`` units, then a
    Linear classifier.  ``mlp(5, 500)`` is the "5x500" net with exactly 2500 hidden neurons.
    Input ``[1, in_features]`` (a flattened MNIST image by default)."""
    layers: list[nn.Module] = []
    fan_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), make_activation(activation, width)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers).eval(), (1, in_features)


class ResidualMLP(nn.Module):
    """ReLU MLP whose equal-width hidden layers are joined by residual Adds:
    ``h_{k+1} = h_k + relu(W_k h_k + b_k)``.  The Adds tie the cofactors of every block's
    output to the stem's, which is what the reduced-cofactor-count tests look for."""

    def __init__(self, depth: int, width: int, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + self.act(block(h))
        return self.head(h)


def residual_mlp(
    depth: int = 4, width: int = 128, in_features: int = 784, num_classes: int = 10
) -> Built:
    """A :class:`ResidualMLP` with ``depth`` residual blocks; input ``[1, in_features]``."""
    return ResidualMLP(depth, width, in_features, num_classes).eval(), (1, in_features)


# --------------------------------------------------------------------------------------------
# VGG (CIFAR, 32x32)
# --------------------------------------------------------------------------------------------

VGG_CFGS: dict[str, str] = {
    "11": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "13": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
    "19": "64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M",
}
"""VGG stage layouts: a number is a 3x3 conv's output channels, ``M`` a 2x2 max-pool."""


def _scaled(channels: int, mult: float) -> int:
    """``channels * mult`` rounded, at least 1."""
    return max(1, round(channels * mult))


def _vgg_features(cfg: str, batch_norm: bool, width_mult: float) -> nn.Sequential:
    """VGG's conv stack: 3x3 Conv(+BN)+ReLU per number, 2x2 MaxPool per ``"M"``."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in cfg.split():
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        out_ch = _scaled(int(item), width_mult)
        layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
        in_ch = out_ch
    return nn.Sequential(*layers)


def vgg(
    cfg: str = "11", batch_norm: bool = False, num_classes: int = 10, width_mult: float = 1.0
) -> Built:
    """CIFAR-style VGG (``cfg`` in 11/13/16/19): five pooled conv stages take 32x32 to 1x1,
    then a single Linear classifier.  Convs keep their bias even with BN (torchvision style).
    ``width_mult`` scales every conv's channel count (0.25 gives a test-sized net)."""
    if cfg not in VGG_CFGS:
        raise ValueError(f"unknown VGG config {cfg!r}; expected one of {sorted(VGG_CFGS)}")
    features = _vgg_features(VGG_CFGS[cfg], batch_norm, width_mult)
    last = _scaled(512, width_mult)
    model = nn.Sequential(features, nn.Flatten(), nn.Linear(last, num_classes))
    return model.eval(), (1, 3, 32, 32)


# --------------------------------------------------------------------------------------------
# ResNet-18 (CIFAR stem)
# --------------------------------------------------------------------------------------------


def conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    dims: int = 2,
    bias: bool = False,
) -> nn.Sequential:
    """``dims``-D convolution ("same" padding, bias-free unless ``bias``) then BatchNorm."""
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return nn.Sequential(
        conv(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=bias),
        norm(out_ch),
    )


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 Conv+BN with a ReLU between, the shortcut added before the
    final ReLU; a 1x1 Conv+BN shortcut when the stride or width changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv_bn(in_ch, out_ch, 3, stride), nn.ReLU(), conv_bn(out_ch, out_ch, 3)
        )
        needs_proj = stride != 1 or in_ch != out_ch
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride) if needs_proj else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.branch(x) + self.shortcut(x))


def resnet(
    blocks: Sequence[int] = (2, 2, 2, 2),
    num_classes: int = 10,
    width: int = 64,
    image_size: int = 32,
) -> Built:
    """CIFAR ResNet with BasicBlocks: 3x3 stem (no max-pool), stages of ``width * 2**i``
    channels (stride 2 from the second stage on), global average pool, Linear."""
    layers: list[nn.Module] = [conv_bn(3, width, 3), nn.ReLU()]
    in_ch = width
    for stage, count in enumerate(blocks):
        out_ch = width * 2**stage
        for i in range(count):
            layers.append(BasicBlock(in_ch, out_ch, 2 if stage > 0 and i == 0 else 1))
            in_ch = out_ch
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)]
    return nn.Sequential(*layers).eval(), (1, 3, image_size, image_size)


def resnet18(num_classes: int = 10, width: int = 64) -> Built:
    """ResNet-18 (2-2-2-2 BasicBlocks) for 32x32 inputs; ``width`` is the stem's channels."""
    return resnet((2, 2, 2, 2), num_classes, width)


# --------------------------------------------------------------------------------------------
# DenseNet (pre-activation BN-ReLU-Conv, Concat)
# --------------------------------------------------------------------------------------------


def bn_relu_conv(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    """Pre-activation unit: BatchNorm, ReLU, bias-free Conv ("same" padding)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(),
        nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
    )


class DenseLayer(nn.Module):
    """Bottleneck dense layer: BN-ReLU-Conv1x1 then BN-ReLU-Conv3x3, output concatenated to
    its input along channels."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.body = nn.Sequential(bn_relu_conv(in_ch, mid, 1), bn_relu_conv(mid, growth_rate, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def _transition(in_ch: int, out_ch: int) -> nn.Sequential:
    """DenseNet transition: BN-ReLU-Conv1x1 then 2x2 average pooling."""
    return nn.Sequential(bn_relu_conv(in_ch, out_ch, 1), nn.AvgPool2d(2, 2))


def _densenet_stem(out_ch: int, small_inputs: bool) -> list[nn.Module]:
    """CIFAR stem (a 3x3 conv) or ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool)."""
    if small_inputs:
        return [nn.Conv2d(3, out_ch, 3, padding=1, bias=False)]
    return [
        nn.Conv2d(3, out_ch, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]


def densenet(
    growth_rate: int = 12,
    block_config: Sequence[int] = (4, 4, 4),
    num_init_features: int = 24,
    bn_size: int = 4,
    compression: float = 0.5,
    num_classes: int = 10,
    small_inputs: bool = True,
) -> Built:
    """DenseNet-BC: dense blocks of :class:`DenseLayer` joined by transitions that compress
    channels by ``compression``; final BN-ReLU, global average pool, Linear.  With
    ``small_inputs`` the stem is CIFAR's 3x3 conv and the input 32x32, else ImageNet's and
    224x224."""
    layers = _densenet_stem(num_init_features, small_inputs)
    ch = num_init_features
    for i, count in enumerate(block_config):
        for _ in range(count):
            layers.append(DenseLayer(ch, growth_rate, bn_size))
            ch += growth_rate
        if i != len(block_config) - 1:
            out_ch = math.floor(ch * compression)
            layers.append(_transition(ch, out_ch))
            ch = out_ch
    layers += [nn.BatchNorm2d(ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(ch, num_classes))
    size = 32 if small_inputs else 224
    return nn.Sequential(*layers).eval(), (1, 3, size, size)


def densenet121(num_classes: int = 1000, small_inputs: bool = False) -> Built:
    """DenseNet-121 (growth 32, blocks 6-12-24-16, 64 initial features); ~8M parameters, so
    it is not in the test registry."""
    return densenet(32, (6, 12, 24, 16), 64, 4, 0.5, num_classes, small_inputs)


# --------------------------------------------------------------------------------------------
# U-Net
# --------------------------------------------------------------------------------------------


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """U-Net's unit: two (3x3 Conv, BN, ReLU)."""
    return nn.Sequential(
        conv_bn(in_ch, out_ch, 3), nn.ReLU(), conv_bn(out_ch, out_ch, 3), nn.ReLU()
    )


class UNet(nn.Module):
    """U-Net: ``depth`` max-pooled encoder stages, a bottleneck, and decoder stages that
    upsample with a 2x2/2 ConvTranspose, Concat the encoder's skip, and apply a double conv;
    a 1x1 Conv gives per-pixel class scores."""

    def __init__(self, in_channels: int, num_classes: int, base: int, depth: int) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        ch = in_channels
        for w in widths[:-1]:
            self.down.append(double_conv(ch, w))
            ch = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(ch, widths[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.up.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.merge.append(double_conv(2 * w_out, w_out))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def unet(
    in_channels: int = 3, num_classes: int = 2, base: int = 8, depth: int = 3, size: int = 32
) -> Built:
    """A small :class:`UNet`; input ``[1, in_channels, size, size]`` (``size`` divisible by
    ``2**depth``)."""
    if size % 2**depth:
        raise ValueError(f"size {size} must be divisible by 2**depth = {2**depth}")
    return UNet(in_channels, num_classes, base, depth).eval(), (1, in_channels, size, size)


# --------------------------------------------------------------------------------------------
# MobileNetV2 inverted residuals
# --------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand Conv+BN+ReLU6 (skipped when ``expand_ratio`` is 1),
    3x3 depthwise Conv+BN+ReLU6, 1x1 project Conv+BN; residual Add when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [conv_bn(in_ch, hidden, 1), nn.ReLU6()]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6()]
        layers.append(conv_bn(hidden, out_ch, 1))
        self.body = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.use_residual else y


MOBILENET_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 16, 1),
    (4, 16, 1),
    (4, 24, 2),
    (4, 24, 1),
    (4, 32, 2),
)
"""Default (expand_ratio, out_channels, stride) per inverted-residual block."""


def mobilenetv2_block(
    blocks: Sequence[tuple[int, int, int]] = MOBILENET_BLOCKS,
    stem_channels: int = 16,
    head_channels: int = 64,
    num_classes: int = 10,
    size: int = 32,
) -> Built:
    """Tiny MobileNetV2: 3x3/2 Conv+BN+ReLU6 stem, :class:`InvertedResidual` ``blocks``
    given as (expand_ratio, out_channels, stride), 1x1 Conv+BN+ReLU6 head, global average
    pool, Linear classifier."""
    layers: list[nn.Module] = [conv_bn(3, stem_channels, 3, 2), nn.ReLU6()]
    ch = stem_channels
    for expand, out_ch, stride in blocks:
        layers.append(InvertedResidual(ch, out_ch, stride, expand))
        ch = out_ch
    layers += [conv_bn(ch, head_channels, 1), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head_channels, num_classes)]
    return nn.Sequential(*layers).eval(), (1, 3, size, size)


MOBILENET_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""torchvision's MobileNetV2 stages: (expand_ratio t, channels c, repeats n, first stride s)."""


def _divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: ``v`` rounded to a multiple of ``divisor``, at
    least ``divisor``, never more than 10 % below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def mobilenetv2(width_mult: float = 1.0, num_classes: int = 1000, size: int = 224) -> Built:
    """MobileNetV2 as torchvision builds it (``torchvision.models.mobilenet_v2``, whose
    dropout vanishes at export): the :data:`MOBILENET_V2_SETTINGS` stages (channels times
    ``width_mult``, made divisible by 8), a 32-channel stem and a 1280-channel head, all
    Conv+BN+ReLU6 with depthwise 3x3 convs and inverted residuals (:func:`mobilenetv2_block`).
    Exported with BN folded, its ReLU6s are ``Clip(x, 0, 6)``.  3.5 M parameters at
    ``width_mult`` 1."""
    blocks: list[tuple[int, int, int]] = []
    for t, c, n, s in MOBILENET_V2_SETTINGS:
        blocks += [(t, _divisible(c * width_mult), s if k == 0 else 1) for k in range(n)]
    stem, head = _divisible(32 * width_mult), _divisible(1280 * max(1.0, width_mult))
    return mobilenetv2_block(blocks, stem, head, num_classes, size)


# --------------------------------------------------------------------------------------------
# Small 1-D, 2-D and 3-D CNNs
# --------------------------------------------------------------------------------------------


def cnn_2d(
    in_channels: int = 3, size: int = 16, width: int = 8, num_classes: int = 10, bias: bool = True
) -> Built:
    """Small Conv2d net: (Conv+BN+ReLU, MaxPool), (Conv+BN+ReLU, AvgPool), Flatten, Linear.
    Input ``[1, in_channels, size, size]`` (``size`` divisible by 4).  With ``bias`` the convs
    keep a bias initializer even when the exporter leaves the BNs unfolded; without it, an
    unoptimised dynamo export builds a zero bias at run time from Shape/Expand nodes."""
    model = nn.Sequential(
        conv_bn(in_channels, width, 3, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        conv_bn(width, 2 * width, 3, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, num_classes),
    )  # fmt: skip
    return model.eval(), (1, in_channels, size, size)


def cnn_1d(in_channels: int = 4, length: int = 64, width: int = 16, num_classes: int = 5) -> Built:
    """Conv1d net: (Conv+BN+ReLU, MaxPool), (Conv+BN+ReLU, AvgPool), Conv+ReLU with bias,
    Flatten, Linear.  Input ``[1, in_channels, length]`` (``length`` divisible by 4)."""
    model = nn.Sequential(
        conv_bn(in_channels, width, 5, dims=1), nn.ReLU(), nn.MaxPool1d(2),
        conv_bn(width, 2 * width, 3, dims=1), nn.ReLU(), nn.AvgPool1d(2),
        nn.Conv1d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * (length // 4), num_classes),
    )  # fmt: skip
    return model.eval(), (1, in_channels, length)


def cnn_3d(in_channels: int = 1, size: int = 16, width: int = 8, num_classes: int = 5) -> Built:
    """Conv3d net: (Conv+BN+ReLU, MaxPool), (Conv+BN+ReLU, AvgPool), Flatten, Linear.
    Input ``[1, in_channels, size, size, size]`` (``size`` divisible by 4).

    The convs keep their bias: for a bias-free Conv3d, onnxscript 0.7's torchlib synthesises a
    zero bias of shape ``[C_out, 2]`` (microsoft/onnxscript#2931), which onnxruntime rejects
    when the dynamo export is not optimised (``fold_bn=False``)."""
    model = nn.Sequential(
        conv_bn(in_channels, width, 3, dims=3, bias=True), nn.ReLU(), nn.MaxPool3d(2),
        conv_bn(width, 2 * width, 3, dims=3, bias=True), nn.ReLU(), nn.AvgPool3d(2),
        nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 3, num_classes),
    )  # fmt: skip
    return model.eval(), (1, in_channels, size, size, size)


# --------------------------------------------------------------------------------------------
# Transformer FFN block
# --------------------------------------------------------------------------------------------


class TransformerMLPBlock(nn.Module):
    """Pre-norm transformer feed-forward block: ``x + W2 gelu(W1 LayerNorm(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def transformer_mlp_block(
    dim: int = 64, hidden: int = 256, num_blocks: int = 1, seq_len: int = 16, batch: int = 2
) -> Built:
    """``num_blocks`` stacked :class:`TransformerMLPBlock` on ``[batch, seq_len, dim]`` input
    (3-D, so the exporter emits MatMul+Add rather than Gemm)."""
    blocks = [TransformerMLPBlock(dim, hidden) for _ in range(num_blocks)]
    return nn.Sequential(*blocks).eval(), (batch, seq_len, dim)


# --------------------------------------------------------------------------------------------
# Re-randomisation and the test registry
# --------------------------------------------------------------------------------------------

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _uniform(t: torch.Tensor, low: float, high: float, gen: torch.Generator) -> None:
    """Fill ``t`` in place with U[low, high] draws from ``gen``."""
    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (high - low) + low)


def _normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill ``t`` in place with N(0, std²) draws from ``gen``."""
    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)


def _randomize_norm(m: nn.Module, gen: torch.Generator) -> None:
    """Affine weight ~ U[0.5, 1.5], bias ~ N(0, 0.1²); BN running mean ~ N(0, 0.5²) and
    running var ~ U[0.5, 2]."""
    fills: dict[str, Callable[[torch.Tensor], None]] = {
        "weight": lambda t: _uniform(t, 0.5, 1.5, gen),
        "bias": lambda t: _normal(t, 0.1, gen),
        "running_mean": lambda t: _normal(t, 0.5, gen),
        "running_var": lambda t: _uniform(t, 0.5, 2.0, gen),
    }
    for attr, fill in fills.items():
        tensor = getattr(m, attr, None)
        if isinstance(tensor, torch.Tensor):
            fill(tensor)


def _is_constant(t: torch.Tensor) -> bool:
    """True when every element of ``t`` equals the first (zero-, one- or fill-initialised)."""
    return bool((t == t.reshape(-1)[0]).all())


def _randomize_constant(p: torch.Tensor, gen: torch.Generator) -> None:
    """Replace a constant parameter: PReLU-like scalars/vectors get U[0.05, 0.5], matrices a
    fan-in-scaled normal."""
    if p.dim() <= 1:
        _uniform(p, 0.05, 0.5, gen)
    else:
        _normal(p, 1.0 / math.sqrt(p[0].numel()), gen)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-randomise, in place and deterministically from ``seed``, everything that torch
    initialises to a constant: norm-layer affine parameters and BatchNorm running statistics
    (mean ~ N(0, 0.5²), var ~ U[0.5, 2]), PReLU slopes and any other parameter whose elements
    are all equal.  Returns ``model`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORMS):
            _randomize_norm(module, gen)
            done.update(id(p) for p in module.parameters(recurse=False))
    for p in model.parameters():
        if id(p) not in done and p.numel() > 0 and _is_constant(p):
            _randomize_constant(p, gen)
    return model.eval()


def build(factory: Callable[..., Built], seed: int = 0, **kwargs: Any) -> Built:
    """Call ``factory(**kwargs)`` with torch's RNG seeded by ``seed`` (without disturbing the
    caller's RNG state), then :func:`randomize_` the result with the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, shape = factory(**kwargs)
    return randomize_(model, seed), shape


def _entry(factory: Callable[..., Built], **kwargs: Any) -> Callable[[], Built]:
    """A registry entry: a zero-argument builder of a seeded, randomised configuration."""

    def make() -> Built:
        return build(factory, 0, **kwargs)

    make.__doc__ = f"{factory.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    return make


ARCHITECTURES: dict[str, Callable[[], Built]] = {
    "mlp": _entry(mlp, depth=3, width=64),
    "mlp_5x500": _entry(mlp, depth=5, width=500),
    "residual_mlp": _entry(residual_mlp, depth=4, width=64),
    "vgg11": _entry(vgg, cfg="11", batch_norm=False, width_mult=0.25),
    "vgg11_bn": _entry(vgg, cfg="11", batch_norm=True, width_mult=0.25),
    "vgg16_bn": _entry(vgg, cfg="16", batch_norm=True, width_mult=0.25),
    "resnet18": _entry(resnet18, width=16),
    "densenet": _entry(densenet, growth_rate=8, block_config=(3, 3, 3), num_init_features=16),
    "unet": _entry(unet, base=8, depth=3),
    "mobilenetv2": _entry(mobilenetv2_block),
    "cnn1d": _entry(cnn_1d),
    "cnn2d": _entry(cnn_2d),
    "cnn3d": _entry(cnn_3d),
    "transformer_mlp": _entry(transformer_mlp_block, num_blocks=2),
}
"""Test-sized configurations by name; each value builds ``(model, input_shape)`` with fixed
seed 0, randomised by :func:`randomize_`, in eval mode."""


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())
