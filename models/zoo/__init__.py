"""RepDistiller/CRD's CIFAR model zoo (the teachers and students GenDD distills between) in Flax.

    from models.zoo import build_model
    model = build_model("resnet32x4", num_classes=100)        # or wrn_40_2, vgg13_bn, ShuffleV2, ...
    logits = model.apply(variables, images)                   # images float in [0, 1], NHWC

Every network has the call signature and outputs of models.resnet.ResNet and PyTorch's eval-mode
numerics, so a checkpoint converted with `python -m utils.convert torch` (or a network trained
here) is a "resnet" export that loads wherever one does: models.resnet.resnet_from_spec builds
it from the spec's "arch". A new family registers its names with `register_model`.
"""
from models.zoo.base import (CIFAR100_MEAN, CIFAR100_STD, ZooNet, build_model, canonical_arch,
                             model_names, register_model, variable_shapes, zoo_from_spec, zoo_spec)
# The families register themselves on import.
from models.zoo import resnet_cifar, wrn, vgg, mobilenetv2, shufflenet  # noqa: F401,E402
# torchvision's ImageNet ResNets/ResNeXts and GenDD's ImageNet MobileNetV1.
from models.zoo import resnet_imagenet, mobilenetv1  # noqa: F401,E402
# GenDD's BEiT-v2 ImageNet teachers (ViT-B/16, ViT-L/16).
from models.zoo import beit  # noqa: F401,E402

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "ZooNet", "build_model", "canonical_arch", "model_names",
           "register_model", "variable_shapes", "zoo_from_spec", "zoo_spec"]
