"""RepDistiller's CIFAR ShuffleNets (ShuffleV1: groups 3; ShuffleV2: net size 1), both with a
1x1 stride-1 stem to 24 channels and the global average pool (their AvgPool 4 on 32x32 inputs).

ShuffleNetV1 bottleneck: 1x1 group conv-BN-ReLU, channel shuffle, 3x3 depthwise-BN-ReLU, 1x1
group conv-BN; the first block of the network has groups 1 in its first conv (24 input channels);
stride-2 blocks concatenate [branch, shortcut] where the shortcut is a 3x3 stride-2 average pool
that counts the padding (divisor always 9, PyTorch's count_include_pad default); then ReLU.

ShuffleNetV2: each stage opens with a down block (two stride-2 branches, concatenated, shuffled)
followed by basic blocks that keep the first half of the channels as the identity and transform
the second (1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU), concatenate and shuffle with 2 groups;
then a 1x1 conv to 1024 channels with BN-ReLU."""
import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.zoo.base import ZooNet, channel_shuffle, register_model


class ShuffleNetV1(ZooNet):
    out_planes: Sequence[int] = (240, 480, 960)
    num_blocks: Sequence[int] = (4, 8, 4)
    groups: int = 3

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        x = self.conv(24, 1, "conv1")(self.standardize(images))
        x = nn.relu(self.batch_norm(train, "bn1")(x))
        in_planes = 24
        for layer, (planes, blocks) in enumerate(zip(self.out_planes, self.num_blocks), start=1):
            for block in range(blocks):
                stride = 2 if block == 0 else 1
                branch_planes = planes - in_planes if block == 0 else planes  # stride 2 concatenates
                mid = branch_planes // 4
                first_groups = 1 if in_planes == 24 else self.groups
                name = f"layer{layer}_{block}"
                y = self.conv(mid, 1, f"{name}_conv1", groups=first_groups)(x)
                y = channel_shuffle(nn.relu(self.batch_norm(train, f"{name}_bn1")(y)), first_groups)
                y = self.conv(mid, 3, f"{name}_conv2", stride, groups=mid)(y)
                y = nn.relu(self.batch_norm(train, f"{name}_bn2")(y))
                y = self.conv(branch_planes, 1, f"{name}_conv3", groups=self.groups)(y)
                y = self.batch_norm(train, f"{name}_bn3")(y)
                if stride == 2:
                    shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                                           count_include_pad=True)
                    x = nn.relu(jnp.concatenate([y, shortcut], axis=-1))
                else:
                    x = nn.relu(y + x)
                in_planes = planes
        return self.classify(x, return_features)


class ShuffleNetV2(ZooNet):
    out_channels: Sequence[int] = (116, 232, 464, 1024)  # three stages, then the last 1x1 conv
    num_blocks: Sequence[int] = (3, 7, 3)

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        x = self.conv(24, 1, "conv1")(self.standardize(images))
        x = nn.relu(self.batch_norm(train, "bn1")(x))
        in_channels = 24
        for layer, (channels, blocks) in enumerate(zip(self.out_channels[:3], self.num_blocks), start=1):
            x = self._down_block(x, in_channels, channels, f"layer{layer}_0", train)
            half = channels // 2
            for block in range(1, blocks + 1):
                name = f"layer{layer}_{block}"
                identity, y = x[..., :half], x[..., half:]
                y = nn.relu(self.batch_norm(train, f"{name}_bn1")(self.conv(half, 1, f"{name}_conv1")(y)))
                y = self.batch_norm(train, f"{name}_bn2")(self.conv(half, 3, f"{name}_conv2", groups=half)(y))
                y = nn.relu(self.batch_norm(train, f"{name}_bn3")(self.conv(half, 1, f"{name}_conv3")(y)))
                x = channel_shuffle(jnp.concatenate([identity, y], axis=-1), 2)
            in_channels = channels
        x = self.conv(self.out_channels[3], 1, "conv2")(x)
        x = nn.relu(self.batch_norm(train, "bn2")(x))
        return self.classify(x, return_features)

    def _down_block(self, x, in_channels: int, out_channels: int, name: str, train: bool):
        mid = out_channels // 2
        left = self.batch_norm(train, f"{name}_bn1")(
            self.conv(in_channels, 3, f"{name}_conv1", 2, groups=in_channels)(x))
        left = nn.relu(self.batch_norm(train, f"{name}_bn2")(self.conv(mid, 1, f"{name}_conv2")(left)))
        right = nn.relu(self.batch_norm(train, f"{name}_bn3")(self.conv(mid, 1, f"{name}_conv3")(x)))
        right = self.batch_norm(train, f"{name}_bn4")(self.conv(mid, 3, f"{name}_conv4", 2, groups=mid)(right))
        right = nn.relu(self.batch_norm(train, f"{name}_bn5")(self.conv(mid, 1, f"{name}_conv5")(right)))
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


register_model("ShuffleV1")(functools.partial(ShuffleNetV1, out_planes=(240, 480, 960), num_blocks=(4, 8, 4),
                                              groups=3))
register_model("ShuffleV2")(functools.partial(ShuffleNetV2, out_channels=(116, 232, 464, 1024),
                                              num_blocks=(3, 7, 3)))
