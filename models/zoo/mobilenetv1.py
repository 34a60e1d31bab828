"""MobileNetV1 as GenDD's ImageNet code defines it (GenDD_imagenet/models/mobilenetv1.py, the
student of its R50 -> MobileNetV1 experiments): a 3x3 stride-2 conv to 32 channels with BN-ReLU,
then 13 depthwise-separable blocks (3x3 depthwise-BN-ReLU, 1x1 pointwise-BN-ReLU) to 1024
channels, AvgPool 7 and the classifier on the 1024-d feature.

Its parameter names are GenDD's `model.<i>.<j>` Sequential keys ('.' -> '_'): block i's depthwise
conv and BN are model_i_0 / model_i_1, its pointwise conv and BN model_i_3 / model_i_4 (the stem's
are model_0_0 / model_0_1); its `fc` is the zoo's `classifier`. AvgPool 7 on the 7x7 map is the
global mean, and GenDD flattens it to 1024 values per image: the network takes 224x224 inputs (a
last map other than 7x7 is refused).
"""
from typing import ClassVar, Sequence

import flax.linen as nn

from models.zoo.base import ZooNet, register_model
from models.zoo.resnet_imagenet import IMAGENET_DATA_NAME, IMAGENET_MEAN, IMAGENET_STD

# (output channels, stride) of the 13 depthwise-separable blocks.
SEPARABLE_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                    (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(ZooNet):
    pixel_mean: Sequence[float] = IMAGENET_MEAN
    pixel_std: Sequence[float] = IMAGENET_STD

    input_size: ClassVar[int] = 224  # the only size its AvgPool 7 accepts (checkpoint shape checks)
    default_data_name: ClassVar[str] = IMAGENET_DATA_NAME  # the converter's default --data_name

    @nn.compact
    def __call__(self, images, train: bool = False, return_features: bool = False):
        x = self.conv(32, 3, "model_0_0", stride=2)(self.standardize(images))
        x = nn.relu(self.batch_norm(train, "model_0_1")(x))
        for index, (channels, stride) in enumerate(SEPARABLE_BLOCKS, start=1):
            name = f"model_{index}"
            x = self.conv(x.shape[-1], 3, f"{name}_0", stride, groups=x.shape[-1])(x)
            x = nn.relu(self.batch_norm(train, f"{name}_1")(x))
            x = nn.relu(self.batch_norm(train, f"{name}_4")(self.conv(channels, 1, f"{name}_3")(x)))
        if x.shape[1:3] != (7, 7):
            raise ValueError(f"GenDD's MobileNetV1 takes 224x224 images (AvgPool 7 on a 7x7 map); images "
                             f"of {images.shape[1]}x{images.shape[2]} give a {x.shape[1]}x{x.shape[2]} map")
        return self.classify(x, return_features)


register_model("mobilenetv1", aliases=("MobileNetV1",))(MobileNetV1)
