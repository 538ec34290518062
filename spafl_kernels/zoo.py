"""The paper's models, built from this package's layers (``sparse=True``) or from plain
``nn.Linear``/``nn.Conv2d`` (``sparse=False``: the dense model FedAvg trains).

Like the paper's code, the sparse layers have no bias (a pruned row then outputs exactly 0 without a
bias to carry), and layers the paper keeps dense (ViT patch embedding and head, ResNet classifier)
stay dense here. Every model maps ``[B, C, H, W]`` to logits ``[B, num_classes]``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .modules import SparseConv2d, SparseLinear

MODELS = ("lenet5", "conv4", "resnet18", "vit", "mlp")


class LayerFactory:
    """Factories for Linear and Conv2d: sparse twins (with ``ste``, ``backend``) or dense. ``classifier``
    builds a model's last Linear (the one row per class): sparse like the others, or dense with
    ``dense_classifier`` (a pruned class row outputs exactly 0, which no input can then move)."""

    def __init__(self, sparse: bool, ste: str, backend: str, dense_classifier: bool = False):
        self.linear = partial(SparseLinear, ste=ste, backend=backend) if sparse else nn.Linear
        self.conv = partial(SparseConv2d, ste=ste, backend=backend) if sparse else nn.Conv2d
        self.classifier = nn.Linear if dense_classifier else self.linear


def _flat_size(features: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Elements per sample after ``features`` (a dry run on one zero image)."""
    with torch.no_grad():
        return features(torch.zeros(1, *input_shape)).numel()


