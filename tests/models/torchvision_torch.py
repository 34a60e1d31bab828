"""PyTorch definitions of the ImageNet CNNs of GenDD's ImageNet experiments, written for the tests
from the published architectures: torchvision's v1 ResNets/ResNeXts (He et al. 2016, Xie et al.
2017, with torchvision's module names, hence state-dict keys: conv1, bn1, layer<s>.<b>.conv<i>,
.bn<i>, .downsample.0/.1, fc) and GenDD's MobileNetV1 (GenDD_imagenet/models/mobilenetv1.py: a
`model` Sequential of conv-BN-ReLU and depthwise-separable blocks, AvgPool 7, `fc`). torchvision
itself is not a dependency. The zoo in models/zoo is proved against these.

`build(arch, num_classes)` returns a module whose forward gives (pooled feature, logits).
Imports torch at the top: import this module only where torch is required.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """A residual block: relu(residual(x) + shortcut(x)), the shortcut torchvision's `downsample`
    (1x1 conv + BN) where the stride or the width changes."""
    expansion = 1

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        out_planes = planes * self.expansion
        self.downsample = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.residual(x) + shortcut)


class BasicBlock(Block):
    def __init__(self, in_planes, planes, stride, groups=1, width_per_group=64):
        super().__init__(in_planes, planes, stride)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def residual(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Bottleneck(Block):
    """ResNet v1.5: the stride sits on the 3x3 conv; ResNeXt groups that conv."""
    expansion = 4

    def __init__(self, in_planes, planes, stride, groups=1, width_per_group=64):
        super().__init__(in_planes, planes, stride)
        width = int(planes * width_per_group / 64) * groups
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def residual(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))


class ImageNetResNet(nn.Module):
    def __init__(self, kind, layers, num_classes, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = 64
        for index, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if index > 1 and i == 0 else 1
                blocks.append(kind(in_planes, planes, stride, groups, width_per_group))
                in_planes = planes * kind.expansion
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * kind.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled, self.fc(pooled)


class MobileNetV1(nn.Module):
    """GenDD's: indices of `model` are its stem (0), 13 separable blocks (1..13) and AvgPool 7 (14)."""

    def __init__(self, num_classes=1000):
        super().__init__()

        def stem(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        def separable(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                                 nn.BatchNorm2d(c_in), nn.ReLU(),
                                 nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
        strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
        layers = [stem(3, 32, 2)]
        layers += [separable(widths[i - 1], widths[i], strides[i]) for i in range(1, 14)]
        self.model = nn.Sequential(*layers, nn.AvgPool2d(7))
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        pooled = self.model(x).reshape(-1, 1024)
        return pooled, self.fc(pooled)


# torchvision's constructors: (block, blocks per stage, groups, width per group).
RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_32x4d": (Bottleneck, (3, 4, 23, 3), 32, 4),  # GenDD's ImageNet-LT teacher
}


def build(arch: str, num_classes: int) -> nn.Module:
    """The network `arch` (the zoo's registry names) for `num_classes` classes."""
    if arch == "mobilenetv1":
        return MobileNetV1(num_classes)
    kind, layers, groups, width_per_group = RESNETS[arch]
    return ImageNetResNet(kind, layers, num_classes, groups, width_per_group)


def damp_residual_branches(model: nn.Module, scale: float = 0.2) -> nn.Module:
    """Scale the last BatchNorm of every residual branch (weight and bias) by `scale`, in place, as
    training leaves it small (torchvision can zero-initialise it). Without it a random deep ResNet's
    residual stream grows positive block after block, each branch's first BatchNorm subtracts a
    large mean, and float32 noise grows with depth: PyTorch's own float32 logits of ResNet-101 are
    5e-5 (relative) from its float64 ones; damped, 5e-7, which leaves the 1e-4 test room to see a
    layout, padding or epsilon mistake (1e-3 and more). Call after randomize_normalization."""
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, Block):
                last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last.weight.mul_(scale)
                last.bias.mul_(scale)
    return model
