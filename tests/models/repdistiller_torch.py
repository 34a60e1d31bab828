"""PyTorch definitions of RepDistiller/CRD's CIFAR zoo, written for the tests from the architecture
(HobbitLong/RepDistiller models/*.py): the same modules, attribute names (hence state-dict keys)
and forward passes, without the distillation hooks. The zoo in models/zoo is proved against these.

`build(arch, num_classes)` returns a module whose forward gives (pooled feature, logits).
Imports torch at the top: import this module only where torch is required.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn(in_channels, out_channels, kernel, stride=1, groups=1):
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels)]


# ------------------------------------------------------------------------------ CIFAR ResNet
class ResNetBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, filters[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        in_planes = filters[0]
        for index, (planes, stride) in enumerate(zip(filters[1:], (1, 2, 2)), start=1):
            blocks = [ResNetBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                      for i in range(n)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(filters[3], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = self.avgpool(x).flatten(1)
        return pooled, self.fc(pooled)


# --------------------------------------------------------------------------------------- WRN
class WideBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return (x if self.equal_in_out else self.convShortcut(activated)) + out


class WideGroup(nn.Module):
    def __init__(self, blocks, in_planes, planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                                     for i in range(blocks)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = WideGroup(n, widths[0], widths[1], 1)
        self.block2 = WideGroup(n, widths[1], widths[2], 2)
        self.block3 = WideGroup(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        pooled = F.avg_pool2d(F.relu(self.bn1(x)), 8).flatten(1)
        return pooled, self.fc(pooled)


# --------------------------------------------------------------------------------------- VGG
VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        in_channels = 3
        for index, channels in enumerate(cfg):
            layers = []
            for c in channels:
                layers += [nn.Conv2d(in_channels, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
                in_channels = c
            setattr(self, f"block{index}", nn.Sequential(*layers[:-1]))  # the last ReLU is in forward
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        height = x.shape[2]
        x = self.pool(F.relu(self.block0(x)))
        x = self.pool(F.relu(self.block1(x)))
        x = self.pool(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if height == 64:
            x = self.pool(x)
        x = F.relu(self.block4(x))
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pooled, self.classifier(pooled)


# ------------------------------------------------------------------------------- MobileNetV2
class InvertedResidual(nn.Module):
    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(*_conv_bn(in_channels, hidden, 1), nn.ReLU(),
                                  *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU(),
                                  *_conv_bn(hidden, out_channels, 1))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, expansion, width_mult, num_classes, input_size=32):
        super().__init__()
        settings = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2),
                    (expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1)]
        in_channels = int(32 * width_mult)
        self.conv1 = nn.Sequential(*_conv_bn(3, in_channels, 3, 2), nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out_channels = int(c * width_mult)
            group = []
            for i in range(n):
                group.append(InvertedResidual(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*group))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn(in_channels, last, 1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)

    def forward(self, x):
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        pooled = self.avgpool(self.conv2(x)).flatten(1)
        return pooled, self.classifier(pooled)


# ------------------------------------------------------------------------------- ShuffleNets
def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid = out_planes // 4
        self.first_groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for index, (planes, n) in enumerate(zip(out_planes, num_blocks), start=1):
            blocks = []
            for i in range(n):
                blocks.append(ShuffleV1Block(in_planes, planes - (in_planes if i == 0 else 0),
                                             2 if i == 0 else 1, groups))
                in_planes = planes
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
        self.linear = nn.Linear(out_planes[2], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        pooled = F.avg_pool2d(x, 4).flatten(1)
        return pooled, self.linear(pooled)


class ShuffleV2Basic(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        half = x.shape[1] // 2
        identity, out = x[:, :half], x[:, half:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(out)))))
        out = F.relu(self.bn3(self.conv3(out)))
        return shuffle(torch.cat([identity, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for index, (channels, n) in enumerate(zip(out_channels[:3], num_blocks), start=1):
            blocks = [ShuffleV2Down(in_channels, channels)] + [ShuffleV2Basic(channels) for _ in range(n)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_channels = channels
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = F.avg_pool2d(x, 4).flatten(1)
        return pooled, self.linear(pooled)


# --------------------------------------------------------------------------------- by name
def build(arch: str, num_classes: int) -> nn.Module:
    """RepDistiller's network `arch` (the zoo's registry names) for `num_classes` classes."""
    if arch.startswith("resnet"):
        depth, x4 = arch[len("resnet"):].partition("x4")[:2]
        return CifarResNet(int(depth), [32, 64, 128, 256] if x4 else [16, 16, 32, 64], num_classes)
    if arch.startswith("wrn_"):
        _, depth, k = arch.split("_")
        return WideResNet(int(depth), int(k), num_classes)
    if arch.startswith("vgg"):
        return VGG(VGG_CFG[int(arch[3:].removesuffix("_bn"))], num_classes)
    if arch == "mobile_half":
        return MobileNetV2(6, 0.5, num_classes)
    if arch == "ShuffleV1":
        return ShuffleNetV1(num_classes)
    if arch == "ShuffleV2":
        return ShuffleNetV2(num_classes)
    raise KeyError(arch)


def randomize_normalization(model: nn.Module, calibration: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial parameters and running statistics, in place (interop.md §5:
    ones and zeros hide swapped or dropped tensors): random scale and shift, statistics calibrated
    on `calibration` (so deep nets stay finite) then perturbed, and in a few channels a tiny variance
    with a matching small scale (the output keeps its size only with the right ε). Returns the model
    in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in norms:
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=generator))
            bn.bias.copy_(0.2 * torch.randn(bn.bias.shape, generator=generator))
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: after one batch, exactly its statistics
        model.train()
        model(calibration)
        for bn in norms:
            bn.momentum = 0.1
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.2 * std * torch.randn(std.shape, generator=generator))
            bn.running_var.mul_(0.7 + 0.7 * torch.rand(std.shape, generator=generator))
            tiny = torch.rand(std.shape, generator=generator) < 0.1
            bn.running_var[tiny] *= 1e-4
            bn.weight[tiny] *= 1e-2
    return model.eval()