class LeNet5(nn.Module):
    """The paper's FMNIST model: conv 5x5 (20) -> pool -> conv 5x5 (50) -> pool -> fc 500 -> fc classes.

    Inputs under 16 pixels (``digits``: 8x8) get padding 2 so both 5x5 convolutions fit.
    """

    def __init__(self, layers: LayerFactory, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        pad = 2 if min(h, w) < 16 else 0
        self.conv1 = layers.conv(c, 20, 5, padding=pad, bias=False)
        self.conv2 = layers.conv(20, 50, 5, padding=pad, bias=False)
        flat = _flat_size(self._features, input_shape)
        self.fc3 = layers.linear(flat, 500, bias=False)
        self.fc4 = layers.classifier(500, num_classes, bias=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.max_pool2d(F.relu(self.conv2(x)), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x).flatten(1)
        return self.fc4(F.relu(self.fc3(x)))


class Conv4(nn.Module):
    """The paper's CIFAR-10 model: four 5x5 convs (64, 64, 128, 128) with BatchNorm, two pools, then
    dense 128 -> 128 -> classes with BatchNorm."""

    def __init__(self, layers: LayerFactory, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        if min(h, w) < 28:
            raise ValueError(f"conv4 needs inputs of at least 28x28 (four valid 5x5 convs, two pools), got {h}x{w}")
        self.conv1, self.bn1 = layers.conv(c, 64, 5, bias=False), nn.BatchNorm2d(64)
        self.conv2, self.bn2 = layers.conv(64, 64, 5, bias=False), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = layers.conv(64, 128, 5, bias=False), nn.BatchNorm2d(128)
        self.conv4, self.bn4 = layers.conv(128, 128, 5, bias=False), nn.BatchNorm2d(128)
        flat = _flat_size(self._features, input_shape)
        self.dense1, self.bn5 = layers.linear(flat, 128, bias=False), nn.BatchNorm1d(128)
        self.dense2, self.bn6 = layers.linear(128, 128, bias=False), nn.BatchNorm1d(128)
        self.dense3 = layers.classifier(128, num_classes, bias=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x).flatten(1)
        x = F.relu(self.bn5(self.dense1(x)))
        x = F.relu(self.bn6(self.dense2(x)))
        return self.dense3(x)


class PreActBlock(nn.Module):
    """The paper's ResNet block (pre-activation): BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut,
    a 1x1 conv on the activated input when the shape changes."""

    def __init__(self, layers: LayerFactory, planes_in: int, planes_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes_in)
        self.conv1 = layers.conv(planes_in, planes_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes_out)
        self.conv2 = layers.conv(planes_out, planes_out, 3, padding=1, bias=False)
        self.shortcut = None
        if planes_in != planes_out or stride != 1:
            self.shortcut = layers.conv(planes_in, planes_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class ResNet18(nn.Module):
    """The paper's half-width ResNet-18 for CIFAR-100: stem conv 3x3 (32), four stages of two blocks
    (32, 64, 128, 256 channels; strides 1, 2, 2, 2), global average pool, dense classifier."""

    def __init__(self, layers: LayerFactory, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.conv1 = layers.conv(input_shape[0], 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        stages, planes = [], 32
        for width, stride in ((32, 1), (64, 2), (128, 2), (256, 2)):
            blocks = PreActBlock(layers, planes, width, stride), PreActBlock(layers, width, width, 1)
            stages.append(nn.Sequential(*blocks))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # The paper pools 4x4 maps of a 32x32 input; adaptive pooling is the same there and fits any size.
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention (``heads`` x ``dim_head``) with sparse ``to_qkv`` and ``to_out``.
    ``[B, T, dim] -> [B, T, dim]``."""

    def __init__(self, layers: LayerFactory, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = layers.linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = layers.linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, h, T, d]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of width ``mlp_dim``."""

    def __init__(self, layers: LayerFactory, dim: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(layers, dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(layers.linear(dim, mlp_dim, bias=False), nn.GELU(),
                                 layers.linear(mlp_dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The paper's CIFAR ViT: patch 4, dim 128, depth 6, 8 heads of 64, MLP 256, class token, every
    Linear of attention and MLP sparse; patch embedding and head dense (as in the paper's code)."""

    def __init__(self, layers: LayerFactory, input_shape: tuple[int, int, int], num_classes: int, patch: int = 4,
                 dim: int = 128, depth: int = 6, heads: int = 8, dim_head: int = 64, mlp_dim: int = 256):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"vit: input {h}x{w} is not divisible by the patch size {patch}")
        self.patch = patch
        self.to_patch_embedding = nn.Linear(c * patch * patch, dim)
        tokens = (h // patch) * (w // patch) + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(layers, dim, heads, dim_head, mlp_dim) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        # [B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches row-major, pixel order (p1, p2, c) as the paper's.
        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.to_patch_embedding(patches)], dim=1)
        tokens = self.blocks(tokens + self.pos_embedding)
        return self.head(tokens[:, 0])


class MLP(nn.Module):
    """LeNet-300-100: flatten -> 300 -> 100 -> classes, ReLU between, every layer sparse."""

    def __init__(self, layers: LayerFactory, input_shape: tuple[int, int, int], num_classes: int,
                 hidden: tuple[int, ...] = (300, 100)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(layers.linear(a, b, bias=False) for a, b in zip(sizes, sizes[1:]))
        self.out = layers.classifier(sizes[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)


_BUILDERS = {"lenet5": LeNet5, "conv4": Conv4, "resnet18": ResNet18, "vit": ViT, "mlp": MLP}


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    sparse: bool = True,
    ste: str = "identity",
    backend: str = "auto",
    seed: int | None = None,
    dense_classifier: bool = False,
) -> nn.Module:
    """Model ``name`` (one of ``MODELS``) for inputs ``[B, *input_shape]``; ``seed`` fixes the
    initialisation (the same seed gives the sparse and the dense model the same weights).
    ``dense_classifier``: the last Linear of LeNet-5, Conv4 and the MLP stays dense (ResNet-18 and the
    ViT keep a dense classifier either way, as in the paper)."""
    if name not in _BUILDERS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if seed is not None:
        torch.manual_seed(seed)
    return _BUILDERS[name](LayerFactory(sparse, ste, backend, dense_classifier), tuple(input_shape), num_classes)
