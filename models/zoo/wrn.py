"""RepDistiller's wide ResNets wrn_d_k (d = 6n+4): a 3x3 stem conv to 16 channels, three groups
of n pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of widths 16k/32k/64k with strides
1/2/2, a final BN-ReLU and AvgPool 8 (the global mean on 32x32 inputs). Where a block changes the
width, its 1x1 shortcut conv takes the *activated* input; elsewhere the shortcut is the raw input.
No dropout (RepDistiller's default dropRate 0)."""
import functools

import flax.linen as nn

from models.zoo.base import ZooNet, register_model


class WideResNet(ZooNet):
    depth: int = 40  # 6n + 4
    widen_factor: int = 2

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f"a wide ResNet's depth is 6n+4, got {self.depth}")
        blocks = (self.depth - 4) // 6
        widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
        x = self.conv(16, 3, "conv1")(self.standardize(images))
        in_planes = 16
        for group, (planes, first_stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            for block in range(blocks):
                stride = first_stride if block == 0 else 1
                name = f"block{group}_layer_{block}"
                activated = nn.relu(self.batch_norm(train, f"{name}_bn1")(x))
                y = self.conv(planes, 3, f"{name}_conv1", stride)(activated)
                y = nn.relu(self.batch_norm(train, f"{name}_bn2")(y))
                y = self.conv(planes, 3, f"{name}_conv2")(y)
                if in_planes == planes:
                    shortcut = x
                else:
                    shortcut = self.conv(planes, 1, f"{name}_convShortcut", stride)(activated)
                x = shortcut + y
                in_planes = planes
        x = nn.relu(self.batch_norm(train, "bn1")(x))
        return self.classify(x, return_features)


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register_model(f"wrn_{_depth}_{_k}")(functools.partial(WideResNet, depth=_depth, widen_factor=_k))
