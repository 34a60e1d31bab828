"""torchvision's v1 ImageNet ResNets and ResNeXts (resnet18/34/50/101, resnext50_32x4d,
resnext101_32x8d, and GenDD's ImageNet-LT teacher resnext101_32x4d): the teachers and students of
GenDD's ImageNet experiments, loadable from torchvision's bare state dicts.

A 7x7 stride-2 stem (padding 3) with BN-ReLU, a 3x3 stride-2 max-pool (padding 1, padded with
-inf as PyTorch's), four stages of 64/128/256/512 planes with strides 1/2/2/2, the global average
pool and the classifier. BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, add, ReLU. Bottleneck (v1.5, as
torchvision: the stride is on the 3x3 conv): conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU,
conv1x1-BN to 4x planes, add, ReLU, with width int(planes * width_per_group / 64) * groups. A
block's shortcut is a 1x1 conv + BN (`downsample`) where the stride or the width changes, so the
first block of ResNet-50/101's layer1 has one (64 -> 256). Inputs of any size (the pool is global);
ImageNet's are 224x224.
"""
import functools
from typing import ClassVar, Sequence

import flax.linen as nn

from models.zoo.base import ZooNet, register_model

# torchvision's ImageNet normalisation (its pretrained weights, and GenDD's loaders, use it).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The data-set name recorded in a converted ImageNet network's sidecar (data/ has no ImageNet yet).
IMAGENET_DATA_NAME = "imagenet2012"


class ImageNetResNet(ZooNet):
    block: str = "basic"  # basic | bottleneck
    layers: Sequence[int] = (2, 2, 2, 2)  # blocks per stage
    groups: int = 1  # of the bottleneck's 3x3 conv (ResNeXt: 32)
    width_per_group: int = 64  # ResNeXt's d
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    default_data_name: ClassVar[str] = IMAGENET_DATA_NAME  # the converter's default --data_name

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be basic or bottleneck, got {self.block!r}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ValueError("a BasicBlock ResNet has groups 1 and width_per_group 64")
        expansion = 4 if self.block == "bottleneck" else 1
        x = self.conv(64, 7, "conv1", stride=2)(self.standardize(images))
        x = nn.relu(self.batch_norm(train, "bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        in_planes = 64
        for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            for block in range(blocks):
                stride = 2 if layer > 1 and block == 0 else 1
                name = f"layer{layer}_{block}"
                if self.block == "basic":
                    y = self._basic(x, planes, stride, name, train)
                else:
                    y = self._bottleneck(x, planes, stride, name, train)
                shortcut = x
                if block == 0 and (stride != 1 or in_planes != planes * expansion):
                    shortcut = self.conv(planes * expansion, 1, f"{name}_downsample_0", stride)(x)
                    shortcut = self.batch_norm(train, f"{name}_downsample_1")(shortcut)
                x = nn.relu(y + shortcut)
                in_planes = planes * expansion
        return self.classify(x, return_features)

    def _basic(self, x, planes: int, stride: int, name: str, train: bool):
        y = nn.relu(self.batch_norm(train, f"{name}_bn1")(self.conv(planes, 3, f"{name}_conv1", stride)(x)))
        return self.batch_norm(train, f"{name}_bn2")(self.conv(planes, 3, f"{name}_conv2")(y))

    def _bottleneck(self, x, planes: int, stride: int, name: str, train: bool):
        width = int(planes * (self.width_per_group / 64.0)) * self.groups
        y = nn.relu(self.batch_norm(train, f"{name}_bn1")(self.conv(width, 1, f"{name}_conv1")(x)))
        y = self.conv(width, 3, f"{name}_conv2", stride, groups=self.groups)(y)
        y = nn.relu(self.batch_norm(train, f"{name}_bn2")(y))
        return self.batch_norm(train, f"{name}_bn3")(self.conv(planes * 4, 1, f"{name}_conv3")(y))


for _name, _block, _layers, _groups, _width in (
        ("resnet18", "basic", (2, 2, 2, 2), 1, 64),
        ("resnet34", "basic", (3, 4, 6, 3), 1, 64),
        ("resnet50", "bottleneck", (3, 4, 6, 3), 1, 64),
        ("resnet101", "bottleneck", (3, 4, 23, 3), 1, 64),
        ("resnext50_32x4d", "bottleneck", (3, 4, 6, 3), 32, 4),
        ("resnext101_32x8d", "bottleneck", (3, 4, 23, 3), 32, 8),
        ("resnext101_32x4d", "bottleneck", (3, 4, 23, 3), 32, 4)):
    register_model(_name)(functools.partial(ImageNetResNet, block=_block, layers=_layers, groups=_groups,
                                            width_per_group=_width))
