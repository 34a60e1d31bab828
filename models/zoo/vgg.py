"""RepDistiller's CIFAR VGGs with BatchNorm (vgg8_bn ... vgg19_bn): five blocks of
conv3x3 (with bias)-BN-ReLU, 2x2 max-pooling after blocks 0, 1 and 2 (32 -> 16 -> 8 -> 4) and
after block 3 only for 64x64 inputs (as RepDistiller's forward), then the global average and a
512-d classifier (no fully connected hidden layers)."""
import functools
from typing import Sequence

import flax.linen as nn

from models.zoo.base import ZooNet, register_model

# Channels of each conv in each of the five blocks (RepDistiller's configurations S, A, B, D, E).
VGG_CONFIGS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _max_pool(x):
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


class VGG(ZooNet):
    blocks: Sequence[Sequence[int]] = VGG_CONFIGS[13]

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        height = images.shape[1]
        x = self.standardize(images)
        for index, channels in enumerate(self.blocks):
            if index in (1, 2, 3) or (index == 4 and height == 64):
                x = _max_pool(x)
            for layer, features in enumerate(channels):
                # In PyTorch's Sequential a conv is entry 3·layer and its BatchNorm entry 3·layer + 1.
                x = self.conv(features, 3, f"block{index}_{3 * layer}", bias=True)(x)
                x = nn.relu(self.batch_norm(train, f"block{index}_{3 * layer + 1}")(x))
        return self.classify(x, return_features)


for _depth, _blocks in VGG_CONFIGS.items():
    register_model(f"vgg{_depth}_bn", aliases=(f"vgg{_depth}",))(functools.partial(VGG, blocks=_blocks))
