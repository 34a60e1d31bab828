"""RepDistiller's CIFAR MobileNetV2 (`mobile_half`: expansion 6, width 0.5): a 3x3 stride-2 stem,
seven groups of inverted residuals (1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 project-BN;
a residual where stride 1 and widths agree), a 1x1 conv to 1280 channels with BN-ReLU, the
average pool and the classifier. As RepDistiller: ReLU, not ReLU6; the t = 1 group keeps its
expansion conv; the last width is 1280 unless width_mult > 1. Its AvgPool(input_size // 16) is the
global mean on the 32x32 inputs it is built for."""
import functools

import flax.linen as nn

from models.zoo.base import ZooNet, register_model

# (expansion, channels, blocks, first stride); expansion None is the network's `expand_ratio`.
INVERTED_RESIDUALS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                      (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))


class MobileNetV2(ZooNet):
    expand_ratio: int = 6
    width_mult: float = 0.5

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        in_channels = int(32 * self.width_mult)
        x = self.conv(in_channels, 3, "conv1_0", stride=2)(self.standardize(images))
        x = nn.relu(self.batch_norm(train, "conv1_1")(x))
        for group, (expansion, channels, blocks, first_stride) in enumerate(INVERTED_RESIDUALS):
            out_channels = int(channels * self.width_mult)
            hidden = in_channels * (expansion or self.expand_ratio)
            for block in range(blocks):
                stride = first_stride if block == 0 else 1
                name = f"blocks_{group}_{block}_conv"
                y = nn.relu(self.batch_norm(train, f"{name}_1")(self.conv(hidden, 1, f"{name}_0")(x)))
                y = self.conv(hidden, 3, f"{name}_3", stride, groups=hidden)(y)
                y = nn.relu(self.batch_norm(train, f"{name}_4")(y))
                y = self.batch_norm(train, f"{name}_7")(self.conv(out_channels, 1, f"{name}_6")(y))
                x = x + y if stride == 1 and in_channels == out_channels else y
                in_channels = out_channels
                hidden = in_channels * (expansion or self.expand_ratio)
        last_channels = int(1280 * self.width_mult) if self.width_mult > 1.0 else 1280
        x = nn.relu(self.batch_norm(train, "conv2_1")(self.conv(last_channels, 1, "conv2_0")(x)))
        return self.classify(x, return_features)


register_model("mobile_half", aliases=("MobileNetV2",))(
    functools.partial(MobileNetV2, expand_ratio=6, width_mult=0.5))
