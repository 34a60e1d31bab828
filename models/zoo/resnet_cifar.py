"""RepDistiller's CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4): post-activation
BasicBlocks (conv-BN-ReLU-conv-BN, add, ReLU), a 3x3 stride-1 stem, three stages of (depth-2)/6
blocks with strides 1/2/2, a 1x1-conv + BN shortcut where the shape changes (so resnet8x4 and
resnet32x4, whose stem is narrower than their first stage, have one in layer1 too), and
AvgPool 8, which on their 32x32 inputs is the global mean."""
import functools
from typing import Sequence

import flax.linen as nn

from models.zoo.base import ZooNet, register_model


class CifarResNet(ZooNet):
    depth: int = 32  # 6n + 2
    filters: Sequence[int] = (16, 16, 32, 64)  # stem, then the three stages

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        if (self.depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet's depth is 6n+2, got {self.depth}")
        blocks = (self.depth - 2) // 6
        x = self.standardize(images)
        x = nn.relu(self.batch_norm(train, "bn1")(self.conv(self.filters[0], 3, "conv1")(x)))
        in_planes = self.filters[0]
        for layer, (planes, first_stride) in enumerate(zip(self.filters[1:], (1, 2, 2)), start=1):
            for block in range(blocks):
                stride = first_stride if block == 0 else 1
                name = f"layer{layer}_{block}"
                y = self.conv(planes, 3, f"{name}_conv1", stride)(x)
                y = nn.relu(self.batch_norm(train, f"{name}_bn1")(y))
                y = self.batch_norm(train, f"{name}_bn2")(self.conv(planes, 3, f"{name}_conv2")(y))
                shortcut = x
                if block == 0 and (stride != 1 or in_planes != planes):
                    shortcut = self.conv(planes, 1, f"{name}_downsample_0", stride)(x)
                    shortcut = self.batch_norm(train, f"{name}_downsample_1")(shortcut)
                x = nn.relu(y + shortcut)
                in_planes = planes
        return self.classify(x, return_features)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(functools.partial(CifarResNet, depth=_depth, filters=(16, 16, 32, 64)))
for _depth in (8, 32):
    register_model(f"resnet{_depth}x4")(functools.partial(CifarResNet, depth=_depth,
                                                          filters=(32, 64, 128, 256)))
